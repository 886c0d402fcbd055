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


class Task:
    """What every task provides. Subclasses set the class attributes and override what differs.

    Rewards: ``score`` grades a batch of completions, 1.0 for a correct final answer and 0.0 otherwise;
    math-verify runs in worker processes with a hard wall-clock bound (``rlzoo.grading``).
    Steps: ``split_steps`` returns the char offsets where each reasoning step of a completion starts
    (the first is 0; ``[]`` for an empty completion).
    """

    name: str = ""
    splits: tuple[str, ...] = ("train", "test")  # accepted by problems()
    eval_splits: tuple[str, ...] = ("test",)  # evaluated during training, beside a fixed train subset
    max_new_tokens: int = 256  # generation budget for one response
    stop: tuple[str, ...] = ()  # stop strings besides EOS

    def problems(self, split: str) -> list[Problem]:
        raise NotImplementedError

    prompt_template: str = "{question}"  # the model's input; {question} is the problem text
    target_template: str = "{solution}"  # the SFT target; {solution} is the worked solution

    def prompt(self, problem: Problem) -> str:
        """The text the model continues."""
        return self.prompt_template.format(question=problem.question)

    def target(self, problem: Problem) -> str:
        """The SFT target completion for ``problem`` (its worked solution with the answer line)."""
        return self.target_template.format(solution=problem.solution)

    def extract_answer(self, completion: str) -> str | None:
        """The final answer a completion commits to (for majority voting), or None."""
        raise NotImplementedError

    def score(self, problems: list[Problem], completions: list[str]) -> list[float]:
        """1.0 where the extracted answer equals the gold one by math-verify (in worker processes), else 0.0."""
        from rlzoo.grading import grade_answers

        answers = [self.extract_answer(c) or "" for c in completions]
        return grade_answers([(p.answer, a) for p, a in zip(problems, answers)])

    def split_steps(self, completion: str) -> list[int]:
        raise NotImplementedError
