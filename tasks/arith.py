"""arith: multi-step integer arithmetic, evaluated left to right; the built-in default task (offline, procedural).

A problem is a chain of ``+``, ``-`` and ``*`` evaluated strictly left to right (no precedence), and its
worked solution does one operation per line; the last line is the answer, marked by ``#``:

    prompt    17+25*3?\\n
    solution  17+25=42\\n42*3=126\\n#126

Every character is a token for the default char-level model, so the format has no spaces or words.
Operands are 1..max_operand, a ``*`` multiplies by min_multiplier..max_multiplier, and a ``-`` never takes
the running value below 0 (no minus signs in answers).

Splits, each from its own seeded random stream, without duplicates:
``train`` is a fixed pool (finite on purpose: with a small pool, train accuracy rises within minutes of RL
while test accuracy moves little, the train/test relation VinePPO measures); ``test`` has the same
distribution and no problem in common with train; ``ood_test`` has more operations than training ever shows
(max_ops + 1 .. ood_max_ops).

Steps: one per line; the ``#answer`` line joins the last operation's step (it only repeats that result),
and a step starts at the newline before its line. Score: the integer on the last line (``#126``) compared
exactly with the gold answer, in-process: it is integer equality, so math-verify (and the worker pool that
its signal-based timeouts need) would add nothing but cost.
"""

from __future__ import annotations

import random
import re

import gin

from rlzoo.errors import UserError
from rlzoo.tasks import TASKS, Problem, Task

ANSWER_MARKER = "#"  # starts the final answer line
_ANSWER_LINE = re.compile(re.escape(ANSWER_MARKER) + r"(\d{1,50})")  # longer numbers are no answer
_NEW_OPERATION_LINE = re.compile(r"\n(?=[^\S\n]*[^\s#])")  # a newline that begins a non-empty, non-answer line


@TASKS.register("arith")
@gin.configurable("arith")
class Arith(Task):
    name = "arith"
    splits = ("train", "test", "ood_test")
    eval_splits = ("test", "ood_test")
    alphabet = "0123456789+-*=?#\n"  # every character of prompts and targets; the char tokenizer's vocabulary

    def __init__(
        self,
        min_ops: int = 1,  # fewest operations in a train/test problem
        max_ops: int = 4,  # most operations in a train/test problem
        ood_max_ops: int = 6,  # ood_test problems have max_ops + 1 .. ood_max_ops operations
        max_operand: int = 99,  # operands of + and - (and the first number) are 1..max_operand
        min_multiplier: int = 2,  # smallest factor of a *
        max_multiplier: int = 9,  # largest factor of a *
        train_size: int = 4000,  # problems in the fixed train pool
        test_size: int = 500,  # problems in test
        ood_test_size: int = 500,  # problems in ood_test
        seed: int = 0,  # seeds all three splits
    ):
        if not 1 <= min_ops <= max_ops < ood_max_ops:
            raise UserError(
                f"arith needs 1 <= min_ops <= max_ops < ood_max_ops, got {min_ops}, {max_ops}, {ood_max_ops}"
            )
        if max_operand < 1 or not 1 <= min_multiplier <= max_multiplier:
            raise UserError("arith needs max_operand >= 1 and 1 <= min_multiplier <= max_multiplier")
        self.min_ops, self.max_ops, self.ood_max_ops = min_ops, max_ops, ood_max_ops
        self.max_operand, self.min_multiplier, self.max_multiplier = max_operand, min_multiplier, max_multiplier
        self.sizes = {"train": train_size, "test": test_size, "ood_test": ood_test_size}
        self.seed = seed
        # Longest possible solution: every op a "*" on the largest running value; one token per character.
        largest = 2 * max_operand * max_multiplier**ood_max_ops
        self.max_new_tokens = ood_max_ops * (2 * len(str(largest)) + 3) + len(str(largest)) + 2
        self._splits: dict[str, list[Problem]] | None = None

    def _make(self, rng: random.Random, num_ops: int) -> tuple[str, str, str]:
        """One problem: (question, worked solution, answer)."""
        value = rng.randint(1, self.max_operand)
        question, lines = str(value), []
        for _ in range(num_ops):
            op = rng.choice("+-*")
            if op == "*":
                operand = rng.randint(self.min_multiplier, self.max_multiplier)
                result = value * operand
            elif op == "-" and value >= 1:
                operand = rng.randint(1, min(value, self.max_operand))
                result = value - operand
            else:
                op, operand = "+", rng.randint(1, self.max_operand)
                result = value + operand
            question += f"{op}{operand}"
            lines.append(f"{value}{op}{operand}={result}")
            value = result
        return question, "\n".join(lines) + f"\n{ANSWER_MARKER}{value}", str(value)

    def _draw(self, rng: random.Random, split: str, ops: tuple[int, int], taken: set[str]) -> list[Problem]:
        problems: list[Problem] = []
        for _ in range(100 * self.sizes[split]):
            if len(problems) == self.sizes[split]:
                return problems
            question, solution, answer = self._make(rng, rng.randint(*ops))
            if question not in taken:
                taken.add(question)
                problems.append(Problem(f"arith/{split}/{len(problems)}", question, answer, solution))
        raise UserError(
            f"arith found only {len(problems)} distinct problems for {split} (asked {self.sizes[split]}); "
            "lower the split sizes or raise max_operand / max_ops"
        )

    def problems(self, split: str) -> list[Problem]:
        if split not in self.splits:
            raise UserError(f"arith has no split {split!r}; it has {', '.join(self.splits)}")
        if self._splits is None:
            # One random stream per split: test and ood_test stay the same whatever the other sizes, and a
            # larger train pool starts with the problems of a smaller one.
            test = self._draw(random.Random(f"{self.seed}/test"), "test", (self.min_ops, self.max_ops), set())
            ood = self._draw(
                random.Random(f"{self.seed}/ood_test"), "ood_test", (self.max_ops + 1, self.ood_max_ops), set()
            )
            taken = {p.question for p in test}  # train never repeats a test problem
            train = self._draw(random.Random(f"{self.seed}/train"), "train", (self.min_ops, self.max_ops), taken)
            self._splits = {"train": train, "test": test, "ood_test": ood}
        return self._splits[split]

    def prompt(self, problem: Problem) -> str:
        return f"{problem.question}?\n"

    def target(self, problem: Problem) -> str:
        return problem.solution

    def extract_answer(self, completion: str) -> str | None:
        match = _ANSWER_LINE.fullmatch(completion.rstrip("\n").rpartition("\n")[2])
        return match.group(1) if match else None

    def score(self, problems: list[Problem], completions: list[str]) -> list[float]:
        answers = [self.extract_answer(c) for c in completions]
        return [float(a is not None and int(a) == int(p.answer)) for p, a in zip(problems, answers)]

    def split_steps(self, completion: str) -> list[int]:
        if not completion:
            return []
        first_text = len(completion) - len(completion.lstrip())  # leading blank lines join the first step
        return [0] + [m.start() for m in _NEW_OPERATION_LINE.finditer(completion) if m.start() > first_text]
