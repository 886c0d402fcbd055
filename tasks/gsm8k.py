"""gsm8k: grade-school math word problems (Cobbe et al. 2021), train 7,473 / test 1,319, shipped in data/gsm8k/.

Format, following VinePPO's rho-1b GSM8K SFT setup (McGill-NLP/VinePPO, configs/sft_rho1b_for_gsm8k.jsonnet
and prompt_library/generic_GSM8K_step_by_step.jsonnet): prompt ``[MATH_TASK] Problem:\\n{question}\\n\\nSolution:``,
target ``\\n{solution}\\n`` where the solution is the dataset's worked answer with the calculator annotations
``<<48/2=24>>`` removed, ending with the line ``#### 72``; generation stops at ``\\n\\n\\nProblem:``.

Answer: the text after the last ``####`` up to the end of that line, commas removed; graded against the gold
with math-verify (``rlzoo.grading``), so ``72.0`` or ``$72`` count as 72.

Steps, as VinePPO splits GSM8K: one per line, a step starting at the newline before its line; leading empty
lines join the first step and the ``#### answer`` line joins the last step. An empty line in the middle
stays with the step before it (VinePPO would make it a one-character step of its own).
"""

from __future__ import annotations

import re

import gin

from rlzoo.errors import UserError
from rlzoo.tasks import TASKS, Problem, Task
from rlzoo.tasks.loading import DATA_DIR, load_rows, resolve_source, row_error

VINEPPO_PROMPT = "[MATH_TASK] Problem:\n{question}\n\nSolution:"
VINEPPO_TARGET = "\n{solution}\n"
PACKAGED = {"train": str(DATA_DIR / "gsm8k" / "train.jsonl.gz"), "test": str(DATA_DIR / "gsm8k" / "test.jsonl.gz")}
_CALCULATOR = re.compile(r"<<.*?>>")
_NEW_LINE_OF_TEXT = re.compile(r"\n(?=[^\S\n]*\S)")  # a newline that begins a non-empty line


@TASKS.register("gsm8k")
@gin.configurable("gsm8k")
class GSM8K(Task):
    name = "gsm8k"
    splits = ("train", "test")
    eval_splits = ("test",)
    max_new_tokens = 512  # the longest gold solution has 1,228 characters, ~400 tokens (VinePPO allows 1024)
    stop = ("\n\n\nProblem:",)

    def __init__(
        self,
        source: dict[str, str] | None = None,  # split -> local file or hub dataset (see loading.py); None: packaged
        columns: dict[str, str] | None = None,  # field -> source column for "question", "answer" (worked solution)
        prompt_template: str = VINEPPO_PROMPT,  # the prompt; {question} is the problem text
        target_template: str = VINEPPO_TARGET,  # the SFT target; {solution} is the worked solution
        remove_calculator: bool = True,  # drop the <<a*b=c>> calculator annotations from solutions
    ):
        self.source = source
        self.columns = columns or {"question": "question", "answer": "answer"}
        self.prompt_template, self.target_template = prompt_template, target_template
        self.remove_calculator = remove_calculator
        self._splits: dict[str, list[Problem]] = {}

    def problems(self, split: str) -> list[Problem]:
        if split not in self.splits:
            raise UserError(f"gsm8k has no split {split!r}; it has {', '.join(self.splits)}")
        if split not in self._splits:
            spec = resolve_source("gsm8k", self.source, PACKAGED, split)
            problems = []
            for i, row in enumerate(load_rows(spec, split, self.columns)):
                solution = row["answer"].strip()
                answer = self.extract_answer(solution)
                if answer is None:
                    raise row_error(spec, i, self.columns["answer"], "has no '#### <answer>' line")
                if self.remove_calculator:
                    solution = _CALCULATOR.sub("", solution)
                problems.append(Problem(f"gsm8k/{split}/{i}", row["question"].strip(), answer, solution))
            self._splits[split] = problems
        return self._splits[split]

    def extract_answer(self, completion: str) -> str | None:
        if "####" not in completion:
            return None
        answer = completion.rpartition("####")[2].split("\n", 1)[0].replace(",", "").strip()
        return answer or None

    def split_steps(self, completion: str) -> list[int]:
        if not completion:
            return []
        answer_at = completion.find("\n####")
        body = completion if answer_at < 0 else completion[:answer_at]  # the answer line joins the last step
        first_text = len(body) - len(body.lstrip())  # leading empty lines join the first step
        return [0] + [m.start() for m in _NEW_LINE_OF_TEXT.finditer(body) if m.start() > first_text]
