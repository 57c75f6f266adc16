"""Multi-process training through ``accelerate launch``: DDP, FSDP2 and DeepSpeed ZeRO-2/3.

The training loops (``sft.py``, ``grpo.py``) stay plain loops; this module holds the few places where the
engines differ, each a small function with one job:

- :func:`check_launch` refuses launches that would silently do something else (an FSDP config on CPU, where
  accelerate runs plain DDP; FSDP1; DeepSpeed with a variable number of micro-batches per step).
- :func:`prepare` hands the model (and, for FSDP2 and DeepSpeed, the optimizer) to
  ``accelerator.prepare``. FSDP2 replaces parameters by sharded DTensors, so the optimizer must be prepared
  with the model (accelerate re-points it at the sharded parameters). DeepSpeed wraps both in its engine.
- :func:`backward` / :func:`finish_step`: DDP and FSDP2 accumulate gradients over the micro-batches and the loop
  clips and steps itself. DeepSpeed steps inside the last ``backward`` (its engine clips and steps the optimizer;
  the learning-rate schedule is posttrain's, stepped in :func:`finish_step`: the engine steps only DeepSpeed's
  own schedulers) and divides each loss by its ``gradient_accumulation_steps``: the loops' losses are already
  normalized for the whole step, so :func:`backward` multiplies that division back out.
- :func:`full_params` gathers full weights for generation (FSDP2: ``FSDPModule.unshard()`` with resharding
  after forward switched off, so that ranks decoding different numbers of steps never wait on each other's
  all-gathers; ZeRO-3: ``deepspeed.zero.GatheredParameters``), and :func:`full_trainable_state` gathers the
  trainable weights for checkpoints and the saved adapter (a collective: every rank calls it).

FSDP2 preparation (:func:`prepare`): accelerate's ``TRANSFORMER_BASED_WRAP`` reads ``_no_split_modules`` from
the module it is given, which is posttrain's loss wrapper (``LossModule``, ``PolicyLogps``, ...), not the
transformers model: it would wrap no decoder layer and hold the whole model in one FSDP unit. So the wrapped
model's ``_no_split_modules`` (Qwen3: ``Qwen3DecoderLayer``) is handed to accelerate's plugin unless the config
names classes itself (``fsdp_transformer_layer_cls_to_wrap``). The root's FSDP state is initialized right after
preparation: a rollout runs the inner model's layers (their FSDP hooks) before any forward through the root, and
FSDP2 would otherwise make the first layer it sees a root and fail at the first training forward.

What runs where: DDP runs on CPU (gloo) and is tested with two processes. torch's FSDP2 runs on CPU with gloo:
``tests/integration/test_scale_out.py`` drives these helpers through ``fully_shard`` with two processes, and
``test_accelerate_cpu.py`` runs accelerate's own FSDP2 preparation of posttrain's wrappers (the shipped
fsdp2_8gpu.yaml, two CPU processes) under SFT and GRPO. accelerate 1.x itself enables FSDP only for GPU-type
setups (on CPU it keeps ``DistributedType.MULTI_CPU`` and ignores the FSDP plugin), so that test switches the
accelerate state to FSDP by hand, and posttrain refuses an FSDP config on CPU. DeepSpeed runs on CPU through its
CPU accelerator on gloo: off CUDA, under a DeepSpeed config, :func:`accelerator_kwargs` asks accelerate for its
GPU-style setup on the gloo backend (accelerate's CPU mode would ignore the DeepSpeed config), and
``test_accelerate_cpu.py`` runs ZeRO-2 and ZeRO-3 SFT and GRPO that way when deepspeed is installed.
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


def _deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def accelerator_kwargs(grad_accum: int, device: str) -> dict:
    """``Accelerator`` arguments for a run on ``device``: accelerate's CPU mode (gloo) off CUDA. Under DeepSpeed
    its engine must know the micro-batches per step, and off CUDA accelerate must not take its CPU mode (which
    ignores a DeepSpeed config): its GPU-style setup on the gloo backend hands the launch to DeepSpeed, whose CPU
    accelerator then runs ZeRO over gloo (how the CPU tests run it)."""
    cuda = device.startswith("cuda")
    if not _deepspeed_launch():
        return {"cpu": not cuda}
    kw = {"cpu": False, "gradient_accumulation_steps": grad_accum}
    if not cuda:
        from accelerate.utils import InitProcessGroupKwargs

        kw["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return kw


def check_launch(accelerator, *, variable_micro_batches: bool = False, optimizer: str | None = None) -> str:
    """Refuse launches that would not do what their config says, or that fail at the first step
    (``optimizer``: the recipe's ``train.optimizer``); returns :func:`launch_kind`."""
    kind = launch_kind(accelerator)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not kind.startswith("fsdp"):
        raise UserError(
            f"the accelerate config asks for FSDP but accelerate runs {kind} here ({accelerator.device}): accelerate "
            "enables FSDP only on GPUs. On CPU use the shipped accelerate/cpu_2proc.yaml (DDP over gloo; "
            "`posttrain recipes accelerate/cpu_2proc` prints its path)")
    if kind == "fsdp1":
        raise UserError("FSDP1 is not supported: set fsdp_config.fsdp_version: 2 in the accelerate config "
                        "(see the shipped accelerate/fsdp2_8gpu.yaml: `posttrain recipes accelerate/fsdp2_8gpu`)")
    if kind == "fsdp2" and optimizer == "adamw_8bit":
        # bitsandbytes' 8-bit step calls its own kernel on plain tensors; FSDP2's parameters and gradients are
        # DTensors (optimizer_update_8bit_blockwise has no DTensor rule), so the first step would fail
        raise UserError("train.optimizer=adamw_8bit does not run under FSDP2 (bitsandbytes' 8-bit AdamW cannot step "
                        "FSDP2's sharded DTensor parameters): set train.optimizer=adamw (on the command line or in "
                        "the recipe; sharding already divides the optimizer state by the number of GPUs), or use "
                        "DDP or DeepSpeed (accelerate/ddp_8gpu.yaml, zero2.yaml), where 8-bit AdamW works")
    if kind == "deepspeed" and variable_micro_batches:
        raise UserError("DeepSpeed counts a fixed number of micro-batches per optimizer step, but "
                        "grpo.dynamic_sampling changes it from step to step: use DDP or FSDP2 "
                        "(the shipped accelerate/ddp_8gpu.yaml, fsdp2_8gpu.yaml), or grpo.dynamic_sampling=false")
    return kind


def prepare(accelerator, module: torch.nn.Module, optimizer, scheduler, *, micro_batch: int = 1):
    """-> (module, optimizer, scheduler) ready for the loop (see the module docstring). ``micro_batch``: the
    rows of one micro-batch (``train.batch_size``), which DeepSpeed must be told (no DataLoader is prepared)."""
    kind = launch_kind(accelerator)
    if kind == "fsdp2":
        wrap_decoder_layers(accelerator.state.fsdp_plugin, module)
        module, optimizer = accelerator.prepare(module, optimizer)
        init_fsdp_root(module)
        return module, optimizer, scheduler
    if kind == "deepspeed":  # the scheduler stays posttrain's: see finish_step
        set_deepspeed_micro_batch(accelerator.state.deepspeed_plugin, micro_batch)
        module, optimizer = accelerator.prepare(module, optimizer)
        return module, optimizer, scheduler
    return accelerator.prepare(module), optimizer, scheduler


def no_split_modules(module: torch.nn.Module) -> list[str]:
    """The decoder-layer class names of the transformers model inside ``module`` (a loss wrapper, a PEFT model):
    the first ``_no_split_modules`` found walking down from ``module``."""
    for m in module.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return list(names)
    return []


def wrap_decoder_layers(plugin, module: torch.nn.Module) -> None:
    """Give accelerate's FSDP plugin the decoder-layer classes to shard one by one (``TRANSFORMER_BASED_WRAP``
    reads ``_no_split_modules`` from the prepared wrapper, which has none); a class list set in the accelerate
    config (``fsdp_transformer_layer_cls_to_wrap``) is kept."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    policy = getattr(policy, "func", policy)
    if policy is transformer_auto_wrap_policy and not plugin.transformer_cls_names_to_wrap:
        names = no_split_modules(module)
        if not names:
            raise UserError(f"FSDP TRANSFORMER_BASED_WRAP: the model ({type(module).__name__}) names no decoder-layer "
                            "class (_no_split_modules): set fsdp_transformer_layer_cls_to_wrap in the accelerate "
                            "config (for example Qwen3DecoderLayer)")
        plugin.transformer_cls_names_to_wrap = names


def init_fsdp_root(module: torch.nn.Module) -> None:
    """Initialize FSDP2's root state on the prepared module now. FSDP2 decides the root lazily, at the first
    forward of any wrapped module; GRPO's first rollout runs the decoder layers (through the inner model) before
    any forward through the root, which would make a layer the root and fail the first training forward
    ("FSDP requires running forward through the root module first"). ``_lazy_init`` is torch's own entry point
    for that decision (private: no public one exists); it is what the root's first forward calls."""
    state = getattr(module, "_get_fsdp_state", None)
    if state is not None:
        state()._lazy_init()


def set_deepspeed_micro_batch(plugin, micro_batch: int) -> None:
    """Set ``train_micro_batch_size_per_gpu`` in the DeepSpeed plugin's config before ``prepare``. The shipped
    configs leave it "auto", which accelerate fills only from a prepared DataLoader (posttrain batches itself) and
    otherwise refuses; accelerate derives ``train_batch_size`` from it and the accumulation steps."""
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch


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
    if launch_kind(accelerator) == "deepspeed":  # the engine stepped the optimizer inside the last backward
        # ... but not the schedule: DeepSpeed steps only its own schedulers (a torch LambdaLR is not one, so
        # accelerate does not hand it to the engine), and accelerate's wrapper would step it once per process
        norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        return float(norm if norm is not None else float("nan")), lr
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


def _reshards_after_forward(m) -> bool:
    """Whether FSDP module ``m`` frees its gathered parameters after forward (torch has a setter, no getter)."""
    return any(g.post_forward_mesh_info is not None for g in m._get_fsdp_state()._fsdp_param_groups)


@contextmanager
def full_params(model):
    """Inside, every parameter of ``model`` (the prepared module) is whole on every rank, and a forward of any
    part of it issues no collective, so ranks may run different numbers of decode steps (generation, weight export).

    FSDP2: each ``FSDPModule`` is unsharded once and kept unsharded (``set_reshard_after_forward(False)``), then
    resharded, and each module's own setting is put back (accelerate leaves the root and the head unit at False).
    ZeRO-3: ``deepspeed.zero.GatheredParameters``, with DeepSpeed's module hooks taken off inside it: they would
    re-partition each layer's weights after its forward and all-gather them again at every decode step (ranks
    that decode different numbers of steps would then wait on each other forever); TRL's
    ``unwrap_model_for_generation`` does the same. Otherwise nothing to do. Every rank must enter it together."""
    fsdp = _fsdp_modules(model)
    if fsdp:
        before = [_reshards_after_forward(m) for m in fsdp]
        for m in fsdp:
            m.set_reshard_after_forward(False, recurse=False)
        for m in fsdp:
            m.unshard()
        try:
            yield
        finally:
            for m, was in zip(fsdp, before):
                m.reshard()
                m.set_reshard_after_forward(was, recurse=False)
        return
    zero3 = _zero3_params(model)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            offload = _zero3_offload(model)
            _remove_zero3_hooks(offload)
            try:
                yield
            finally:
                _restore_zero3_hooks(offload)
        return
    yield


def _zero3_offload(engine):
    """The DeepSpeed engine's parameter-offload object that holds ZeRO-3's module hooks (None before the engine
    has its optimizer, or when ``engine`` is not one)."""
    opt = getattr(engine, "optimizer", None)
    return getattr(opt, "parameter_offload", None)


def _remove_zero3_hooks(offload) -> None:
    if offload is None:
        return
    from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

    for p in iter_params(offload.module, recurse=True):
        p.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def _restore_zero3_hooks(offload) -> None:
    """Put ZeRO-3's module hooks back, with the parameter coordinator's recorded trace (the order of fetches it
    prefetches by) invalidated: the generation forwards were not a training step."""
    if offload is None:
        return
    coordinator = offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()
    offload._register_deepspeed_module(offload.module)


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
    """Whether the weights or the optimizer state differ between ranks (FSDP2 DTensors, DeepSpeed partitions):
    then the whole weights are gathered for saving and each rank saves and loads its own optimizer state.
    Decided from the parameters themselves, so ``model`` may be the inner model or the prepared module (FSDP2
    replaces every parameter under the root it prepared by a DTensor, whichever modules are FSDP units)."""
    from torch.distributed.tensor import DTensor

    return _deepspeed_launch() or any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())


__all__ = ["DivergedError", "GatheredRollouts", "accelerator_kwargs", "gather_all", "accumulation", "backward",
           "check_launch", "finish_step", "full_params", "full_trainable_state", "grad_norm", "init_fsdp_root",
           "launch_kind", "load_trainable_state", "no_split_modules", "nonfinite_tensors", "prepare",
           "set_deepspeed_micro_batch", "sharded_optimizer", "wrap_decoder_layers"]
