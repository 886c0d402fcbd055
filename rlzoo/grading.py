"""Grade final answers with math-verify, in a small pool of worker processes with a hard time bound.

Why processes: math-verify bounds its own parsing and comparison with SIGALRM, which only works in the
main thread of a process, and an alarm cannot interrupt a long C call (a huge integer power, say). So the
parent hands items to workers and enforces the bound itself: a worker still on an item ``timeout_s`` after
starting it is killed and respawned, and that item scores 0. math-verify's own alarms stay on (a third of
the budget, in whole seconds and at least 1, for each of the two parses and the comparison) so that a merely
slow item ends without a respawn.
A worker runs under an address-space cap (``RLIMIT_AS``): an input that would allocate gigabytes fails with
MemoryError (score 0) instead of swapping the machine. A worker that dies (killed, out of memory) is
respawned the same way; its current item gets one more try, then scores 0.

Workers are fresh interpreters (``python -c``, talking over a socket pair), not forks: the parent may
hold torch threads that ``fork`` would copy in a broken state, and multiprocessing's ``spawn`` and
``forkserver`` re-import the caller's ``__main__``, which breaks scripts without a main guard. A respawn
costs ~0.6 s (importing sympy), paid only after a pathological item. The pool starts on first use and
shuts down at exit. Items travel to a worker in chunks (one round-trip per chunk; one small message back
per item, so that the parent knows when each item started).

Cheap cases never reach a worker: an empty answer, or a predicted answer over ``MAX_ANSWER_CHARS``, scores
0; a predicted answer identical to the gold (after stripping whitespace) scores 1, also where math-verify
cannot parse the gold; two plain integers (the usual GSM8K case) compare as integers, which is what
math-verify concludes for them. These cost microseconds where math-verify costs milliseconds.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait

MAX_ANSWER_CHARS = 1_000  # longer predicted answers score 0 without a worker: no real final answer is this long
WORKER_MEMORY_BYTES = 3 * 1024**3  # address-space cap of one worker; an idle one maps ~60 MiB
WORKER_START_TIMEOUT_S = 120.0  # a worker not ready by then means a broken install, not a bad input
CHUNK_SIZE = 64  # most items per round-trip to a worker
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # so that workers import this rlzoo
# ASCII digits only: Python's \d and int() also take other scripts' digits ("４２"), which math-verify, the judge
# this shortcut must agree with, decides for itself.
_PLAIN_INTEGER = re.compile(r"[-+]?[0-9]{1,100}")


def _wrap(answer: str) -> str:
    # A bare answer ("\frac{1}{2}", "18", "(3, \pi)") in inline math mode: math-verify reads it as one
    # LaTeX expression (and parses it faster than the same answer in \boxed{}).
    return "$" + answer + "$"


def _worker_main(fd: int, memory_bytes: int) -> None:
    conn = Connection(fd)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # timeouts are expected here; they score 0

    def grade(gold: str, pred: str, soft_timeout: int) -> float:
        try:
            gold_parsed = parse(_wrap(gold), parsing_timeout=soft_timeout)
            pred_parsed = parse(_wrap(pred), parsing_timeout=soft_timeout)
            return float(bool(gold_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=soft_timeout))
        except (Exception, RecursionError, MemoryError):  # whatever goes wrong, this answer is not verified
            return 0.0

    grade("1", "1", 5)  # warm sympy and antlr so that the first real item is not charged for it
    conn.send("ready")
    while True:
        try:
            soft_timeout, pairs = conn.recv()
        except EOFError:  # the parent closed its end: shut down
            return
        for gold, pred in pairs:
            conn.send(grade(gold, pred, soft_timeout))


class _Worker:
    def __init__(self):
        parent_socket, child_socket = socket.socketpair()
        code = f"from rlzoo.grading import _worker_main; _worker_main({child_socket.fileno()}, {WORKER_MEMORY_BYTES})"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([_SOURCE_ROOT, os.environ.get("PYTHONPATH", "")]))
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=[child_socket.fileno()], stdin=subprocess.DEVNULL, env=env
        )
        child_socket.close()
        self.conn = Connection(parent_socket.detach())
        self.ready = False  # True once it has imported math-verify and said so
        self.started_at = time.monotonic()  # spawn time until ready, then when its current item began
        self.pending: collections.deque[int] = collections.deque()  # item indices sent, not yet answered

    def stop(self) -> None:
        self.conn.close()
        self.process.kill()
        self.process.wait()


class _Pool:
    def __init__(self, size: int):
        self.workers = [_Worker() for _ in range(size)]
        self.start_failures = 0  # workers that died or hung before saying ready, since one last did
        self.owner_pid = os.getpid()
        self.lock = threading.Lock()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def _respawn(self, i: int) -> None:
        self.workers[i].stop()
        self.workers[i] = _Worker()

    def _fail(self, i: int, chunks: collections.deque, retry: set[int] | None = None) -> None:
        """Worker i overran or died: respawn it and put the rest of its chunk back in line.

        Its current item keeps score 0, except that an item whose worker died (rather than overran) gets one
        more try, in a set ``retry`` of items that had theirs: the death may have come from outside."""
        worker = self.workers[i]
        if not worker.ready:
            self.start_failures += 1
            if self.start_failures >= 3:  # once could be an outside kill; three times is a broken install
                raise RuntimeError("math-verify grading workers fail to start; check that `import math_verify` works")
        elif worker.pending and retry is not None and worker.pending[0] not in retry:
            retry.add(worker.pending[0])
        elif worker.pending:
            worker.pending.popleft()
        if worker.pending:
            chunks.appendleft(list(worker.pending))
        self._respawn(i)

    def run(self, pairs: list[tuple[str, str]], items: list[int], scores: list[float], timeout_s: float) -> None:
        """Grade ``pairs[k]`` into ``scores[k]`` for each k in ``items``."""
        soft_timeout = max(1, int(timeout_s / 3))  # math-verify's alarms take whole seconds
        size = min(CHUNK_SIZE, -(-len(items) // (2 * len(self.workers))))  # small batches: every worker gets some
        chunks = collections.deque(items[k : k + size] for k in range(0, len(items), size))
        retried: set[int] = set()  # items whose worker died under them once
        while chunks or any(w.pending for w in self.workers):
            for i, w in enumerate(self.workers):
                if w.ready and not w.pending and w.process.poll() is not None:  # died idle (e.g. the OOM killer)
                    self._respawn(i)
                elif w.ready and not w.pending and chunks:
                    chunk = chunks.popleft()
                    try:
                        w.conn.send((soft_timeout, [pairs[k] for k in chunk]))
                    except OSError:  # died since the check above
                        chunks.appendleft(chunk)
                        self._respawn(i)
                        continue
                    w.pending.extend(chunk)
                    w.started_at = time.monotonic()

            busy = [w for w in self.workers if w.pending or not w.ready]
            deadline = min(w.started_at + (timeout_s if w.ready else WORKER_START_TIMEOUT_S) for w in busy)
            wait([w.conn for w in busy], timeout=max(0.0, deadline - time.monotonic()))

            for i, w in enumerate(self.workers):
                try:
                    while w.conn.poll():
                        message = w.conn.recv()
                        if message == "ready":
                            w.ready = True
                            self.start_failures = 0
                        else:
                            scores[w.pending.popleft()] = message
                        w.started_at = time.monotonic()
                except (EOFError, OSError):  # it died: killed, out of memory, stack overflow
                    self._fail(i, chunks, retry=retried)
                    continue
                limit = timeout_s if w.ready else WORKER_START_TIMEOUT_S
                if (w.pending or not w.ready) and time.monotonic() - w.started_at > limit:
                    self._fail(i, chunks)


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _get_pool() -> _Pool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.owner_pid != os.getpid():  # a forked child must not share its parent's pool
            _pool = _Pool(size=min(2, os.cpu_count() or 1))
        return _pool


@atexit.register
def _shutdown() -> None:
    if _pool is not None and _pool.owner_pid == os.getpid():
        _pool.close()


def _equal_without_math_verify(gold: str, pred: str) -> bool | None:
    """The verdict for identical strings or two plain integers; None where math-verify must decide."""
    gold, pred = gold.strip(), pred.strip()
    if gold == pred:
        return True
    if _PLAIN_INTEGER.fullmatch(gold) and _PLAIN_INTEGER.fullmatch(pred):
        return int(gold) == int(pred)
    return None


def grade_answers(pairs: list[tuple[str, str]], timeout_s: float = 5.0) -> list[float]:
    """1.0 where math-verify finds ``predicted`` equal to ``gold`` in a ``(gold, predicted)`` pair, else 0.0.

    Both are bare final answers (``"18"``, ``"\\frac{1}{2}"``), not whole completions. Each item gets at most
    ``timeout_s`` seconds of wall-clock time in a worker process; one that runs over scores 0.
    """
    scores = [0.0] * len(pairs)
    to_workers = []
    for k, (gold, pred) in enumerate(pairs):
        if not gold.strip() or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
            continue
        equal = _equal_without_math_verify(gold, pred)
        if equal is None:
            to_workers.append(k)
        else:
            scores[k] = float(equal)
    if to_workers:
        pool = _get_pool()
        with pool.lock:
            pool.run(pairs, to_workers, scores, timeout_s)
    return scores
