"""math: competition mathematics (Hendrycks et al. 2021): MATH train and MATH-500 test, shipped in data/math/.

Splits: ``train`` is the original MATH train set less the 2 rows whose ``\\boxed{}`` is empty (7,498);
``test`` is MATH-500 (Lightman et al. 2023), 500 problems of the MATH test set. Prompt and SFT target
follow VinePPO's rho-1b MATH SFT setup (McGill-NLP/VinePPO, configs/sft_rho1b_for_MATH.jsonnet):
``[MATH_TASK] Problem:\\n{question}\\n\\nSolution:`` and ``\\n{solution}\\n``.

Answers: the gold is the content of the solution's last ``\\boxed{...}`` (braces matched; also ``\\fbox{}``
and the brace-less ``\\boxed 2``); the prediction is the same taken from the completion, and the two are
compared by math-verify (``rlzoo.grading``). Rows of any split without a non-empty boxed answer are dropped.

Steps, in the spirit of VinePPO's MATH splitter (treetune/tasks/math_extract_steps_inplace.py), with
LaTeX math found first (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``, ``\\begin{env}..\\end{env}``;
``[asy]..[/asy]`` drawings are never cut):

1. cut at every newline outside inline math and drawings (lines of a display block are cut too), and at
   every sentence end outside math: ``.``, ``!`` or ``?`` (also right before a math closing delimiter, as
   in ``$x = 3.$``), then spaces, then a capital letter;
2. merge each part with fewer than MIN_STEP_CHARS non-blank characters into the part after it (the last
   part into the one before);
3. cut a part longer than MAX_STEP_CHARS after the comma outside math nearest its middle, else after the
   ``=`` nearest its middle, keeping both pieces at least MIN_STEP_CHARS long; repeat on the pieces.

A step starts at the separator that precedes it (the newline or the space after a sentence end).
"""

from __future__ import annotations

import re

import gin

from rlzoo.errors import UserError
from rlzoo.tasks import TASKS, Problem, Task
from rlzoo.tasks.loading import DATA_DIR, load_rows, resolve_source

VINEPPO_PROMPT = "[MATH_TASK] Problem:\n{question}\n\nSolution:"
VINEPPO_TARGET = "\n{solution}\n"
PACKAGED = {
    "train": str(DATA_DIR / "math" / "train.jsonl.gz"),
    "test": str(DATA_DIR / "math" / "math500_test.jsonl.gz"),
}
MIN_STEP_CHARS = 20  # shorter fragments merge into the next step
MAX_STEP_CHARS = 100  # longer parts are cut at a comma or "=" where possible

