"""Tasks: problems with verifiable answers and a reasoning-step splitter.

A task gives train and test problems, formats prompts, scores completions (reward in [0, 1]) and
splits a completion into reasoning steps (char offsets where each step starts; the engine-side code
maps them to token positions). Tasks register by name with ``@TASKS.register("name")``; third-party
packages register through the ``rlzoo.tasks`` entry-point group.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlzoo.registry import Registry

TASKS: Registry = Registry(
    "task",
    "rlzoo.tasks",
    builtin_modules=("rlzoo.tasks.arith", "rlzoo.tasks.gsm8k", "rlzoo.tasks.math"),
)


@dataclass(frozen=True)
class Problem:
    id: str  # stable within its task and split, e.g. "gsm8k/test/17"
    question: str  # the problem as posed (the task turns it into the model prompt)
    answer: str  # gold final answer
    solution: str | None = None  # worked solution, ending with the answer line (SFT target)


def get_task(name: str, **overrides):
    """Build the task registered as ``name`` (gin bindings apply; ``overrides`` win over them)."""
    return TASKS.get(name)(**overrides)
