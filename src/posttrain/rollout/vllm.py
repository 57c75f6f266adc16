"""The vLLM rollout backend (extra ``[vllm]``, CUDA only): ``generate(prompts, n, sampling, seeds) -> Rollouts``.

Not exercised by CI: vLLM cannot be installed on the machines here. It is written against vLLM's documented
API (``LLM``, ``SamplingParams``, sleep mode, the OpenAI-compatible server) and the way TRL drives a colocated
engine; the pure pieces (sampling settings -> vLLM keyword arguments, per-completion seeds, the OpenAI request
body and its parsing, outputs -> ``Rollouts``, the merged weights pushed to the engine, the engine's own
arguments) are unit-tested in ``tests/unit/test_vllm_backend.py`` without importing vLLM.

Two modes (``grpo.vllm.mode``):

- ``colocate``: every training process holds its own ``vllm.LLM`` on its GPU, capped at
  ``gpu_memory_utilization`` of the GPU's memory (several processes with ``tensor_parallel_size`` > 1 share one
  engine through ``distributed_executor_backend="external_launcher"``, as TRL does). With ``enable_sleep_mode``
  the engine sleeps between rollouts (level 2: weights and KV cache released, so training gets the memory back)
  and wakes up for the next one. After each optimizer step the policy's weights are pushed before the next
  rollout: LoRA is merged into the base weights (``W + scale * B @ A``, computed from the whole tensors, so it
  works under FSDP2 and ZeRO-3 too) and loaded with vLLM's ``model.load_weights`` (TRL's colocate path); the
  engine's prefix cache is reset.
- ``server``: generation runs on other GPUs (or nodes) in vLLM's OpenAI-compatible server started with
  ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. After each step rank 0 saves the adapter to
  ``grpo.vllm.adapter_dir`` (a filesystem the server can read) and registers it through
  ``/v1/load_lora_adapter``; every rank then sends its own requests to ``/v1/completions``. LoRA only (full
  weights do not travel over HTTP).

Sampling: every completion is its own request with ``n=1`` and the seed ``(sampling.seed, prompt seed, j)``
mixed as the transformers backend mixes it, so a completion does not depend on its batch, the process count or a
restart (the two backends draw different numbers from the same seed: they are reproducible, not identical).
vLLM's prefix cache shares each prompt's prefill across its G requests. Log-probabilities are vLLM's
``processed_logprobs`` (after temperature; with top-k/top-p/min-p on, vLLM also applies those filters to them,
the trainer does not), which is what truncated importance sampling (``grpo.importance_sampling_cap``) compares
with the trainer's own log-probabilities.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Sequence

import torch

from posttrain.distributed import full_params
from posttrain.errors import UserError
from posttrain.models import resolve_source
from posttrain.rollout import Rollouts, SamplingParams, completion_seed, stop_token_ids

INSTALL_HINT = ("pip install 'posttrain[vllm]' on a machine with an NVIDIA GPU (vLLM is CUDA-only), or use the "
                "transformers backend (grpo.rollout_backend=hf, eval --backend hf)")


def require_vllm():
    """Import vLLM or raise a UserError naming the extra to install."""
    try:
        import vllm
    except ImportError as exc:
        raise UserError(f"the vLLM backend needs the vllm package ({exc.name or 'vllm'} is not installed): "
                        f"{INSTALL_HINT}") from None
    return vllm


# ---------------------------------------------------------------------------------------------- pure mapping


def completion_seeds(base_seed: int, prompt_seeds: Sequence[int], n: int) -> list[int]:
    """One seed per completion, grouped by prompt: the transformers backend's per-completion key."""
    return [completion_seed(base_seed, s, j) for s in prompt_seeds for j in range(n)]


def sampling_kwargs(sampling: SamplingParams, *, seed: int | None = None, n: int = 1) -> dict:
    """Our :class:`SamplingParams` -> keyword arguments of ``vllm.SamplingParams``, one to one.
    ``top_k`` <= 0 (off) becomes vLLM's -1; ``logprobs`` asks for the sampled token's log-probability only."""
    return {
        "n": n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "min_p": sampling.min_p,
        "seed": seed,
        "max_tokens": sampling.max_new_tokens,
        "stop": list(sampling.stop_strings) or None,
        "stop_token_ids": list(sampling.stop_token_ids) or None,
        "include_stop_str_in_output": sampling.include_stop_str_in_output,
        "ignore_eos": sampling.ignore_eos,
        "logprobs": 0 if sampling.logprobs else None,
        "skip_special_tokens": True,
    }


