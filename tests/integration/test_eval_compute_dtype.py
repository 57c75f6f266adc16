"""Evaluation's compute dtype (the ``auto`` rule of GRPO's rollouts, an explicit override, recorded with the
results) and the rollout engine's faster batches (a shared prompt prefix prefilled once, finished rows
compacted in place), which must give the float32 completions of one prompt decoded at a time."""

import json

import pytest
import torch

from posttrain.errors import UserError


@pytest.fixture(scope="module")
def tiny(tiny_qwen3):
    from posttrain.config import ModelConfig
    from posttrain.models import load_model

    return load_model(ModelConfig(name=str(tiny_qwen3)), None, for_training=False, verbose=False)


def test_dtype_rule_auto_is_native_bf16_and_float32_overrides(tiny):
    from posttrain.config import EvalConfig
    from posttrain.evaluation.runner import compute_dtype
    from posttrain.models import cpu_has_native_bf16

    model, _ = tiny
    assert next(model.parameters()).dtype == torch.float32
    native = cpu_has_native_bf16()
    assert compute_dtype(model, EvalConfig()) == ((torch.bfloat16, "bfloat16") if native else (None, "float32"))
    assert compute_dtype(model, EvalConfig(compute_dtype="float32")) == (None, "float32")
    assert compute_dtype(model, EvalConfig(compute_dtype="bfloat16")) == (torch.bfloat16, "bfloat16")


def test_chosen_dtype_reaches_the_engine_and_is_recorded(tiny, tmp_path, monkeypatch):
    import posttrain.evaluation.generation as generation
    from posttrain.config import EvalConfig
    from posttrain.evaluation import evaluate, load_benchmark

    seen = []

    class Recording(generation.HFRolloutEngine):  # the real engine, noting the dtype it was given
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.compute_dtype)

    monkeypatch.setattr(generation, "HFRolloutEngine", Recording)
    model, tok = tiny
    bench = load_benchmark("synthetic", limit=3)
    out = tmp_path / "bf16"
    evaluate(model, tok, bench, EvalConfig(max_new_tokens=4, batch_size=3, compute_dtype="bfloat16"), out_dir=out,
             progress=False)
    assert seen == [torch.bfloat16]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compute_dtype"] == "bfloat16"
    assert json.loads((out / "eval_config.json").read_text())["compute_dtype"] == "bfloat16"
    with pytest.raises(UserError, match="compute_dtype"):  # float32 answers are not mixed into a bf16 run
        evaluate(model, tok, bench, EvalConfig(max_new_tokens=4, batch_size=3, compute_dtype="float32"),
                 out_dir=out, progress=False)
    # an evaluation written before the dtype was recorded ran in the weights' dtype (float32): it resumes in float32
    old = tmp_path / "old"
    evaluate(model, tok, bench, EvalConfig(max_new_tokens=4, batch_size=3, compute_dtype="float32"), out_dir=old,
             progress=False)
    config = json.loads((old / "eval_config.json").read_text())
    del config["compute_dtype"]
    (old / "eval_config.json").write_text(json.dumps(config))
    assert evaluate(model, tok, bench, EvalConfig(max_new_tokens=4, batch_size=3, compute_dtype="float32"),
                    out_dir=old, progress=False)["compute_dtype"] == "float32"
    assert seen[-1] is None


def test_shared_prefix_length():
    from posttrain.rollout.hf import _shared_prefix

    assert _shared_prefix([[1, 2, 3, 4]]) == 0                       # one prompt: nothing to share
    assert _shared_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert _shared_prefix([[1, 2, 3], [1, 2, 3, 9]]) == 2            # each prompt keeps a token of its own
    assert _shared_prefix([[7, 2], [1, 2]]) == 0


def test_batched_decoding_equals_one_prompt_at_a_time_in_float32(tiny):
    """A batch whose prompts share a system prompt (prefilled once) and whose rows stop at different steps (the
    cache compacted in place) decodes the float32 greedy tokens of each prompt decoded alone."""
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.hf import HFRolloutEngine

    model, tok = tiny
    system = tok("You are a careful assistant. Answer briefly and show the working.")["input_ids"]
    prompts = [system + tok(q)["input_ids"] for q in ("What is 2 + 3?", "Compute 17 * 4, then add 9.", "Hi", "7-1?")]
    engine = HFRolloutEngine(model, tok)

    def run(batch, stops=()):
        sp = SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=tuple(stops) or (-1,), logprobs=True)
        return engine.generate(batch, 1, sp)

    free = run(prompts)
    # stop tokens taken from the completions themselves, so that the rows finish at different steps
    stops = {int(free.completion_ids[0, 2]), int(free.completion_ids[1, 6])}
    together = run(prompts, stops)
    assert together.stats["forward"] == "lean"
    alone = [run([p], stops) for p in prompts]
    lengths = [int(a.lengths[0]) for a in alone]
    assert len(set(lengths)) > 1                                      # rows left the batch at different steps
    for r, a in enumerate(alone):
        n = lengths[r]
        assert together.completion_ids[r, :n].tolist() == a.completion_ids[0, :n].tolist()
        assert int(together.lengths[r]) == n
        torch.testing.assert_close(together.logprobs[r, :n], a.logprobs[0, :n], atol=1e-4, rtol=0)
