"""Typed recipe configuration.

A recipe is a YAML file whose top-level keys are sections (``model``, ``lora``, ``data``, ``train``, ...).
YAML supplies the values, the command line overrides them with ``key.sub=value`` (the value is parsed as
YAML, so ``train.lr=1e-4``, ``lora.target_modules=[q_proj,v_proj]`` and ``lora=null`` all work), and an
unknown key anywhere is an error that lists the valid keys at that level. The resolved config is saved in
the run directory as ``config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


from posttrain.errors import UserError


class ConfigError(UserError):
    """A recipe or override is invalid; the message says where and what to do."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(..., description="hub id, local directory, .gguf file, or alias smollm2-135m-instruct")
    gguf_file: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    device: str = "auto"
    backend: Literal["hf", "unsloth"] = Field(
        "hf", description="hf: transformers + PEFT; unsloth: Unsloth's FastLanguageModel (extra [unsloth], one GPU)")


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: float = 16
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(default_factory=lambda: list(SEVEN_PROJECTIONS))
    use_rslora: bool = False
    use_dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


class ReasoningMarkers(Section):
    reasoning_start: str = "<start_working_out>"
    reasoning_end: str = "<end_working_out>"
    solution_start: str = "<SOLUTION>"
    solution_end: str = "</SOLUTION>"


class ColumnMap(Section):
    """Problem/solution/answer columns turned into a conversation (OpenMathReasoning style)."""

    problem: str = "problem"
    solution: str | None = "generated_solution"
    answer: str | None = "expected_answer"


class DataConfig(Section):
    source: Literal["auto", "hub", "file", "generator"] = "auto"
    path: str = Field(..., description="hub dataset name, local file, or module:function generator")
    config_name: str | None = None
    split: str = "train"
    format: Literal["auto", "sharegpt", "openai", "prompt_completion", "text", "columns"] = "auto"
    columns: ColumnMap | None = None
    generator_kwargs: dict[str, Any] = Field(default_factory=dict)
    template: Literal["tokenizer", "chatml", "qwen3", "reasoning"] = "tokenizer"
    markers: ReasoningMarkers = Field(default_factory=ReasoningMarkers)
    system_prompt: str | None = None
    train_on: Literal["assistant", "all"] = "assistant"
    max_length: int = Field(2048, ge=8)
    drop_long: bool = True
    numeric_answer_only: bool = False
    sample: int | None = Field(None, ge=1)
    val_size: float | int = 0
    seed: int = 3407


class TrainConfig(Section):
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = -1
    epochs: float = 1.0
    lr: float = 2e-4
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 3407
    packing: bool = False
    group_by_length: bool = True
    loss_chunk_size: int = Field(1024, ge=1)
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="SFT: dtype of the decoder layers' matmuls (autocast; master weights, the head and the "
                            "loss stay float32). auto: bfloat16 on CUDA with bf16 support, float32 on CPU; bfloat16 "
                            "on a CPU with AVX512-BF16/AMX is faster, as TRL's bf16 default is")
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set train.warmup_steps or train.warmup_ratio, not both")
        return self


class StartsFromAdapter(Section):
    """Recipes that may start from an existing PEFT adapter (an earlier SFT run's ``adapter/``)."""

    init_adapter: str | None = Field(
        None, description="a PEFT adapter directory to start from (e.g. the SFT run's adapter/)")
    init_adapter_mode: Literal["continue", "merge"] = Field(
        "continue", description="continue: train that adapter further (the notebook; the KL reference is the bare "
                                "base); merge: fold it into the base and train a new lora: adapter (the reference "
                                "is then the SFT model)")


class SFTRecipe(StartsFromAdapter):
    output_dir: str = "runs/sft"
    model: ModelConfig
    lora: LoraConfig | None = Field(default_factory=LoraConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------------
# Loading, overrides, errors


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """``["train.lr=1e-4", "lora=null"]`` -> ``[(["train", "lr"], 1e-4), (["lora"], None)]``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example train.max_steps=10)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as text
            try:
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
            except ValueError:
                pass
        out.append((key.split("."), value))
    return out


def apply_overrides(data: dict, overrides: list[tuple[list[str], Any]]) -> dict:
    for path, value in overrides:
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _valid_keys(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at location ``loc`` (the parent of an unknown key)."""
    cls: Any = model_cls
    for part in loc:
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return sorted(cls.model_fields)


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], source: str) -> str:
    lines = [f"invalid config in {source}:"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(model_cls, loc[:-1])
            lines.append(f"  unknown key '{key}'; valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  missing required key '{key}'")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, cls: type[BaseModel] = SFTRecipe,
                data: dict | None = None):
    """Read a YAML recipe, apply ``key=value`` overrides and validate it into ``cls``."""
    source = str(path) if path else "(overrides)"
    if data is None:
        data = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"recipe file not found: {p} (give the path to a .yaml recipe, e.g. recipes/tiny/sft.yaml)")
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{p} is not valid YAML: {exc}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{p}: a recipe is a mapping of sections (model:, data:, train:, ...)")
    data = apply_overrides(data, parse_overrides(overrides or []))
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls, source)) from None


def dump_recipe(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_recipe(cfg: BaseModel, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_recipe(cfg))
    tmp.replace(path)
    return path
