"""Reward functions for RL from verifiable rewards.

Public API:

* ``get_reward_funcs(specs)`` / ``resolve_rewards(specs)``: built-in, preset and custom reward functions
* ``RewardSet``: weighted sums, validation and TRL's reward metrics (``RewardFailureError``,
  ``RewardContractError``)
* ``generation_suffix(tokenizer)``: the marker a chat template's generation prompt leaves open

A reward is TRL's plain function ``(prompts, completions, **columns) -> list[float | None]``. The answer
verifier they use is its own package, :mod:`posttrain.verify`.
"""

from posttrain.rewards.functions import generation_suffix
from posttrain.rewards.registry import (
    RewardContractError,
    RewardFailureError,
    RewardSet,
    get_reward_funcs,
    resolve_rewards,
)

__all__ = ["RewardContractError", "RewardFailureError", "RewardSet", "generation_suffix", "get_reward_funcs",
           "resolve_rewards"]
