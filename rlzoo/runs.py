"""The run folder: the only interface between ``rlzoo train``, ``rlzoo bench`` and ``rlzoo leaderboard``, its
format, and reading it (``load_run``, ``find_runs``: what the leaderboard and the bench read).

A run folder holds one training run (one strategy, one task, one seed)::

    RUN/
      run.json          identity, written at start: {"format": 1, "algo", "task", "model", "seed",
                        "budget": {"iterations"|"episodes"|"seconds": N}, "rlzoo_version",
                        "command", "started", "dropped_problems": {split: N} (problems whose prompt leaves too
                        little of the model's context for a response, left out; ``rlzoo.tasks.fit_to_context``),
                        "prompt_tokenization_mismatch": {"sampled", "alone", "joint"} (fractions of train prompts
                        that tokenize differently from the start of prompt + target; ``tokenization_mismatch``),
                        "model_sha256" (``policy.weights_digest`` of the weights the run started from)};
                        "status" is "running" | "finished" | "failed"
      config.gin        the operative gin config (every binding that took effect)
      metrics.jsonl     one JSON object per line, appended and flushed per record (see below)
      tb/               TensorBoard events (same scalars)
      checkpoints/      iter_NNNNNN/ folders (policy.safetensors, state.pt, ...); "latest" names the newest
      .lock             held (flock) by the one process training in the folder (``owned``)

Every metrics record has ``"kind"`` ("train" or "eval"), ``"iteration"`` (0-based count of updates
done), ``"episodes"`` (responses trained on so far), ``"time/train_total"`` (seconds of training so
far, evaluation excluded: the wall-clock that comparisons use) and ``"flops/total"`` (estimated FLOPs
of training so far, evaluation excluded: the budget that a busy machine does not distort). Train
records add ``reward/mean``; ``time/<stage>``: seconds of this iteration per stage (generation, reward,
logprobs, mc, baseline, advantages, critic, update) and ``time/iteration`` their total;
``flops/<stage>``: this iteration's estimated FLOPs per stage that runs a model (generation: prefill +
decode of the rollouts; logprobs: old and reference log-probs; mc, baseline: an estimator's extra
rollouts, prefill + decode; advantages: the forward of a critic the estimator owns; critic: its
update; update: the PPO epochs), stages with none left out; ``flops/total`` is cumulative over the
run, resumes included. The estimate (``rlzoo.train.estimated_flops``) is 2·N per token position run
forward through a model of N parameters and 6·N forward + backward, over the positions actually
run, padding included; ``batch/tokens``: rows x padded length of the iteration's batch, the positions
of every pass over it (so ``flops/update`` = 6·N·batch/tokens·ppo.epochs). ``tokens/<purpose>``:
tokens generated so far (cumulative) by purpose (policy, mc, baseline) and ``tokens_iter/<purpose>``
this iteration's; ``kl/ref``, ``ppo/*``, ``loss/*``, ``credit/*``, ``memory/peak_rss_mb`` ... Eval records
add ``eval/<split>/pass@1``, ``eval/<split>/maj@<k>``, ``mean_response_tokens``, ``truncated`` and
``n_problems`` for ``split`` in ``train`` (a fixed subset of the train split) and the task's eval splits
(``test``, and ``ood_test`` for arith), and ``time/eval``. Every evaluation of a run samples the same
problems with the same seed (and so does every strategy's run with the same seed), so an unchanged
policy scores the same at every evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rlzoo.errors import UserError

FORMAT = 1


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record and flush it to disk, so a killed run loses nothing it reported."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write: everything before it stands
                break
            if not isinstance(record, dict):  # a cut that happens to parse (a bare number)
                break
            records.append(record)
    return records


@contextlib.contextmanager
def owned(run_dir: Path, hold: bool = True):
    """Within: this process owns ``run_dir`` (an exclusive flock on RUN/.lock), and no other process trains in it.
    A second one waits here until the owner has stopped (a killed bench's orphaned run saves and exits on its
    SIGTERM); the kernel drops the lock with its holder, kill -9 included. ``hold`` False (a rank that does not
    write the folder): a no-op."""
    if not hold:
        yield
        return
    import fcntl

    with open(Path(run_dir) / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"rlzoo: another process is training in {run_dir}; waiting for it to stop", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def check_out_dir(path: Path, what: str = "--out") -> None:
    """Refuse an output folder that is a file or lies under one, before any work whose results it would hold."""
    for folder in [Path(path), *Path(path).parents]:
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"{what} {path}: {folder} is a file, not a folder; pick another path")
            return


def read_run(run_dir: Path) -> dict:
    """run.json of a run folder (empty dict if absent)."""
    p = Path(run_dir) / "run.json"
    if not p.exists():
        return {}
    try:
        info = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid JSON ({e}); fix it, or delete {run_dir} to start over") from None
    if not isinstance(info, dict):
        raise UserError(f"{p} is not a run.json (not a JSON object); fix it, or delete {run_dir} to start over")
    return info


def load_torch_file(path: Path) -> dict:
    """A checkpoint's torch file (state.pt, NAME.optim.pt) as tensors and plain values, never unpickling
    anything else: a run folder may come from someone else, and a pickled object runs code as it loads."""
    import torch

    try:
        return torch.load(path, weights_only=True)
    except Exception:  # UnpicklingError for a foreign object or garbage; RuntimeError, EOFError ... for a cut file
        raise UserError(f"{path} is not a checkpoint rlzoo wrote: it is corrupt, or holds objects other than tensors "
                        "and plain values, refused because loading them could run code; delete its checkpoint "
                        "folder to resume from an earlier one") from None


def write_run(run_dir: Path, info: dict) -> None:
    p = Path(run_dir) / "run.json"
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, p)


# ----------------------------------------------------------------------------- reading run folders


@dataclass
class Run:
    path: Path
    info: dict  # run.json
    evals: list[dict]  # eval records, in training order
    trains: list[dict]  # train records, in training order

    @property
    def algo(self) -> str:
        return self.info["algo"]

    @property
    def task(self) -> str:
        return self.info["task"]

    @property
    def seed(self):
        return self.info.get("seed")

    @property
    def status(self) -> str:
        return self.info.get("status", "unknown")

    @property
    def name(self) -> str:
        return f"{self.algo}-seed{self.seed}"


def _run_dirs(root: Path) -> list[Path]:
    """``root`` itself if it is a run folder, else every run folder below it (not descending into runs), except a
    bench's tuning runs (``tune/`` beside its ``bench.json``): they trained on other settings and seeds than its
    evaluation runs and would be ranked with them. Given as ``root`` (``OUT/tune``), they are read."""
    if (root / "run.json").exists():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "run.json" in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
        else:
            if "bench.json" in filenames and "tune" in dirnames:
                dirnames.remove("tune")
            dirnames.sort()
    return sorted(found)


def load_run(path: Path) -> Run:
    path = Path(path)
    try:
        info = json.loads((path / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}/run.json cannot be read ({e}); a run folder is written by `rlzoo train`")
    if not isinstance(info, dict) or not info.get("algo") or not info.get("task"):
        raise UserError(f"{path}/run.json names no algo and task; a run folder is written by `rlzoo train`")
    records = read_jsonl(path / "metrics.jsonl")
    return Run(
        path=path,
        info=info,
        evals=[r for r in records if r.get("kind") == "eval"],
        trains=[r for r in records if r.get("kind") == "train"],
    )


def find_runs(paths: list[Path]) -> list[Run]:
    """The runs in ``paths`` (run folders, or folders holding run folders at any depth), one task only."""
    if not paths:
        raise UserError("no runs given; pass run folders or folders that contain them")
    dirs: dict[Path, None] = {}
    for p in map(Path, paths):
        if not p.is_dir():
            what = "is not a folder" if p.exists() else "does not exist"
            raise UserError(f"{p} {what}; pass run folders (with run.json) or folders that contain them")
        found = _run_dirs(p)
        if not found:
            raise UserError(f"no run folders under {p}: a run folder holds run.json and metrics.jsonl from `rlzoo train`")
        dirs.update((d.resolve(), None) for d in found)
    runs = [load_run(d) for d in dirs]
    tasks = sorted({r.task for r in runs})
    if len(tasks) > 1:
        where = "; ".join(f"{t}: {next(r.path for r in runs if r.task == t)}" for t in tasks)
        raise UserError(f"runs from different tasks ({where}); a leaderboard compares runs of one task")
    return runs
