"""``rlzoo bench``: a controlled comparison of strategies, one ``rlzoo train`` run per (strategy, seed).

Controlled means every run gets the same task, base policy, config files, bindings and budget; only
``--algo`` and ``--seed`` differ (prompt order and evaluation sets follow from the seed and the config, so
the strategies of one seed see the same ones). Each run is its own process (gin's state is global), so a
run that finished is skipped and one that was interrupted resumes by issuing the very same command again.

The bench folder::

    OUT/
      bench.json                the plan; a different plan on the same OUT is refused. "sessions" logs each invocation
      runs/<algo>-seed<s>/      run folders, as rlzoo/runs.py documents them
      logs/<algo>-seed<s>.log   each run's stdout and stderr (appended across resumes)
      leaderboard/              rlzoo.leaderboard's output over the runs (or --leaderboard DIR)

Wall-clock is a measure the leaderboard compares, so runs that share the machine (``--jobs`` > 1) each get
cores // jobs threads, and the thread count is logged in bench.json.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rlzoo.errors import UserError
from rlzoo.runs import read_run

DEFAULT_POLICY_TASKS = ("arith",)  # the built-in default policy is pretrained on these tasks only
BUDGET_KINDS = ("iterations", "episodes", "seconds")
POLL_SECONDS = 0.5


# --------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class BenchPlan:
    algos: tuple[str, ...]
    task: str
    model: str  # "default" (the built-in policy) or a model folder / id
    seeds: tuple[int, ...]
    budget: str | None  # "iterations=N" | "episodes=N" | "seconds=N"; None: what the config says
    configs: tuple[str, ...]  # absolute paths of the gin files, in order
    config_sha256: tuple[str, ...]  # their contents: an edited file is a different plan
    bindings: tuple[str, ...]  # --set key=value, in order
    launcher: tuple[str, ...] = ()  # what runs "rlzoo.cli train ..." (default: this python -m); e.g. torchrun --nproc_per_node 4 -m

    def as_dict(self) -> dict:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return out if self.launcher else {k: v for k, v in out.items() if k != "launcher"}  # plans from before launchers read the same


@dataclass
class PlannedRun:
    name: str  # "<algo>-seed<seed>"
    algo: str
    seed: int
    run_dir: Path
    command: list[str]  # the same command starts and resumes the run


def parse_budget(text: str | None) -> str | None:
    """Canonical ``kind=N`` for ``iterations=N``, ``episodes=N`` or ``seconds=N`` (N > 0)."""
    if text is None:
        return None
    kind, _, value = text.partition("=")
    kind = kind.strip()
    try:
        number = float(value) if kind == "seconds" else int(value)
    except ValueError:
        number = None
    if kind not in BUDGET_KINDS or number is None or number <= 0:
        raise UserError(f"bad --budget {text!r}; expected iterations=N, episodes=N or seconds=N with N > 0")
    return f"{kind}={number:g}" if kind == "seconds" else f"{kind}={number}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_plan(algos: str | list[str], task: str, model: str = "default", seeds: int = 3, budget: str | None = None,
              configs: list[str | Path] = (), bindings: list[str] = (), launcher: str | None = None) -> BenchPlan:
    """Validate the bench options (one-line UserError for each mistake) and return the plan."""
    launch = tuple(shlex.split(launcher)) if launcher else ()
    if launch and launch[-1] not in ("-m", "--module"):
        raise UserError(f"--launcher {launcher!r} must end with the flag that runs a module, e.g. "
                        "'torchrun --nproc_per_node 4 -m' or 'deepspeed --num_gpus 4 --module'")
    names = [a.strip() for a in algos.split(",")] if isinstance(algos, str) else [a.strip() for a in algos]
    names = [a for a in names if a]
    if not names:
        raise UserError("--algos names no strategy; e.g. --algos vineppo,ppo,grpo,rloo")
    if len(set(names)) < len(names):
        raise UserError(f"--algos names a strategy twice ({','.join(names)}); name each once")
    if model == "default" and task not in DEFAULT_POLICY_TASKS:
        raise UserError(f"the built-in default policy only knows {', '.join(DEFAULT_POLICY_TASKS)}; "
                        f"for --task {task} pass --model PATH (a causal LM folder)")
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: need at least 1 (3 or more for confidence intervals)")
    paths = [Path(c).expanduser() for c in configs]
    for p in paths:
        if not p.is_file():
            raise UserError(f"config file {p} not found; pass a gin file, e.g. --config benchmarks/quick.gin")
    for b in bindings:
        if "=" not in b:
            raise UserError(f"bad --set {b!r}; expected binding=value, e.g. --set ppo.learning_rate=1e-5")
    canonical_budget = parse_budget(budget)
    if model != "default" and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())

    from rlzoo.algorithms import ESTIMATORS
    from rlzoo.tasks import TASKS

    unknown = [a for a in names if a not in ESTIMATORS]
    if unknown:
        raise UserError(f"unknown strategy {', '.join(map(repr, unknown))}; known: {', '.join(ESTIMATORS.names())}")
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; known: {', '.join(TASKS.names())}")
    return BenchPlan(
        algos=tuple(names),
        task=task,
        model=model,
        seeds=tuple(range(seeds)),
        budget=canonical_budget,
        configs=tuple(str(p.resolve()) for p in paths),
        config_sha256=tuple(_sha256(p) for p in paths),
        bindings=tuple(bindings),
        launcher=launch,
    )


def plan_runs(plan: BenchPlan, out: Path) -> list[PlannedRun]:
    """One run per (strategy, seed), seeds outermost so that with --jobs 1 every strategy gets a seed early."""
    out = Path(out).resolve()
    runs = []
    for seed in plan.seeds:
        for algo in plan.algos:
            run_dir = out / "runs" / f"{algo}-seed{seed}"
            cmd = [*(plan.launcher or (sys.executable, "-m")), "rlzoo.cli", "train", "--algo", algo, "--task", plan.task, "--model", plan.model,
                   "--seed", str(seed), "--out", str(run_dir)]
            for c in plan.configs:
                cmd += ["--config", c]
            for b in plan.bindings:
                cmd += ["--set", b]
            if plan.budget:
                cmd += ["--budget", plan.budget]
            runs.append(PlannedRun(f"{algo}-seed{seed}", algo, seed, run_dir, cmd))
    return runs


def check_plan(plan: BenchPlan, out: Path) -> dict:
    """Write OUT/bench.json, or refuse if it holds a different plan. Returns its contents."""
    path = Path(out) / "bench.json"
    if not path.exists():
        return {"format": 1, "plan": plan.as_dict(), "sessions": []}
    try:
        saved = json.loads(path.read_text())
        old = saved["plan"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is not a bench plan; use another --out")
    new = plan.as_dict()
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        what = "; ".join("config file contents changed" if k == "config_sha256" else f"{k}: {old.get(k)} -> {new[k]}"
                         for k in changed)
        raise UserError(f"{out} holds a bench with another plan ({what}); repeat its options to resume it, or use another --out")
    return saved


def bench_command(plan: BenchPlan, out: Path, jobs: int, leaderboard: Path | None) -> str:
    """The command line that reproduces (and resumes) this bench."""

    def show(p):  # paths under the working directory are shown relative to it
        try:
            return str(Path(p).relative_to(Path.cwd()))
        except ValueError:
            return str(p)

    args = ["rlzoo", "bench", "--algos", ",".join(plan.algos), "--task", plan.task, "--model", show(plan.model),
            "--seeds", str(len(plan.seeds))]
    if plan.budget:
        args += ["--budget", plan.budget]
    for c in plan.configs:
        args += ["--config", show(c)]
    for b in plan.bindings:
        args += ["--set", b]
    if plan.launcher:
        args += ["--launcher", shlex.join(plan.launcher)]
    args += ["--out", show(Path(out).resolve()), "--jobs", str(jobs)]
    if leaderboard:
        args += ["--leaderboard", show(Path(leaderboard).resolve())]
    return shlex.join(args)


# --------------------------------------------------------------------------------------------------
# Following runs


class RunWatch:
    """Follows a run's metrics.jsonl as it grows, reading only the new bytes each poll."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.reset()

    def reset(self) -> None:
        self.offset = 0
        self.partial = b""  # an unfinished last line, completed by a later poll
        self.last: dict = {}  # latest record of any kind
        self.last_train: dict = {}
        self.last_eval: dict = {}

    def poll(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:  # the file was rewritten (e.g. a resume rewound it): read it again
            self.reset()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.last = record
            if record.get("kind") == "train":
                self.last_train = record
            elif record.get("kind") == "eval":
                self.last_eval = record


def progress(record: dict, budget: dict | None) -> float | None:
    """Fraction of the run's budget (run.json "budget": limits by kind, 0 for none) that ``record`` shows
    done: the run stops at the first limit it meets, so the largest fraction."""
    keys = {"iterations": "iteration", "episodes": "episodes", "seconds": "time/train_total"}
    done = [float(record[keys[k]]) / float(total) for k, total in (budget or {}).items()
            if k in keys and total and keys[k] in record]
    return min(1.0, max(done)) if done else None


@dataclass
class RunState:
    run: PlannedRun
    state: str = "queued"
    proc: subprocess.Popen | None = None
    log: object = None
    watch: RunWatch | None = None
    budget: dict | None = None
    first_progress: tuple[float, float] | None = None  # (progress, wall time) when first seen: the ETA's origin
    eta: float | None = None

    def refresh(self) -> None:
        self.watch.poll()
        if self.budget is None:
            self.budget = read_run(self.run.run_dir).get("budget")
        p = progress(self.watch.last, self.budget)
        if p is None:
            return
        now = time.monotonic()
        if self.first_progress is None:
            self.first_progress = (p, now)
        p0, t0 = self.first_progress
        self.eta = (1 - p) * (now - t0) / (p - p0) if p > p0 else None


def _fmt(v, fmt: str) -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "–"


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def render(states: list[RunState], title: str):
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("run", "state", "iter", "episodes", "reward", "test", "train s", "ETA"):
        table.add_column(col, justify="left" if col in ("run", "state") else "right", no_wrap=True)
    for st in states:
        last = st.watch.last if st.watch else {}
        test = (st.watch.last_eval if st.watch else {}).get("eval/test/pass@1")
        reward = (st.watch.last_train if st.watch else {}).get("reward/mean")
        style = {"running": "bold", "resuming": "bold", "finished": "green", "skipped": "dim"}.get(st.state, "red" if st.state.startswith("failed") else "")
        iterations = (st.budget or {}).get("iterations")
        iteration = _fmt(last.get("iteration"), "{}") + (f"/{iterations}" if iterations and iterations < 10**8 else "")
        table.add_row(st.run.name, st.state, iteration, _fmt(last.get("episodes"), "{}"),
                      _fmt(reward, "{:.3f}"), _fmt(test, "{:.1%}"), _fmt(last.get("time/train_total"), "{:.0f}"),
                      _eta(st.eta) if st.state in ("running", "resuming") else "", style=style)
    return table


# --------------------------------------------------------------------------------------------------
# Running


def _stop_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM (which train treats like Ctrl-C) when the bench dies,
    even by SIGKILL, so that no run goes on unwatched and a re-run bench never trains a run twice at once."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # loaded before fork, used after


@dataclass
class BenchResult:
    states: dict[str, str]  # run name -> final state
    unfinished: list[str] = field(default_factory=list)  # names of runs that failed or were interrupted
    leaderboard: Path | None = None
    logs: Path | None = None


def _last_error_line(log_path: Path) -> str:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("rlzoo: error:")]
    return (errors or lines or ["(no output)"])[-1].removeprefix("rlzoo: error: ")


