"""How many threads torch computes with: the cores that are really free, not the cores the machine has.

Why: torch's CPU kernels run in OpenMP parallel regions whose threads meet at a barrier, where the early ones
spin. With 2 threads on 2 cores and one other busy process, nearly every region waits for the thread whose core
the scheduler gave to the other process, for a whole time slice: an SFT step went from 4.7 s to 55-127 s (10-30x),
where a fair share of the machine costs 2x. With one thread per free core the other job costs about its share.

The count, first rule that applies:

1. ``POSTTRAIN_THREADS=N`` (a positive integer): N, however busy the machine looks.
2. ``OMP_NUM_THREADS=N`` (set by the user, a job scheduler or ``torchrun``): N, as torch itself reads it.
3. Otherwise the cores that are free: the CPUs this process may run on (``sched_getaffinity``), capped by a cgroup
   CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``; a fractional quota rounds up, since
   throttling stops all threads together and strands no barrier), minus the cores other processes kept busy
   during ``SAMPLE_S`` seconds of ``/proc/stat`` (our own CPU time in that window is not "other work"). A core
   counts as free when at most ``BUSY_MARGIN`` of it is busy: one thread too few costs a share of the speed, one
   too many costs 10x. The free cores are shared among the processes of a multi-process launch
   (``LOCAL_WORLD_SIZE``), never more than torch's own default (its physical cores), never fewer than 1.

The choice is made once per command, by the CLI (``apply``), for the commands that compute, and printed in one line
on stderr. The library (``posttrain.sft.train`` and the other recipes) leaves torch's thread setting to its caller,
with one exception: a resumed training run (``--resume``) uses the count recorded in its checkpoint
(``resume_count``), because sums are reduced in an order that depends on the thread count, and only the same count
continues a run bit for bit. ``POSTTRAIN_THREADS`` overrides that too, with a message that the continuation is then
not bit-identical.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.errors import UserError

ENV = "POSTTRAIN_THREADS"
SAMPLE_S = 0.25
BUSY_MARGIN = 0.25  # a core this busy with other work still counts as free
CGROUP_ROOT = Path("/sys/fs/cgroup")

_default: int | None = None  # torch's own count, read before the first change
_applied: ThreadChoice | None = None  # what this process's command chose


@dataclass(frozen=True)
class ThreadChoice:
    count: int
    source: str          # "auto", ENV, "OMP_NUM_THREADS", or "resume"
    reason: str          # for the printed line: what the count came from

    def line(self) -> str:
        return f"[posttrain] threads: {self.count} ({self.reason})"


# --------------------------------------------------------------------------------------------------
# Pure functions: text in, numbers out


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 ``cpu.max`` (``"150000 100000"`` or ``"max 100000"``) -> CPUs allowed (1.5), None when unlimited."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100000
    return int(parts[0]) / period if period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` -> CPUs allowed, None when unlimited (quota -1)."""
    quota, period = int(quota_text.strip()), int(period_text.strip())
    return quota / period if quota > 0 and period > 0 else None


def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
    """``/proc/stat`` -> {cpu: (busy jiffies, total jiffies)} from its ``cpuN`` lines. Total is user..steal (guest
    time is already inside user and nice); idle and iowait are not busy; steal is (another guest had the core)."""
    out = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        ticks = [int(f) for f in fields[:8]]
        total = sum(ticks)
        out[int(name[3:])] = (total - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), total)
    return out


def busy_cores(before: dict, after: dict, cpus: set[int] | None = None) -> float:
    """How many of ``cpus`` (all when None) were busy between two ``parse_proc_stat`` snapshots, in cores."""
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        if (cpus is None or cpu in cpus) and cpu in before and t1 > before[cpu][1]:
            busy += (b1 - before[cpu][0]) / (t1 - before[cpu][1])
    return busy