def completion_request(sampling: SamplingParams, prompt: Sequence[int], model: str, seed: int | None) -> dict:
    """The JSON body of one ``POST /v1/completions`` to vLLM's OpenAI-compatible server (vLLM's extra fields
    top_k, min_p, stop_token_ids, ignore_eos, include_stop_str_in_output, return_tokens_as_token_ids included)."""
    kw = sampling_kwargs(sampling, seed=seed)
    body = {"model": model, "prompt": [int(t) for t in prompt], "n": 1, "max_tokens": kw["max_tokens"],
            "temperature": kw["temperature"], "top_p": kw["top_p"], "top_k": kw["top_k"], "min_p": kw["min_p"],
            "seed": seed, "stop": kw["stop"], "stop_token_ids": kw["stop_token_ids"],
            "include_stop_str_in_output": kw["include_stop_str_in_output"], "ignore_eos": kw["ignore_eos"],
            "skip_special_tokens": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    return {k: v for k, v in body.items() if v is not None}


def parse_completion_choice(choice: dict) -> tuple[list[int], list[float], str, str]:
    """One ``choices[0]`` of a /v1/completions answer -> (token ids, log-probs, text, finish reason)."""
    lp = choice.get("logprobs") or {}
    tokens = lp.get("tokens") or []
    ids = []
    for tok in tokens:
        if not str(tok).startswith("token_id:"):
            raise UserError("the vLLM server did not return token ids (is it vLLM's OpenAI server? it must accept "
                            "return_tokens_as_token_ids)")
        ids.append(int(str(tok).split(":", 1)[1]))
    logps = [float(x) if x is not None else 0.0 for x in (lp.get("token_logprobs") or [0.0] * len(ids))]
    return ids, logps, choice.get("text", ""), "length" if choice.get("finish_reason") == "length" else "stop"


def build_rollouts(prompts: list[list[int]], n: int, token_ids: list[list[int]], logprobs: list[list[float]] | None,
                   texts: list[str], finish: list[str], pad_id: int, stats: dict | None = None) -> Rollouts:
    """Per-completion lists (grouped by prompt) -> :class:`Rollouts` (right-padded tensors)."""
    T = max((len(t) for t in token_ids), default=0) or 1
    ids = torch.full((len(token_ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), T), dtype=torch.long)
    lp = torch.zeros((len(token_ids), T), dtype=torch.float32)
    for r, t in enumerate(token_ids):
        ids[r, :len(t)] = torch.tensor(t, dtype=torch.long)
        mask[r, :len(t)] = 1
        if logprobs is not None:
            lp[r, :len(t)] = torch.tensor(logprobs[r][:len(t)], dtype=torch.float32)
    stats = dict(stats or {}, tokens=int(mask.sum()))
    return Rollouts(prompt_ids=prompts, num_generations=n, completion_ids=ids, completion_mask=mask, texts=list(texts),
                    finish_reasons=list(finish), logprobs=lp if logprobs is not None else None, stats=stats)


def vllm_weight_name(name: str) -> str:
    """A PEFT/accelerate parameter name -> the checkpoint name vLLM's ``load_weights`` expects."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    for prefix in ("_checkpoint_wrapped_module.", "modules_to_save.default.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def merged_named_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as vLLM names them, LoRA folded in: ``W + sum_adapters B @ A * scale``.

    Reads whole tensors, so under FSDP2 / ZeRO-3 call it inside :func:`posttrain.distributed.full_params`.
    The training weights are not modified."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        LoraLayer = ()
    lora = {name: m for name, m in model.named_modules() if LoraLayer and isinstance(m, LoraLayer)}
    for m in lora.values():
        if any(getattr(m, "use_dora", {}).values()):
            raise UserError("lora.use_dora=true cannot be pushed to vLLM as merged weights; use lora.use_dora=false "
                            "or grpo.rollout_backend=hf")
    for name, p in model.named_parameters():
        if ".lora_" in name or "original_module" in name:
            continue
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        if name.endswith(".base_layer.weight") and name[:-len(".base_layer.weight")] in lora:
            m = lora[name[:-len(".base_layer.weight")]]
            with torch.no_grad():
                delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
            t = t + delta.to(t.dtype) if torch.is_tensor(delta) else t
        yield vllm_weight_name(name), t


def llm_kwargs(model_path: str, cfg, *, world: int, rank: int, max_model_len: int | None, dtype: str,
               seed: int = 0) -> dict:
    """Arguments of the colocated ``vllm.LLM`` (``cfg``: the ``grpo.vllm`` section)."""
    if world % cfg.tensor_parallel_size:
        raise UserError(f"grpo.vllm.tensor_parallel_size={cfg.tensor_parallel_size} must divide the number of "
                        f"processes ({world})")
    kw = {"model": model_path, "tensor_parallel_size": cfg.tensor_parallel_size,
          "gpu_memory_utilization": cfg.gpu_memory_utilization, "enable_sleep_mode": cfg.enable_sleep_mode,
          "dtype": dtype, "seed": seed + rank // cfg.tensor_parallel_size, "enable_prefix_caching": True,
          "logprobs_mode": "processed_logprobs"}
    if max_model_len:
        kw["max_model_len"] = max_model_len
    if world > 1:
        kw["distributed_executor_backend"] = "external_launcher"  # one engine per process (group), torchrun's ranks
    return kw


# ---------------------------------------------------------------------------------------------- engines


class VLLMRolloutEngine:
    """Rollouts from a colocated ``vllm.LLM`` (``llm``) or a vLLM OpenAI server (``client``)."""

    def __init__(self, tokenizer, *, llm=None, client=None, policy=None, enable_sleep_mode: bool = False,
                 gather=None, publish=None):
        self.tokenizer, self.llm, self.client, self.policy = tokenizer, llm, client, policy
        self.enable_sleep_mode = enable_sleep_mode
        self.gather = gather      # context manager factory: whole weights of the policy (FSDP2/ZeRO-3)
        self.publish = publish    # server mode: callable() -> served adapter name after saving the adapter
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stale = True         # the engine does not hold the policy's current weights
        self.served = None
        self.pushes = 0

    def default_stop_ids(self) -> tuple[int, ...]:
        return stop_token_ids(self.policy, self.tokenizer)

    def push_weights(self) -> None:
        """Call after each optimizer step: the next rollout first loads the new weights."""
        self.stale = True

    def _sync(self) -> None:
        if self.client is not None:
            self.served = self.publish()
        else:
            if self.enable_sleep_mode:
                torch.cuda.empty_cache()
                self.llm.wake_up(tags=["weights"])
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
            with (self.gather() if self.gather else nullcontext()):
                for name, tensor in merged_named_weights(self.policy):
                    runner.model.load_weights([(name, tensor)])
            self.llm.reset_prefix_cache()
        self.stale = False
        self.pushes += 1

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, *,
                 seeds: Sequence[int] | None = None) -> Rollouts:
        prompts = [list(map(int, p)) for p in prompts]
        seeds = list(range(len(prompts))) if seeds is None else [int(s) for s in seeds]
        t0 = time.perf_counter()
        if self.stale or (self.llm is not None and self.enable_sleep_mode):  # sleep level 2 dropped the weights
            self._sync()
        per = completion_seeds(sampling.seed, seeds, n)
        flat = [p for p in prompts for _ in range(n)]
        if self.client is not None:
            outs = self.client.complete([completion_request(sampling, p, self.served, s) for p, s in zip(flat, per)])
            parsed = [parse_completion_choice(o["choices"][0]) for o in outs]
        else:
            vllm = require_vllm()
            if self.enable_sleep_mode:
                self.llm.wake_up(tags=["kv_cache"])
            params = [vllm.SamplingParams(**sampling_kwargs(sampling, seed=s)) for s in per]
            outs = self.llm.generate([{"prompt_token_ids": p} for p in flat], sampling_params=params, use_tqdm=False)
            parsed = []
            for o in outs:
                c = o.outputs[0]
                lps = [next(iter(d.values())).logprob if d else 0.0 for d in (c.logprobs or [])]
                parsed.append((list(c.token_ids), lps, c.text, "length" if c.finish_reason == "length" else "stop"))
            if self.enable_sleep_mode:
                self.llm.sleep(level=2)
        ids, lps, texts, finish = (list(x) for x in zip(*parsed)) if parsed else ([], [], [], [])
        return build_rollouts(prompts, n, ids, lps if sampling.logprobs else None, texts, finish, self.pad_id,
                              {"time_s": time.perf_counter() - t0, "weight_pushes": self.pushes})


class VLLMServerClient:
    """A small HTTP client (standard library only) for vLLM's OpenAI-compatible server."""

    def __init__(self, host: str, port: int, timeout: float = 240.0, workers: int = 64):
        self.base = f"http://{host}:{port}"
        self.timeout, self.workers = timeout, workers

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read().decode() or "{}"
        except urllib.error.HTTPError as exc:
            raise UserError(f"vLLM server {self.base}{path} answered {exc.code}: {exc.read().decode()[:300]}") from None
        except OSError as exc:
            raise UserError(f"cannot reach the vLLM server at {self.base} ({exc}): start it first (see "
                            "docs/scale-out.md) or check grpo.vllm.server_host/server_port") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {"text": text}

    def complete(self, bodies: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(bodies)))) as pool:
            return list(pool.map(lambda b: self._post("/v1/completions", b), bodies))

    def load_lora(self, name: str, path: str) -> None:
        self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    def unload_lora(self, name: str) -> None:
        self._post("/v1/unload_lora_adapter", {"lora_name": name})


