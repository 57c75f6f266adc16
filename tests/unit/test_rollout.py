"""The transformers rollout engine on a tiny random Qwen3 (real Qwen vocabulary): shared prefill, merged LoRA,
finished rows leaving the batch, stop tokens and strings, per-completion seeds, sampling filters."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import LoraConfig, ModelConfig
from posttrain.models import load_model
from posttrain.rollout import SamplingParams
from posttrain.fastpath.weights import merged_lora
from posttrain.rollout.hf import HFRolloutEngine, filter_logits


@pytest.fixture(scope="module")
def policy(tiny_qwen3):
    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name=str(tiny_qwen3)), LoraConfig(r=4, alpha=8), verbose=False)
    with torch.no_grad():  # a non-zero adapter, so merging matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok


def _prompts(tok):
    texts = ["What is 2 + 3?", "Name a color.", "Count: one, two"]
    return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for t in texts]


@torch.no_grad()
def _teacher_forced_logps(model, prompt, completion, temperature=1.0):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def test_sampling_logprobs_equal_a_teacher_forced_forward_with_the_adapter(policy):
    """Shared prefill + repeated KV cache + left padding + merged LoRA + dropped rows give the same
    distribution as one plain forward of prompt + completion through the (unmerged) PEFT model."""
    model, tok = policy
    prompts = _prompts(tok)
    eng = HFRolloutEngine(model, tok)
    ro = eng.generate(prompts, 3, SamplingParams(temperature=0.8, max_new_tokens=10, top_k=50), seeds=[1, 2, 3])
    assert ro.completion_ids.shape[0] == 9 and ro.logprobs is not None
    model.eval()
    for row in range(len(ro)):
        n = int(ro.lengths[row])
        comp = ro.completion_ids[row, :n].tolist()
        ref = _teacher_forced_logps(model, ro.prompt_of(row), comp, 0.8)
        torch.testing.assert_close(ro.logprobs[row, :n], ref, rtol=1e-4, atol=1e-4)
    model.train()


def test_greedy_equals_model_generate(policy):
    model, tok = policy
    prompts = _prompts(tok)
    ro = HFRolloutEngine(model, tok).generate(prompts, 2, SamplingParams(temperature=0, max_new_tokens=8,
                                                                         ignore_eos=True))
    model.eval()
    for i, p in enumerate(prompts):
        out = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=8, min_new_tokens=8)
        want = out[0, len(p):].tolist()
        assert ro.completion_ids[2 * i].tolist() == want and ro.completion_ids[2 * i + 1].tolist() == want
    model.train()


def test_a_completion_does_not_depend_on_its_batch(policy):
    model, tok = policy
    prompts = _prompts(tok)
    sp = SamplingParams(temperature=1.0, max_new_tokens=6, seed=7)
    eng = HFRolloutEngine(model, tok)
    together = eng.generate(prompts, 4, sp, seeds=[10, 11, 12])
    alone = eng.generate(prompts[1:2], 4, sp, seeds=[11])
    assert torch.equal(together.completion_ids[4:8], alone.completion_ids)
    again = eng.generate(prompts, 4, sp, seeds=[10, 11, 12])
    assert torch.equal(together.completion_ids, again.completion_ids)
    other = eng.generate(prompts, 4, SamplingParams(temperature=1.0, max_new_tokens=6, seed=8), seeds=[10, 11, 12])
    assert not torch.equal(together.completion_ids, other.completion_ids)
    # the G samples of a group differ (their own streams)
    assert len({tuple(r) for r in together.completion_ids[:4].tolist()}) > 1


def test_stop_tokens_end_rows_and_finished_rows_leave_the_batch(policy):
    model, tok = policy
    prompts = _prompts(tok)
    eng = HFRolloutEngine(model, tok)
    sp = dict(temperature=1.0, max_new_tokens=8, seed=3)
    free = eng.generate(prompts, 1, SamplingParams(**sp, ignore_eos=True), seeds=[0, 1, 2])
    first = free.completion_ids[0].tolist()
    k = next(i for i in range(2, 8) if first[i] not in first[:i])  # a token prompt 0 first meets at step k
    stop = first[k]
    sizes = []
    hook = model.get_base_model().model.embed_tokens.register_forward_pre_hook(  # rows of each forward
        lambda mod, args: sizes.append(args[0].shape[0]))
    try:
        ro = eng.generate(prompts, 1, SamplingParams(**sp, stop_token_ids=(stop,)), seeds=[0, 1, 2])
    finally:
        hook.remove()
    assert ro.finish_reasons[0] == "stop" and ro.lengths[0] == k + 1
    assert ro.completion_ids[0, :k + 1].tolist() == first[:k + 1]  # the stop token is kept (it is trained on)
    assert ro.completion_mask[0].tolist() == [1] * (k + 1) + [0] * (ro.completion_ids.shape[1] - k - 1)
    for r in range(3):
        if stop not in free.completion_ids[r].tolist():
            assert ro.finish_reasons[r] == "length" and ro.lengths[r] == 8
            assert torch.equal(ro.completion_ids[r, :8], free.completion_ids[r])
    # prefill of 3 prompts (after one row for the prefix they share), then the batch shrinks once prompt 0 stopped
    sizes = sizes[1:] if sizes[0] == 1 else sizes
    assert sizes[0] == 3 and sizes[-1] < 3 and sizes == sorted(sizes, reverse=True)


def test_stop_strings_cut_the_text(policy):
    model, tok = policy
    prompts = _prompts(tok)[:1]
    eng = HFRolloutEngine(model, tok)
    free = eng.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    piece = tok.decode(free.completion_ids[0, 3:4])
    assert piece.strip(), "need a visible token to stop on"
    ro = eng.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=8, stop_strings=(piece,)))
    assert ro.finish_reasons[0] == "stop" and ro.lengths[0] <= 4
    assert ro.texts[0].endswith(piece)
    ro = eng.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=8, stop_strings=(piece,),
                                                 include_stop_str_in_output=False))
    assert not ro.texts[0].endswith(piece)


@pytest.mark.parametrize("mode", ["inplace", "backup"])
def test_merged_lora_is_the_adapter_and_restores_the_base(policy, mode):
    model, tok = policy
    ids = torch.tensor([_prompts(tok)[0]])
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
        with merged_lora(model, mode):
            merged = model(input_ids=ids).logits
        after = dict(model.named_parameters())
    model.train()
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, want, atol=1e-4)
    for n, p in before.items():
        if mode == "backup":
            assert torch.equal(after[n], p), n
        else:
            torch.testing.assert_close(after[n], p, rtol=0, atol=1e-6)


def test_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    keep = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.7)) == [True, True, False, False]  # 0.5 < 0.7 -> add 0.25
    assert keep(filter_logits(logits, top_p=0.45)) == [True, False, False, False]
    assert keep(filter_logits(logits, min_p=0.32)) == [True, True, False, False]  # below 0.16 = 0.32 * 0.5
    assert keep(filter_logits(logits, min_p=0.18)) == [True, True, True, True]


def test_sampling_frequencies_follow_the_filtered_distribution(policy):
    """min_p 0.25 on [0.5, 0.3, 0.2, ~0]: keep the first three, renormalized."""
    from posttrain.rollout.hf import sample_tokens

    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    logits = torch.log(probs).repeat(4000, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    tokens, logps = sample_tokens(logits, SamplingParams(min_p=0.2), gens)
    freq = torch.bincount(tokens, minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.12, 0.0]) / 0.92, atol=0.03, rtol=0)
    torch.testing.assert_close(logps, torch.log(probs)[tokens])


def test_bf16_compute_keeps_float32_weights_and_logits_close(policy):
    """compute_dtype=bfloat16: the layers run in bf16 during the rollout, the weights are float32 again after,
    and the sampling log-probs stay close to a float32 teacher-forced forward."""
    model, tok = policy
    prompts = _prompts(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    eng = HFRolloutEngine(model, tok, compute_dtype=torch.bfloat16)
    ro = eng.generate(prompts, 2, SamplingParams(max_new_tokens=6), seeds=[0, 1, 2])
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.allclose(p, before[n], atol=1e-6), n
    model.eval()
    for row in range(len(ro)):
        ref = _teacher_forced_logps(model, ro.prompt_of(row), ro.completion_ids[row].tolist())
        assert (ro.logprobs[row] - ref).abs().max() < 0.15
    model.train()