def decide(cpus: int, quota: float | None, other_busy: float, default: int, procs: int = 1) -> tuple[int, str]:
    """The automatic count and why (rule 3 of the module docstring)."""
    usable = min(cpus, math.ceil(quota - 1e-9)) if quota else cpus
    free = min(usable, math.floor(cpus - other_busy + BUSY_MARGIN + 1e-9))
    count = max(1, min(free, default) // max(1, procs))
    why = [f"of {cpus} cores"]
    if quota:
        why.append(f"cgroup quota {quota:g} CPUs")
    why.append(f"{other_busy:.1f} busy with other work")
    if procs > 1:
        why.append(f"shared by {procs} processes")
    if default < usable:
        why.append(f"torch's default {default}")
    return count, f"{', '.join(why)}; {ENV}=N overrides"


def env_count(environ, name: str) -> int | None:
    """A positive integer from ``environ[name]``; None when unset or empty; a UserError naming it otherwise."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{name}={raw!r}: the number of threads must be a positive integer (e.g. {name}=2); "
                        f"unset it to let posttrain choose from the free cores")
    return value


def resume_count(recorded: int | None, override: int | None, current: int, now: ThreadChoice | None) -> tuple[int, str]:
    """The count a resumed run continues with, and the line that says so. ``recorded``: what the checkpoint's run
    used (None in checkpoints written before it was recorded); ``override``: POSTTRAIN_THREADS; ``current``:
    torch's count now; ``now``: what this command chose for the machine as it is."""
    if recorded is None:
        count = override or current
        return count, (f"[posttrain] threads: {count}; the checkpoint does not record the count the run used, so "
                       "the continued steps are bit-identical only if it was the same")
    if override is not None and override != recorded:
        return override, (f"[posttrain] threads: {override} ({ENV}), where the run used {recorded}: the continued "
                          "steps are not bit-identical to an uninterrupted run")
    line = f"[posttrain] threads: {recorded}, as the run used before --resume (the same count continues it bit for bit)"
    if now is not None and now.source == "auto" and now.count < recorded:
        line += (f"; the machine looks busier now ({now.reason.split(';')[0]}: {now.count} would be chosen), so "
                 f"steps may be slower: {ENV}={now.count} trades bit-identity for speed")
    return recorded, line


# --------------------------------------------------------------------------------------------------
# Reading the machine


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_quota(root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The tightest CPU quota on this process's cgroup and its ancestors (v2 and v1), None when there is none."""
    membership = membership if membership is not None else (_read(Path("/proc/self/cgroup")) or "")
    quotas = []
    for line in membership.splitlines():
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 (on a hybrid v1/v2 system it is mounted at unified/)
            dirs, files = [root, root / "unified"], ("cpu.max",)
        elif "cpu" in controllers.split(","):
            dirs, files = [root / controllers, root / "cpu"], ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        parts = [p for p in path.strip("/").split("/") if p]
        for base in dirs:
            for depth in range(len(parts), -1, -1):
                texts = [_read(base.joinpath(*parts[:depth], f)) for f in files]
                if None in texts:
                    continue
                q = parse_cpu_max(texts[0]) if len(texts) == 1 else parse_cfs(*texts)
                if q:
                    quotas.append(q)
    return min(quotas) if quotas else None


def other_busy_cores(cpus: set[int], seconds: float = SAMPLE_S) -> float:
    """Cores of ``cpus`` kept busy by other processes over ``seconds``: two /proc/stat snapshots, less our own
    CPU time over the same window (0 where /proc/stat cannot be read)."""
    first = _read(Path("/proc/stat"))
    if first is None:
        return 0.0
    t0, own0 = time.monotonic(), _own_cpu_seconds()
    time.sleep(seconds)
    second = _read(Path("/proc/stat")) or first
    own = (_own_cpu_seconds() - own0) / max(time.monotonic() - t0, 1e-3)
    return max(0.0, busy_cores(parse_proc_stat(first), parse_proc_stat(second), cpus) - own)


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def choose_threads(environ=None, default: int | None = None) -> ThreadChoice:
    """The count for this process (the rules of the module docstring), without applying it."""
    environ = os.environ if environ is None else environ
    forced = env_count(environ, ENV)
    if forced is not None:
        return ThreadChoice(forced, ENV, f"{ENV}={forced}")
    omp = env_count(environ, "OMP_NUM_THREADS")
    if omp is not None:
        return ThreadChoice(omp, "OMP_NUM_THREADS", f"OMP_NUM_THREADS={omp}; {ENV}=N overrides")
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    procs = env_count(environ, "LOCAL_WORLD_SIZE") or 1
    count, reason = decide(len(cpus), cgroup_quota(), other_busy_cores(cpus),
                           default or torch_default_threads(), procs)
    return ThreadChoice(count, "auto", reason)


def torch_default_threads() -> int:
    """torch's count before posttrain first changed it (its physical cores, or OMP_NUM_THREADS)."""
    global _default
    if _default is None:
        _default = torch.get_num_threads()
    return _default


def apply(choice: ThreadChoice | None = None, stream=None) -> ThreadChoice:
    """Choose (unless given) and set torch's intra-op threads, and the inter-op pool's when it has not started yet
    (torch allows that once; its idle threads wait without spinning, so a later call leaves it); print the line."""
    global _applied
    torch_default_threads()
    choice = choice or choose_threads()
    torch.set_num_threads(choice.count)
    try:
        torch.set_num_interop_threads(choice.count)
    except RuntimeError:
        pass
    _applied = choice
    print(choice.line(), file=stream or sys.stderr, flush=True)
    return choice


def apply_for_resume(recorded: int | None, environ=None) -> str:
    """Set the count a resumed run continues with (``resume_count``) and return the line saying so."""
    environ = os.environ if environ is None else environ
    now = _applied
    if now is None and recorded is not None and env_count(environ, ENV) is None:
        now = choose_threads(environ)  # a library caller: see whether the machine is busier than the run's
    count, line = resume_count(recorded, env_count(environ, ENV), torch.get_num_threads(), now)
    torch.set_num_threads(count)
    return line
