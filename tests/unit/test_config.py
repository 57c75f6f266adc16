from pathlib import Path

import pytest
import yaml

from posttrain import recipes
from posttrain.config import ConfigError, SFTRecipe, load_recipe, parse_overrides


# every shipped training recipe; pipelines (pipelines/) are checked by test_pipeline.py, accelerate configs
# (accelerate/) by test_accelerate_configs.py
RECIPES = [recipes.ROOT / f"{name}.yaml" for name in recipes.names("recipe")]


def recipe_class(path: Path):
    data = yaml.safe_load(path.read_text())
    if "grpo" in data:
        from posttrain.grpo.config import GRPORecipe

        return GRPORecipe
    if "dpo" in data:
        from posttrain.preference.dpo_config import DPORecipe

        return DPORecipe
    if "rm" in data:
        from posttrain.preference.config import RMRecipe

        return RMRecipe
    return SFTRecipe


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(recipes.ROOT)))
def test_every_recipe_loads(path):
    cfg = load_recipe(path, [], recipe_class(path))
    assert cfg.model.name and cfg.data.path


def test_overrides_are_parsed_as_yaml():
    assert parse_overrides(["train.lr=1e-4", "lora=null", "lora.target_modules=[q_proj,v_proj]"]) == [
        (["train", "lr"], 1e-4), (["lora"], None), (["lora", "target_modules"], ["q_proj", "v_proj"])]


def test_override_applies_and_resolved_config_round_trips(tmp_path):
    src = recipes.ROOT / "tiny" / "sft.yaml"
    cfg = load_recipe(src, ["train.max_steps=3", "output_dir=runs/x", "lora.r=4"])
    assert (cfg.train.max_steps, cfg.output_dir, cfg.lora.r) == (3, "runs/x", 4)
    from posttrain.config import save_recipe

    saved = save_recipe(cfg, tmp_path)
    again = load_recipe(saved)
    assert again == cfg


def test_unknown_key_lists_valid_keys():
    src = recipes.ROOT / "tiny" / "sft.yaml"
    with pytest.raises(ConfigError) as err:
        load_recipe(src, ["train.learning_rate=1e-4"])
    msg = str(err.value)
    assert "unknown key 'train.learning_rate'" in msg and "lr" in msg and "grad_accum" in msg
    with pytest.raises(ConfigError, match="valid keys here: .*model"):
        load_recipe(src, ["modle.name=x"])


def test_bad_value_and_missing_file():
    src = recipes.ROOT / "tiny" / "sft.yaml"
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_recipe(src, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match="recipe file not found: nope.yaml"):
        load_recipe("nope.yaml")
    with pytest.raises(ConfigError, match="not key=value"):
        load_recipe(src, ["train.lr"])
