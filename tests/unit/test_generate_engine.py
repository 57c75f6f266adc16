"""The ``model.generate`` rollout engine (what ``model.backend: unsloth`` GRPO decodes with, since Unsloth's patched
forward cannot take posttrain's DynamicCache; see posttrain.rollout.generate). Here it runs transformers' own
``generate`` on a tiny random Qwen3 with a LoRA adapter, and is compared with the HF engine and with a
teacher-forced forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from posttrain.config import LoraConfig, ModelConfig, load_recipe
from posttrain.grpo.config import GRPORecipe
from posttrain.grpo.loop import build_engine
from posttrain.models import load_model
from posttrain.rollout import SamplingParams
from posttrain.rollout.generate import GenerateRolloutEngine
from posttrain.rollout.hf import HFRolloutEngine


@pytest.fixture(scope="module")
def policy(tiny_qwen3):
    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name=str(tiny_qwen3)), LoraConfig(r=4, alpha=8), verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok


def _prompts(tok):
    texts = ["What is 2 + 3?", "Name a color.", "Count: one, two"]  # three lengths: left padding matters
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for t in texts]


def test_greedy_equals_the_hf_engine(policy):
    model, tok = policy
    prompts = _prompts(tok)
    sp = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    ref = HFRolloutEngine(model, tok, merge="none").generate(prompts, 2, sp)
    got = GenerateRolloutEngine(model, tok).generate(prompts, 2, sp)
    assert got.completion_ids.tolist() == ref.completion_ids.tolist()
    assert got.finish_reasons == ["length"] * 6 and got.stats["forward"] == "generate"
    torch.testing.assert_close(got.logprobs, ref.logprobs, rtol=1e-4, atol=1e-4)
    assert model.training  # the mode it was called in is restored


@torch.no_grad()
def test_sampled_logprobs_are_the_temperature_scaled_unfiltered_distribution(policy):
    model, tok = policy
    prompts = _prompts(tok)
    sp = SamplingParams(temperature=0.7, top_k=20, max_new_tokens=6, seed=3)
    eng = GenerateRolloutEngine(model, tok)
    ro = eng.generate(prompts, 3, sp, seeds=[5, 6, 7])
    again = eng.generate(prompts, 3, sp, seeds=[5, 6, 7])
    assert ro.completion_ids.tolist() == again.completion_ids.tolist()  # seeded per call: a rerun repeats
    model.eval()
    for row in range(len(ro)):
        n = int(ro.lengths[row])
        comp = ro.completion_ids[row, :n].tolist()
        prompt = ro.prompt_of(row)
        logits = model(input_ids=torch.tensor([prompt + comp])).logits[0, len(prompt) - 1:-1].float() / 0.7
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(comp)[:, None]).squeeze(-1)
        torch.testing.assert_close(ro.logprobs[row, :n], ref, rtol=1e-4, atol=1e-4)
    model.train()


def test_stop_token_and_stop_string_cut_the_completion(policy):
    model, tok = policy
    prompts = _prompts(tok)[:1]
    free = GenerateRolloutEngine(model, tok).generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=12,
                                                                                 ignore_eos=True))
    ids = free.completion_ids[0].tolist()
    stop_id = ids[4]  # the 5th greedy token, made a stop token: the completion keeps it and ends there
    first = ids.index(stop_id)
    ro = GenerateRolloutEngine(model, tok).generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=12,
                                                                               stop_token_ids=(stop_id,)))
    assert ro.completion_ids[0, :int(ro.lengths[0])].tolist() == ids[:first + 1]
    assert ro.finish_reasons == ["stop"]
    text = tok.decode(ids[:first + 1], skip_special_tokens=False)
    stop = text[-3:] if len(text) >= 3 else text
    ro = GenerateRolloutEngine(model, tok).generate(prompts, 1, SamplingParams(
        temperature=0, max_new_tokens=12, stop_token_ids=(10**6 - 1,), stop_strings=(stop,)))
    assert ro.finish_reasons == ["stop"] and stop in tok.decode(ro.completion_ids[0, :int(ro.lengths[0])])
    assert int(ro.lengths[0]) <= first + 1


def test_unsloth_grpo_decodes_with_generate(policy, tmp_path):
    """The decision for model.backend=unsloth (rollout.generate's docstring): the GRPO loop builds this engine,
    never the DynamicCache one that Unsloth's patched forward cannot take."""
    model, tok = policy
    base = ["model.name=m", "data.path=d", f"output_dir={tmp_path}"]
    updater = SimpleNamespace(compute=None, policy=None)
    unsloth = load_recipe(None, base + ["model.backend=unsloth"], GRPORecipe)
    assert isinstance(build_engine(unsloth, None, model, tok, updater), GenerateRolloutEngine)
    assert isinstance(build_engine(load_recipe(None, base, GRPORecipe), None, model, tok, updater), HFRolloutEngine)
