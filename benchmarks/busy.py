"""One competing busy process, as another job on a shared machine would be: a pure-Python spin loop that keeps one
core busy until stopped. The side-by-side benchmarks run beside it with ``--busy``; on its own it starts one,
prints its PID, and stops it after SECONDS (or Ctrl-C):

    python benchmarks/busy.py 60          # keep one core busy for a minute
    python benchmarks/busy.py --check     # how busy the machine looks to posttrain with and without it

The loop is a separate interpreter (not a thread of the benchmark: the GIL and the benchmark's own CPU accounting
would hide it), started before the measured system loads, and killed, with its exit awaited, however the block
ends.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time

# spins in pure Python; every ~20 ms it checks that the process that started it still lives, so a benchmark killed
# without running its cleanup (kill -9, timeout) does not leave a core busy for good
SPIN = "import os, sys\nparent = int(sys.argv[1])\nwhile os.getppid() == parent:\n    for _ in range(10**6):\n        pass\n"


@contextlib.contextmanager
def busy_process(enabled: bool = True):
    """``with busy_process():`` one core kept busy by another process for the block; ``enabled=False`` does
    nothing, so callers can write ``with busy_process(args.busy):``. Yields the process (None when disabled)."""
    if not enabled:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())], stdin=subprocess.DEVNULL)
    time.sleep(0.5)  # running, not starting, when the measured process looks at the machine
    if proc.poll() is not None:
        raise RuntimeError(f"the busy process exited at once (status {proc.returncode})")
    print(f"[busy] PID {proc.pid} keeps one core busy", file=sys.stderr, flush=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        print(f"[busy] PID {proc.pid} stopped", file=sys.stderr, flush=True)


def check() -> None:
    """What posttrain.threads sees: the free-core estimate idle, then beside one busy process."""
    from posttrain.threads import choose_threads

    env = {k: v for k, v in os.environ.items() if k not in ("POSTTRAIN_THREADS", "OMP_NUM_THREADS")}
    print("idle:", choose_threads(env).line())
    with busy_process():
        print("busy:", choose_threads(env).line())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("seconds", nargs="?", type=float, default=60.0, help="how long to keep the core busy")
    ap.add_argument("--check", action="store_true", help="print posttrain's thread choice idle and beside it")
    args = ap.parse_args()
    if args.check:
        check()
        return
    with busy_process() as proc:
        print(proc.pid, flush=True)
        try:
            time.sleep(args.seconds)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
