"""Typed config of preference learning: the pair data (``PreferenceDataConfig``, shared by ``posttrain rm`` and
``posttrain dpo``) and the reward-model recipe (``RMRecipe``, shaped like ``SFTRecipe`` so that
:class:`posttrain.session.TrainingSession` runs it: ``output_dir``, ``model``, ``lora``, ``data``, ``train``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from posttrain.config import (LORA, MODEL, OUTPUT_DIR, LoraConfig, ModelConfig, ReasoningMarkers, Section,
                              TrainConfig, check_output_dir, warn_long_warmup, val_size_value)


class PairColumns(Section):
    """Which columns of a row hold the prompt, the two answers and the margin (TRL's names by default)."""

    prompt: str | None = Field("prompt", description="column with the prompt (text or a list of messages); a row "
                                                     "without it has an implicit prompt: chosen and rejected hold the "
                                                     "whole conversation, and their shared beginning is the prompt. "
                                                     "null: always implicit (UltraFeedback-binarized has a prompt "
                                                     "column and conversations that repeat it)")
    chosen: str = Field("chosen", description="column with the preferred answer (text or messages)")
    rejected: str = Field("rejected", description="column with the dispreferred answer (text or messages)")
    margin: str = Field("margin", description="optional column with a per-pair margin: the loss asks r_chosen - "
                                              "r_rejected to exceed it (Llama 2's margin loss); absent: 0")


class PreferenceDataConfig(Section):
    source: Literal["auto", "hub", "file", "generator"] = Field(
        "auto", description="what path is. auto: a file when path ends in .json/.jsonl/.parquet/.csv or exists, a "
                            "generator when it holds a ':', else a hub dataset")
    path: str = Field(..., min_length=1, description="hub dataset name, local file, or module:function generator "
                                                     "returning rows with prompt/chosen/rejected")
    config_name: str | None = Field(None, description="hub dataset configuration (subset); null: its default")
    split: str = Field("train", description="hub dataset split to load")
    columns: PairColumns = Field(default_factory=PairColumns,
                                 description="the columns of the prompt, the two answers and the margin")
    generator_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the generator function (source generator)")
    template: Literal["tokenizer", "chatml", "qwen3", "reasoning"] = Field(
        "tokenizer", description="chat template for pairs in messages form (as data.template in SFT); text pairs "
                                 "are used as written, with the EOS token appended (as TRL does)")
    markers: ReasoningMarkers = Field(default_factory=ReasoningMarkers,
                                      description="the tags of the reasoning template")
    system_prompt: str | None = Field(None, description="reasoning template: replaces the seeds' system prompt; "
                                                        "null: the template's default")
    max_length: int = Field(1024, ge=8, description="tokens of prompt + answer at most: a pair whose chosen or "
                                                    "rejected side is longer is dropped and counted (TRL drops "
                                                    "them too, though its docs say it truncates)")
    sample: int | None = Field(None, ge=1, description="use a random subset of this many rows (seeded by seed); "
                                                       "null: every row")
    val_size: float | int = Field(
        0, description="validation pairs held out of training: a float below 1 is a fraction of the pairs, an "
                       "integer a count; 0: none. Their loss and accuracy are logged every train.eval_every steps")
    seed: int = Field(3407, description="seed of the row sample and the train/validation split")

    @field_validator("val_size")
    @classmethod
    def _split(cls, v: float | int) -> float | int:
        return val_size_value(v, "pairs")


class RMConfig(Section):
    center_rewards_coefficient: float = Field(
        0.0, ge=0.0, allow_inf_nan=False,
        description="adds coef x mean((r_chosen + r_rejected)^2) to the loss, keeping rewards near 0 so that they "
                    "mix with other rewards at a known scale (TRL's center_rewards_coefficient; 0.01 is "
                    "common); 0: off")


class RMRecipe(Section):
    output_dir: str = Field("runs/rm", description=OUTPUT_DIR)
    model: ModelConfig = Field(..., description=MODEL + " (loaded with a scalar head on top: a sequence "
                                                        "classifier with one label)")
    lora: LoraConfig | None = Field(default_factory=LoraConfig,
                                    description=LORA + "; with LoRA the head trains and is saved with the adapter")
    data: PreferenceDataConfig = Field(..., description="the preference pairs and how they become tokens")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(batch_size=4, lr=1e-4),
                               description="optimizer, schedule, batch sizes (in pairs: each pair is two "
                                           "sequences), checkpoints and logging; defaults here: batch_size 4, "
                                           "lr 1e-4")
    rm: RMConfig = Field(default_factory=RMConfig, description="the reward model's own loss settings")
    init_adapter: str | None = Field(
        None, description="a PEFT adapter (e.g. an SFT run's adapter/) merged into the base before training, so "
                          "the reward model starts from the fine-tuned model; null: the base as it is")

    _output_dir = field_validator("output_dir")(check_output_dir)

    @model_validator(mode="after")
    def _warn(self) -> "RMRecipe":
        warn_long_warmup(self.train)
        return self
