"""Tasks: splits, rewards on gold and corrupted answers, step splitting, loading from files."""

import json
import random
import re

import datasets
import gin
import pytest

from rlzoo.errors import UserError
from rlzoo.grading import grade_answers
from rlzoo.tasks import TASKS, Task, get_task
from rlzoo.tasks.math import last_boxed


def steps_of(task: Task, text: str) -> list[str]:
    starts = task.split_steps(text)
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def check_step_offsets(task: Task, texts: list[str]) -> None:
    for text in texts:
        starts = task.split_steps(text)
        assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < len(text), text
    assert task.split_steps("") == []


@pytest.fixture(scope="module")
def gsm8k():
    return get_task("gsm8k")


@pytest.fixture(scope="module")
def math_task():
    return get_task("math")


def test_registry_builds_every_task():
    assert {"arith", "gsm8k", "math"} <= set(TASKS.names())
    assert get_task("arith", train_size=10).problems("train")[9].id == "arith/train/9"
    with pytest.raises(UserError, match="no split 'valid'"):
        get_task("arith").problems("valid")


# ---------------------------------------------------------------------------------------------- arith


def evaluate_left_to_right(question: str) -> int:
    tokens = re.findall(r"\d+|[-+*]", question)
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], map(int, tokens[2::2])):
        value = value + operand if op == "+" else value - operand if op == "-" else value * operand
    return value


def test_arith_splits():
    task = get_task("arith")
    splits = {name: task.problems(name) for name in task.splits}
    assert {name: len(ps) for name, ps in splits.items()} == {"train": 4000, "test": 500, "ood_test": 500}
    assert task.eval_splits == ("test", "ood_test")
    questions = {name: {p.question for p in ps} for name, ps in splits.items()}
    assert all(len(questions[name]) == len(splits[name]) for name in splits)  # no duplicates within a split
    assert not questions["train"] & questions["test"] and not questions["train"] & questions["ood_test"]
    ops = {name: {len(re.findall(r"[-+*]", p.question)) for p in ps} for name, ps in splits.items()}
    assert ops["train"] == ops["test"] == {1, 2, 3, 4} and ops["ood_test"] == {5, 6}
    for p in splits["train"][:500] + splits["ood_test"]:
        assert int(p.answer) == evaluate_left_to_right(p.question) >= 0
        lines = p.solution.split("\n")
        assert len(lines) == len(re.findall(r"[-+*]", p.question)) + 1 and lines[-1] == f"#{p.answer}"
        assert all(evaluate_left_to_right(line.split("=")[0]) == int(line.split("=")[1]) for line in lines[:-1])
    alphabet = set(task.alphabet)
    assert all(set(task.prompt(p) + task.target(p)) <= alphabet for ps in splits.values() for p in ps)
    # seeded; the eval splits do not depend on the other sizes; a smaller train pool is a prefix of a larger one
    smaller = get_task("arith", train_size=100)
    assert smaller.problems("train") == splits["train"][:100] and smaller.problems("test") == splits["test"]
    fewer_tests = get_task("arith", test_size=400, train_size=10)
    assert (
        fewer_tests.problems("test") == splits["test"][:400] and fewer_tests.problems("ood_test") == splits["ood_test"]
    )
    assert get_task("arith", seed=1).problems("test") != splits["test"]


def test_arith_knobs_through_gin():
    TASKS.names()  # imports the task modules, so that gin knows their names
    gin.parse_config(["arith.train_size = 50", "arith.max_ops = 2", "arith.ood_max_ops = 3", "arith.max_operand = 9"])
    try:
        task = get_task("arith")
        assert len(task.problems("train")) == 50
        assert {len(re.findall(r"[-+*]", p.question)) for p in task.problems("ood_test")} == {3}
        assert max(int(n) for p in task.problems("train") for n in re.findall(r"\d+", p.question)) <= 9
    finally:
        gin.clear_config()
    with pytest.raises(UserError, match="distinct problems"):  # 1-op problems over 1..2 cannot fill 100
        get_task("arith", max_ops=1, ood_max_ops=2, max_operand=2, max_multiplier=2, test_size=100).problems("test")


