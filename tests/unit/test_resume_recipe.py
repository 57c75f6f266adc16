"""--resume compares the recipe with the run's config.yaml: changes are listed and refused, safe keys pass, listed
keys are accepted and recorded, keys the checkpoint fixes are refused even when listed."""

from __future__ import annotations

import pytest
import yaml

from posttrain.config import SFTRecipe, load_recipe, save_recipe
from posttrain.errors import UserError
from posttrain.resume import check_recipe, differences, save_resumed_recipe

BASE = ["model.name=m", "data.path=d.jsonl", "train.max_steps=6", "train.lr=2e-4"]


def recipe(run, *extra):
    return load_recipe(None, [*BASE, f"output_dir={run}", *extra], SFTRecipe)


def test_differences_name_every_changed_leaf_and_a_nulled_section_once():
    old = {"train": {"lr": 1, "betas": [0.9, 0.99]}, "lora": {"r": 16}, "only_old": 1}
    new = {"train": {"lr": 2, "betas": [0.9, 0.99]}, "lora": None, "only_new": 2}
    assert differences(old, new) == [("train.lr", 1, 2), ("lora", {"r": 16}, None)]


def test_a_changed_recipe_is_refused_with_every_key_listed(tmp_path):
    save_recipe(recipe(tmp_path), tmp_path)
    assert check_recipe(tmp_path, recipe(tmp_path)) == []
    with pytest.raises(UserError) as err:
        check_recipe(tmp_path, recipe(tmp_path, "train.max_steps=10", "train.lr=0.05", "lora.r=8", "data.seed=3"))
    msg = str(err.value)
    assert f"the recipe differs from the one {tmp_path} was trained with" in msg
    assert "  train.max_steps: 6 -> 10\n" in msg and "  data.seed: 3407 -> 3\n" in msg
    assert ("train.lr: 0.0002 -> 0.05 (cannot change on resume: the optimizer state in the checkpoint restores it)"
            in msg)
    assert "lora.r: 16 -> 8 (cannot change on resume" in msg
    assert "pass --allow-changes data.seed,train.max_steps" in msg
    assert "start a new run to change lora.r, train.lr" in msg


def test_safe_keys_pass_listed_keys_are_accepted_fixed_keys_never(tmp_path):
    save_recipe(recipe(tmp_path), tmp_path)
    assert sorted(check_recipe(tmp_path, recipe(tmp_path, "train.save_every=5", "train.log_every=2"))) == [
        ("train.log_every", 1, 2), ("train.save_every", 0, 5)]
    changed = recipe(tmp_path, "train.max_steps=10", "data.seed=3")
    assert sorted(check_recipe(tmp_path, changed, ["train.max_steps", "data"])) == [
        ("data.seed", 3407, 3), ("train.max_steps", 6, 10)]
    with pytest.raises(UserError, match="data.seed"):
        check_recipe(tmp_path, changed, ["train.max_steps"])
    with pytest.raises(UserError, match="lora.r: 16 -> 8 \\(cannot change"):
        check_recipe(tmp_path, recipe(tmp_path, "lora.r=8"), ["lora", "lora.r"])


def test_config_yaml_states_what_the_run_used_and_from_which_step(tmp_path):
    save_recipe(recipe(tmp_path), tmp_path)
    first = recipe(tmp_path, "train.max_steps=10")
    save_resumed_recipe(tmp_path, first, check_recipe(tmp_path, first, ["train.max_steps"]), step=6)
    second = recipe(tmp_path, "train.max_steps=12")
    save_resumed_recipe(tmp_path, second, check_recipe(tmp_path, second, ["train.max_steps"]), step=10)
    text = (tmp_path / "config.yaml").read_text()
    assert text.splitlines()[:2] == ["# resumed at step 6: train.max_steps: 6 -> 10",
                                     "# resumed at step 10: train.max_steps: 10 -> 12"]
    assert yaml.safe_load(text)["train"]["max_steps"] == 12  # still a valid recipe: the comments are comments
    assert load_recipe(tmp_path / "config.yaml", [], SFTRecipe).train.max_steps == 12
