"""``--resume`` continues the run that wrote the checkpoints, with that run's recipe.

A checkpoint restores the weights, the optimizer (with its learning rate, betas and weight decay) and the
scheduler's position; the recipe given with ``--resume`` rebuilds everything else. So a recipe that differs from
the run's ``config.yaml`` either cannot take effect (the base model, the LoRA shape, the optimizer's settings:
the checkpoint overrides them, or does not fit) or changes the run halfway (the schedule's length, the data, the
GRPO settings). Before this module, both were accepted silently and ``config.yaml`` was rewritten with values the
run had not used.

Now ``--resume`` compares the recipe with ``config.yaml`` before anything is loaded and refuses, listing every key
that differs. Keys that only say where and how often to write (``SAFE``) may change freely. Other keys may
change when the user lists them (``--allow-changes train.max_steps,data``: keys or whole sections), except those
in ``FIXED``. ``config.yaml`` is then rewritten with the new values and a comment line per resume
(``# resumed at step 4: train.max_steps: 6 -> 10``), so it states what the run used and from which step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.config import dump_recipe
from posttrain.errors import UserError

CONFIG = "config.yaml"
RECORD = "# resumed"

# where and how often the run writes, not what it trains: accepted without --allow-changes
SAFE = ("output_dir", "model.device", "train.save_every", "train.keep_checkpoints", "train.log_every",
        "train.report_to", "train.eval_every", "grpo.log_completions_every", "grpo.num_completions_to_print",
        "grpo.zero_std_warning", "grpo.vllm.server_host", "grpo.vllm.server_port", "grpo.vllm.server_timeout")
# what the checkpoint fixes: a change cannot take effect, so it is refused even with --allow-changes
_BASE = "the checkpoint's weights belong to the base model the run was trained on"
_OPTIM = "the optimizer state in the checkpoint restores it"
FIXED = {"model.name": _BASE, "model.revision": _BASE, "model.gguf_file": _BASE, "model.load_in_4bit": _BASE,
         "model.backend": _BASE, "lora": "the checkpoint holds an adapter of the run's shape and target modules",
         "init_adapter": "the run started from it", "init_adapter_mode": "the run started from it",
         "train.optimizer": "the checkpoint holds that optimizer's state", "train.lr": _OPTIM, "train.betas": _OPTIM,
         "train.weight_decay": _OPTIM}
_ABSENT = object()


def _under(key: str, prefixes) -> str | None:
    return next((p for p in prefixes if key == p or key.startswith(p + ".")), None)


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every leaf that differs; a section that is null on one side
    (``lora: null``) is one leaf; keys present on one side only (another posttrain version) are not compared."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{prefix}{k}.")
        return out
    if old is _ABSENT or new is _ABSENT or old == new:
        return []
    return [(prefix.rstrip("."), old, new)]


def saved_recipe(run_dir: Path, cls: type[BaseModel]) -> dict | None:
    """The run's ``config.yaml`` as the recipe class dumps it (defaults filled in, so only real differences
    show); the raw YAML when it no longer validates; None when there is none."""
    path = run_dir / CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--resume: {path} is not valid YAML ({exc}); restore it or start a new run") from None
    try:
        return cls.model_validate(data).model_dump(mode="json")
    except ValidationError:
        return data


def check_recipe(run_dir: Path, cfg: BaseModel, allow: list[str] | tuple[str, ...] = ()) -> list[tuple]:
    """The changes ``--resume`` with ``cfg`` makes to the run's recipe, when they are all acceptable (see the
    module docstring); a UserError listing them otherwise."""
    old = saved_recipe(run_dir, type(cfg))
    if old is None:
        return []
    changes = [c for c in differences(old, cfg.model_dump(mode="json")) if c[0] != "output_dir"]  # a copied run
    refused, lines = [], []
    for key, before, after in changes:
        if _under(key, SAFE):
            continue
        line = f"  {key}: {_show(before)} -> {_show(after)}"
        fixed = _under(key, FIXED)
        if fixed:
            line += f" (cannot change on resume: {FIXED[fixed]})"
        if fixed or not _under(key, allow):
            refused.append(key)
        lines.append(line)
    if refused:
        flexible = [k for k in refused if not _under(k, FIXED)]
        fixed = [k for k in refused if _under(k, FIXED)]
        advice = ["resume with the run's settings"]
        if flexible:
            advice.append(f"pass --allow-changes {','.join(flexible)} to continue with the new values (config.yaml "
                          "will record them and the step they started at)")
        if fixed:
            advice.append(f"start a new run to change {', '.join(fixed)}")
        raise UserError(f"--resume: the recipe differs from the one {run_dir} was trained with "
                        f"({run_dir / CONFIG}):\n" + "\n".join(lines) + "\n" + "; or ".join(advice))
    return changes


def save_resumed_recipe(run_dir: Path, cfg: BaseModel, changes: list[tuple], step: int) -> Path:
    """``config.yaml`` with ``cfg`` (what the run uses from now on), after one comment line per resume that
    changed something: the earlier lines are kept."""
    path = run_dir / CONFIG
    history = [ln for ln in path.read_text().splitlines() if ln.startswith(RECORD)] if path.is_file() else []
    if changes:
        history.append(f"{RECORD} at step {step}: " + "; ".join(f"{k}: {_show(a)} -> {_show(b)}"
                                                                for k, a, b in changes))
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text("".join(h + "\n" for h in history) + dump_recipe(cfg))
    tmp.replace(path)
    return path


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
