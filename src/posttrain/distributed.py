"""Multi-process training through ``accelerate launch``: DDP, FSDP2 and DeepSpeed ZeRO-2/3.

The training loops (``sft.py``, ``grpo.py``) stay plain loops; this module holds the few places where the
engines differ, each a small function with one job:

- :func:`check_launch` refuses launches that would silently do something else (an FSDP config on CPU, where
  accelerate runs plain DDP; FSDP1; DeepSpeed with a variable number of micro-batches per step).
- :func:`prepare` hands the model (and, for FSDP2 and DeepSpeed, the optimizer and scheduler) to
  ``accelerator.prepare``. FSDP2 replaces parameters by sharded DTensors, so the optimizer must be prepared
  with the model (accelerate re-points it at the sharded parameters). DeepSpeed wraps both in its engine.
- :func:`backward` / :func:`finish_step`: DDP and FSDP2 accumulate gradients over the micro-batches and the loop
  clips and steps itself. DeepSpeed steps inside the last ``backward`` (its engine clips, steps the optimizer
  and the scheduler) and divides each loss by its ``gradient_accumulation_steps``: the loops' losses are already
  normalized for the whole step, so :func:`backward` multiplies that division back out.
- :func:`full_params` gathers full weights for generation (FSDP2: ``FSDPModule.unshard()`` with resharding
  after forward switched off, so that ranks decoding different numbers of steps never wait on each other's
  all-gathers; ZeRO-3: ``deepspeed.zero.GatheredParameters``), and :func:`full_trainable_state` gathers the
  trainable weights for checkpoints and the saved adapter (a collective: every rank calls it).

What runs where: DDP runs on CPU (gloo) and is tested with two processes. torch's FSDP2 runs on CPU with
gloo, and ``tests/integration/test_scale_out.py`` drives these helpers through ``fully_shard`` with two
processes; but accelerate 1.x enables FSDP only for GPU-type distributed setups (on CPU it keeps
``DistributedType.MULTI_CPU`` and ignores the FSDP plugin), so FSDP through ``accelerate launch`` runs on GPUs
only. DeepSpeed needs CUDA and is not exercised by CI.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager, nullcontext

import torch

from posttrain.errors import UserError


def launch_kind(accelerator) -> str:
    """``single``, ``ddp``, ``fsdp2``, ``fsdp1`` or ``deepspeed``."""
    name = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if name == "DEEPSPEED":
        return "deepspeed"
    if name == "FSDP":
        return "fsdp2" if getattr(accelerator, "is_fsdp2", False) else "fsdp1"
    return "ddp" if accelerator.num_processes > 1 else "single"


def accelerator_kwargs(grad_accum: int) -> dict:
    """Extra ``Accelerator`` arguments: under DeepSpeed its engine must know the micro-batches per step."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"gradient_accumulation_steps": grad_accum}
    return {}


def check_launch(accelerator, *, variable_micro_batches: bool = False) -> str:
    """Refuse launches that would not do what their config says; returns :func:`launch_kind`."""
    kind = launch_kind(accelerator)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not kind.startswith("fsdp"):
        raise UserError(
            f"the accelerate config asks for FSDP but accelerate runs {kind} here ({accelerator.device}): accelerate "
            "enables FSDP only on GPUs. On CPU use the shipped accelerate/cpu_2proc.yaml (DDP over gloo; "
            "`posttrain recipes accelerate/cpu_2proc` prints its path)")
    if kind == "fsdp1":
        raise UserError("FSDP1 is not supported: set fsdp_config.fsdp_version: 2 in the accelerate config "
                        "(see the shipped accelerate/fsdp2_8gpu.yaml: `posttrain recipes accelerate/fsdp2_8gpu`)")
    if kind == "deepspeed" and variable_micro_batches:
        raise UserError("DeepSpeed counts a fixed number of micro-batches per optimizer step, but "
                        "grpo.dynamic_sampling changes it from step to step: use DDP or FSDP2 "
                        "(the shipped accelerate/ddp_8gpu.yaml, fsdp2_8gpu.yaml), or grpo.dynamic_sampling=false")
    return kind


def prepare(accelerator, module: torch.nn.Module, optimizer, scheduler):
    """-> (module, optimizer, scheduler) ready for the loop (see the module docstring)."""
    kind = launch_kind(accelerator)
    if kind == "fsdp2":
        module, optimizer = accelerator.prepare(module, optimizer)
        return module, optimizer, scheduler
    if kind == "deepspeed":
        return accelerator.prepare(module, optimizer, scheduler)
    return accelerator.prepare(module), optimizer, scheduler


def accumulation(accelerator, module, last: bool):
    """The context of one micro-batch: gradients are synchronized only on the step's last one."""
    kind = launch_kind(accelerator)
    if kind == "deepspeed":  # a fixed count per step (check_launch): accumulate() marks the step's last one
        return accelerator.accumulate(module)
    if last or kind == "single":
        return nullcontext()
    return accelerator.no_sync(module)


def backward(accelerator, loss: torch.Tensor) -> None:
    if launch_kind(accelerator) == "deepspeed":
        loss = loss * accelerator.gradient_accumulation_steps  # DeepSpeed divides by it again
    accelerator.backward(loss)


def grad_norm(params, max_norm: float | None) -> float:
    """Clip the gradients' global norm to ``max_norm`` (None: measure only); works on DTensor (FSDP2) gradients."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


class DivergedError(UserError):
    """A step's loss, gradient norm or updated weights are not finite."""


