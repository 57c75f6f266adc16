"""A reward model as a GRPO reward: named in a reward spec, it scores prompt + completion rendered with its own
chat template exactly as plain transformers does, mixes with verifier rewards under a weight, normalizes with
running statistics, and bad models (NaN scores, several labels, not a reward model) stop with a clear error."""

from __future__ import annotations

import statistics

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain.errors import UserError
from posttrain.preference.reward_model import RunningStats, load_reward_model, render
from posttrain.rewards.registry import RewardContractError, RewardSet

PROMPTS = [[{"role": "user", "content": "What is 2 + 3?"}], [{"role": "user", "content": "What is 4 * 4?"}],
           [{"role": "user", "content": "Name a colour."}]]
COMPLETIONS = [[{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "It is 16."}],
               [{"role": "assistant", "content": "blue, or maybe green"}]]


def save_classifier(src, out, num_labels: int = 1, nan: bool = False):
    torch.manual_seed(7)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=num_labels)
    tok = AutoTokenizer.from_pretrained(src)
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
        if nan:
            model.score.weight.fill_(float("nan"))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rm_dir(tiny_qwen3, tmp_path_factory):
    return save_classifier(tiny_qwen3, tmp_path_factory.mktemp("rm") / "rm")


def direct_scores(path, prompts, completions) -> list[float]:
    """What a transformers user computes: the chat template, one sequence at a time."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    with torch.inference_mode():
        for p, c in zip(prompts, completions):
            text = tok.apply_chat_template(p + c, tokenize=False)
            out.append(float(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]))
    return out


def zero(prompts, completions, **columns):
    return [0.0] * len(completions)


def test_a_reward_spec_naming_a_reward_model_scores_and_mixes_with_verifier_rewards(rm_dir):
    rs = RewardSet.from_specs([{"name": "reward_model", "model": str(rm_dir), "weight": 2.0, "device": "cpu",
                                "batch_size": 2}, "math_accuracy", zero], strict=True, timeout=5.0)
    # scoring cannot hang, so no deadline around it (a custom function gets grpo.reward_timeout)
    assert rs.names == ["reward_model", "math_accuracy", "zero"] and rs.limits == [None, None, 5.0]
    total, per, metrics = rs(PROMPTS, COMPLETIONS, answer=["5", "16", "red"])
    expected = direct_scores(rm_dir, PROMPTS, COMPLETIONS)
    assert per["reward_model"] == pytest.approx(expected, abs=1e-5) and len(set(expected)) == 3
    assert per["math_accuracy"] == [1.0, 1.0, 0.0]
    assert total == pytest.approx([2 * e + a for e, a in zip(expected, per["math_accuracy"])])
    assert metrics["rewards/reward_model/mean"] == pytest.approx(statistics.fmean(expected))
    assert metrics["rewards/reward_model/seconds"] > 0


def test_normalization_uses_the_running_mean_and_std_of_every_score(rm_dir):
    rs = RewardSet.from_specs([{"name": "reward_model", "model": str(rm_dir), "normalize": True, "device": "cpu"}])
    raw = direct_scores(rm_dir, PROMPTS, COMPLETIONS)
    _, first, _ = rs(PROMPTS[:2], COMPLETIONS[:2])
    _, second, _ = rs(PROMPTS[2:], COMPLETIONS[2:])
    m, s = statistics.fmean(raw[:2]), statistics.pstdev(raw[:2])
    assert first["reward_model"] == pytest.approx([(r - m) / (s + 1e-6) for r in raw[:2]], abs=1e-4)
    m, s = statistics.fmean(raw), statistics.pstdev(raw)
    assert second["reward_model"] == pytest.approx([(raw[2] - m) / (s + 1e-6)], abs=1e-4)


def test_running_stats_equal_the_whole_sample():
    stats, seen = RunningStats(), []
    for chunk in ([1.0, 2.0], [10.0], [-3.0, 4.5, 0.25]):
        stats.update(chunk)
        seen += chunk
        assert stats.mean == pytest.approx(statistics.fmean(seen)) and stats.std == pytest.approx(statistics.pstdev(seen))


def test_text_prompts_are_scored_as_text_with_eos(rm_dir):
    tok = AutoTokenizer.from_pretrained(rm_dir)
    assert render(tok, "Q: 1+1?\nA:", " 2", "rm") == "Q: 1+1?\nA: 2" + tok.eos_token
    assert render(tok, "Hi", [{"role": "assistant", "content": "Hello"}], "rm") == tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], tokenize=False)


def test_a_nan_score_stops_training_naming_the_reward(tiny_qwen3, tmp_path):
    path = save_classifier(tiny_qwen3, tmp_path / "nan", nan=True)
    rs = RewardSet.from_specs([{"name": "reward_model", "model": str(path), "device": "cpu"}], strict=True)
    with pytest.raises(RewardContractError, match="reward 'reward_model' returned nan"):
        rs(PROMPTS, COMPLETIONS)


def test_what_is_not_a_one_label_reward_model_is_refused(tiny_qwen3, tmp_path):
    two = save_classifier(tiny_qwen3, tmp_path / "two", num_labels=2)
    with pytest.raises(UserError, match="head has 2 labels.*num_labels=1"):
        load_reward_model(str(two), device="cpu", verbose=False)
    with pytest.raises(UserError, match="is not a reward model.*Qwen3ForCausalLM"):
        load_reward_model(str(tiny_qwen3), device="cpu", verbose=False)
    with pytest.raises(UserError, match="unknown argument 'modle'; it accepts: model, device"):
        RewardSet.from_specs([{"name": "reward_model", "modle": str(two)}])
    with pytest.raises(UserError, match="batch_size=0"):
        RewardSet.from_specs([{"name": "reward_model", "model": str(two), "batch_size": 0}])
    with pytest.raises(UserError, match="unknown reward 'reward_modle'.*reward_model"):
        RewardSet.from_specs(["reward_modle"])


def test_an_sft_adapter_is_not_a_reward_model(tiny_qwen3, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen3), LoraConfig(r=2, task_type="CAUSAL_LM"))
    lm.save_pretrained(tmp_path / "adapter")
    with pytest.raises(UserError, match="CAUSAL_LM adapter, not a reward model's"):
        load_reward_model(str(tmp_path / "adapter"), base=str(tiny_qwen3), device="cpu", verbose=False)


def test_a_judge_reward_is_the_answer_tokens_probability(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    rs = RewardSet.from_specs([{"name": "judge", "model": str(tiny_qwen3), "device": "cpu", "batch_size": 2},
                               {"name": "judge", "model": str(tiny_qwen3), "scale": "digits", "device": "cpu"}])
    _, per, _ = rs(PROMPTS, COMPLETIONS)
    judge, digit_judge = rs.funcs
    lm = AutoModelForCausalLM.from_pretrained(tiny_qwen3).eval()
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    yes, no = tok("Yes")["input_ids"][0], tok("No")["input_ids"][0]
    expected_yes, expected_digits = [], []
    with torch.inference_mode():
        for p, c in zip(PROMPTS, COMPLETIONS):  # one sequence at a time: no padding
            ids = tok(judge._text(p, c), return_tensors="pt", add_special_tokens=False)["input_ids"]
            logits = lm(input_ids=ids).logits[0, -1]
            assert "Is the answer below correct" in judge._text(p, c) and c[0]["content"] in judge._text(p, c)
            expected_yes.append(float(torch.softmax(logits[[yes, no]], -1)[0]))
            ids = tok(digit_judge._text(p, c), return_tensors="pt", add_special_tokens=False)["input_ids"]
            logits = lm(input_ids=ids).logits[0, -1]
            digits = torch.softmax(logits[[tok(str(d))["input_ids"][0] for d in range(10)]], -1)
            expected_digits.append(float(digits @ torch.arange(10.0)) / 9)
    assert per["judge"] == pytest.approx(expected_yes, abs=1e-5) and len(set(per["judge"])) == 3
    assert per["judge_2"] == pytest.approx(expected_digits, abs=1e-5)
    assert all(0 <= v <= 1 for v in per["judge"] + per["judge_2"])
    with pytest.raises(UserError, match="scale='stars'"):
        RewardSet.from_specs([{"name": "judge", "model": str(tiny_qwen3), "scale": "stars"}])
