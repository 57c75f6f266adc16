"""Shared fixtures: tiny real models (random weights, real Qwen vocabulary) written once per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the thread count stays torch's default in every test (in-process and subprocess commands alike): no load-dependent
# choice (posttrain.threads), which would make results and timings depend on what else the machine runs
if "OMP_NUM_THREADS" not in os.environ and "POSTTRAIN_THREADS" not in os.environ:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A tiny random Qwen3 instruct model (Qwen3 chat template, eos <|im_end|>)."""
    from posttrain.tiny import save_tiny_qwen3

    return save_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_base(tmp_path_factory) -> Path:
    """A tiny random Qwen3 'base' model: eos <|endoftext|>, no chat template."""
    from posttrain.tiny import save_tiny_qwen3

    return save_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3-base", base=True)


@pytest.fixture(scope="session")
def qwen_tok(tiny_qwen3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
