"""Whole runs on a tiny model: a diverged last step saves nothing (review R16b), a hung custom reward stops GRPO
naming itself within its time limit (W15), and rewards of 1e308 stop it naming the reward (W14)."""

from __future__ import annotations

import time

import pytest

from posttrain.errors import UserError
from posttrain.grpo.loop import train as grpo_train
from posttrain.sft import train as sft_train
from tests.integration.test_grpo import recipe as grpo_recipe
from tests.integration.test_sft import chats, recipe as sft_recipe
from tests.conftest import write_jsonl


def test_a_diverged_last_step_stops_the_run_and_saves_no_adapter(tiny_qwen3, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chats(8))
    with pytest.raises(UserError, match=r"at step 1: training diverged \(no checkpoint written for it\). Lower "
                                        r"train.lr \(now 1e\+38\)"):
        sft_train(sft_recipe(tiny_qwen3, data, tmp_path / "run", "train.lr=1e38", "train.max_steps=1",
                             "train.warmup_steps=0", "train.batch_size=2"))
    assert not (tmp_path / "run" / "adapter").exists()


def sleeps(prompts, completions, **kw):
    time.sleep(120)
    return [0.0] * len(completions)


def huge(prompts, completions, **kw):
    return [1e308 if i % 2 else -1e308 for i in range(len(completions))]


def test_a_hung_reward_stops_grpo_within_its_limit(tiny_qwen3, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"reward 'sleeps' did not return within 2 s \(grpo.reward_timeout\)"):
        grpo_train(grpo_recipe(tiny_qwen3, tmp_path / "run", "train.max_steps=1", "grpo.reward_timeout=2"),
                   reward_funcs=[sleeps])
    assert time.perf_counter() - t0 < 100  # model load + one rollout + 2 s, not the reward's 120 s


def test_rewards_whose_spread_overflows_stop_grpo_naming_the_reward(tiny_qwen3, tmp_path):
    with pytest.raises(UserError, match=r"step 1: reward 'huge' returned -?1e\+308 .*overflow the group statistics"):
        grpo_train(grpo_recipe(tiny_qwen3, tmp_path / "run", "train.max_steps=1"), reward_funcs=[huge])
