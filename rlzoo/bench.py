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
      tune/<algo>/<setting>/seed<k>/   with --sweep: the tuning runs (logs under logs/tune/...)
      leaderboard/              rlzoo.leaderboard's output over the runs (or --leaderboard DIR)

Wall-clock is a measure the leaderboard compares, so runs that share the machine (``--jobs`` > 1) each get
cores // jobs threads, and the thread count is logged in bench.json. The built-in base policy, if the plan
uses it, is built (or found cached) by the bench itself, on every core (``build_threads``), before any run
starts: the runs only load it.

A tuning sweep (``--sweep train.lr=1e-5,3e-5,1e-4``, repeatable: the grid is the cartesian product) gives every
strategy the same grid and the same tuning seeds (counted from TUNE_SEED_BASE, never an evaluation seed). Each
(strategy, setting, tuning seed) is an ordinary run folder under tune/; a strategy's pick is the setting with the
best final *train* accuracy (rlzoo.leaderboard.summarize_tuning: never test accuracy), re-derived from those
folders on every invocation, and its evaluation runs under runs/ are the plan's runs plus the picked bindings.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import itertools
import json
import os
import re
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
from rlzoo.runs import check_out_dir, read_run

BUDGET_KINDS = ("iterations", "episodes", "seconds")
POLL_SECONDS = 0.5
TUNE_SEED_BASE = 1000  # tuning seeds are 1000, 1001, ...: a pick is never judged on the seeds that evaluate it
BENCH_BINDINGS = ("train.algo", "train.task", "train.model", "train.seed")  # the bench sets these per run
BUDGET_BINDINGS = ("train.iterations", "train.max_episodes", "train.max_seconds")  # --budget sets these, over any --set


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
    sweep: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (binding, its values) per --sweep; the grid is their product
    tune_seeds: int = 0  # tuning runs per (strategy, setting); 0 without a sweep

    def as_dict(self) -> dict:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        out["sweep"] = [[name, list(values)] for name, values in self.sweep]  # as bench.json holds it, so a resume compares equal
        # Plans from before launchers and sweeps read the same.
        return {k: v for k, v in out.items() if v or k not in ("launcher", "sweep", "tune_seeds")}


@dataclass
class PlannedRun:
    name: str  # "<algo>-seed<seed>", or "tune/<algo>/<setting>/seed<k>" for a tuning run
    algo: str
    seed: int
    run_dir: Path
    command: list[str]  # the same command starts and resumes the run
    setting: tuple[str, ...] = ()  # the sweep's bindings this run adds to the plan's ("train.lr=3e-5", ...)


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


