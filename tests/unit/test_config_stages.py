"""Eval settings and pipeline stages are typed: one owner of the eval defaults (the CLI and a pipeline's eval
stage get the same), sample-dependent defaults filled in, unknown keys and wrong types named with the valid keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.cli import build_parser
from posttrain.commands.eval_cmd import settings_from
from posttrain.config import EvalConfig, validate
from posttrain.errors import UserError
from posttrain.pipeline_config import EvalStage, ExportStage, GRPOStage, SFTStage, parse_pipeline

P = Path("p.yaml")


def cli_settings(*options: str) -> EvalConfig:
    args = build_parser().parse_args(["eval", "--model", "m", "--benchmark", "synthetic", *options])
    return settings_from(args)


def test_defaults_depend_on_the_number_of_samples():
    one, four, six = EvalConfig(), EvalConfig(samples=4), EvalConfig(samples=6)
    assert (one.temperature, one.top_p, one.k) == (0.0, 1.0, (1,))            # greedy pass@1
    assert (four.temperature, four.top_p, four.k) == (0.6, 0.95, (1, 2, 4))
    assert six.k == (1, 2, 4, 6)
    assert EvalConfig(samples=4, temperature=1.0, top_p=0.9, k=[4, 1]).k == (4, 1)  # given: kept as given


def test_cli_and_pipeline_stage_build_the_same_settings():
    """No option given and no key written: both take EvalConfig's defaults, so the files they write agree."""
    stage = EvalStage(name="e", benchmark="synthetic")
    assert cli_settings().to_dict() == stage.to_dict() == EvalConfig().to_dict()
    assert cli_settings().benchmark_options() == stage.benchmark_options() == {
        "data_file": None, "benchmark_dir": None, "limit": None, "limit_seed": None, "difficulty": "easy"}
    given = cli_settings("--samples", "4", "--prompt", "reasoning", "--max-new-tokens", "48", "--last-number")
    stage = EvalStage(name="e", benchmark="synthetic", samples=4, prompt="reasoning", max_new_tokens=48,
                      last_number=True)
    assert given.to_dict() == stage.to_dict()
    assert given.to_dict()["n_samples"] == 4 and given.to_dict()["temperature"] == 0.6


def test_saved_settings_keep_the_keys_earlier_runs_wrote():
    """metrics.json and eval_config.json of finished evaluations must compare equal to a rerun's."""
    d = EvalConfig(samples=2).to_dict()
    assert list(d) == ["prompt_style", "template", "system_prompt", "markers", "max_new_tokens", "batch_size",
                       "n_samples", "temperature", "top_p", "top_k", "ks", "seed", "last_number"]
    assert d["ks"] == [1, 2] and not {"batch_size", "ks"} & set(EvalConfig().fingerprint())


def test_bad_eval_settings_say_what_to_do():
    with pytest.raises(UserError, match="4 samples per problem need sampling: set a temperature > 0"):
        validate(EvalConfig, {"samples": 4, "temperature": 0}, "the options")
    with pytest.raises(UserError, match=r"pass@k for k=\[8\] needs at least that many samples.*raise samples"):
        cli_settings("--samples", "4", "--k", "8")
    with pytest.raises(UserError, match=r"the options:\n  samples: Input should be greater than or equal to 1"):
        cli_settings("--samples", "0")
    with pytest.raises(UserError, match="unknown key 'max_tokens'; valid keys here: .*max_new_tokens"):
        validate(EvalConfig, {"max_tokens": 3}, "x")


def test_stages_are_told_apart_by_command_which_defaults_to_the_name():
    cfg, written = parse_pipeline({"model": "m", "stages": [
        {"name": "sft", "recipe": "a.yaml"},
        {"name": "rl", "command": "grpo", "recipe": "b.yaml", "overrides": ["train.max_steps=1"]},
        {"name": "eval_sft", "command": "eval", "benchmark": "synthetic", "samples": 4, "limit": 8},
        {"name": "export"}]}, P)
    assert [type(s) for s in cfg.stages] == [SFTStage, GRPOStage, EvalStage, ExportStage]
    assert cfg.model == "m" and cfg.output_dir is None
    ev, ex = cfg.stages[2], cfg.stages[3]
    assert isinstance(ev, EvalConfig) and (ev.temperature, ev.k, ev.limit, ev.label) == (0.6, (1, 2, 4), 8, None)
    assert (ex.format, ex.quant, ex.dtype, ex.verify) == ("merged", "q8_0", "bfloat16", True)
    assert written[0] == {"name": "sft", "recipe": "a.yaml"}      # as written: no command, no defaults added


def test_extra_keys_merge_into_a_stage_and_append_overrides():
    _, written = parse_pipeline({"stages": [{"name": "sft", "recipe": "a.yaml", "overrides": ["x=1"]},
                                            {"name": "eval", "benchmark": "synthetic"}]}, P,
                                extra={"sft": {"overrides": ["y=2"]}, "eval": {"limit": 8}})
    assert written[0]["overrides"] == ["x=1", "y=2"] and written[1]["limit"] == 8
    with pytest.raises(UserError, match=r"no stage named \['nope'\] in p.yaml"):
        parse_pipeline({"stages": [{"name": "eval", "benchmark": "s"}]}, P, extra={"nope": {}})


@pytest.mark.parametrize("stage, message", [
    ({"name": "eval", "benchmark": "s", "limt": 3},
     (r"p.yaml: stages\[0\] \(eval, an eval stage\): unknown key 'limt'; valid keys here: adapter, batch_size, "
      r"benchmark, .*limit, limit_seed")),
    ({"name": "e", "command": "eval", "limit": "x", "benchmark": "s"},
     r"stages\[0\] \(e, an eval stage\): limit: Input should be a valid integer.*\(got 'x'\)"),
    ({"name": "eval"}, r"stages\[0\] \(eval, an eval stage\): missing required key 'benchmark'"),
    ({"name": "grpo", "recipe": "g.yaml", "overrides": "a=1"},
     r"stages\[0\] \(grpo, a grpo stage\): overrides: Input should be a valid list"),
    ({"name": "export", "format": "zip"},
     r"\(export, an export stage\): format: Input should be 'adapter', 'merged'"),
    ({"name": "e", "command": "eval", "benchmark": "s", "markers": {"start": "<a>"}},
     r"unknown key 'markers.start'; valid keys here: reasoning_end, reasoning_start"),
    ({"name": "distill"},
     r"stages\[0\] \(distill\): unknown stage command 'distill'; set command: to one of sft, grpo"),
])
def test_bad_stage_names_file_stage_and_key(stage, message):
    with pytest.raises(UserError, match=message):
        parse_pipeline({"stages": [stage]}, P)


def test_bad_top_level_keys_and_shapes():
    with pytest.raises(UserError, match="p.yaml: unknown key 'stage'; valid keys here: model, output_dir, stages"):
        parse_pipeline({"stage": [], "stages": [{"name": "export"}]}, P)
    with pytest.raises(UserError, match="needs a non-empty 'stages:' list"):
        parse_pipeline({"stages": []}, P)
    with pytest.raises(UserError, match="stage names must be unique"):
        parse_pipeline({"stages": [{"name": "export"}, {"name": "export"}]}, P)