def finish_step(accelerator, model, optimizer, scheduler, max_norm: float | None, *, loss: float, step: int,
                advice: str) -> tuple[float, float]:
    """Clip, step the optimizer and the scheduler, zero the gradients. -> (grad norm, learning rate used).

    The one place a diverged step is caught, so that no run ends with exit status 0 and non-finite weights: a
    non-finite ``loss`` (the step's, summed over processes) or gradient norm raises :class:`DivergedError` before
    the update, and an update that leaves a trainable weight non-finite (an enormous learning rate) raises it
    after; the run then stops before anything is saved. ``step`` (1-based) and ``advice`` (what to change) go into
    the message. DeepSpeed's engine has stepped already and owns its overflow handling: only the loss is checked."""
    def diverged(what: str) -> DivergedError:
        return DivergedError(f"{what} at step {step}: training diverged (no checkpoint written for it). {advice}, "
                             "or resume from the last checkpoint")

    if not math.isfinite(loss):
        raise diverged(f"loss is {loss}")
    if launch_kind(accelerator) == "deepspeed":  # the engine stepped inside the last backward
        norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        return float(norm if norm is not None else float("nan")), scheduler.get_last_lr()[0]
    params = [p for p in model.parameters() if p.requires_grad]
    norm = grad_norm(params, max_norm)
    if not math.isfinite(norm):
        raise diverged(f"the gradient norm is {norm}")
    lr = scheduler.get_last_lr()[0]
    try:
        optimizer.step()
    except RuntimeError as exc:  # torch refuses a step size beyond float32 (an lr of 1e38 or so)
        if "overflow" not in str(exc):
            raise
        raise diverged(f"the optimizer step overflowed (learning rate {lr:g}: {exc})") from None
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    bad = nonfinite_tensors(params, accelerator)
    if bad:
        raise diverged(f"the update (learning rate {lr:g}) left {bad} of {len(params)} trainable tensors with "
                       "non-finite values")
    return norm, lr


@torch.no_grad()
def nonfinite_tensors(params: list[torch.Tensor], accelerator=None) -> int:
    """How many of ``params`` hold a NaN or an infinity, over every process (this process's shard of a DTensor).
    One summing pass over the weights (a sum is finite unless a value is not, or it overflows float32; the few
    tensors whose sum is not finite are then checked value by value), about what one more optimizer read costs."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in params]
    sums = torch.stack([t.sum(dtype=torch.float32) for t in local]).isfinite().tolist() if local else []
    count = torch.tensor(float(sum(not bool(torch.isfinite(t).all()) for t, ok in zip(local, sums) if not ok)),
                         dtype=torch.float64)
    if accelerator is not None and accelerator.num_processes > 1:
        count = accelerator.reduce(count.to(accelerator.device), reduction="max")
    return int(count)


# ---------------------------------------------------------------------------------------------- gathering


def _fsdp_modules(model) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _zero3_params(model) -> list:
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


@contextmanager
def full_params(model):
    """Inside, every parameter of ``model`` is whole on every rank (for generation and weight export).

    FSDP2: each ``FSDPModule`` is unsharded once and kept unsharded (``set_reshard_after_forward(False)``), so a
    forward issues no collective: ranks may run different numbers of decode steps. ZeRO-3:
    ``deepspeed.zero.GatheredParameters``. Otherwise nothing to do. Every rank must enter it together."""
    fsdp = _fsdp_modules(model)
    if fsdp:
        for m in fsdp:
            m.set_reshard_after_forward(False, recurse=False)
        for m in fsdp:
            m.unshard()
        try:
            yield
        finally:
            for m in fsdp:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)
        return
    zero3 = _zero3_params(model)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield
        return
    yield


class GatheredRollouts:
    """A rollout engine whose ``generate`` runs inside :func:`full_params` of the prepared (sharded) module."""

    def __init__(self, engine, module):
        self.engine, self.module = engine, module

    def generate(self, *args, **kwargs):
        with full_params(self.module):
            return self.engine.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def gather_all(values: list, world: int) -> list:
    """This process's list -> every process's items, in rank order (Python objects; one process: a copy)."""
    if world == 1:
        return list(values)
    from accelerate.utils import gather_object

    return [x for part in gather_object([list(values)]) for x in part]


def full_trainable_state(model) -> dict[str, torch.Tensor]:
    """Name -> whole CPU tensor of every trainable parameter (the adapter, or all weights in full
    fine-tuning). A collective under FSDP2 and ZeRO-3: every rank must call it."""
    out = {}
    names = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    zero3 = [p for _, p in names if hasattr(p, "ds_id")]
    ctx = nullcontext()
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
    with ctx:
        for n, p in names:
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out[n] = t.contiguous().cpu()
    return out


def load_trainable_state(model, weights: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into (possibly sharded) trainable parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            p = params[name]
            if hasattr(p, "device_mesh"):  # DTensor shard: distribute the whole tensor the same way
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(tensor.to(p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(tensor.to(p.device, p.dtype))


def sharded_optimizer(model) -> bool:
    """Whether the optimizer state differs between ranks (FSDP2 DTensors, DeepSpeed partitions): then each
    rank saves and loads its own."""
    return bool(_fsdp_modules(model) or _zero3_params(model) or
                os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true")


__all__ = ["DivergedError", "GatheredRollouts", "accelerator_kwargs", "gather_all", "accumulation", "backward",
           "check_launch", "finish_step", "full_params", "full_trainable_state", "grad_norm", "launch_kind",
           "load_trainable_state", "nonfinite_tensors", "prepare", "sharded_optimizer"]
