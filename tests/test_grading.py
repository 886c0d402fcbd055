"""rlzoo.grading: math-verify verdicts through the worker pool, and the hard bounds that keep bad inputs cheap."""

import os
import random
import signal
import string
import threading
import time

import pytest
from math_verify import parse, verify

from rlzoo import grading
from rlzoo.grading import grade_answers


def _worker_pids() -> set[int]:
    return {w.process.pid for w in grading._get_pool().workers}


def test_math_verify_verdicts_through_the_pool():
    cases = [  # (gold, predicted, expected score)
        ("18", "18.0", 1.0),
        ("18", "\\$18", 1.0),
        ("1800", "1,800", 1.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("\\frac{1}{2}", "\\dfrac12", 1.0),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)", 1.0),
        ("p - q", "-q+p", 1.0),
        ("\\text{(C)}", "C", 1.0),
        ("\\text{Devon}", "\\text{Devon}", 1.0),  # identical strings score 1 without a worker
        ("18", "17", 0.0),
        ("\\frac{1}{2}", "\\frac{1}{3}", 0.0),
        ("(3, \\pi)", "(3, 2\\pi)", 0.0),
        ("x^2+1", "x^2-1", 0.0),
        ("5", "", 0.0),
        ("", "5", 0.0),
    ]
    assert grade_answers([(g, p) for g, p, _ in cases]) == [expected for _, _, expected in cases]
    assert grade_answers([]) == []


def test_integer_shortcut_agrees_with_math_verify():
    rng = random.Random(0)
    pairs = [("42", "42"), ("42", "042"), ("-3", "-3"), ("-3", "3"), ("+7", "7"), ("10", "1")]
    pairs += [
        (str(a), str(a + rng.choice([0, 0, 1, -1, 10]))) for a in (rng.randint(-(10**6), 10**6) for _ in range(50))
    ]
    for gold, pred in pairs:
        expected = verify(parse(f"${gold}$"), parse(f"${pred}$"))  # in-process: pytest runs tests in the main thread
        assert grading._equal_without_math_verify(gold, pred) == expected, (gold, pred)
    # digits of other scripts (fullwidth, Arabic-Indic) are no plain integer: math-verify decides, through the pool
    for gold, pred in [("42", "４２"), ("42", "٤٢"), ("-3", "-３")]:
        assert grading._equal_without_math_verify(gold, pred) is None, (gold, pred)
        assert grade_answers([(gold, pred)]) == [float(verify(parse(f"${gold}$"), parse(f"${pred}$")))], (gold, pred)


SHORT_ADVERSARIAL = ["9**9**9**9", "9^{9^{9^{9}}}", "2^{10^9}"]
LONG_ADVERSARIAL = [
    "".join(random.Random(0).choice(string.printable) for _ in range(100_000)),
    "(" * 50_000 + "1" + ")" * 50_000,
    "{" * 50_000 + "1" + "}" * 50_000,
]


@pytest.mark.timeout(120)  # a hang fails here instead of stalling the suite
def test_adversarial_inputs_score_zero_and_end(monkeypatch):
    # The length guard stops the long inputs before they reach a worker.
    assert grade_answers([("1", a) for a in LONG_ADVERSARIAL]) == [0.0] * len(LONG_ADVERSARIAL)
    # With it off, every input reaches math-verify in a worker and still ends (soft alarm or hard kill).
    monkeypatch.setattr(grading, "MAX_ANSWER_CHARS", 10**6)
    adversarial = SHORT_ADVERSARIAL + LONG_ADVERSARIAL
    pairs = [("1", a) for a in adversarial] + [("1", "1.0"), ("\\frac{1}{2}", "0.5")]
    started = time.monotonic()
    assert grade_answers(pairs, timeout_s=1.0) == [0.0] * len(adversarial) + [1.0, 1.0]
    # 8 items of at most 1 s each, plus a respawn (~0.6 s) per killed worker; a hang would take minutes
    assert time.monotonic() - started < 60


@pytest.mark.timeout(120)
def test_parent_kills_an_item_past_its_deadline():
    grade_answers([("1", "1.0")])  # the pool is up
    before = _worker_pids()
    # math-verify gives up on this one after its 1 s alarm (the shortest it has): the parent must act at 0.3 s.
    pairs = [("1", "2^{2^{33}}"), ("2", "2.0"), ("3", "3.0"), ("4", "4.0")]
    assert grade_answers(pairs, timeout_s=0.3) == [0.0, 1.0, 1.0, 1.0]
    assert len(before - _worker_pids()) == 1  # exactly one worker was killed and replaced
    assert grade_answers([("5", "5.0")]) == [1.0]  # and the pool still works


@pytest.mark.timeout(120)
def test_dead_workers_are_replaced():
    grade_answers([("1", "1.0")])
    for pid in _worker_pids():  # killed while idle, as the OOM killer might
        os.kill(pid, signal.SIGKILL)
    assert grade_answers([("1", "1.0"), ("2", "\\frac{4}{2}")]) == [1.0, 1.0]

    # killed in the middle of a slow item (it ends at math-verify's 1 s alarm): graded once more, the rest too
    victims = _worker_pids()
    killer = threading.Timer(0.3, lambda: [os.kill(pid, signal.SIGKILL) for pid in victims])
    killer.start()
    pairs = [("1", "2^{2^{33}}"), ("2", "2.0"), ("3", "3.0"), ("4", "4.0")]
    assert grade_answers(pairs, timeout_s=5.0) == [0.0, 1.0, 1.0, 1.0]
    killer.join()


@pytest.mark.skipif(not os.path.exists("/proc/self/limits"), reason="reads /proc (Linux)")
def test_workers_run_under_a_memory_cap():
    grade_answers([("1", "1.0")])
    for pid in _worker_pids():
        with open(f"/proc/{pid}/limits") as f:
            line = next(line for line in f if line.startswith("Max address space"))
        assert line.split()[3] == str(grading.WORKER_MEMORY_BYTES)  # soft limit, in bytes
