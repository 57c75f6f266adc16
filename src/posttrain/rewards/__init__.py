"""Reward functions and the answer verifier for RL from verifiable rewards.

Public API:

* ``verify(prediction, gold) -> Verdict`` and ``Verdict(equal, reason, pred_normalized, gold_normalized)``
* ``extract_answer(text, style="auto", ...)`` (styles: auto, boxed, tags, gsm8k, final_answer, dapo)
* ``VerifierPool``: worker processes with hard timeouts for the symbolic rung
* ``get_reward_funcs(specs)`` and ``RewardSet``: built-in and custom rewards, weighted sums, metrics

A reward is TRL's plain function ``(prompts, completions, **columns) -> list[float | None]``.
Heavy modules (sympy) load only in the worker processes.
"""

from posttrain.verify.extract import STYLES, extract_answer
from posttrain.verify.verifier import Verdict, verify

__all__ = [
    "STYLES",
    "RewardFailureError",
    "RewardSet",
    "Verdict",
    "VerifierPool",
    "extract_answer",
    "generation_suffix",
    "get_reward_funcs",
    "resolve_rewards",
    "verify",
]


def __getattr__(name):  # lazy: keep `import posttrain.rewards` cheap
    if name == "VerifierPool":
        from posttrain.verify.pool import VerifierPool

        return VerifierPool
    if name in ("get_reward_funcs", "resolve_rewards", "RewardSet", "RewardFailureError"):
        from posttrain.rewards import registry

        return getattr(registry, name)
    if name == "generation_suffix":
        from posttrain.rewards.functions import generation_suffix

        return generation_suffix
    raise AttributeError(f"module 'posttrain.rewards' has no attribute {name!r}")
