"""Preference learning: pairs of a chosen and a rejected answer to one prompt.

``data`` (pairs from files, the hub or a generator, tokenized with the chat template), ``losses`` (the pure
math: Bradley-Terry for reward models, DPO/IPO/SimPO), ``rm`` (``posttrain rm``: an outcome reward model),
``dpo`` (``posttrain dpo``), ``reward_model`` (a trained reward model scoring completions, e.g. as a GRPO reward).
"""