TEXT, INLINE, DISPLAY, DRAWING = 0, 1, 2, 3  # what each character of a solution is part of
_MATH = re.compile(
    r"(?P<drawing>\[asy\].*?\[/asy\])"
    r"|(?P<display>\$\$.*?\$\$|\\\[.*?\\\]|\\begin\{(?P<env>[^}]*)\}.*?\\end\{(?P=env)\})"
    r"|(?P<inline>(?<!\\)\$(?:\\.|[^$\\])+\$|\\\(.*?\\\))",
    re.DOTALL,
)
_SENTENCE_END = re.compile(r"[.!?](\$\$|\$|\\\]|\\\))?(?=[ \t]+[A-Z])")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text`` (or ``\\boxed x``), None if none."""
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if at < 0:
        return None
    rest = text[at + (6 if text.startswith("\\boxed", at) else 5) :]
    if not rest.startswith("{"):
        match = re.match(r" +([^\s$]+)", rest)  # "\boxed 2$": a single token without braces
        return match.group(1) if match else None
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced braces: the completion was cut off inside the box


def _kinds(text: str) -> bytearray:
    kinds = bytearray(len(text))  # TEXT everywhere ...
    for m in _MATH.finditer(text):  # ... except inside math
        kind = DRAWING if m.group("drawing") else DISPLAY if m.group("display") else INLINE
        kinds[m.start() : m.end()] = bytes([kind]) * (m.end() - m.start())
    return kinds


def _nonblank(text: str, start: int, end: int) -> int:
    return len(text[start:end].strip())


def _cut_long(text: str, kinds: bytearray, start: int, end: int) -> list[int]:
    """Cut points inside text[start:end] so that its pieces are at most MAX_STEP_CHARS where possible."""
    if end - start <= MAX_STEP_CHARS:
        return []
    middle = (start + end) / 2
    for mark, where in ((",", (TEXT,)), ("=", (TEXT, INLINE, DISPLAY))):  # a comma in prose first, else an "="
        cuts = [i + 1 for i in range(start, end) if text[i] == mark and kinds[i] in where]
        cuts = [c for c in cuts if min(_nonblank(text, start, c), _nonblank(text, c, end)) >= MIN_STEP_CHARS]
        if cuts:
            cut = min(cuts, key=lambda c: abs(c - middle))
            return _cut_long(text, kinds, start, cut) + [cut] + _cut_long(text, kinds, cut, end)
    return []


def split_math_steps(text: str) -> list[int]:
    """Char offsets where each reasoning step of a MATH solution starts (rules in the module docstring)."""
    if not text:
        return []
    kinds = _kinds(text)
    cuts = {i for i, ch in enumerate(text) if ch == "\n" and kinds[i] in (TEXT, DISPLAY)}
    cuts |= {
        m.end()
        for m in _SENTENCE_END.finditer(text)
        if kinds[m.end()] == TEXT and (m.group(1) or kinds[m.start()] == TEXT)
    }
    bounds = [0] + sorted(c for c in cuts if c > 0) + [len(text)]

    parts: list[list[int]] = []  # [start, end] of each step
    for start, end in zip(bounds, bounds[1:]):
        if parts and _nonblank(text, *parts[-1]) < MIN_STEP_CHARS:
            parts[-1][1] = end  # the previous part is too short: this one joins it
        else:
            parts.append([start, end])
    if len(parts) > 1 and _nonblank(text, *parts[-1]) < MIN_STEP_CHARS:
        last = parts.pop()
        parts[-1][1] = last[1]

    starts = []
    for start, end in parts:
        starts += [start] + _cut_long(text, kinds, start, end)
    return starts


@TASKS.register("math")
@gin.configurable("math")
class MATH(Task):
    name = "math"
    splits = ("train", "test")
    eval_splits = ("test",)
    max_new_tokens = 1024  # as VinePPO
    stop = ("\n\n\nProblem:",)

    def __init__(
        self,
        source: dict[str, str] | None = None,  # split -> local file or hub dataset (see loading.py); None: packaged
        columns: dict[str, str] | None = None,  # field -> source column for "problem", "solution" (with a \boxed{})
        prompt_template: str = VINEPPO_PROMPT,  # the prompt; {question} is the problem text
        target_template: str = VINEPPO_TARGET,  # the SFT target; {solution} is the worked solution
    ):
        self.source = source
        self.columns = columns or {"problem": "problem", "solution": "solution"}
        self.prompt_template, self.target_template = prompt_template, target_template
        self._splits: dict[str, list[Problem]] = {}

    def problems(self, split: str) -> list[Problem]:
        if split not in self.splits:
            raise UserError(f"math has no split {split!r}; it has {', '.join(self.splits)}")
        if split not in self._splits:
            spec = resolve_source("math", self.source, PACKAGED, split)
            problems = []
            for i, row in enumerate(load_rows(spec, split, self.columns)):
                answer = last_boxed(row["solution"])
                if answer and answer.strip():
                    problems.append(
                        Problem(f"math/{split}/{i}", row["problem"].strip(), answer.strip(), row["solution"].strip())
                    )
            self._splits[split] = problems
        return self._splits[split]

    def extract_answer(self, completion: str) -> str | None:
        answer = last_boxed(completion)
        return answer.strip() if answer and answer.strip() else None

    def split_steps(self, completion: str) -> list[int]:
        return split_math_steps(completion)
