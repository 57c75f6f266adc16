"""Worker processes that run the symbolic rung under a hard wall-clock limit.

Why processes: sympy can run for minutes or allocate gigabytes on a hostile answer, and ``signal.alarm``
(math-verify's timeout) works only in the main thread and cannot interrupt C code. Here each task has a
deadline; a worker that misses it is killed (SIGKILL) and replaced, the task's verdict is
``timeout`` (counted in ``stats``), and the pool keeps going. Workers also run under an address-space
limit, so a runaway allocation ends in a MemoryError verdict instead of swapping the machine.

Workers are fresh interpreters (``python -m posttrain.verify.worker``) talking over a socket pair:
nothing is inherited from the parent (torch, CUDA, threads), and, unlike multiprocessing's spawn and
forkserver methods, the caller's main module is never re-imported, so ``verify()`` works from an
unguarded script too. A worker is ready after importing sympy (about a second); they start on first use.
"""

from __future__ import annotations

import atexit
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from pathlib import Path

from posttrain.verify.verifier import DEFAULT_TIMEOUT, Verdict, verify_fast

START_TIMEOUT = 120.0


class _Worker:
    __slots__ = ("proc", "conn", "ready", "tid", "started")

    def __init__(self, proc, conn):
        self.proc = proc
        self.conn = conn
        self.ready = False
        self.tid = None
        self.started = time.monotonic()


class VerifierPool:
    """A pool of verifier worker processes.

    >>> with VerifierPool(workers=1) as pool:          # doctest: +SKIP
    ...     pool.verify(r"\\sin^2 x + \\cos^2 x", "1").equal
    True

    ``verify``/``verify_many`` decide ordinary pairs in-process and send the rest to the workers, with
    ``timeout`` seconds (default 2) of wall-clock time per pair. Thread-safe: calls are serialised.
    ``stats`` counts ``fast``, ``pooled``, ``timeouts``, ``crashes`` and ``restarts``.
    """

    def __init__(
        self,
        workers: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        memory_limit_mb: int | None = 2048,
    ):
        self.size = max(1, workers or min(4, os.cpu_count() or 1))
        self.timeout = timeout
        self.memory_limit_mb = memory_limit_mb
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = False
        self._start_failures = 0
        self.stats = {"fast": 0, "pooled": 0, "timeouts": 0, "crashes": 0, "restarts": 0}

    # ------------------------------------------------------------ public
    def verify(self, prediction: str, gold: str, timeout: float | None = None, rule: str | None = None) -> Verdict:
        return self.verify_many([(prediction, gold, rule)], timeout=timeout)[0]

    def verify_many(self, pairs, timeout: float | None = None) -> list[Verdict]:
        """Verdicts for (prediction, gold) pairs, in order; a pair may carry a third item, the extraction
        rule of an already extracted prediction (see ``posttrain.verify.verify``)."""
        pairs = [("" if t[0] is None else str(t[0]), "" if t[1] is None else str(t[1]), t[2] if len(t) > 2 else None)
                 for t in pairs]
        out: list[Verdict | None] = [None] * len(pairs)
        todo = []
        for i, (p, g, r) in enumerate(pairs):
            try:
                v = verify_fast(p, g, r)
            except RecursionError:
                v = Verdict(False, "too_large")
            except Exception:  # noqa: BLE001 - the worker will decide and report
                v = None
            if v is None:
                todo.append(i)
            else:
                out[i] = v
        self.stats["fast"] += len(pairs) - len(todo)
        if todo:
            self.stats["pooled"] += len(todo)
            results = self.run([("verify", pairs[i]) for i in todo], timeout)
            for i, res in zip(todo, results):
                out[i] = res
        return out  # type: ignore[return-value]

    def run(self, tasks, timeout: float | None = None) -> list[Verdict]:
        """Run ``(op, args)`` tasks on the workers; a task past ``timeout`` gets a ``timeout`` verdict."""
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            if self._closed:
                raise RuntimeError("VerifierPool is closed")
            return self._run(list(tasks), timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for w in self._workers:
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
            for w in self._workers:
                try:
                    w.proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    _kill(w)
                w.conn.close()
            self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ internals
    def _spawn(self) -> _Worker:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])  # the directory holding the posttrain package
        env["PYTHONPATH"] = os.pathsep.join([src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "posttrain.verify.worker", str(child.fileno()), str(self.memory_limit_mb or 0)],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            child.close()
        return _Worker(proc, Connection(parent.detach()))

    def _replace(self, w: _Worker) -> None:
        _kill(w)
        w.conn.close()
        idx = self._workers.index(w)
        self._workers[idx] = self._spawn()
        self.stats["restarts"] += 1

    def _run(self, tasks, timeout: float) -> list[Verdict]:
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())
        out: list[Verdict | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        busy: dict[_Worker, tuple[int, float]] = {}
        while pending or busy:
            for w in list(self._workers):
                if pending and w.ready and w not in busy:
                    idx = pending.popleft()
                    op, args = tasks[idx]
                    w.tid = next(self._ids)
                    try:
                        w.conn.send((w.tid, op, args))
                    except (OSError, ValueError):
                        pending.appendleft(idx)
                        self._replace(w)
                        continue
                    busy[w] = (idx, time.monotonic() + timeout)
            now = time.monotonic()
            deadlines = [d for _, d in busy.values()]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 1.0
            by_conn = {w.conn: w for w in self._workers if w in busy or not w.ready}
            for conn in wait(list(by_conn), timeout=min(wait_s, 1.0)):
                w = by_conn[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is None or msg[0] == "failed":
                    self._worker_died(w, busy, out, tasks, msg)
                elif msg[0] == "ready":
                    w.ready = True
                    self._start_failures = 0
                elif w in busy and msg[0] == w.tid:
                    idx, _ = busy.pop(w)
                    out[idx] = msg[1] if isinstance(msg[1], Verdict) else Verdict(False, "error:bad result")
            now = time.monotonic()
            for w, (idx, deadline) in list(busy.items()):
                if now >= deadline:
                    busy.pop(w)
                    out[idx] = _timeout_verdict(tasks[idx])
                    self.stats["timeouts"] += 1
                    self._replace(w)
            for w in list(self._workers):
                if not w.ready and now - w.started > START_TIMEOUT:
                    raise RuntimeError(f"a verifier worker did not start within {START_TIMEOUT:.0f} s")
        return out  # type: ignore[return-value]

    def _worker_died(self, w, busy, out, tasks, msg):
        if msg is not None or not w.ready:
            self._start_failures += 1
            if self._start_failures > 3:
                why = msg[1] if msg else "it exited during start-up"
                raise RuntimeError(f"verifier workers cannot start: {why}")
        if w in busy:
            idx, _ = busy.pop(w)
            out[idx] = Verdict(False, "error:worker crashed", *_shown(tasks[idx]))
            self.stats["crashes"] += 1
        self._replace(w)


def _kill(w: _Worker) -> None:
    try:
        w.proc.kill()
        w.proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        pass


def _shown(task):
    op, args = task
    if op == "verify":
        return str(args[0])[:200], str(args[1])[:200]
    return "", ""


def _timeout_verdict(task) -> Verdict:
    return Verdict(False, "timeout", *_shown(task))


_DEFAULT: VerifierPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide pool used by ``verify()`` when no pool is given (closed at exit)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT._closed:
            _DEFAULT = VerifierPool()
            atexit.register(_DEFAULT.close)
        return _DEFAULT
