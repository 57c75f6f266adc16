"""A time limit on one call of a reward function: a hung reward stops the run, naming itself, instead of hanging it.

Custom rewards often call a code sandbox, a judge model or a web service; one that never answers would otherwise
block training forever. :func:`call_with_deadline` runs the call **in the calling thread**, so rewards that time
themselves out with ``signal.alarm`` (math-verify, and so TRL's ``accuracy_reward``) keep working: that only
works in the main thread. A watchdog thread waits meanwhile; when the time is up it sends the main thread
``SIGUSR2``, whose handler raises :class:`Expired` inside the reward. ``Expired`` is a ``BaseException``, so a
reward's own ``except Exception`` cannot swallow it, and a signal interrupts the blocking calls a hung reward
sits in (sleep, socket reads, subprocess and lock waits). The handler is installed once and raises only for the
call that overran; any other ``SIGUSR2`` goes to the handler that was there before (or is ignored).

Code that never returns to the interpreter while releasing the GIL (a C library that retries its own
interrupted calls) cannot be interrupted this way: ``GRACE_S`` seconds after the limit the watchdog prints the
message and ends the process with status 2, which beats a run that hangs without a word. Off the main thread, or
without ``SIGUSR2`` (Windows), the call runs in a daemon thread that is abandoned when it overruns.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, TypeVar

from posttrain.errors import UserError

T = TypeVar("T")
SIGNAL = getattr(signal, "SIGUSR2", None)
GRACE_S = 30.0  # after the limit, how long an uninterruptible call gets before the process ends


class TimeLimitError(UserError):
    """A call ran past its time limit; the message names it and the setting that bounds it."""


class Expired(BaseException):
    """Raised inside the call that overran (not an ``Exception``: the call's own handlers must not catch it)."""


class _Call:
    """One call under a deadline: ``expired`` is set by the watchdog, ``done`` by the caller, under ``lock``."""

    def __init__(self):
        self.lock = threading.Lock()
        self.expired = self.done = False
        self.finished = threading.Event()

    def finish(self) -> None:
        with self.lock:
            self.done = True
        self.finished.set()


_current: _Call | None = None
_previous_handler = None
_installed = False


def _handler(signum, frame):
    call = _current
    if call is not None and call.expired and not call.done:
        raise Expired
    if callable(_previous_handler):
        _previous_handler(signum, frame)


def call_with_deadline(call: Callable[[], T], seconds: float | None, message: str) -> T:
    """``call()``, or :class:`TimeLimitError` (``message``) when it runs past ``seconds`` (None: no limit)."""
    if seconds is None:
        return call()
    if SIGNAL is None or threading.current_thread() is not threading.main_thread():
        return _in_thread(call, seconds, message)
    global _current, _previous_handler, _installed
    if not _installed:  # once: restoring the old handler later could let a late signal kill the process
        _previous_handler = signal.signal(SIGNAL, _handler)
        _installed = True
    state, outer = _Call(), _current
    _current = state
    threading.Thread(target=_watch, args=(state, seconds, message, threading.main_thread().ident), daemon=True,
                     name="posttrain-deadline").start()
    try:
        try:
            return call()
        finally:
            state.finish()
    except Expired:
        state.finish()
        raise TimeLimitError(message) from None
    finally:
        _current = outer


def _watch(state: _Call, seconds: float, message: str, main: int) -> None:
    if state.finished.wait(seconds):
        return
    with state.lock:
        if state.done:
            return
        state.expired = True
        signal.pthread_kill(main, SIGNAL)
    if not state.finished.wait(GRACE_S):
        sys.stderr.write(f"posttrain: error: {message} (it did not stop when interrupted, so the process ends)\n")
        sys.stderr.flush()
        os._exit(2)


def _in_thread(call: Callable[[], T], seconds: float, message: str) -> T:
    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True, name="posttrain-deadline-call")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeLimitError(f"{message} (it is left running in the background)")
    if "error" in box:
        raise box["error"]
    return box["value"]