def test_arith_reward_and_steps():
    task = get_task("arith")
    problem = next(p for p in task.problems("test") if p.question.count("*") == 0 and len(p.solution.split("\n")) == 3)
    gold = task.target(problem)
    wrong = gold.rpartition("#")[0] + f"#{int(problem.answer) + 1}"
    completions = [gold, gold + "\n", wrong, gold.rpartition("\n")[0], gold + "\n1+1=2", ""]
    assert task.score([problem] * len(completions), completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert task.extract_answer("3+4=7\n#7") == "7" and task.extract_answer("3+4=7\n7") is None

    example = "17+25=42\n42*3=126\n#126"
    assert steps_of(task, example) == ["17+25=42", "\n42*3=126\n#126"]  # the answer line joins the last step
    assert steps_of(task, "\n5+3=8\n8-2=6\n#6") == ["\n5+3=8", "\n8-2=6\n#6"]
    assert steps_of(task, "5+3=8") == ["5+3=8"]
    check_step_offsets(task, [task.target(p) for p in task.problems("ood_test")])


# ---------------------------------------------------------------------------------------------- gsm8k


def test_gsm8k_splits_and_format(gsm8k):
    train, test = gsm8k.problems("train"), gsm8k.problems("test")
    assert (len(train), len(test)) == (7473, 1319)
    assert not {p.question for p in train} & {p.question for p in test}
    janet = test[0]
    assert janet.answer == "18" and "<<" not in janet.solution
    assert gsm8k.prompt(janet) == f"[MATH_TASK] Problem:\n{janet.question}\n\nSolution:"  # VinePPO's template
    assert gsm8k.target(janet) == (
        "\nJanet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer\u2019s market.\n#### 18\n"
    )
    assert any(p.answer == "1080" for p in train)  # "#### 1,080" loses its comma


def test_gsm8k_reward_on_gold_and_corrupted_answers(gsm8k):
    for split in gsm8k.splits:
        problems = gsm8k.problems(split)
        gold = gsm8k.score(problems, [gsm8k.target(p) for p in problems])
        assert sum(gold) / len(gold) == 1.0, split
        off_by_one = [gsm8k.target(p).rpartition("#### ")[0] + f"#### {int(p.answer) + 1}\n" for p in problems]
        assert sum(gsm8k.score(problems, off_by_one)) == 0.0, split
    # through math-verify in the workers: a seeded sample with the answers written as decimals
    sample = random.Random(0).sample(gsm8k.problems("test"), 200)
    rewritten = [gsm8k.target(p).rpartition("#### ")[0] + f"#### {p.answer}.00\n" for p in sample]
    assert sum(gsm8k.score(sample, rewritten)) / len(sample) >= 0.99
    assert gsm8k.score(sample[:2], ["no answer line", "\n#### "]) == [0.0, 0.0]
    assert gsm8k.extract_answer("so 1,234 apples.\n#### 1,234\nProblem: next") == "1234"


def test_gsm8k_steps(gsm8k):
    janet = gsm8k.target(gsm8k.problems("test")[0])
    assert steps_of(gsm8k, janet) == [
        "\nJanet sells 16 - 3 - 4 = 9 duck eggs a day.",
        "\nShe makes 9 * 2 = $18 every day at the farmer\u2019s market.\n#### 18\n",
    ]
    # leading empty lines join the first step, a middle one stays with the step before, the answer the last
    assert steps_of(gsm8k, "\n\nA is 1.\n\nB is 2.\n\n#### 3") == ["\n\nA is 1.\n", "\nB is 2.\n\n#### 3"]
    assert steps_of(gsm8k, "#### 3") == ["#### 3"]
    check_step_offsets(gsm8k, [gsm8k.target(p) for p in gsm8k.problems("test")])


# ----------------------------------------------------------------------------------------------- math


def test_math_splits_and_answers(math_task):
    train, test = math_task.problems("train"), math_task.problems("test")
    assert (len(train), len(test)) == (7498, 500)  # MATH train less its 2 empty \boxed{}; MATH-500
    assert not {p.question for p in train} & {p.question for p in test}
    assert test[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert last_boxed("so $\\boxed{\\frac{a}{b^{2}}}$ and then $\\fbox{7}$.") == "7"
    assert last_boxed("is $\\boxed 2$.") == "2"
    assert last_boxed("is $\\boxed{\\frac{1}{2}") is None and last_boxed("no box") is None


def test_math_reward_on_gold_and_corrupted_answers(math_task):
    test = math_task.problems("test")
    gold = math_task.score(test, [math_task.target(p) for p in test])
    assert sum(gold) == len(test)
    train = math_task.problems("train")
    assert sum(math_task.score(train, [math_task.target(p) for p in train])) == len(train)
    # gold answers against themselves in another surface form, so that math-verify decides (a seeded sample:
    # all 500 take ~5 s on 2 cores; measured 500/500)
    rng = random.Random(0)
    rewrapped = grade_answers([(p.answer, f"\\boxed{{{p.answer}}}") for p in rng.sample(test, 150)])
    assert sum(rewrapped) / len(rewrapped) >= 0.99
    # corrupted: another problem's answer (a seeded sample; pairs with identical strings skipped)
    sample = rng.sample(test, 50)
    others = [p.answer for p in rng.sample(test, 50)]
    pairs = [(p, o) for p, o in zip(sample, others) if o.strip() != p.answer.strip()]
    swapped = [math_task.target(p).replace(f"\\boxed{{{p.answer}}}", f"\\boxed{{{o}}}") for p, o in pairs]
    assert sum(math_task.score([p for p, _ in pairs], swapped)) == 0.0
    unboxed = [math_task.target(p).replace("\\boxed", "") for p in sample[:5]]
    assert math_task.score(sample[:5], unboxed) == [0.0] * 5


def test_math_steps(math_task):
    by_id = {p.id: p for p in math_task.problems("test")}
    assert steps_of(math_task, math_task.target(by_id["math/test/410"])) == [  # sentence ends
        "\nThe number $21420N$ is divisible by $6$ if and only if it is even and the sum of its digits is divisible by $3$.",
        " So $N$ must be even, and $2 + 1 + 4 + 2 + 0 + N = 9 + N$ must be divisible by $3$.",
        "  Since $9$ is divisible by $3$, we see that $N$ must also be divisible by $3$.",
        " The only digit that works is $N = \\boxed{6}$.\n",
    ]
    assert steps_of(math_task, math_task.target(by_id["math/test/68"])) == [  # lines of a display, short merges
        "\nIsolating $\\tan x^\\circ,$ we find",
        "\n\\begin{align*}\n\\tan x &= \\frac{\\tan 53^\\circ + \\tan 81^\\circ}{\\tan 53^\\circ \\tan 81^\\circ - 1} \\\\",
        "\n&= -\\frac{\\tan 53^\\circ + \\tan 81^\\circ}{1 - \\tan 53^\\circ \\tan 81^\\circ}.",
        "\n\\end{align*}From the angle addition formula, this is equal to",
        "\n\\[-\\tan (53^\\circ + 81^\\circ) = -\\tan 134^\\circ = \\tan 46^\\circ.\\]Therefore, $x = \\boxed{46}.$\n",
    ]
    long_sentence = (
        "We add the twenty-two apples to the basket of forty-one pears, which gives a total of sixty-three "
        "fruits, and then we count them again to be sure."
    )
    assert steps_of(math_task, long_sentence) == [  # 146 characters: cut at the comma nearest the middle
        "We add the twenty-two apples to the basket of forty-one pears,",
        " which gives a total of sixty-three fruits, and then we count them again to be sure.",
    ]
    long_math = (
        "$$" + " + ".join(f"x_{{{i}}}" for i in range(12)) + " = " + " + ".join(f"y_{{{i}}}" for i in range(12)) + "$$"
    )
    assert steps_of(math_task, long_math) == [
        long_math[: long_math.index("=") + 1],
        long_math[long_math.index("=") + 1 :],
    ]
    assert steps_of(math_task, "[asy]\n" + "draw((0,0)--(1,1));\n" * 10 + "[/asy]") == [
        "[asy]\n" + "draw((0,0)--(1,1));\n" * 10 + "[/asy]"
    ]
    check_step_offsets(math_task, [math_task.target(p) for p in math_task.problems("test")])


# -------------------------------------------------------------------------------------------- loading


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_local_jsonl_and_parquet_with_a_column_mapping(tmp_path):
    rows = [
        {"q": "Tom has 2 apples and buys 3. How many?", "sol": "He has 2+3=5.\n#### 5", "extra": 1},
        {"q": "Half of 10?", "sol": "10/2=5\n#### 5", "extra": 2},
    ]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    task = get_task("gsm8k", source={"train": path, "test": path}, columns={"question": "q", "answer": "sol"})
    problems = task.problems("test")
    assert [(p.question, p.answer) for p in problems] == [(rows[0]["q"], "5"), (rows[1]["q"], "5")]
    assert task.score(problems, [task.target(p) for p in problems]) == [1.0, 1.0]

    parquet = str(tmp_path / "mine.parquet")
    datasets.Dataset.from_list([{"p": "What is $1+1$?", "s": "It is $\\boxed{2}$."}]).to_parquet(parquet)
    math_task = get_task("math", source={"test": parquet}, columns={"problem": "p", "solution": "s"})
    assert [(p.question, p.answer) for p in math_task.problems("test")] == [("What is $1+1$?", "2")]
    with pytest.raises(UserError, match="math.source has no entry for split 'train'"):
        math_task.problems("train")


@pytest.mark.parametrize(
    "bad_row, problem",
    [
        ({"sol": "1\n#### 1"}, "is missing"),
        ({"q": 7, "sol": "1\n#### 1"}, "is a int"),
        ({"q": "  ", "sol": "1\n#### 1"}, "is empty"),
    ],
)
def test_malformed_rows_name_file_row_and_column(tmp_path, bad_row, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"q": "fine?", "sol": "1\n#### 1"}, bad_row])
    task = get_task("gsm8k", source={"test": path}, columns={"question": "q", "answer": "sol"})
    with pytest.raises(UserError) as error:
        task.problems("test")
    assert str(error.value).startswith(f"{path}: row 2, column 'q' {problem}")


def test_bad_sources_are_user_errors(tmp_path):
    good = {"question": "x?", "answer": "no marker here"}
    path = write_jsonl(tmp_path / "nomarker.jsonl", [good])
    with pytest.raises(UserError, match=r"nomarker.jsonl: row 1, column 'answer' has no '#### <answer>' line"):
        get_task("gsm8k", source={"test": path}).problems("test")
    with pytest.raises(UserError, match="does not exist"):
        get_task("gsm8k", source={"test": str(tmp_path / "missing.jsonl")}).problems("test")
    with pytest.raises(UserError, match="nomarker.jsonl has no column 'other'"):
        get_task("gsm8k", source={"test": path}, columns={"question": "question", "answer": "other"}).problems("test")
    (tmp_path / "broken.jsonl").write_text('{"question": "x?", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(UserError, match="cannot read"):
        get_task("gsm8k", source={"test": str(tmp_path / "broken.jsonl")}).problems("test")
    with pytest.raises(UserError, match="no split 'validation'"):
        get_task("math").problems("validation")
