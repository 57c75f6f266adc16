"""GRPO: config, typed rollout data, pure losses and the training loop."""
