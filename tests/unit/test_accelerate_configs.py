"""Every shipped accelerate config (posttrain/recipes/accelerate/) loads with accelerate's own config class, and
every key of its fsdp_config / deepspeed_config is an option of `accelerate launch` (that is how the launcher
reads them), so a typo fails here rather than being ignored on a GPU cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from posttrain import recipes

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((recipes.ROOT / "accelerate").glob("*.yaml"))


def launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {a.dest for a in launch_command_parser()._actions}


def test_the_documented_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"single_gpu.yaml", "cpu_2proc.yaml", "ddp_8gpu.yaml", "fsdp2_8gpu.yaml", "zero2.yaml", "zero3.yaml",
            "multinode_2x8.yaml"} <= names
    doc = (REPO / "docs" / "scale-out.md").read_text()
    for name in names:  # the command that gives the shipped file's path
        assert f"posttrain recipes accelerate/{Path(name).stem}" in doc, f"docs/scale-out.md does not mention {name}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_for_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    text = path.read_text()
    assert text.startswith("#") and ("Command:" in text or "Node 0:" in text), "start with what it does and the command"
    cfg = ClusterConfig.from_yaml_file(str(path))  # raises on unknown top-level keys
    raw = yaml.safe_load(text)
    options = launch_options()
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = sorted(set(raw.get(section) or {}) - options)
        assert not unknown, f"{path.name}: {section} keys unknown to accelerate launch: {unknown}"
    kind = str(cfg.distributed_type).rsplit(".", 1)[-1]
    assert raw["mixed_precision"] == "no"  # posttrain sets precision itself (model.dtype, grpo.compute_dtype)
    if kind == "FSDP":
        assert raw["fsdp_config"]["fsdp_version"] == 2  # posttrain refuses FSDP1
    if kind == "DEEPSPEED":
        assert raw["deepspeed_config"]["zero_stage"] in (2, 3)
    assert cfg.num_processes % cfg.num_machines == 0
