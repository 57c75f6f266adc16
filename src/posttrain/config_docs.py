"""The configuration reference, generated from the typed models: ``posttrain config show`` and ``docs/config.md``.

Every key of every model is listed by its dotted path (``train.lr``; a pipeline's stages as
``stages[eval].limit``) with its type, its default and its ``Field(description=...)``. The defaults shown are
the ones a recipe gets: a section's keys take their defaults from the section's own default, so GRPO's
``train.batch_size`` shows 8 where SFT's shows 2. A unit test fails when a field has no description, and
another when ``docs/config.md`` differs from :func:`markdown` (``posttrain config show --markdown all >
docs/config.md`` rewrites it).
"""

from __future__ import annotations

import textwrap
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from posttrain.config import EvalConfig, SFTRecipe
from posttrain.grpo.config import GRPORecipe
from posttrain.pipeline_config import STAGE_MODELS, PipelineConfig
from posttrain.preference.config import RMRecipe
from posttrain.preference.dpo_config import DPORecipe

# kind -> (model, what it configures)
KINDS: dict[str, tuple[type[BaseModel], str]] = {
    "sft": (SFTRecipe, ("A supervised fine-tuning recipe: `posttrain sft RECIPE [key=value ...]`. Overrides on the "
                        "command line use the same dotted keys (`train.lr=1e-4`, `lora=null`).")),
    "grpo": (GRPORecipe, ("A GRPO recipe: `posttrain grpo RECIPE [key=value ...]`: the SFT sections (with GRPO's own "
                          "train defaults) plus `grpo` and `rewards`.")),
    "dpo": (DPORecipe, ("A DPO recipe: `posttrain dpo RECIPE [key=value ...]`: the SFT sections with preference "
                        "pairs as `data`, plus `dpo` (loss type, beta, reference) and `init_adapter`.")),
    "rm": (RMRecipe, ("A reward-model recipe: `posttrain rm RECIPE [key=value ...]`: the SFT sections with "
                      "preference pairs as `data`, plus `rm` and `init_adapter`.")),
    "eval": (EvalConfig, ("The evaluation settings: the options of `posttrain eval` (`--max-new-tokens` sets "
                          "`max_new_tokens`) and the keys of a pipeline's eval stage. The models, adapters, "
                          "benchmarks and output folder are the command's own options (`posttrain eval --help`).")),
    "pipeline": (PipelineConfig, ("A pipeline file: `posttrain run PIPELINE`. Each stage's keys are listed under "
                                  "`stages[COMMAND]`; `command` defaults to the stage's name.")),
}


INTRO = ("Every key of a recipe, of the evaluation settings and of a pipeline file, with its type, default and "
         "meaning. Generated from the typed models (`src/posttrain/config.py`, `grpo/config.py`, `preference/config.py`, `preference/dpo_config.py`, `pipeline_config.py`) "
         "by `posttrain config show --markdown all > docs/config.md`; edit the models' descriptions, not this file. "
         "`posttrain config show sft` prints one of them in the terminal.")
SECTION = "(keys below)"  # the default of a section that has one: its keys' defaults


@dataclass(frozen=True)
class Key:
    path: str
    type: str
    default: str
    description: str


def keys(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[Key]:
    """Every key of ``model`` and of the sections inside it, depth first. ``defaults``: an instance whose values
    are the defaults (a section's own default), else the fields' defaults."""
    out = []
    for name in _ordered(model):
        field, path = model.model_fields[name], prefix + name
        if defaults is not None:
            default = getattr(defaults, name)
        elif field.default_factory is not None:
            default = field.default_factory()
        else:
            default = field.default
        out.append(Key(path, type_name(field.annotation), _show(default), field.description or ""))
        if name == "stages" and model is PipelineConfig:
            for command, stage in STAGE_MODELS.items():
                out += keys(stage, f"stages[{command}].")
            continue
        section = _section(field.annotation)
        if section is not None:
            out += keys(section, path + ".", default if isinstance(default, section) else None)
    return out


def _ordered(model: type[BaseModel]) -> list[str]:
    """Field names in declaration order, except that a pipeline stage lists name and command, then its own keys,
    then the ones it inherits (an eval stage's benchmark before the evaluation settings)."""
    names = list(model.model_fields)
    if model not in STAGE_MODELS.values():
        return names
    own = [n for n in model.__annotations__ if n in names]
    first = ["name", "command", *own]
    return list(dict.fromkeys(first + names))


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (``LoraConfig`` for ``LoraConfig | None``), or None."""
    for cand in (annotation, *get_args(annotation)):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def type_name(annotation: Any) -> str:
    """A type as a user reads it: ``int``, ``float or null``, ``{auto, float32, bfloat16}``, ``list[str]``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Annotated:
        return type_name(args[0])
    if origin is Literal:
        return "{" + ", ".join(str(a) for a in args) + "}"
    if origin in (Union, types.UnionType):
        if all(_section(a) is not None for a in args):
            return "mapping"  # a union of models: one of the pipeline's stage kinds
        return " or ".join(type_name(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is tuple:
        return f"list[{type_name(args[0])}]" if args[-1] is Ellipsis else "[" + ", ".join(map(type_name, args)) + "]"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _show(value: Any) -> str:
    """A default as it would be written in YAML; a section's default is its keys, listed below it."""
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return SECTION
    if isinstance(value, float):
        return repr(value)  # 1e-06, as a recipe writes it (YAML would print 1.0e-06)
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str) and value and value == value.strip() and not value[0] in "[{":
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("\n...\n").strip()


def text(kind: str) -> str:
    """The reference of one kind for a terminal: each key with its type and default, its description below."""
    model, intro = KINDS[kind]
    lines = [f"{kind}: {intro}", ""]
    for k in keys(model):
        lines.append(f"{k.path}  ({k.type}; default {k.default})" if k.default != "required"
                     else f"{k.path}  ({k.type}; required)")
        lines += textwrap.wrap(k.description, 100, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines) + "\n"


def markdown(kinds: list[str] | None = None) -> str:
    """``docs/config.md``: one table per kind."""
    out = ["# Configuration reference", "", INTRO, ""]
    for kind in kinds or list(KINDS):
        model, intro = KINDS[kind]
        out += [f"## {kind}", "", intro, "", "| key | type | default | description |", "|---|---|---|---|"]
        for k in keys(model):
            default = _cell(k.default, code=k.default not in ("required", SECTION))
            out.append(f"| `{k.path}` | {_cell(k.type)} | {default} | {_cell(k.description)} |")
        out.append("")
    return "\n".join(out)


def _cell(s: str, code: bool = False) -> str:
    """A table cell: pipes escaped, and outside code ``<`` too (``<think>`` is not HTML)."""
    s = s.replace("|", "\\|")
    return (f"`{s}`" if s else s) if code else s.replace("<", "&lt;")