def _stop(states: list[RunState], console) -> None:
    """Ask every running run to stop as ``rlzoo train`` understands Ctrl-C: the first SIGINT finishes the
    iteration, saves and exits; a second stops at once. Another Ctrl-C here sends that second one, a third kills."""
    for sig, note in ((signal.SIGINT, None), (signal.SIGINT, "stopping now"), (signal.SIGKILL, "killing the runs")):
        if note:
            console.print(note)
        running = [st for st in states if st.proc and st.proc.poll() is None]
        for st in running:
            st.proc.send_signal(sig)
        try:
            for st in running:
                st.proc.wait()
            break
        except KeyboardInterrupt:
            if sig == signal.SIGKILL:
                raise
    for st in states:
        if st.proc and st.state in ("running", "resuming"):
            st.state = "interrupted"


def run_bench(plan: BenchPlan, out: Path, jobs: int = 1, leaderboard: Path | None = None, console=None) -> BenchResult:
    """Run (or resume) every planned run, ``jobs`` at a time, showing a live table; then write the leaderboard."""
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: need at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".bench.lock", "w") as lock:  # two benches on one folder would run each run twice
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another rlzoo bench is running on {out}; wait for it or use another --out") from None
        return _run_bench_locked(plan, out, jobs, leaderboard, console)


