"""The shipped recipes are found by name from any folder, a user's own file of the same name wins, an unknown name
lists the shipped ones, and every recipe's header states the command that runs it by its name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import recipes
from posttrain.config import ConfigError, SFTRecipe, load_recipe
from posttrain.errors import UserError
from posttrain.pipeline import load_pipeline


def test_names_cover_every_shipped_file_once_by_kind():
    files = sorted(p.relative_to(recipes.ROOT).with_suffix("").as_posix() for p in recipes.ROOT.rglob("*.yaml"))
    assert recipes.names() == files and "tiny/sft" in files
    kinds = [recipes.names(k) for k in ("recipe", "pipeline", "accelerate")]
    assert sorted(sum(kinds, [])) == files
    assert "pipelines/quickstart" in kinds[1] and "accelerate/cpu_2proc" in kinds[2]
    assert not any(n.startswith(("pipelines/", "accelerate/")) for n in kinds[0])


def test_a_name_resolves_from_any_folder_and_a_local_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = recipes.ROOT / "tiny" / "sft.yaml"
    for name in ("tiny/sft", "tiny/sft.yaml", "recipes/tiny/sft.yaml"):
        assert recipes.resolve(name) == shipped
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "sft.yaml").write_text("output_dir: mine\n")
    assert recipes.resolve("tiny/sft.yaml") == Path("tiny/sft.yaml")  # the local file, as given
    assert recipes.resolve("tiny/sft") == shipped  # no such file here: the name
    assert recipes.find("../config") is None and recipes.find("tiny/../tiny/sft") is None


def test_an_unknown_name_lists_the_shipped_ones_of_its_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="recipe file not found: tiny/sfft") as err:
        load_recipe("tiny/sfft")
    msg = str(err.value)
    assert "tiny/sft" in msg and "tiny/grpo" in msg and "accelerate/" not in msg and "pipelines/" not in msg
    with pytest.raises(UserError, match=r"pipeline file not found: quick .*one of: .*pipelines/quickstart"):
        load_pipeline("quick")


def test_load_by_name_is_load_by_path():
    assert load_recipe("tiny/sft", ["train.max_steps=3"], SFTRecipe) == \
        load_recipe(recipes.ROOT / "tiny" / "sft.yaml", ["train.max_steps=3"], SFTRecipe)


def test_pipelines_name_their_stage_recipes_by_name(tmp_path):
    pipe = load_pipeline("pipelines/quickstart")
    assert pipe.path == recipes.ROOT / "pipelines" / "quickstart.yaml"
    trained = {s.name: s.config.recipe for s in pipe.stages if s.command in ("sft", "grpo")}
    assert trained == {"sft": str(recipes.ROOT / "tiny" / "quickstart_sft.yaml"),
                       "grpo": str(recipes.ROOT / "tiny" / "quickstart_grpo.yaml")}
    own = tmp_path / "p.yaml"  # a user's pipeline elsewhere naming a shipped recipe
    own.write_text("stages:\n  - {name: sft, recipe: tiny/sft}\n")
    assert load_pipeline(own).stages[0].config.recipe == str(recipes.ROOT / "tiny" / "sft.yaml")


@pytest.mark.parametrize("name", recipes.names())
def test_each_header_states_the_command_by_name(name):
    """The header's command is what a user copies: it names the recipe the way a wheel install can run it."""
    header = [line for line in (recipes.ROOT / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
    commands = [line for line in header if line.startswith(("# Command:", "# Alone:", "# Node 0:"))]
    assert commands and name in commands[0], f"{name}: the header's command does not name {name}"
    assert not any("recipes/" in line for line in header), f"{name}: a checkout path (recipes/...) in the header"


def test_recipes_command_lists_names_and_prints_a_path():
    run = [sys.executable, "-m", "posttrain.cli", "recipes"]
    listed = subprocess.run(run, capture_output=True, text=True)
    assert listed.returncode == 0
    assert all(f"  {name} " in listed.stdout for name in recipes.names())
    path = subprocess.run([*run, "accelerate/ddp_8gpu"], capture_output=True, text=True)
    assert path.returncode == 0 and path.stdout.strip() == str(recipes.ROOT / "accelerate" / "ddp_8gpu.yaml")
    bad = subprocess.run([*run, "tiny/nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "tiny/sft" in bad.stderr and "Traceback" not in bad.stderr


def test_the_readme_and_the_recipes_page_list_every_shipped_recipe():
    repo = Path(__file__).resolve().parents[2]
    for doc in ("README.md", "docs/recipes.md"):
        text = (repo / doc).read_text()
        missing = [n for n in recipes.names("recipe") + recipes.names("pipeline") if f"`{n}`" not in text]
        assert not missing, f"{doc} does not list {missing}"
