"""Checkpoints written atomically and verified, and exact resume.

A checkpoint is ``RUN/checkpoints/step-N/`` holding the trainable weights (the adapter, or every weight in
full fine-tuning), the optimizer and scheduler states, every RNG state, a ``state.json`` with the data position,
and, written last, ``manifest.json``: the size and sha256 of every other file. It is written into
``.tmp-step-N/``, flushed to the disk (fsync), and renamed only when complete, so the run directory never holds a
half-written checkpoint that looks complete, not even after a power loss.

A damaged checkpoint is never trusted and never blocks: ``load_checkpoint`` checks the manifest (and that every
file loads) and falls back, with a message, to the newest intact checkpoint; a ``.tmp-step-N`` left by a killed
or failed writer is removed by the next run (``session``), which holds the run directory's lock. A full disk is
named as such (``fileops.writing``), and the temporary directory of a failed checkpoint is removed at once.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from posttrain.errors import UserError
from posttrain.fileops import fsync_dir, fsync_tree, remove_tree, sha256_file, tensor_bytes, writing

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-step-"
# what a checkpoint written before manifests must hold to be tried at all (optimizer.pt is per rank when sharded)
_LEGACY_FILES = ("trainable.safetensors", "scheduler.pt", "state.json")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Whole trainable weights (gathered from FSDP2/ZeRO-3 shards: a collective, every rank calls it)."""
    from posttrain.distributed import full_trainable_state

    return full_trainable_state(model)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, state: dict,
                    rank: int = 0) -> None:
    """Write this rank's part of checkpoint ``step``: rank 0 everything into ``.tmp-step-N/``, the other ranks
    their RNG (and sharded optimizer) state beside it. Every rank calls it; then, after a barrier, rank 0 calls
    ``finish_checkpoint``."""
    from posttrain.distributed import sharded_optimizer

    weights = trainable_state(model)
    per_rank_optimizer = sharded_optimizer(model)
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{step}"
    optim_state = optimizer.state_dict()
    advice = "free some space (or lower train.keep_checkpoints), then continue with --resume"
    with writing(root, f"checkpoint step-{step}", advice) as w:
        try:
            if rank == 0:
                w.need(tensor_bytes(weights) + (0 if per_rank_optimizer else tensor_bytes(optim_state)))
                remove_tree(tmp, root)
                tmp.mkdir()
                save_file(weights, str(tmp / "trainable.safetensors"))
                if not per_rank_optimizer:
                    torch.save(optim_state, tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
            torch.save(rng_state(), (tmp if rank == 0 else root) / f"rng-{rank}.pt")
            if per_rank_optimizer:
                torch.save(optim_state, (tmp if rank == 0 else root) / f"optimizer-{rank}.pt")
        except BaseException:
            if rank == 0:
                remove_tree(tmp, root, ignore_errors=True)  # a failed checkpoint must not keep filling the disk
            raise


def finish_checkpoint(run_dir: str | Path, step: int, world: int = 1, keep: int = 2) -> Path:
    """Rank 0, after every rank's ``save_checkpoint``: move the other ranks' files in, write the manifest last,
    flush, rename ``.tmp-step-N`` to ``step-N``, and delete all but the ``keep`` newest checkpoints (0: keep all)."""
    root = checkpoints_dir(run_dir)
    tmp, final = root / f"{TMP_PREFIX}{step}", root / f"step-{step}"
    for r in range(1, world):
        for name in (f"rng-{r}.pt", f"optimizer-{r}.pt"):
            if (root / name).exists():
                (root / name).replace(tmp / name)
    with writing(root, f"checkpoint step-{step}", "free some space, then continue with --resume"):
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
        fsync_tree(tmp)
    remove_tree(final, root)  # a damaged checkpoint of this step, redone after resuming from an earlier one
    tmp.rename(final)
    fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        remove_tree(old, root, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------
# Finding and verifying


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed from their temporary directory), oldest first; not yet verified."""
    return [p for p in step_dirs(run_dir) if (p / MANIFEST).is_file() or (p / "state.json").is_file()]


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Every ``step-N`` directory, complete or not, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def leftovers(run_dir: str | Path) -> list[Path]:
    """What a writer that was killed (or failed) mid-checkpoint leaves: ``.tmp-step-N/`` and staged rank files."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(TMP_PREFIX) or
                  re.fullmatch(r"(rng|optimizer)-\d+\.pt", p.name))


