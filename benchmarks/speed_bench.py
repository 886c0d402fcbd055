"""Seconds per iteration, stage by stage, of this checkout against an older commit, side by side.

    git worktree add ../rlzoo-base 7704100   # beside this checkout
    python -m venv ../venv-base && ../venv-base/bin/pip install torch==2.13.0 -e ../rlzoo-base
    OMP_NUM_THREADS=1 python benchmarks/speed_bench.py --base-python ../venv-base/bin/python

Each (strategy, repeat) trains ``--iterations`` iterations of the quick bench's shape (``benchmarks/speed.gin``:
the built-in policy, 16 prompts x 8 samples, 2 epochs x 2 minibatches, one torch thread) with ``rlzoo train``,
once with each commit, in separate processes, alternating which goes first, so that a busy machine slows both
alike. The first iteration (warm-up) is dropped; the table shows the median over the other iterations and the
repeats of ``time/<stage>`` in each run's metrics.jsonl. Same seed, same samples: both commits run the same
batches (the script checks the first iteration's mean reward), so the effective GFLOP/s of both columns divide
the same work, this checkout's ``flops/<stage>`` (the positions it runs, 2·N per position forward, 6·N forward and
backward), by each commit's seconds. The one-thread fp32 matmul peak is measured at the start and the end, at the
shapes the stages run ([4096, 128] x [128, 384] and a [1024]^3 square); "at peak s" is the seconds this checkout's
work would take if every FLOP ran at that peak (no time for anything but matmuls): the floor of a stage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("generation", "logprobs", "advantages", "mc", "critic", "update")  # the stages that run a model
TRAIN = "from rlzoo.cli import main; main()"


def matmul_peak(seconds: float = 2.0) -> float:
    """Best one-thread fp32 GFLOP/s over the stages' matmul shapes."""
    torch.set_num_threads(1)
    best = 0.0
    for m, k, n in ((4096, 128, 384), (4096, 384, 128), (1024, 1024, 1024)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        reps, spent = max(1, int(4e8 / (m * k * n))), 0.0
        while spent < seconds / 3:
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            elapsed = time.perf_counter() - start
            best, spent = max(best, 2 * m * k * n * reps / elapsed / 1e9), spent + elapsed
    return best


def train_run(python: str, algo: str, iterations: int, out: Path) -> list[dict]:
    """The train records of one ``rlzoo train`` run of ``python``'s rlzoo (run from a neutral folder, so that
    each interpreter imports its own install, not this checkout)."""
    cmd = [python, "-c", TRAIN, "train", "--algo", algo, "--task", "arith", "--config", str(ROOT / "benchmarks" / "speed.gin"),
           "--set", f"train.iterations={iterations}", "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=out.parent, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("kind") == "train"]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-python", required=True, help="python of a venv with the base commit installed (see above)")
    parser.add_argument("--base-name", default="7704100", help="the base commit's name in the table")
    parser.add_argument("--algos", default="grpo,ppo,vineppo,rloo")
    parser.add_argument("--iterations", type=int, default=3, help="train iterations per run (the first is dropped)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (strategy, commit)")
    parser.add_argument("--json", default="", help="also write the measurements here")
    args = parser.parse_args()

    peak_before = matmul_peak()
    # Absolute, not resolved: the runs start in a temporary folder, and a venv's python is a link that must stay one.
    sides = {args.base_name: os.path.abspath(args.base_python), "this": sys.executable}
    runs: dict[tuple[str, str], list[list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="rlzoo-speed-") as tmp:
        for repeat in range(args.repeats):
            for a, algo in enumerate(args.algos.split(",")):
                order = list(sides) if (repeat + a) % 2 == 0 else list(sides)[::-1]
                for side in order:
                    out = Path(tmp) / f"{side}-{algo}-{repeat}"
                    started = time.perf_counter()
                    try:
                        records = train_run(sides[side], algo, args.iterations, out)
                    except subprocess.CalledProcessError as e:
                        sys.exit(f"{side} {algo}: rlzoo train failed:\n{e.stderr[-2000:]}")
                    runs.setdefault((algo, side), []).append(records)
                    print(f"[{repeat + 1}/{args.repeats}] {algo:8s} {side:8s} {time.perf_counter() - started:6.1f} s", file=sys.stderr)
    peak_after = matmul_peak()
    peak = max(peak_before, peak_after)

    base, this = args.base_name, "this"
    print(f"\nOne-thread fp32 matmul peak: {peak_before:.0f} GFLOP/s before, {peak_after:.0f} after; % of peak uses {peak:.0f}.")
    print(f"Median seconds per iteration over iterations 2..{args.iterations} x {args.repeats} repeats; GFLOP/s: this "
          "checkout's flops/<stage> over each commit's seconds.\n")
    print(f"| strategy | stage | {base} s | this s | speed-up | {base} GFLOP/s | this GFLOP/s | this % of peak | at peak s |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {"peak_gflops": [peak_before, peak_after], "command": " ".join(["python", "benchmarks/speed_bench.py", *sys.argv[1:]]),
               "strategies": {}}
    for algo in args.algos.split(","):
        same = {side: [r[0].get("reward/mean") for r in runs[(algo, side)]] for side in sides}
        if same[base] != same[this]:
            print(f"WARNING: {algo}: first-iteration rewards differ ({same[base]} vs {same[this]}): not the same samples", file=sys.stderr)
        rows = {}
        for stage in (*STAGES, "iteration"):
            secs = {side: median([r[f"time/{stage}"] for rs in runs[(algo, side)] for r in rs[1:] if f"time/{stage}" in r]) for side in sides}
            if stage == "iteration":
                flops = median([sum(v for k, v in r.items() if k.startswith("flops/") and k != "flops/total")
                                for rs in runs[(algo, this)] for r in rs[1:]])
            else:
                flops = median([r.get(f"flops/{stage}", 0) for rs in runs[(algo, this)] for r in rs[1:]])
            if not flops and stage != "iteration":
                continue
            gf = {side: flops / secs[side] / 1e9 for side in sides}
            rows[stage] = {"seconds": secs, "gflops_per_s": gf, "flops": flops}
            print(f"| {algo} | {stage} | {secs[base]:.3f} | {secs[this]:.3f} | {secs[base] / secs[this]:.2f}x | "
                  f"{gf[base]:.1f} | {gf[this]:.1f} | {100 * gf[this] / peak:.0f}% | {flops / peak / 1e9:.3f} |")
        results["strategies"][algo] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