def budget_bindings(text: str | None) -> list[str]:
    """The gin bindings a ``--budget`` sets: ``train.iterations = N``, or the episode or seconds limit with no
    iteration limit. ``rlzoo train`` and the bench's up-front checks read a budget through this one place."""
    canonical = parse_budget(text)
    if canonical is None:
        return []
    kind, _, value = canonical.partition("=")
    binding = f"{BUDGET_BINDINGS[BUDGET_KINDS.index(kind)]} = {value}"
    return [binding] if kind == "iterations" else [binding, "train.iterations = 1000000000"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _split_values(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes, so that a value may be a tuple or a list:
    ``(0.9, 0.99),(0.9, 0.999)`` is two values."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [part.strip() for part in [*parts, text[start:]]]


def parse_sweep(options: list[str], configs: list[str | Path] = (), bindings: list[str] = (), budget: str | None = None
                ) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``--sweep binding=v1,v2,...`` options -> ((binding, (v1, v2, ...)), ...). Every value is checked the way
    ``--set binding=value`` is (gin, over ``configs`` and ``bindings``); each mistake is a one-line UserError."""
    from rlzoo.config import apply_gin

    example = "e.g. --sweep train.lr=1e-5,3e-5,1e-4"
    sweep: list[tuple[str, tuple[str, ...]]] = []
    set_names = {b.partition("=")[0].strip() for b in bindings}
    for option in options:
        name, eq, text = option.partition("=")
        name = name.strip()
        values = _split_values(text) if eq else []
        if not name or not eq:
            raise UserError(f"bad --sweep {option!r}; expected binding=value,value,..., {example}")
        if values == [""]:
            raise UserError(f"--sweep {option!r} gives {name} an empty grid; list its values, {example}")
        if "" in values:
            raise UserError(f"--sweep {option!r} has an empty value; separate the values with single commas, {example}")
        if len(set(values)) < len(values):
            raise UserError(f"--sweep {option!r} lists a value twice; list each once")
        if name in (n for n, _ in sweep):
            raise UserError(f"--sweep names {name} twice; give all its values in one --sweep {name}=v1,v2,...")
        if name in BENCH_BINDINGS or (budget and name in BUDGET_BINDINGS):
            raise UserError(f"--sweep {name}: the bench sets {name} itself" + (" (from --budget)" if name in BUDGET_BINDINGS else "")
                            + "; sweep another binding")
        if name in set_names:
            raise UserError(f"{name} is both swept (--sweep) and set (--set); drop one")
        for value in values:
            try:
                apply_gin(configs, [*bindings, f"{name}={value}"])
            except UserError as e:
                raise UserError(f"bad --sweep value {name}={value}: {str(e).removeprefix('bad gin binding: ')}") from None
        sweep.append((name, tuple(values)))
    return tuple(sweep)


def grid(plan: BenchPlan) -> list[tuple[str, ...]]:
    """The settings of the plan's sweep, each a tuple of bindings ("train.lr=1e-5", ...), in the order given."""
    if not plan.sweep:
        return []
    names = [name for name, _ in plan.sweep]
    return [tuple(f"{n}={v}" for n, v in zip(names, values)) for values in itertools.product(*(v for _, v in plan.sweep))]


def setting_slug(setting: tuple[str, ...]) -> str:
    """A folder name for a setting: its bindings, readable; a hash suffix where characters had to be replaced."""
    text = ",".join(setting)
    slug = re.sub(r"[^A-Za-z0-9._=+,-]", "_", text)
    if slug != text or len(slug) > 100:
        slug = f"{slug[:90]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    return slug


def make_plan(algos: str | list[str], task: str, model: str = "default", seeds: int = 3, budget: str | None = None,
              configs: list[str | Path] = (), bindings: list[str] = (), launcher: str | None = None,
              sweep: list[str] = (), tune_seeds: int = 1) -> BenchPlan:
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
    from rlzoo.policy import check_model_for_task

    check_model_for_task(model, task)
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: need at least 1 (3 or more for confidence intervals)")
    paths = [Path(c).expanduser() for c in configs]
    for p in paths:
        if not p.is_file():
            raise UserError(f"config file {p} not found; pass a gin file, e.g. --config benchmarks/quick.gin")
    for b in bindings:
        if "=" not in b:
            raise UserError(f"bad --set {b!r}; expected binding=value, e.g. --set train.lr=1e-5")
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
    if sweep and tune_seeds < 1:
        raise UserError(f"--tune-seeds {tune_seeds}: need at least 1")
    from rlzoo.config import apply_gin

    apply_gin(paths, bindings)  # a bad binding stops the bench here, not in every run
    swept = parse_sweep(sweep, paths, bindings, canonical_budget)
    plan = BenchPlan(
        algos=tuple(names),
        task=task,
        model=model,
        seeds=tuple(range(seeds)),
        budget=canonical_budget,
        configs=tuple(str(p.resolve()) for p in paths),
        config_sha256=tuple(_sha256(p) for p in paths),
        bindings=tuple(bindings),
        launcher=launch,
        sweep=swept,
        tune_seeds=tune_seeds if swept else 0,
    )
    check_runs(plan)
    return plan


def check_runs(plan: BenchPlan) -> None:
    """Build every run's config as its own ``rlzoo train`` will (rlzoo.train.check_config), for each strategy and
    setting, so that a value gin accepts but a run refuses (train.lr=-1, grpo.group_size=0, a missing --model) is
    one line before bench.json exists, not a failed run in a bench folder that then holds the wrong plan."""
    import gin

    from rlzoo.config import apply_gin
    from rlzoo.train import TrainConfig, check_config

    budget = budget_bindings(plan.budget)
    for setting in [(), *grid(plan)]:
        for algo in plan.algos:
            identity = [f"train.algo = {algo!r}", f"train.task = {plan.task!r}", f"train.model = {plan.model!r}"]
            apply_gin(plan.configs, [*plan.bindings, *setting, *budget, *(b.replace("'", '"') for b in identity)])
            try:
                check_config(TrainConfig())
            except UserError as e:
                raise UserError(f"--sweep setting {', '.join(setting)}: {e}" if setting else str(e)) from None
    gin.clear_config()


def _planned_run(plan: BenchPlan, name: str, algo: str, seed: int, run_dir: Path, setting: tuple[str, ...] = ()) -> PlannedRun:
    cmd = [*(plan.launcher or (sys.executable, "-m")), "rlzoo.cli", "train", "--algo", algo, "--task", plan.task, "--model", plan.model,
           "--seed", str(seed), "--out", str(run_dir)]
    for c in plan.configs:
        cmd += ["--config", c]
    for b in (*plan.bindings, *setting):
        cmd += ["--set", b]
    if plan.budget:
        cmd += ["--budget", plan.budget]
    return PlannedRun(name, algo, seed, run_dir, cmd, setting)


def plan_runs(plan: BenchPlan, out: Path, picks: dict[str, tuple[str, ...]] | None = None) -> list[PlannedRun]:
    """One run per (strategy, seed), seeds outermost so that with --jobs 1 every strategy gets a seed early.
    ``picks``: a strategy's tuned setting (bindings added to its runs), once its tuning runs decided it."""
    out = Path(out).resolve()
    return [_planned_run(plan, f"{algo}-seed{seed}", algo, seed, out / "runs" / f"{algo}-seed{seed}", (picks or {}).get(algo, ()))
            for seed in plan.seeds for algo in plan.algos]


def plan_tuning_runs(plan: BenchPlan, out: Path) -> list[PlannedRun]:
    """One run per (strategy, setting of the grid, tuning seed), strategy outermost so that the first strategy's
    evaluation runs can start while the others still tune."""
    out = Path(out).resolve()
    runs = []
    for algo in plan.algos:
        for setting in grid(plan):
            for seed in range(TUNE_SEED_BASE, TUNE_SEED_BASE + plan.tune_seeds):
                where = f"{algo}/{setting_slug(setting)}/seed{seed}"
                runs.append(_planned_run(plan, f"tune/{where}", algo, seed, out / "tune" / where, setting))
    return runs


def tuning_results(plan: BenchPlan, out: Path) -> dict:
    """Every strategy's train score per setting, its pick and the tuning's cost, from the tuning run folders."""
    from rlzoo.leaderboard import summarize_tuning

    runs: dict[str, dict[tuple[str, ...], list[Path]]] = {}
    for r in plan_tuning_runs(plan, out):
        runs.setdefault(r.algo, {}).setdefault(r.setting, []).append(r.run_dir)
    return summarize_tuning(grid(plan), runs, seeds=list(range(TUNE_SEED_BASE, TUNE_SEED_BASE + plan.tune_seeds)))


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
    changed = [k for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
    if changed:
        what = "; ".join("config file contents changed" if k == "config_sha256" else f"{k}: {old.get(k)} -> {new.get(k)}"
                         for k in changed)
        raise UserError(f"{out} holds a bench with another plan ({what}); repeat its options to resume it, or use another --out")
    return saved


def bench_command(plan: BenchPlan, out: Path, jobs: int, leaderboard: Path | None) -> str:
    """The command line that reproduces (and resumes) this bench. It goes into the leaderboard's provenance, so it
    names no machine's folders: a path given relative, or under the working folder, is shown from there (as typed);
    any other by its path from the leaderboard folder, as ``rlzoo.leaderboard.leaderboard_command`` shows paths."""
    board = Path(leaderboard or Path(out) / "leaderboard").resolve()

    def show(p):
        p = Path(p)
        if not p.is_absolute():  # as given (the plan keeps "default" and hub ids as given too)
            return str(p)
        try:
            return str(p.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return os.path.relpath(p.resolve(), board)

    args = ["rlzoo", "bench", "--algos", ",".join(plan.algos), "--task", plan.task, "--model", show(plan.model),
            "--seeds", str(len(plan.seeds))]
    if plan.budget:
        args += ["--budget", plan.budget]
    for c in plan.configs:
        args += ["--config", show(c)]
    for b in plan.bindings:
        args += ["--set", b]
    for name, values in plan.sweep:
        args += ["--sweep", f"{name}={','.join(values)}"]
    if plan.sweep:
        args += ["--tune-seeds", str(plan.tune_seeds)]
    if plan.launcher:
        args += ["--launcher", shlex.join(plan.launcher)]
    args += ["--out", show(out), "--jobs", str(jobs)]
    if leaderboard:
        args += ["--leaderboard", show(leaderboard)]
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
    check_out_dir(out, "--out")
    if leaderboard:
        check_out_dir(leaderboard, "--leaderboard")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".bench.lock", "w") as lock:  # two benches on one folder would run each run twice
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another rlzoo bench is running on {out}; wait for it or use another --out") from None
        return _run_bench_locked(plan, out, jobs, leaderboard, console)


def base_policies(plan: BenchPlan) -> list:
    """The pretrain configs (rlzoo.policy.PretrainConfig) of the built-in policies the plan's runs start from: one,
    unless the sweep binds ``pretrain.*``; none when the plan names its own model. Leaves gin's bindings cleared."""
    if plan.model != "default":
        return []
    import gin

    from rlzoo.config import apply_gin
    from rlzoo.policy import pretrain_config

    configs = {}
    for setting in [(), *grid(plan)]:
        apply_gin(plan.configs, [*plan.bindings, *setting])  # what each run's own `rlzoo train` will see
        cfg = pretrain_config()
        configs[json.dumps(asdict(cfg), sort_keys=True)] = cfg
    gin.clear_config()
    return list(configs.values())


def build_threads() -> int:
    """Threads for building the base policy: every core, unless the user set OMP_NUM_THREADS (as for the runs, their
    setting wins: on a machine others load, two threads contending for two busy cores trained 4x slower than one)."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return os.cpu_count() or 1


def build_base_policies(plan: BenchPlan, console) -> None:
    """Build the plan's built-in policies that are not cached yet, here, on ``build_threads()`` threads, so that the
    runs only load them: left to the runs, each would build it on its one thread while the other job slots waited."""
    import torch

    from rlzoo.policy import policy_folder, pretrain

    missing = [cfg for cfg in base_policies(plan) if not (policy_folder(cfg) / "pretrain.json").is_file()]
    if not missing:
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(build_threads())
    try:
        for cfg in missing:
            console.print(f"building the base policy {policy_folder(cfg)} on {torch.get_num_threads()} threads (once; cached after)")
            pretrain(cfg)
    finally:
        torch.set_num_threads(threads)


TUNING_DONE = ("finished", "skipped", "diverged")  # a tuning run in one of these states has its result


def run_env(jobs: int) -> dict[str, str]:
    """The environment of a bench's runs: cores // jobs threads each (OpenMP and MKL alike; a user's own setting wins).
    Float results are bit-identical between runs only at the same thread counts: a run started by hand reproduces a
    bench's run under this environment."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def _run_bench_locked(plan: BenchPlan, out: Path, jobs: int, leaderboard: Path | None, console) -> BenchResult:
    from rich.console import Console
    from rich.live import Live

    console = console or Console(stderr=True)
    saved = check_plan(plan, out)
    env = run_env(jobs)
    command = bench_command(plan, out, jobs, leaderboard)
    saved["sessions"].append({"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
                              "jobs": jobs, "omp_num_threads": env["OMP_NUM_THREADS"]})
    (out / "bench.json").write_text(json.dumps(saved, indent=2))
    (out / "logs").mkdir(exist_ok=True)

    # Tuning runs first; a strategy's evaluation runs wait for its tuning runs, which decide their setting.
    tuning = [RunState(r, watch=RunWatch(r.run_dir)) for r in plan_tuning_runs(plan, out)]
    finals = [RunState(r, watch=RunWatch(r.run_dir)) for r in plan_runs(plan, out)]
    states = tuning + finals
    for st in tuning:
        status = read_run(st.run.run_dir).get("status")
        # A diverged tuning run (train recorded the failure) is a result: its setting is out of the running.
        st.state = {"finished": "skipped", "failed": "diverged"}.get(status, "queued")
    for st in finals:
        if read_run(st.run.run_dir).get("status") == "finished":
            st.state = "skipped"
        elif plan.sweep:
            st.state = "awaits tuning"
    for st in states:
        st.refresh()
    tuning_ids = {id(st) for st in tuning}
    queue = [st for st in states if st.state == "queued"]
    waiting = {st.run.algo for st in finals if st.state == "awaits tuning"}
    title = (f"rlzoo bench {out}: {len(states)} runs" + (f" ({len(tuning)} tuning)" if tuning else "")
             + f", {sum(st.state in ('skipped', 'diverged') for st in states)} finished before, --jobs {jobs}")

    def release() -> None:
        """Plan the evaluation runs of every strategy whose tuning runs are all done, with its pick."""
        done = [a for a in sorted(waiting) if all(st.state in TUNING_DONE for st in tuning if st.run.algo == a)]
        if not done:
            return
        picks = tuning_results(plan, out)["strategies"]
        planned = {r.name: r for r in plan_runs(plan, out, {a: tuple(picks[a]["pick"] or ()) for a in done})}
        for algo in done:
            waiting.discard(algo)
            pick = picks[algo]["pick"]
            if pick is None:
                console.print(f"{algo}: every setting of the sweep diverged or was not run; its evaluation runs are left out")
            else:
                console.print(f"{algo}: tuned; picked {', '.join(pick)} by final train accuracy")
            for st in finals:
                if st.run.algo == algo and st.state == "awaits tuning":
                    st.run = planned[st.run.name]
                    st.state = "queued" if pick is not None else "untuned"
                    if pick is not None:
                        queue.append(st)

    def launch(st: RunState) -> None:
        st.state = "resuming" if (st.run.run_dir / "run.json").exists() else "running"
        st.first_progress = None  # the ETA measures this process's pace
        st.run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = out / "logs" / f"{st.run.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        st.log = open(log_path, "a")
        st.log.write(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')} {shlex.join(st.run.command)}\n")
        st.log.flush()
        # Its own session: a Ctrl-C at the terminal reaches only the bench, which passes it on once (see _stop).
        st.proc = subprocess.Popen(st.run.command, stdout=st.log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, preexec_fn=_stop_with_parent)

    def reap(st: RunState, rc: int) -> None:
        st.log.close()
        st.refresh()
        status = read_run(st.run.run_dir).get("status")
        diverged = rc == 2 and status == "failed"  # train's own verdict (non-finite loss), not a mistake in the options
        if rc == 0 and status == "finished":
            st.state = "finished"
        elif rc == 130:  # stopped by Ctrl-C after saving a checkpoint
            st.state = "interrupted"
        elif diverged and id(st) in tuning_ids:
            st.state = "diverged"
        else:
            st.state = f"failed (exit {rc})" if rc else f"failed (exit 0, status {status})"
        log = out / "logs" / f"{st.run.name}.log"
        console.print(f"{st.run.name}: {st.state}" + ("" if st.state == "finished" else f"; log: {log}"))
        if rc == 2 and not diverged:  # a user error (bad binding, model path...): every run would hit it; stop and say it once
            _stop(states, console)
            raise UserError(f"{st.run.name}: {_last_error_line(log)}")

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    old_handler = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        if queue or waiting:
            build_base_policies(plan, console)
        with Live(render(states, title), console=console, refresh_per_second=2) as live:
            try:
                reaped = True
                while True:
                    if reaped:
                        release()
                        reaped = False
                    running = [st for st in states if st.state in ("running", "resuming")]
                    while queue and len(running) < jobs:
                        launch(queue[0])
                        running.append(queue.pop(0))
                    if not running:
                        break
                    for st in running:
                        st.refresh()
                        rc = st.proc.poll()
                        if rc is not None:
                            reap(st, rc)
                            reaped = True
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
                         unfinished=[st.run.name for st in states if st.state.startswith(("failed", "interrupted", "awaits", "untuned"))],
                         logs=out / "logs")
    notes = [f"{jobs} runs at a time, OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each"]
    result.leaderboard = _write_leaderboard(finals, Path(leaderboard) if leaderboard else out / "leaderboard", command, notes, console,
                                            tuning=tuning_results(plan, out) if plan.sweep else None)
    return result


def _write_leaderboard(states: list[RunState], out: Path, command: str, notes: list[str], console, tuning: dict | None = None) -> Path | None:
    from rlzoo.audit import leaderboard_sections
    from rlzoo.leaderboard import write_leaderboard
    from rlzoo.runs import load_run

    runs = [load_run(st.run.run_dir) for st in states if (st.run.run_dir / "run.json").exists()]
    if not runs:
        console.print("no run started: no leaderboard")
        return None
    try:
        # An audit written into the leaderboard folder (`rlzoo audit --out OUT/leaderboard/audit`) joins its page.
        write_leaderboard(runs, out, command=command, notes=notes, tuning=tuning, sections=leaderboard_sections(out))
    except UserError as e:
        console.print(f"no leaderboard: {e}")
        return None
    console.print(f"leaderboard: {out / 'README.md'} and {out / 'index.html'}")
    return out
