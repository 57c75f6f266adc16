"""How the fast path changes what a module computes: an instance ``forward`` set for the length of a ``with``
block, the module's class untouched, so the model is as it was after it (and on an error part-way)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch


@contextmanager
def installed_forwards(pairs: Iterable[tuple[torch.nn.Module, Callable]]):
    """While the body runs, each ``(module, forward)`` of ``pairs`` (consumed here, so it may be a generator that
    decides module by module) computes with ``forward``; every one installed is removed after."""
    installed = []
    try:
        for module, forward in pairs:
            module.forward = forward
            installed.append(module)
        yield
    finally:
        for module in installed:
            del module.forward


__all__ = ["installed_forwards"]