# ---------------------------------------------------------------------------------------------- construction


def build_training_engine(cfg, model, tokenizer, accelerator, run_dir, max_model_len: int, prepared=None):
    """The vLLM engine for a GRPO run (``cfg``: the GRPORecipe; ``prepared``: the module accelerate prepared,
    whose shards :func:`posttrain.distributed.full_params` gathers)."""
    v = cfg.grpo.vllm
    is_peft = hasattr(model, "disable_adapter")
    if cfg.model.load_in_4bit:
        raise UserError("model.load_in_4bit=true with grpo.rollout_backend=vllm: LoRA cannot be merged into 4-bit "
                        "weights for vLLM; train 16-bit LoRA (model.load_in_4bit=false) or use rollout_backend=hf")
    if v.mode == "server":
        if not is_peft:
            raise UserError("grpo.vllm.mode=server pushes the LoRA adapter to the server by file; full fine-tuning "
                            "(lora: null) needs grpo.vllm.mode=colocate")
        client = VLLMServerClient(v.server_host, v.server_port, v.server_timeout)
        root = Path(v.adapter_dir or (Path(run_dir) / "vllm_adapters")).resolve()
        state = {"version": 0, "name": None}

        def publish() -> str:
            state["version"] += 1
            name = f"posttrain-{state['version']}"
            if accelerator.is_main_process:
                path = root / name
                model.save_pretrained(path)
                client.load_lora(name, str(path))
                if state["name"]:
                    client.unload_lora(state["name"])
            accelerator.wait_for_everyone()
            state["name"] = name
            return name

        return VLLMRolloutEngine(tokenizer, client=client, policy=model, publish=publish)
    vllm = require_vllm()
    if not torch.cuda.is_available():
        raise UserError(f"grpo.rollout_backend=vllm needs a CUDA GPU; none is visible here. {INSTALL_HINT}")
    source, gguf = resolve_source(cfg.model)
    if gguf:
        raise UserError("grpo.rollout_backend=vllm cannot start from a .gguf model; give the hub id or directory")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    os.environ.setdefault("RANK", str(accelerator.process_index))  # vLLM's external launcher reads torchrun's
    os.environ.setdefault("LOCAL_RANK", str(accelerator.local_process_index))
    os.environ.setdefault("WORLD_SIZE", str(accelerator.num_processes))
    llm = vllm.LLM(**llm_kwargs(source, v, world=accelerator.num_processes, rank=accelerator.process_index,
                                max_model_len=max_model_len, dtype=dtype if dtype != "float32" else "auto",
                                seed=cfg.train.seed))
    if v.enable_sleep_mode:
        llm.sleep(level=2)
    accelerator.wait_for_everyone()
    return VLLMRolloutEngine(tokenizer, llm=llm, policy=model, enable_sleep_mode=v.enable_sleep_mode,
                             gather=lambda: full_params(prepared if prepared is not None else model))



__all__ = ["INSTALL_HINT", "VLLMRolloutEngine", "VLLMServerClient", "build_rollouts", "build_training_engine",
           "completion_request", "completion_seeds", "llm_kwargs", "merged_named_weights", "parse_completion_choice",
           "require_vllm", "sampling_kwargs", "vllm_weight_name"]
