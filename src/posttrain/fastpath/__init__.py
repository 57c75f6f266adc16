"""The CPU fast path: how frozen weights compute during training and rollouts (oneDNN-prepacked weights,
fused LoRA, a lean decoder, float32 attention, allocator settings). Algorithms do not see it."""
