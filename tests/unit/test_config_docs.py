"""The configuration documents itself: every field of every config model has a description, `posttrain config
show` prints every key with its type, default and description, and docs/config.md is the current reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

from pydantic import BaseModel

from posttrain import config_docs
from posttrain.config import EvalConfig, SFTRecipe
from posttrain.grpo.config import GRPORecipe
from posttrain.pipeline_config import STAGE_MODELS, PipelineConfig
from posttrain.preference.config import RMRecipe
from posttrain.preference.dpo_config import DPORecipe

REPO = Path(__file__).resolve().parents[2]
ROOTS = [SFTRecipe, GRPORecipe, DPORecipe, RMRecipe, EvalConfig, PipelineConfig, *STAGE_MODELS.values()]


def models_inside(annotation) -> list[type[BaseModel]]:
    """The models a field's annotation holds, through unions, lists and Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in models_inside(arg)]


def undocumented(model: type[BaseModel], seen: set) -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if not (field.description or "").strip():
            missing.append(f"{model.__module__}.{model.__name__}.{name}")
        for sub in models_inside(field.annotation):
            if sub not in seen:
                seen.add(sub)
                missing += undocumented(sub, seen)
    return missing


def test_every_field_of_every_config_model_has_a_description():
    seen: set = set(ROOTS)
    missing = [m for root in ROOTS for m in undocumented(root, seen)]
    assert len(seen) > 10  # the walk reached the nested sections (model, lora, data, train, grpo, vllm, ...)
    assert not missing, "fields without Field(description=...): " + ", ".join(missing)


def test_the_walk_finds_a_missing_description():
    class Inner(BaseModel):
        documented: int = 0

    from pydantic import Field

    class Outer(BaseModel):
        inner: Inner | None = Field(None, description="a section")

    assert undocumented(Outer, {Outer}) == [f"{__name__}.Inner.documented"]


def test_reference_lists_every_key_with_the_defaults_a_recipe_gets():
    grpo = {k.path: k for k in config_docs.keys(GRPORecipe)}
    sft = {k.path: k for k in config_docs.keys(SFTRecipe)}
    assert grpo["train.batch_size"].default == "8" and sft["train.batch_size"].default == "4"  # GRPO's own
    assert grpo["grpo.vllm.mode"].type == "{colocate, server}" and grpo["grpo.vllm.mode"].default == "colocate"
    assert sft["lora.target_modules"].default.startswith("[q_proj, k_proj")
    assert sft["model.name"].default == "required" and sft["train.max_grad_norm"].type == "float or null"
    # one row per field of the recipe and of every section inside it (data.columns, data.markers too)
    sections = models_inside_all(SFTRecipe)
    assert {m.__name__ for m in sections} >= {"ModelConfig", "LoraConfig", "DataConfig", "ColumnMap", "TrainConfig"}
    assert len(sft) == len(SFTRecipe.model_fields) + sum(len(m.model_fields) for m in sections)
    pipe = {k.path for k in config_docs.keys(PipelineConfig)}
    assert {"stages[eval].limit", "stages[eval].benchmark", "stages[sft].recipe", "stages[export].quant"} <= pipe


def models_inside_all(model: type[BaseModel]) -> list[type[BaseModel]]:
    out = []
    for field in model.model_fields.values():
        for sub in models_inside(field.annotation):
            out += [sub, *models_inside_all(sub)]
    return out


def test_config_show_prints_keys_types_defaults_and_descriptions():
    res = subprocess.run([sys.executable, "-m", "posttrain.cli", "config", "show", "grpo"], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "train.lr  (float; default 1e-06)" in res.stdout
    assert "grpo.loss_type  ({grpo, bnpo, dr_grpo, dapo}; default dapo)" in res.stdout
    assert "over the tokens of the whole step" in res.stdout  # the description, under its key


def test_docs_config_md_is_current():
    current = (REPO / "docs" / "config.md").read_text()
    assert current == config_docs.markdown(), (
        "docs/config.md is out of date with the config models: regenerate it with\n"
        "    posttrain config show --markdown all > docs/config.md")
