"""posttrain: LLM post-training (SFT, GRPO, evaluation, export) from one YAML recipe."""

__version__ = "0.1.0"