def checkpoint_problem(path: Path) -> str | None:
    """None when checkpoint ``path`` is intact (every file its manifest lists has the recorded size and sha256);
    else what is wrong. A checkpoint from before manifests is checked for its files only."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        missing = [n for n in _LEGACY_FILES if not (path / n).is_file()]
        return f"{missing[0]} is missing" if missing else None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != rec["bytes"]:
            return f"{name} has {size:,} bytes where {rec['bytes']:,} were written"
        if sha256_file(f) != rec["sha256"]:
            return f"{name} does not match its sha256 (its contents changed after it was written)"
    return None


def newest_intact(run_dir: str | Path, verbose: bool = True) -> Path | None:
    """The newest checkpoint whose manifest checks out (damaged ones are reported and skipped); None when there
    is no checkpoint; a UserError when there are some and none is intact."""
    problems = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        problems.append(_report_damaged(path, problem, verbose))
    if problems:
        raise _none_intact(run_dir, problems)
    return None


def _report_damaged(path: Path, problem: str, verbose: bool) -> str:
    if verbose:
        print(f"[posttrain] checkpoint {path} is damaged ({problem}); not using it", flush=True)
    return f"{path.name}: {problem}"


def _none_intact(run_dir, problems: list[str]) -> UserError:
    root = checkpoints_dir(run_dir)
    return UserError(f"--resume: no intact checkpoint in {root} ({'; '.join(problems)}); delete {root} and run "
                     "without --resume to start over")


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class _Read:
    weights: dict
    optimizer: dict
    scheduler: dict
    rng: dict | None
    state: dict


def _read(path: Path, rank: int) -> _Read:
    """Every file of checkpoint ``path`` read into memory; nothing is applied yet, so a file that fails to load
    leaves the model and optimizer untouched."""
    optim_file = path / f"optimizer-{rank}.pt"
    if not optim_file.exists():
        optim_file = path / "optimizer.pt"
    rng_file = path / f"rng-{rank}.pt"
    return _Read(weights=load_file(str(path / "trainable.safetensors")),
                 optimizer=torch.load(optim_file, weights_only=False),
                 scheduler=torch.load(path / "scheduler.pt", weights_only=False),
                 rng=torch.load(rng_file, weights_only=False) if rng_file.exists() else None,
                 state=json.loads((path / "state.json").read_text()))


def load_checkpoint(run_dir: str | Path, model, optimizer, scheduler, rank: int = 0, path: Path | None = None,
                    verbose: bool = True) -> dict | None:
    """Restore the newest intact checkpoint (or ``path``, chosen by the main process) into model, optimizer,
    scheduler and RNGs; -> its state (``step`` and what the recipe saved). A damaged checkpoint (manifest
    mismatch, or a file that does not load) is reported and the one before it is used. None when there is no
    checkpoint; a UserError when none is intact, or when the checkpoint does not fit the model."""
    candidates = [path] if path is not None else list(reversed(list_checkpoints(run_dir)))
    problems: list[str] = []
    for ck in candidates:
        problem = checkpoint_problem(ck)
        if problem is None:
            try:
                loaded = _read(ck, rank)
            except Exception as exc:  # noqa: BLE001 - any loader's error means the same: this file is damaged
                problem = f"it does not load: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if problem is None:
            break
        problems.append(_report_damaged(ck, problem, verbose))
    else:
        if problems:
            raise _none_intact(run_dir, problems)
        return None
    if problems and verbose:
        print(f"[posttrain] resuming from {ck.name}, the newest intact checkpoint", flush=True)
    _apply(ck, loaded, model, optimizer, scheduler)
    return loaded.state


def _apply(path: Path, loaded: _Read, model, optimizer, scheduler) -> None:
    from posttrain.distributed import load_trainable_state

    mismatch = model_mismatch(loaded.weights, model)
    if mismatch is None:
        try:
            optimizer.load_state_dict(loaded.optimizer)
        except ValueError as exc:
            mismatch = f"the optimizer state does not fit ({exc})"
    if mismatch is not None:
        raise UserError(f"checkpoint {path} does not fit the model: {mismatch}. The recipe's model or lora settings "
                        f"differ from those the run was trained with (see {path.parents[1] / 'config.yaml'}); a "
                        "checkpoint resumes only the run that wrote it")
    load_trainable_state(model, loaded.weights)
    scheduler.load_state_dict(loaded.scheduler)
    if loaded.rng is not None:
        set_rng_state(loaded.rng)


def model_mismatch(weights: dict[str, torch.Tensor], model) -> str | None:
    """None when ``weights`` are exactly the model's trainable parameters with their shapes; else the first
    difference, in words."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, tensor in weights.items():
        if name not in params:
            return f"it holds {name}, which the model does not train"
        shape = tuple(getattr(params[name], "ds_shape", params[name].shape))  # ZeRO-3 keeps the real shape aside
        if tuple(tensor.shape) != shape:
            return f"{name} has shape {tuple(tensor.shape)} in the checkpoint and {shape} in the model"
    extra = [n for n in params if n not in weights]
    if extra:
        return f"the model trains {extra[0]}, which the checkpoint does not hold ({len(extra)} such tensors)"
    return None
