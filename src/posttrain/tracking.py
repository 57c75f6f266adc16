"""Per-step metrics: ``metrics.jsonl`` (one JSON object per step), a live console display, and TensorBoard,
W&B or trackio when the recipe asks for them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from posttrain.errors import UserError


class MetricsLogger:
    def __init__(self, run_dir: str | Path, report_to: list[str] | None = None, total_steps: int | None = None,
                 resume_step: int = 0, enabled: bool = True, title: str = "train", config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.total = total_steps
        self.sinks = []
        self._progress = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.exists():  # drop lines of steps that the resumed run will redo
            keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif not resume_step:
            self.path.write_text("")
        self._file = self.path.open("a")
        for name in report_to or []:
            self.sinks.append(_open_sink(name, Path(run_dir), config or {}))
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.description}"))
            self._task = self._progress.add_task("", total=total_steps, completed=resume_step)
            self._progress.start()

    def log(self, step: int, metrics: dict, echo: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for kind, sink in self.sinks:
            _write_sink(kind, sink, step, metrics)
        short = "  ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if k in SHOWN)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, description=short)
        elif echo:
            total = f"/{self.total}" if self.total else ""
            print(f"[step {step}{total}] {short}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        for kind, sink in self.sinks:
            if kind == "tensorboard":
                sink.close()
            elif kind in ("wandb", "trackio"):
                sink.finish()


SHOWN = ("loss", "val_loss", "grad_norm", "learning_rate", "tokens_per_s", "padding_pct", "reward", "reward_std", "kl",
         "completions/mean_length", "step_time")


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _fmt(v) -> str:
    v = _clean(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def _open_sink(name: str, run_dir: Path, config: dict):
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            return name, SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if name == "wandb":
            import wandb

            return name, wandb.init(project="posttrain", dir=str(run_dir), config=config)
        if name == "trackio":
            import trackio

            return name, trackio.init(project="posttrain", config=config)
    except ImportError:
        raise UserError(f"train.report_to includes {name} but it is not installed: pip install 'posttrain[track]'") from None
    raise UserError(f"train.report_to: unknown tracker {name!r} (tensorboard, wandb, trackio)")


def _write_sink(kind: str, sink, step: int, metrics: dict) -> None:
    numeric = {k: float(_clean(v)) for k, v in metrics.items() if isinstance(_clean(v), (int, float))}
    if kind == "tensorboard":
        for k, v in numeric.items():
            sink.add_scalar(k, v, step)
    else:
        sink.log(numeric, step=step)
