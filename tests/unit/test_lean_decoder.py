"""The lean decoder forward (posttrain.fastpath.lean) against transformers' own forward, on tiny random
Llama (q/k/v/o biases), Qwen2 (q/k/v biases) and Qwen3 (q/k norms) models with a non-zero LoRA adapter:
the same sampled tokens and log-probabilities; models it does not support fall back to transformers."""

from __future__ import annotations

import pytest
import torch

from posttrain.fastpath import onednn
from posttrain.rollout import SamplingParams
from posttrain.rollout.hf import HFRolloutEngine
from posttrain.fastpath.lean import unsupported

pytestmark = pytest.mark.skipif(not onednn.available("cpu"), reason="the lean decoder needs oneDNN packed linears")
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(kind: str, **kw):
    from transformers import AutoConfig

    common = dict(vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=96, max_position_embeddings=512, tie_word_embeddings=True,
                  eos_token_id=151645, pad_token_id=151643)
    if kind == "llama":
        common.update(attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0})
    if kind == "qwen3":
        common.update(head_dim=16)
    common.update(kw)
    return AutoConfig.for_model(kind, **common)


def _policy(kind: str, **kw):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(kind, **kw), dtype=torch.float32)
    with torch.no_grad():  # non-zero biases, so the fused bias layout matters
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _prompts(tok):
    texts = ["What is 2 + 3?", "Name a color, any color you like.", "Count: one, two"]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for t in texts]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_lean_and_transformers_sample_the_same_tokens(kind, qwen_tok):
    model = _policy(kind)
    assert unsupported(model) is None
    prompts = _prompts(qwen_tok)  # different lengths: left padding in the shared prefill
    sp = SamplingParams(temperature=0.9, max_new_tokens=12, top_k=40, seed=5)
    lean = HFRolloutEngine(model, qwen_tok, lean=True).generate(prompts, 3, sp, seeds=[1, 2, 3])
    hf = HFRolloutEngine(model, qwen_tok, lean=False).generate(prompts, 3, sp, seeds=[1, 2, 3])
    assert (lean.stats["forward"], hf.stats["forward"]) == ("lean", "transformers")
    assert torch.equal(lean.completion_ids, hf.completion_ids)
    assert lean.finish_reasons == hf.finish_reasons
    torch.testing.assert_close(lean.logprobs, hf.logprobs, rtol=1e-4, atol=1e-4)


def test_lean_bf16_log_probabilities_stay_close_to_float32(qwen_tok):
    model = _policy("qwen3")
    prompts = _prompts(qwen_tok)
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, seed=1, ignore_eos=True)
    ro = HFRolloutEngine(model, qwen_tok, compute_dtype=torch.bfloat16).generate(prompts, 2, sp)
    model.eval()
    errs = []
    with torch.no_grad():
        for row in range(len(ro)):
            comp = ro.completion_ids[row].tolist()
            ids = torch.tensor([ro.prompt_of(row) + comp])
            logits = model(input_ids=ids).logits[0, len(ro.prompt_of(row)) - 1:-1].float()
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)
            errs.append((ro.logprobs[row] - ref).abs())
    model.train()
    err = torch.cat(errs)
    assert float(err.mean()) < 0.02 and float(err.max()) < 0.2, (float(err.mean()), float(err.max()))


def test_unsupported_models_say_why_and_generate_through_transformers(qwen_tok):
    sliding = _policy("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0,
                      layer_types=["sliding_attention", "sliding_attention"])
    assert "sliding" in unsupported(sliding)
    gpt2 = __import__("transformers").AutoModelForCausalLM.from_config(
        __import__("transformers").AutoConfig.for_model("gpt2", vocab_size=151936, n_embd=32, n_layer=1, n_head=2))
    assert "gpt2" in unsupported(gpt2)
    sp = SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True)
    ro = HFRolloutEngine(sliding, qwen_tok).generate(_prompts(qwen_tok)[:1], 1, sp)
    ref = HFRolloutEngine(sliding, qwen_tok, lean=False).generate(_prompts(qwen_tok)[:1], 1, sp)
    assert ro.stats["forward"] == "transformers" and torch.equal(ro.completion_ids, ref.completion_ids)
