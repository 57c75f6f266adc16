"""The pipeline file as typed models: its top-level keys and one model per kind of stage.

    output_dir: runs/quickstart          # optional; --out overrides it
    model: smollm2-135m-instruct         # optional; the base model of every stage
    stages:
      - {name: eval_base, command: eval, benchmark: synthetic, limit: 360, prompt: reasoning}
      - {name: sft, recipe: tiny/quickstart_sft, overrides: [train.max_steps=40]}
      - {name: export, format: merged}

``stages`` is a list of :data:`StageConfig`, a union told apart by ``command``, which defaults to the stage's
``name`` (``{name: sft, ...}`` is an sft stage). An eval stage takes every key of
:class:`~posttrain.config.EvalConfig` (the options of ``posttrain eval``) plus ``benchmark``,
``label`` and ``adapter``. Unknown keys and wrong types are errors that name the file, the stage and the key,
and list the valid keys. :mod:`posttrain.pipeline` runs what :func:`parse_pipeline` returns.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from posttrain.config import EvalConfig, describe_error
from posttrain.errors import UserError

NAME = ("the stage's name, unique in the pipeline; its output goes to RUN/<name>/, so it is a plain folder name: "
        "letters, digits, '_', '-' and '.', starting with a letter or digit")
# a plain folder name: never '.', '..', a path, or a hidden name (a rerun deletes RUN/<name>/ to redo a stage)
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RESERVED = ("report.md", "pipeline.yaml", "plots")
COMMAND = "what the stage runs: sft, grpo, dpo, rm, eval or export; defaults to the stage's name"


class StageBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(..., description=NAME)
    start_from: str | None = Field(
        None, description="the name of an earlier sft, grpo or dpo stage whose model this stage takes (two GRPO "
                          "runs from the same SFT model, an eval of each); null: the latest such stage before it")


class TrainStage(StageBase):
    recipe: str = Field(..., description="the training recipe: a .yaml path (as given, or relative to the "
                                         "pipeline file's folder or one above it) or a shipped recipe's name "
                                         "(tiny/sft)")
    overrides: list[str] = Field(
        default_factory=list, description="key=value overrides of the recipe, as on the command line "
                                          "(train.max_steps=40); the runner adds model.name, init_adapter and "
                                          "output_dir itself")


class SFTStage(TrainStage):
    """Supervised fine-tuning from the previous training stage's model (or the base model)."""

    command: Literal["sft"] = Field("sft", description=COMMAND)


class GRPOStage(TrainStage):
    """GRPO, continuing the previous training stage's adapter (``init_adapter``) or weights."""

    command: Literal["grpo"] = Field("grpo", description=COMMAND)


class DPOStage(TrainStage):
    """DPO (or IPO, SimPO) on preference pairs, continuing the previous training stage's adapter or weights."""

    command: Literal["dpo"] = Field("dpo", description=COMMAND)


class RMStage(TrainStage):
    """A Bradley-Terry reward model (``posttrain rm``), started from the previous training stage's model (its adapter
    merged in). It is not the policy: later eval, export and training stages keep taking the latest sft, grpo or
    dpo stage's model. A later stage names it in an override through ``{run}``, the pipeline's run directory:
    ``rewards=[{name: reward_model, model: '{run}/rm'}]``."""

    command: Literal["rm"] = Field("rm", description=COMMAND)


class EvalStage(EvalConfig, StageBase):
    """``posttrain eval`` of the latest trained model (the base model before any training)."""

    # EvalConfig's config, not StageBase's: its validator fills in the sample-dependent defaults by assignment
    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    command: Literal["eval"] = Field("eval", description=COMMAND)
    benchmark: str = Field(..., description="a benchmark's name (gsm8k, math500, ...: posttrain eval --help lists "
                                            "them) or a .jsonl/.json/.parquet file")
    label: str | None = Field(None, description="the model's name in report.md; null: the stage's name")
    adapter: str | None = Field(
        None, description="an adapter directory to evaluate on the pipeline's base model instead; none: the bare "
                          "base model; null: the latest trained model")


class ExportStage(StageBase):
    """``posttrain export`` of the latest trained run directory into ``RUN/<name>/<format>``."""

    command: Literal["export"] = Field("export", description=COMMAND)
    format: Literal["adapter", "merged", "gguf"] = Field(
        "merged", description="adapter: the PEFT adapter; merged: LoRA merged into 16-bit safetensors; gguf: a "
                              "GGUF file with an Ollama Modelfile")
    quant: Literal["f16", "bf16", "q8_0", "q4_k_m"] = Field(
        "q8_0", description="gguf: tensor type (q4_k_m needs llama.cpp's llama-quantize)")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the merged weights (merged, and the weights a GGUF is encoded from)")
    verify: bool = Field(True, description="load the export back and compare it with its source before keeping it")


StageConfig = Annotated[SFTStage | GRPOStage | DPOStage | RMStage | EvalStage | ExportStage,
                        Field(discriminator="command")]
STAGE_MODELS: dict[str, type[StageBase]] = {"sft": SFTStage, "grpo": GRPOStage, "dpo": DPOStage, "rm": RMStage,
                                            "eval": EvalStage, "export": ExportStage}
