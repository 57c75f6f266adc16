"""Checkpoints written atomically, and exact resume.

A checkpoint is ``RUN/checkpoints/step-N/`` holding the trainable weights (the adapter, or every weight in
full fine-tuning), the optimizer and scheduler states, every RNG state, and a ``state.json`` with the
data position. It is written into a temporary directory that is renamed only when complete, so the run
directory never holds a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, state: dict,
                    keep: int = 2, rank: int = 0) -> Path | None:
    """Write checkpoint ``step`` atomically (rank 0 writes; all ranks' RNG states, and optimizer states when they
    are sharded (FSDP2, DeepSpeed), are saved by rank). Every rank calls it."""
    from posttrain.distributed import sharded_optimizer

    weights = trainable_state(model)
    per_rank_optimizer = sharded_optimizer(model)
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, str(tmp / "trainable.safetensors"))
        if not per_rank_optimizer:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    rng_path = (tmp if rank == 0 else root) / f"rng-{rank}.pt"
    torch.save(rng_state(), rng_path)
    if per_rank_optimizer:
        torch.save(optimizer.state_dict(), (tmp if rank == 0 else root) / f"optimizer-{rank}.pt")
    if rank != 0:
        return None
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def collect_rank_rng(run_dir: str | Path, step: int, world: int) -> None:
    """Move the other ranks' RNG (and sharded optimizer) files into checkpoint ``step`` (called by rank 0 after a
    barrier)."""
    root = checkpoints_dir(run_dir)
    for r in range(1, world):
        for name in (f"rng-{r}.pt", f"optimizer-{r}.pt"):
            src = root / name
            if src.exists():
                src.replace(root / f"step-{step}" / name)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and
             (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def load_checkpoint(run_dir: str | Path, model, optimizer, scheduler, rank: int = 0) -> dict | None:
    """Restore the latest complete checkpoint into model, optimizer, scheduler and RNGs; -> its state."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    path = ckpts[-1]
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model (e.g. {missing[0]}): was the recipe changed?")
    from posttrain.distributed import load_trainable_state

    load_trainable_state(model, weights)
    optim_file = path / f"optimizer-{rank}.pt"
    if not optim_file.exists():
        optim_file = path / "optimizer.pt"
    optimizer.load_state_dict(torch.load(optim_file, weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "state.json").read_text())
