"""Throughput of rlzoo.grading.grade_answers and of the tasks' step splitters; prints a table.

    python benchmarks/grading_bench.py

Each row grades a fresh batch in this process; the worker pool is started (and warmed) before timing.
math-verify's parse cache lives in the workers, so a row that repeats earlier strings runs faster:
rows use answers not seen before in the run where that matters (cold) and say so where not.
"""

import random
import time

from rich.console import Console
from rich.table import Table

from rlzoo.grading import grade_answers
from rlzoo.tasks import get_task


def timed(pairs):
    start = time.perf_counter()
    scores = grade_answers(pairs)
    seconds = time.perf_counter() - start
    return len(pairs) / seconds, sum(scores) / len(scores)


def main():
    grade_answers([("1", "1.0")])  # start the pool
    math_test = get_task("math").problems("test")
    math_train = get_task("math").problems("train")
    rng = random.Random(0)
    rows = [
        ("plain integers (no worker)", [(str(i), str(i + i % 2)) for i in range(100_000)]),
        ("identical strings (no worker)", [(p.answer, p.answer) for p in math_train]),
        ("decimals vs integers (GSM8K-like)", [(str(i), f"{i + i % 2}.0") for i in range(10_000, 12_000)]),
        ("MATH-500 gold vs \\boxed{gold}, cold", [(p.answer, f"\\boxed{{{p.answer}}}") for p in math_test]),
        ("MATH-500 gold vs \\boxed{gold}, warm", [(p.answer, f"\\boxed{{{p.answer}}}") for p in math_test]),
        (
            "MATH train gold vs another answer",
            [(p.answer, q.answer) for p, q in zip(math_train[:1000], rng.sample(math_train, 1000))],
        ),
    ]
    table = Table(title="grade_answers throughput (2 workers)")
    for column in ("batch", "items", "items/s", "mean score"):
        table.add_column(column)
    for name, pairs in rows:
        rate, mean = timed(pairs)
        table.add_row(name, str(len(pairs)), f"{rate:,.0f}", f"{mean:.3f}")

    steps = Table(title="split_steps throughput (gold targets)")
    for column in ("task", "completions/s", "steps/completion"):
        steps.add_column(column)
    for name in ("arith", "gsm8k", "math"):
        task = get_task(name)
        texts = [task.target(p) for p in task.problems("train")[:5000]]
        start = time.perf_counter()
        n_steps = sum(len(task.split_steps(t)) for t in texts)
        steps.add_row(name, f"{len(texts) / (time.perf_counter() - start):,.0f}", f"{n_steps / len(texts):.1f}")
    console = Console()
    console.print(table)
    console.print(steps)


if __name__ == "__main__":
    main()
