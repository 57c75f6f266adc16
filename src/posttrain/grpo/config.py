"""Typed GRPO recipe: the SFT sections (model, lora, data, train) plus a ``grpo`` section and ``rewards``.

Batch semantics (as TRL's): ``train.batch_size`` counts *completions* per micro-batch on one process, and one
step samples ``train.batch_size * train.grad_accum`` completions per process, i.e. that number divided by
``grpo.num_generations`` prompts, each with its whole group on that process. ``data.max_length`` is the
budget of prompt + completion tokens (the notebook's ``max_seq_length``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from posttrain.config import DataConfig, LoraConfig, ModelConfig, Section, StartsFromAdapter, TrainConfig


class VLLMConfig(Section):
    """The vLLM rollout engine (grpo.rollout_backend=vllm; extra [vllm], CUDA only). See docs/scale-out.md."""

    mode: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: an engine in each training process on its GPU; server: vLLM's OpenAI "
                                "server on other GPUs/nodes (LoRA only)")
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0,
                                          description="colocate: fraction of the GPU's memory vLLM may take")
    enable_sleep_mode: bool = Field(True, description="colocate: release vLLM's memory between rollouts")
    tensor_parallel_size: int = Field(1, ge=1, description="colocate: processes sharing one engine")
    max_model_len: int | None = Field(None, ge=8, description="default: data.max_length")
    server_host: str = "127.0.0.1"
    server_port: int = Field(8000, ge=1, le=65535)
    server_timeout: float = Field(240.0, gt=0.0)
    adapter_dir: str | None = Field(None, description="server: where each step's adapter is saved for the server "
                                                      "to load (a shared filesystem); default OUTPUT/vllm_adapters")


class GRPOConfig(Section):
    # sampling
    num_generations: int = Field(8, description="completions per prompt (the group size G); at least 2")
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, description="0 or -1: off")
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    stop_strings: list[str] = Field(default_factory=list)
    ignore_eos: bool = Field(False, description="never stop before max_completion_length (benchmarks)")
    max_prompt_length: int | Literal["auto"] = Field(
        "auto", description="prompts longer are dropped and counted; auto = the prompt_length_quantile of lengths")
    prompt_length_quantile: float = Field(0.9, gt=0.0, le=1.0)
    max_completion_length: int | None = Field(
        None, ge=1, description="default: data.max_length - max_prompt_length (completions get the rest)")
    # objective
    beta: float = Field(0.0, ge=0.0, description="weight of the k3 KL to the reference (base, adapters off)")
    epsilon: float = Field(0.2, gt=0.0, description="lower clip: ratio >= 1 - epsilon")
    epsilon_high: float | None = Field(None, gt=0.0, description="upper clip (DAPO clip-higher); default epsilon")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = Field(1, ge=1, description="optimizer updates per batch of rollouts (PPO epochs)")
    mask_truncated_completions: bool = False
    entropy_coef: float = Field(0.0, ge=0.0, description="entropy bonus: loss -= entropy_coef * mean entropy")
    dynamic_sampling: bool = Field(False, description="drop groups whose rewards all agree (DAPO)")
    dynamic_sampling_rounds: int = Field(
        0, ge=0, description="with dynamic_sampling: extra rounds of prompts drawn to refill the dropped groups")
    reward_weights: list[float] | None = None
    share_prompt: bool = Field(True, description="in training, a group's completions share one prompt forward "
                                                 "(not with model.gradient_checkpointing)")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the decoder layers' matmuls in rollouts and training (autocast); the head and "
                            "log-softmax stay in float32 with float32 weights. auto: bfloat16 on CUDA with bf16 "
                            "and on CPUs with native bf16 (AVX512-BF16/AMX), else float32")
    # rollout engine
    rollout_backend: Literal["hf", "vllm"] = Field("hf", description="hf: our transformers decode loop; vllm: see vllm")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    importance_sampling_cap: float | None = Field(
        None, gt=0.0, description="truncated importance sampling: weight each token's policy loss by "
                                  "min(exp(logp_train - logp_sampler), cap) (TRL/verl use 2-3); off by default")
    rollout_max_rows: int | None = Field(None, ge=1, description="completions decoded together; default all")
    merge_lora: Literal["auto", "inplace", "backup", "none"] = "auto"
    # what users watch
    log_completions_every: int = Field(10, ge=0, description="every N steps print and save sample completions")
    num_completions_to_print: int = Field(4, ge=0)
    zero_std_warning: float = Field(0.5, ge=0.0, le=1.0,
                                    description="warn when more than this fraction of groups has zero reward variance")

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
        return self


class GRPORecipe(StartsFromAdapter):
    output_dir: str = "runs/grpo"
    model: ModelConfig
    lora: LoraConfig | None = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(batch_size=8, lr=1e-6))
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    rewards: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["math_accuracy"],
        description="reward specs: built-in names, presets (unsloth_math), module:function, or {name, weight, ...}")

    @model_validator(mode="after")
    def _check(self) -> "GRPORecipe":
        if not self.rewards:
            raise ValueError("rewards: give at least one reward function (e.g. [math_accuracy] or [unsloth_math])")
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