def _run_bench_locked(plan: BenchPlan, out: Path, jobs: int, leaderboard: Path | None, console) -> BenchResult:
    from rich.console import Console
    from rich.live import Live

    console = console or Console(stderr=True)
    saved = check_plan(plan, out)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # a user's own setting wins
        env.setdefault(var, str(max(1, (os.cpu_count() or 1) // jobs)))
    command = bench_command(plan, out, jobs, leaderboard)
    saved["sessions"].append({"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
                              "jobs": jobs, "omp_num_threads": env["OMP_NUM_THREADS"]})
    (out / "bench.json").write_text(json.dumps(saved, indent=2))
    (out / "logs").mkdir(exist_ok=True)

    states = [RunState(r, watch=RunWatch(r.run_dir)) for r in plan_runs(plan, out)]
    for st in states:
        if read_run(st.run.run_dir).get("status") == "finished":
            st.state = "skipped"
        st.refresh()
    queue = [st for st in states if st.state == "queued"]
    title = f"rlzoo bench {out}: {len(states)} runs, {len(states) - len(queue)} finished before, --jobs {jobs}"

    # The built-in policy is built on first use and cached: the first run launched builds it (if it is
    # not cached yet) while the others wait, instead of every run building it at once.
    gate: dict = {"open": plan.model != "default", "run": None, "since": 0.0}

    def gate_open() -> bool:
        if not gate["open"] and gate["run"] is not None:
            st = gate["run"]
            run_json = st.run.run_dir / "run.json"  # train (re)writes it once the policy is loaded
            gate["open"] = st.proc.poll() is not None or (run_json.exists() and run_json.stat().st_mtime >= gate["since"])
        return gate["open"] or gate["run"] is None

    def launch(st: RunState) -> None:
        if gate["run"] is None:
            gate["run"], gate["since"] = st, time.time() - 1  # 1 s slack for coarse file-system clocks
        st.state = "resuming" if (st.run.run_dir / "run.json").exists() else "running"
        st.first_progress = None  # the ETA measures this process's pace
        st.run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        st.log = open(out / "logs" / f"{st.run.name}.log", "a")
        st.log.write(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')} {shlex.join(st.run.command)}\n")
        st.log.flush()
        # Its own session: a Ctrl-C at the terminal reaches only the bench, which passes it on once (see _stop).
        st.proc = subprocess.Popen(st.run.command, stdout=st.log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, preexec_fn=_stop_with_parent)

    def reap(st: RunState, rc: int) -> None:
        st.log.close()
        st.refresh()
        status = read_run(st.run.run_dir).get("status")
        if rc == 0 and status == "finished":
            st.state = "finished"
        elif rc == 130:  # stopped by Ctrl-C after saving a checkpoint
            st.state = "interrupted"
        else:
            st.state = f"failed (exit {rc})" if rc else f"failed (exit 0, status {status})"
        console.print(f"{st.run.name}: {st.state}" + ("" if st.state == "finished" else f"; log: {out / 'logs' / (st.run.name + '.log')}"))
        if rc == 2:  # a user error (bad binding, model path...): every run would hit it; stop and say it once
            _stop(states, console)
            raise UserError(f"{st.run.name}: {_last_error_line(out / 'logs' / f'{st.run.name}.log')}")

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    old_handler = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        with Live(render(states, title), console=console, refresh_per_second=2) as live:
            try:
                while True:
                    running = [st for st in states if st.state in ("running", "resuming")]
                    while queue and len(running) < jobs and gate_open():
                        launch(queue[0])
                        running.append(queue.pop(0))
                    if not running:
                        break
                    for st in running:
                        st.refresh()
                        rc = st.proc.poll()
                        if rc is not None:
                            reap(st, rc)
                    live.update(render(states, title))
                    time.sleep(POLL_SECONDS)
            except KeyboardInterrupt:
                console.print("interrupted: running runs finish their iteration and save (Ctrl-C again: stop now); "
                              "re-run the same command to resume")
                _stop(states, console)
                live.update(render(states, title))
                raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if not console.is_terminal:  # Live's last render ends without a newline there
            console.line()

    result = BenchResult(states={st.run.name: st.state for st in states},
                         unfinished=[st.run.name for st in states if st.state.startswith(("failed", "interrupted"))],
                         logs=out / "logs")
    notes = [f"{jobs} runs at a time, OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each"]
    result.leaderboard = _write_leaderboard(states, Path(leaderboard) if leaderboard else out / "leaderboard", command, notes, console)
    return result


def _write_leaderboard(states: list[RunState], out: Path, command: str, notes: list[str], console) -> Path | None:
    from rlzoo.leaderboard import load_run, write_leaderboard

    runs = [load_run(st.run.run_dir) for st in states if (st.run.run_dir / "run.json").exists()]
    if not runs:
        console.print("no run started: no leaderboard")
        return None
    try:
        write_leaderboard(runs, out, command=command, notes=notes)
    except UserError as e:
        console.print(f"no leaderboard: {e}")
        return None
    console.print(f"leaderboard: {out / 'README.md'} and {out / 'index.html'}")
    return out
