"""The typed recipe of ``posttrain dpo``: SFT's sections (``model``, ``lora``, ``train``, ``output_dir``,
``init_adapter``) with preference pairs as ``data`` and the method's own ``dpo`` section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from posttrain.config import (
    DATA,
    LORA,
    MODEL,
    OUTPUT_DIR,
    LoraConfig,
    ModelConfig,
    Section,
    StartsFromAdapter,
    TrainConfig,
    check_output_dir,
    warn_long_warmup,
)
from posttrain.preference.config import PreferenceDataConfig


class DPOConfig(Section):
    loss_type: Literal["sigmoid", "ipo", "simpo", "robust"] = Field(
        "sigmoid", description="sigmoid: DPO (Rafailov 2023); ipo: IPO, the squared distance of the length-averaged "
                               "log-ratio margin to 1/(2 beta); simpo: SimPO, reference-free, the length-averaged "
                               "log-probabilities with a target margin simpo_gamma; robust: rDPO (TRL 1.16's "
                               "label-smoothed DPO), unbiased under labels flipped with probability label_smoothing")
    beta: float = Field(0.1, gt=0, allow_inf_nan=False,
                        description="how far the policy may move from the reference: the implicit reward is beta x "
                                    "the log-ratio (ipo: the regularization tau; simpo: the reward scale, 2.0-2.5 in "
                                    "the SimPO paper)")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, allow_inf_nan=False,
        description="the probability that a pair's preference is flipped. sigmoid and simpo: conservative DPO, "
                    "-(1-eps) logsig(z) - eps logsig(-z) (TRL's DPOTrainer before 1.0; TRL 1.16's DPOTrainer ignores "
                    "it for sigmoid); robust: rDPO's unbiased loss; not used by ipo")
    simpo_gamma: float = Field(0.5, ge=0, allow_inf_nan=False,
                               description="simpo: the target reward margin gamma (TRL's simpo_gamma)")
    reference: Literal["auto", "adapter_off", "precomputed"] = Field(
        "auto", description="the reference model's log-probabilities. adapter_off: the model with its LoRA adapter "
                            "disabled, each step (no second copy); precomputed: the starting model's, computed once "
                            "before the first step for every training and validation pair and stored in the run "
                            "directory (reference_logps.safetensors; --resume reads them back). auto: adapter_off "
                            "for a new adapter, precomputed in full fine-tuning and when continuing an init_adapter "
                            "(disabling it would give the bare base). simpo uses no reference")


class DPORecipe(StartsFromAdapter):
    output_dir: str = Field("runs/dpo", description=OUTPUT_DIR)
    model: ModelConfig = Field(..., description=MODEL)
    lora: LoraConfig | None = Field(default_factory=LoraConfig, description=LORA)
    data: PreferenceDataConfig = Field(..., description=DATA + " (preference pairs: prompt, chosen, rejected)")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(lr=5e-6, batch_size=4),
        description="optimizer, schedule, batch sizes (in pairs: each pair is two sequences), checkpoints and "
                    "logging; eval_every logs the validation pairs' metrics. Defaults here: batch_size 4, lr 5e-6")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="the preference loss and its reference")

    _output_dir = field_validator("output_dir")(check_output_dir)

    @model_validator(mode="after")
    def _check(self) -> DPORecipe:
        d = self.dpo
        if d.loss_type == "ipo" and d.label_smoothing:
            raise ValueError("dpo.label_smoothing is not used by dpo.loss_type=ipo: set it to 0, or use sigmoid/robust")
        if d.loss_type == "simpo" and d.reference != "auto":
            raise ValueError(f"dpo.reference={d.reference}: simpo uses no reference model; leave dpo.reference=auto")
        if d.reference == "adapter_off" and self.lora is None and self.init_adapter is None:
            raise ValueError("dpo.reference=adapter_off needs a LoRA adapter (lora: section); full fine-tuning uses "
                             "dpo.reference=precomputed")
        if d.reference == "adapter_off" and self.init_adapter and self.init_adapter_mode == "continue":
            raise ValueError("dpo.reference=adapter_off with init_adapter_mode=continue would compare with the bare "
                             "base, not the starting adapter: use dpo.reference=precomputed (or auto), or "
                             "init_adapter_mode=merge")
        warn_long_warmup(self.train)
        return self

    def resolved_reference(self) -> str:
        """``none`` (simpo), ``adapter_off`` or ``precomputed``: what ``dpo.reference: auto`` means here."""
        d = self.dpo
        if d.loss_type == "simpo":
            return "none"
        if d.reference != "auto":
            return d.reference
        new_adapter = self.lora is not None and (self.init_adapter is None or self.init_adapter_mode == "merge")
        return "adapter_off" if new_adapter else "precomputed"
