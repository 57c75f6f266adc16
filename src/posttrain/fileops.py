"""Deleting and writing files without losing what is not ours, and naming a full disk.

- :func:`remove_tree`: every ``rmtree`` in posttrain goes through it. It deletes only a path strictly inside the
  directory that owns it (a stage folder inside the pipeline's run directory, a temporary checkpoint inside
  ``checkpoints/``), so a stage named ``..``, an ``--out`` that is an ancestor, or a symlink can never turn a
  cleanup into deleting the user's files. A refusal is a bug or a hostile name, and says so.
- :func:`writing`: a block that writes files. A full disk, however the library reports it (``OSError`` ENOSPC,
  safetensors' "os error 28", torch's zip writer's "unexpected pos"), becomes one ``UserError`` naming the
  directory, the MB needed and the MB free. ``need(bytes)`` checks the free space before a large write, so a
  write that cannot fit fails at once instead of filling the disk (for every other process too) and then failing.
- :func:`fsync_tree` and :func:`sha256_file`: what a checkpoint needs to survive a power loss and be verified.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path

from posttrain.errors import UserError

MB = 2**20
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def remove_tree(path: str | Path, owner: str | Path, ignore_errors: bool = False) -> None:
    """``shutil.rmtree(path)``, only when ``path`` lies strictly inside ``owner`` (both resolved, symlinks
    followed); a missing ``path`` is nothing to do."""
    path, owner = Path(path), Path(owner)
    if not path.exists() and not path.is_symlink():
        return
    real, root = path.resolve(), owner.resolve()
    if path.is_symlink() or real == root or root not in real.parents:
        raise UserError(f"refusing to delete {path}: it is not a folder inside {owner}, which is all this command "
                        "may delete (a bug, or a name such as '..' that points outside); nothing was deleted")
    shutil.rmtree(real, ignore_errors=ignore_errors)


def free_bytes(path: str | Path) -> int:
    """Free space on the file system of ``path`` (or of its nearest existing ancestor)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def is_no_space(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it came from) reports a full disk or an exceeded quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(exc).lower() for t in _NO_SPACE_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space_message(exc: BaseException) -> str | None:
    """The one-line message for a full disk that ``exc`` reports (None when it reports something else); for
    writes that no ``writing`` block guards, such as ``posttrain verify --out``."""
    if not is_no_space(exc):
        return None
    where = getattr(exc, "filename", None)
    free = f"; {free_bytes(Path(where).parent) / MB:,.1f} MB free there" if where else ""
    return f"no space left on device writing {where or 'a file'}{free}; free some space and run the command again"


class Writing:
    """What :func:`writing` yields: ``need(n)`` declares (and checks) the bytes about to be written."""

    def __init__(self, directory: Path, what: str, advice: str):
        self.directory, self.what, self.advice = directory, what, advice
        self.needed = 0
        self.free = free_bytes(directory)

    def need(self, n: int) -> None:
        self.needed += int(n)
        self.free = free_bytes(self.directory)
        if self.needed > self.free:
            raise self.error()

    def error(self) -> UserError:
        needed = f"about {max(self.needed / MB, 0.1):,.1f} MB needed, " if self.needed else ""
        return UserError(f"no space left on device in {self.directory} writing {self.what} ({needed}"
                         f"{self.free / MB:,.1f} MB free); {self.advice}")


@contextlib.contextmanager
def writing(directory: str | Path, what: str, advice: str = "free some space and run the command again"):
    """Name a full disk when the block's writes fail for lack of space (see the module docstring). Torch's zip
    writer reports ENOSPC only as "unexpected pos"; a RuntimeError/OSError with less than 16 MB left counts too."""
    w = Writing(Path(directory), what, advice)
    try:
        yield w
    except UserError:
        raise
    except Exception as exc:
        nearly_full = isinstance(exc, (OSError, RuntimeError)) and free_bytes(directory) < 16 * MB
        short = "safetensor" in type(exc).__name__.lower() and w.free < w.needed
        if is_no_space(exc) or nearly_full or short:
            raise w.error() from exc
        raise


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside ``obj`` (nested dicts, lists and tuples): the size of what a save writes."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.element_size() * obj.numel()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def sha256_file(path: str | Path, chunk: int = 4 * MB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_tree(directory: str | Path) -> None:
    """Flush every file directly in ``directory`` and the directory itself to the disk (a rename that follows is
    then durable: after a power loss the renamed folder does not hold short files)."""
    d = Path(directory)
    for p in d.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(d)


def fsync_dir(directory: str | Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not fsync directories
        pass
    finally:
        os.close(fd)
