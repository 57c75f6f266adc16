"""A verifier worker process: ``python -m posttrain.verify.worker FD MEMORY_LIMIT_MB``.

Started by ``pool.VerifierPool``. Talks over the inherited socket ``FD`` with multiprocessing's
``Connection`` framing: receives ``(task_id, op, args)``, answers ``(task_id, Verdict)``; ``None`` or
end-of-file ends it. It runs under an address-space limit, says ``("ready", pid)`` once sympy is imported
(or ``("failed", why)``), and turns every exception into a verdict, so only a kill from the pool (a
timeout) or the operating system ends it early.
"""

from __future__ import annotations

import os
import resource
import sys
from multiprocessing.connection import Connection

from posttrain.verify.verifier import Verdict, verify_symbolic


def serve(conn, memory_limit_mb: int | None) -> None:
    try:
        if memory_limit_mb:
            limit = memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        # sympy and the fallback parser, imported here (under the limit, failures reported) before "ready",
        # so no task pays for the import
        import posttrain.verify.symbolic  # noqa: F401
    except BaseException as exc:  # noqa: BLE001 - tell the parent why we cannot work
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        tid, op, args = msg
        try:
            if op == "verify":
                res = verify_symbolic(*args)
            else:
                res = Verdict(False, f"error:unknown op {op}")
        except MemoryError:
            res = Verdict(False, "too_large")
        except BaseException as exc:  # noqa: BLE001 - a verdict, never a dead worker
            res = Verdict(False, f"error:{type(exc).__name__}")
        try:
            conn.send((tid, res))
        except (OSError, ValueError):
            return


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    conn = Connection(int(argv[0]))
    serve(conn, int(argv[1]) if len(argv) > 1 else 0)


if __name__ == "__main__":
    main()
