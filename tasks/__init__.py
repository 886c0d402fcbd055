"""Tasks: problems with verifiable answers and a reasoning-step splitter.

A task gives train and test problems, formats prompts, scores completions (reward in [0, 1]) and
splits a completion into reasoning steps (char offsets where each step starts; the engine-side code
maps them to token positions). Tasks register by name with ``@TASKS.register("name")``; third-party
packages register through the ``rlzoo.tasks`` entry-point group.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlzoo.errors import UserError
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

    def target_lead(self) -> str:
        """The fixed text every SFT target starts with, before the solution ("\n" for VinePPO's format; "" if none)."""
        lead, found, _ = self.target_template.partition("{solution}")
        return lead if found else ""

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


# ------------------------------------------------------------------------------------- a task for a model

PROMPT_TOKENIZATIONS = ("alone", "joint")


def encode_prompts(tokenizer, task: Task, problems: list[Problem], tokenization: str = "alone") -> list[list[int]]:
    """The token ids the engine continues, one list per problem: every sampler (rollouts, evaluation) takes its
    prompts from here. ``"alone"``: the prompt text tokenized by itself (with the tokenizer's special tokens, e.g.
    BOS), as rlzoo's own SFT tokenizes prompts. ``"joint"``: the prompt and the fixed text every SFT target starts
    with (``task.target_lead()``, "\n" for VinePPO's format) tokenized together, so that a tokenizer which merges
    across that boundary (``?\n\nSolution:\n`` as one token) gives the tokens a model fine-tuned on jointly
    tokenized prompt + target text (TRL's SFT) saw; the response then starts after that lead."""
    if tokenization not in PROMPT_TOKENIZATIONS:
        raise UserError(f"prompt tokenization {tokenization!r}; expected one of {', '.join(PROMPT_TOKENIZATIONS)}")
    lead = task.target_lead() if tokenization == "joint" else ""
    texts = [task.prompt(p) + lead for p in problems]
    return tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []


def tokenization_mismatch(tokenizer, task: Task, problems: list[Problem], sample: int = 64) -> dict:
    """How often the prompt's tokens are not the start of the tokens of prompt + SFT target, on the first ``sample``
    problems with a worked solution, for each way of tokenizing the prompt: ``{"sampled": n, "alone": fraction,
    "joint": fraction, "example": (prompt tail tokens, joint tokens)}``. Nonzero ``alone``: a checkpoint fine-tuned
    on jointly tokenized text sees prompts at RL time split in a way it never saw."""
    with_solution = [p for p in problems if p.solution][:sample]
    joint = tokenizer([task.prompt(p) + task.target(p) for p in with_solution], add_special_tokens=True)["input_ids"]
    out = {"sampled": len(with_solution)}
    for mode in PROMPT_TOKENIZATIONS:
        prompts = encode_prompts(tokenizer, task, with_solution, mode)
        bad = [i for i, (a, b) in enumerate(zip(prompts, joint)) if b[: len(a)] != a]
        out[mode] = len(bad) / max(len(with_solution), 1)
        if mode == "alone" and bad:
            a, b = prompts[bad[0]], joint[bad[0]]
            same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            out["example"] = [tokenizer.convert_ids_to_tokens(a[same:same + 4]), tokenizer.convert_ids_to_tokens(b[same:same + 2])]
    return out


def fit_to_context(tokenizer, task: Task, problems: list[Problem], context: int | None, max_new_tokens: int,
                   min_response_tokens: int = 0, tokenization: str = "alone") -> tuple[list[Problem], list[str]]:
    """The problems whose prompt leaves room for a response in the model's ``context`` (kept, in order) and the ids
    of the others (dropped): room for ``max_new_tokens``, or for ``min_response_tokens`` when that is set (such a
    problem's responses then get the room there is). The one place a task is fitted to a model, so a too-long
    prompt is dropped when the run starts, never a failure mid-run. ``context`` None: every problem fits."""
    if context is None:
        return list(problems), []
    need = min_response_tokens or max_new_tokens
    kept, dropped = [], []
    for problem, ids in zip(problems, encode_prompts(tokenizer, task, problems, tokenization)):
        if len(ids) + need <= context:
            kept.append(problem)
        else:
            dropped.append(problem.id)
    return kept, dropped
