"""Data-parallel speed-up: the same short `rlzoo train` run (same global batch, seeds and config) as one
process and as N processes under torchrun, plain DDP and DeepSpeed ZeRO-2; prints seconds per
iteration by stage and the speed-up over one process.

    python benchmarks/scaling_bench.py                          # grpo, quick.gin, 1 vs 2 processes, 4 iterations
    python benchmarks/scaling_bench.py --algos vineppo,grpo --model default --iterations 6 --processes 2

One process runs with all cores' threads and with the per-process share (OMP_NUM_THREADS = cores /
processes, as torchrun gives each rank). Every run is timed from its own metrics (``time/iteration``: the slowest rank's; evaluation excluded),
skipping the first iteration (warm-up). On a shared machine run it alone: other load skews the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generation", "reward", "logprobs", "mc", "advantages", "critic", "update")


def run(algo: str, model: str, processes: int, threads: int, deepspeed: str | None, iterations: int, out: Path,
        extra: list[str]) -> list[dict]:
    train = ["rlzoo.cli", "train", "--algo", algo, "--task", "arith", "--model", model, "--out", str(out),
             "--config", str(ROOT / "benchmarks" / "quick.gin"), "--budget", f"iterations={iterations}",
             "--set", "train.eval_every=1000000", "--set", "train.checkpoint_every=1000000",
             "--set", "train.eval_train_problems=16", "--set", "train.eval_test_problems=16", *extra]
    if deepspeed:
        train += ["--deepspeed", deepspeed]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m"]
                if processes > 1 else [sys.executable, "-m"])
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([*launcher, *train], capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{' '.join(train)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", default="grpo")
    parser.add_argument("--model", default="default", help="policy folder or 'default'")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--set", dest="bindings", action="append", default=[], help="extra gin binding for every run")
    args = parser.parse_args()
    extra = [x for b in args.bindings for x in ("--set", b)]
    zero2 = str(ROOT / "benchmarks" / "deepspeed" / "zero2_cpu.json")

    cores = os.cpu_count() or 1
    per_process = max(1, cores // args.processes)
    table = Table(title=f"seconds per iteration (mean of iterations 2..{args.iterations}), quick.gin, {cores} cores; "
                        "speed-up against the first row")
    for column in ("algo", "processes", "threads each", "training", "iteration", *STAGES, "speed-up"):
        table.add_column(column, justify="right")
    setups = ((1, cores, None, "one process"), (1, per_process, None, "one process"),
              (args.processes, per_process, None, "DDP"), (args.processes, per_process, zero2, "DeepSpeed ZeRO-2"))
    with tempfile.TemporaryDirectory() as tmp:
        for algo in args.algos.split(","):
            base = None
            for i, (processes, threads, deepspeed, label) in enumerate(setups):
                if i == 1 and threads == cores:
                    continue
                records = run(algo, args.model, processes, threads, deepspeed, args.iterations, Path(tmp) / f"{algo}-{i}", extra)[1:]
                per_iteration = statistics.mean(r["time/iteration"] for r in records)
                base = base or per_iteration
                stages = [statistics.mean(r.get(f"time/{s}", 0.0) for r in records) for s in STAGES]
                table.add_row(algo, str(processes), str(threads), label, f"{per_iteration:.2f}", *(f"{s:.2f}" for s in stages),
                              f"{base / per_iteration:.2f}x")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
