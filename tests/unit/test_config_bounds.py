"""Values are bounded at load: every out-of-range value of the reliability review (R13-R17, R20) fails in
load_recipe, before a model is loaded, with the key, the problem and the value; the edges that are meaningful
stay accepted."""

from __future__ import annotations

import warnings

import pytest

from posttrain.config import ConfigError, load_recipe
from posttrain.grpo.config import GRPORecipe

SFT, GRPO = "tiny/sft", "tiny/grpo"

REJECTED = [  # (override, what the message says after the key)
    ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ("train.lr=0", "train.lr: Input should be greater than 0"),
    ("train.lr=nan", "train.lr: Input should be a finite number"),
    ("train.lr=inf", "train.lr: Input should be a finite number"),
    ("train.epochs=0", "train.epochs: Input should be greater than 0"),
    ("train.epochs=-1", "train.epochs: Input should be greater than 0"),
    ("train.log_every=0", "train.log_every: Input should be greater than or equal to 1"),
    ("train.log_every=-1", "train.log_every: Input should be greater than or equal to 1"),
    ("train.warmup_steps=-5", "train.warmup_steps: Input should be greater than or equal to 0"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio: Input should be less than or equal to 1"),
    ("train.save_every=-2", "train.save_every: Input should be greater than or equal to 0"),
    ("train.eval_every=-3", "train.eval_every: Input should be greater than or equal to 0"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints: Input should be greater than or equal to 0"),
    ("train.max_grad_norm=0", "train.max_grad_norm: Input should be greater than 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm: Input should be greater than 0"),
    ("train.max_grad_norm=inf", "train.max_grad_norm: Input should be a finite number"),
    ("train.weight_decay=-1", "train.weight_decay: Input should be greater than or equal to 0"),
    ("train.betas=[2,3]", r"train.betas: \[2.0, 3.0\]: each decay rate must be in \[0, 1\)"),
    ("train.betas=[0.9,1.0]", r"train.betas: \[0.9, 1.0\]: each decay rate must be in \[0, 1\)"),
    ("train.batch_size=true", "train.batch_size: expected a number, got true"),
    ("train.lr=false", "train.lr: expected a number, got false"),
    ("data.val_size=-1", "data.val_size: -1 is neither a fraction in \\[0, 1\\) nor a whole number"),
    ("data.val_size=-0.5", "data.val_size: -0.5 is neither"),
    ("data.val_size=2.5", "data.val_size: 2.5 is neither"),
    ("data.val_size=nan", "data.val_size: nan is neither"),
    ("data.path=", "data.path: String should have at least 1 character"),
    ("lora.alpha=0", "lora.alpha: Input should be greater than 0"),
    ("lora.alpha=-16", "lora.alpha: Input should be greater than 0"),
    ("lora.target_modules=[]", r"lora.target_modules: \[\] names no layer"),
    ("lora.target_modules=''", "lora.target_modules: '' names no layer"),
    ("model.name=", "model.name: is empty"),
    ("model.name='  '", "model.name: is empty"),
    ("output_dir=", "output_dir: is empty"),
    ("output_dir=/", "output_dir: '/' is the filesystem root"),
    ("output_dir=/tmp/..", "output_dir: '/tmp/..' is the filesystem root"),
]


@pytest.mark.parametrize("override,message", REJECTED, ids=[o for o, _ in REJECTED])
def test_out_of_range_values_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(SFT, [override])


GRPO_REJECTED = [
    ("grpo.temperature=inf", "grpo.temperature: Input should be a finite number"),
    ("grpo.beta=nan", "grpo.beta: Input should be a finite number"),
    ("grpo.top_k=-2", "grpo.top_k: Input should be greater than or equal to -1"),
    ("grpo.max_prompt_length=0", "grpo.max_prompt_length: 0: give a number of tokens >= 1, or auto"),
    ("grpo.reward_weights=[1, .nan]", "every weight must be a finite number"),
    ("grpo.reward_timeout=0", "grpo.reward_timeout: Input should be greater than 0"),
    ("grpo.reward_timeout=nan", "grpo.reward_timeout: Input should be a finite number"),
    ("grpo.reward_max_failure_fraction=1.5", "grpo.reward_max_failure_fraction: Input should be less than or equal"),
    ("grpo.num_generations=true", "grpo.num_generations: expected a number, got true"),
    ("output_dir=/", "output_dir: '/' is the filesystem root"),
]


@pytest.mark.parametrize("override,message", GRPO_REJECTED, ids=[o for o, _ in GRPO_REJECTED])
def test_grpo_values_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(GRPO, [override], GRPORecipe)


def test_meaningful_edges_are_accepted_and_kept():
    cfg = load_recipe(SFT, ["data.val_size=0.25", "train.max_grad_norm=null", "train.keep_checkpoints=0",
                            "train.betas=[0,0.5]", "lora.target_modules=all-linear", "train.max_steps=-1"])
    assert (cfg.data.val_size, cfg.train.max_grad_norm, cfg.train.keep_checkpoints) == (0.25, None, 0)
    assert cfg.train.betas == (0.0, 0.5) and cfg.lora.target_modules == "all-linear"
    assert load_recipe(SFT, ["data.val_size=5.0"]).data.val_size == 5  # a whole float is a count
    assert isinstance(load_recipe(SFT, ["data.val_size=5.0"]).data.val_size, int)
    assert load_recipe(SFT, ["train.lr=1e-4"]).train.lr == 1e-4  # YAML 1.1 reads 1e-4 as text: still a number
    g = load_recipe(GRPO, ["grpo.reward_timeout=null", "grpo.reward_max_failure_fraction=1"], GRPORecipe)
    assert (g.grpo.reward_timeout, g.grpo.reward_max_failure_fraction) == (None, 1.0)
    assert load_recipe(GRPO, [], GRPORecipe).grpo.reward_timeout == 300.0


def test_every_problem_of_a_recipe_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_recipe(SFT, ["train.lr=nan", "train.log_every=0", "lora.alpha=0"])
    lines = str(err.value).splitlines()
    assert len(lines) == 4 and all(k in str(err.value) for k in ("train.lr", "train.log_every", "lora.alpha"))


def test_a_warmup_as_long_as_the_run_warns_once_at_load():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_recipe(SFT, ["train.max_steps=1", "train.warmup_steps=2"])
        load_recipe(SFT, ["train.max_steps=10", "train.warmup_ratio=1.0", "train.warmup_steps=0"])
        load_recipe(SFT, ["train.max_steps=5", "train.warmup_steps=2"])  # reaches lr at step 3: no warning
        load_recipe(SFT, ["train.max_steps=-1", "train.warmup_steps=50"])  # length unknown at load: no warning
        # GRPO's schedule counts updates: 2 steps x 2 iterations = 4 updates > 2 warmup steps
        load_recipe(GRPO, ["train.max_steps=2", "train.warmup_steps=2", "grpo.num_iterations=2"], GRPORecipe)
        load_recipe(GRPO, ["train.max_steps=2", "train.warmup_steps=2"], GRPORecipe)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3, messages
    assert messages[0].startswith("train.warmup_steps=2 is not shorter than the run (1 optimizer updates")
    assert "never reaches train.lr=0.0002 and the first update uses lr 0" in messages[0]
    assert messages[1].startswith("train.warmup_ratio=1.0 (10 steps) is not shorter than the run (10 optimizer")
    assert messages[2].startswith("train.warmup_steps=2 is not shorter than the run (2 optimizer updates")