TRAINING = ("sft", "grpo", "dpo", "rm")  # stages that run a trainer on a recipe
POLICY = ("sft", "grpo", "dpo")          # ... and whose model the later stages take
COMMANDS = tuple(STAGE_MODELS)


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    output_dir: str | None = Field(None, description="the run directory RUN; null: runs/<pipeline file name>. "
                                                     "--out overrides it")
    model: str | None = Field(None, description="the base model of every stage (set as model.name in each "
                                                "recipe; evaluated before any training); null: each recipe's own")
    stages: list[StageConfig] = Field(..., description="the stages, run in order; each takes the model of the "
                                                       "latest sft/grpo stage before it")


def parse_pipeline(data: Any, path: Path, extra: dict[str, dict] | None = None) -> tuple[PipelineConfig, list[dict]]:
    """The pipeline ``data`` (read from ``path``) as a ``PipelineConfig``, and each stage as written (``extra``
    merged in), which is what a finished stage's fingerprint covers. ``extra`` maps a stage name to keys merged
    into it; its ``overrides`` are appended to the file's (``posttrain quickstart --fast``)."""
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise UserError(f"{path}: needs a non-empty 'stages:' list, e.g. stages: [{{name: sft, recipe: tiny/sft}}]")
    extra = dict(extra or {})
    written: list[dict] = []
    for i, spec in enumerate(data["stages"]):
        spec = _stage_as_written(path, i, spec, {str(s["name"]) for s in written}, extra)
        written.append(spec)
    if extra:
        raise UserError(f"no stage named {sorted(extra)} in {path}; its stages: {sorted(s['name'] for s in written)}")
    stages = [{**s, "name": str(s["name"]), "command": s.get("command", s["name"])} for s in written]
    try:
        cfg = PipelineConfig.model_validate({**data, "stages": stages})
    except ValidationError as err:
        raise UserError(_format_error(err, path, stages)) from None
    _check_inputs(cfg, path)
    return cfg, written


def _check_inputs(cfg: PipelineConfig, path: Path) -> None:
    """``start_from`` names an earlier policy stage (its model exists when this stage runs)."""
    earlier: dict[str, str] = {}
    for i, st in enumerate(cfg.stages):
        if st.start_from is not None and earlier.get(st.start_from) not in POLICY:
            kind = earlier.get(st.start_from)
            why = (f"stage {st.start_from!r} is an {kind} stage, not a policy (sft, grpo, dpo)" if kind else
                   f"no stage named {st.start_from!r} comes before it")
            raise UserError(f"{_where(path, i, st.name)}: start_from: {why}; name one of "
                            f"{[n for n, k in earlier.items() if k in POLICY] or 'the earlier sft/grpo/dpo stages'}")
        earlier[st.name] = st.command


def _stage_as_written(path: Path, i: int, spec: Any, seen: set[str], extra: dict[str, dict]) -> dict:
    """Checks that need the stage's name before its model can be chosen; ``extra`` for it merged in."""
    if not isinstance(spec, dict) or not spec.get("name"):
        raise UserError(f"{_where(path, i)}: each stage is a mapping with a 'name' (and 'command' when the name is "
                        f"not one of {', '.join(COMMANDS)})")
    spec = dict(spec)
    name = str(spec["name"])
    command = spec.get("command", name)
    if command not in COMMANDS:
        raise UserError(f"{_where(path, i, name)}: unknown stage command {command!r}; set command: to one of "
                        f"{', '.join(COMMANDS)} (it defaults to the stage's name)")
    if not PLAIN_NAME.fullmatch(name) or name in RESERVED:
        raise UserError(f"{_where(path, i, name)}: a stage name is a plain folder name inside the run directory "
                        "(letters, digits, '_', '-', '.', starting with a letter or digit; not "
                        f"{', '.join(RESERVED)}): {name!r} is not one; rename it")
    if name in seen:
        raise UserError(f"{_where(path, i, name)}: another stage has this name, and stage names must be unique; rename it")
    for key, value in (extra.pop(name, None) or {}).items():
        spec[key] = list(spec.get("overrides") or []) + list(value) if key == "overrides" else value
    return spec


def _where(path: Path, i: int, name: str | None = None) -> str:
    return f"{path}: stages[{i}]" + (f" ({name})" if name else "")


def _format_error(err: ValidationError, path: Path, stages: list[dict]) -> str:
    """One line per problem: the stage (index and name) and the key inside it, or a top-level key."""
    lines = []
    for e in err.errors():
        loc = e["loc"]
        if len(loc) >= 3 and loc[0] == "stages" and loc[2] in STAGE_MODELS:
            i, command = int(loc[1]), str(loc[2])
            article = "a" if command in ("grpo", "dpo") else "an"
            where = _where(path, i, f"{stages[i]['name']}, {article} {command} stage")
            lines.append(f"{where}: {describe_error(e, STAGE_MODELS[command], loc[3:])}")
        else:
            lines.append(f"{path}: {describe_error(e, PipelineConfig)}")
    return "\n".join(lines)
