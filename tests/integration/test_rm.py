"""``posttrain rm`` end to end on a tiny random Qwen3 (real Qwen vocabulary): it learns a separable preference,
the saved model and adapter load with plain transformers and PEFT and score as our scorer does, the loss is TRL's
RewardTrainer loss on the same batch, ``eval-rm`` reports accuracy with its interval, and a GRPO run takes the
reward model as a reward."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain.cli import main
from posttrain.config import load_recipe
from posttrain.preference.config import RMRecipe
from posttrain.preference.data import load_pairs, split_pairs
from posttrain.preference.pair_batch import PairBatch, cache_dropped
from posttrain.preference.reward_model import load_reward_model, pad_right, score_ids
from posttrain.preference.rm import RMLoss, load_for_training, margins, pair_metrics, pair_rewards, train
from tests.conftest import write_jsonl

GOOD = ["yes", "right", "correct", "true", "sure", "agreed", "indeed", "exactly", "certainly", "absolutely"]
BAD = ["no", "wrong", "incorrect", "false", "never", "nope", "refused", "denied", "mistaken", "invalid"]


def separable_pairs(n: int, seed: int) -> list[dict]:
    """Chosen answers use a 'good' word, rejected ones a 'bad' word, in shared filler: separable, yet a random
    model ranks them about at chance (many words on each side)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        filler = " ".join(rng.choice(["the", "a", "so", "then", "well"]) for _ in range(rng.randint(0, 3)))
        rows.append({"prompt": [{"role": "user", "content": f"Question {i}: is it {rng.randint(1, 99)}?"}],
                     "chosen": [{"role": "assistant", "content": f"{filler} {rng.choice(GOOD)}".strip()}],
                     "rejected": [{"role": "assistant", "content": f"{filler} {rng.choice(BAD)}".strip()}],
                     "margin": rng.choice([0.0, 0.5])})
    return rows


def recipe(model, data, out, *overrides) -> RMRecipe:
    base = [f"model.name={model}", f"data.path={data}", f"output_dir={out}", "data.val_size=32", "train.batch_size=8",
            "train.max_steps=40", "train.lr=3e-3", "train.warmup_steps=0", "train.eval_every=40", "lora=null",
            "train.seed=0"]
    return load_recipe(None, base + list(overrides), cls=RMRecipe)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", separable_pairs(160, seed=0))


@pytest.fixture(scope="module")
def full_run(tiny_qwen3, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "full"
    train(recipe(tiny_qwen3, data_file, out))
    return out


@pytest.fixture(scope="module")
def lora_run(tiny_qwen3, data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "lora"
    train(recipe(tiny_qwen3, data_file, out, "lora.r=4", "lora.alpha=8", "train.max_steps=3", "data.val_size=0"))
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_separable_preference_is_learned_from_chance(tiny_qwen3, data_file, full_run):
    cfg = recipe(tiny_qwen3, data_file, full_run)
    torch.manual_seed(cfg.train.seed)  # as the session seeds before loading: the same initial head
    model, tok = load_for_training(cfg, verbose=False)
    _, val = split_pairs(load_pairs(cfg.data, tok).pairs, cfg.data.val_size, cfg.data.seed)
    before = pair_metrics(*pair_rewards(model, val, tok.pad_token_id, 16), val)["accuracy"]
    rows = metrics(full_run)
    first, last = rows[0], rows[-1]
    assert before <= 0.75, before  # the random model is near chance on held-out pairs
    assert last["val_accuracy"] >= 0.9 and last["val_accuracy"] >= before + 0.2, (before, last)
    assert last["val_loss"] < 0.5 * first["loss"] and last["val_margin"] > 0
    assert {"accuracy", "margin", "mean_reward", "min_reward", "max_reward"} <= first.keys()
    assert last["val_accuracy_ci95_low"] < last["val_accuracy"] <= last["val_accuracy_ci95_high"]


def test_saved_model_loads_with_plain_transformers_and_scores_as_ours(full_run, data_file):
    hf = AutoModelForSequenceClassification.from_pretrained(full_run / "model").eval()
    tok = AutoTokenizer.from_pretrained(full_run / "model")
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_token_id
    ours, our_tok = load_reward_model(str(full_run), device="cpu", verbose=False)
    pairs = load_pairs(load_recipe(None, [f"data.path={data_file}", "model.name=x"], RMRecipe).data, our_tok).pairs[:6]
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    batched = score_ids(ours, seqs, tok.pad_token_id, batch_size=5)  # padded batches, sorted by length
    with torch.inference_mode():
        alone = [float(hf(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs]
    assert batched == pytest.approx(alone, abs=1e-5)



def test_shared_prefix_scores_equal_whole_sequence_scores(full_run, data_file):
    """Training and eval-rm score a pair with its prompt + common beginning computed once: the same rewards as the
    classifier's own forward on each whole sequence, also when a sequence ends in pad tokens (the head reads the
    last token that is not the pad) or one answer is the other's beginning."""
    from posttrain.preference.data import PreferencePair

    ours, tok = load_reward_model(str(full_run), device="cpu", verbose=False)
    pad = tok.pad_token_id
    pairs = load_pairs(load_recipe(None, [f"data.path={data_file}", "model.name=x"], RMRecipe).data, tok).pairs[:5]
    pairs += [PreferencePair([5, 6, 7], [8, 9, pad, pad], [8, 9], None, 90),  # pad at the end; a shared beginning
              PreferencePair([5], [pad], [10, 11, 12], None, 91)]  # a chosen that is all pad: the prompt's token
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    whole = score_ids(ours, seqs, pad, batch_size=1)
    r_c, r_r = pair_rewards(ours, pairs, pad, batch_size=6)
    assert torch.cat([r_c, r_r]).tolist() == pytest.approx(whole, abs=1e-5)
    batch = PairBatch.build(pairs, pad)
    assert int(batch.counts[1]) < int(batch.counts[0])  # fewer positions computed than two whole sequences'


def test_gradient_checkpointing_scores_whole_sequences_with_the_same_rewards_and_gradients(tiny_qwen3):
    """transformers drops the key/value cache under gradient checkpointing, which the shared prefix needs: the
    pairs then run as whole sequences, with the same rewards and the same gradients as without checkpointing."""
    from posttrain.config import ModelConfig
    from posttrain.preference.data import PreferencePair
    from posttrain.preference.reward_model import load_sequence_classifier

    torch.manual_seed(0)
    model, tok = load_sequence_classifier(ModelConfig(name=str(tiny_qwen3), device="cpu"), verbose=False)
    model.config.use_cache = True
    model.train()
    pairs = [PreferencePair([5, 6, 7], [8, 9, 10], [8, 11], None, 1), PreferencePair([12], [13], [14, 15], None, 2)]
    batch = PairBatch.build(pairs, tok.pad_token_id)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert cache_dropped(model.model)  # the whole-sequence path runs
        model.zero_grad()
        loss, rewards = RMLoss(model, None, 0.0)(batch)
        loss.backward()
        results.append((rewards, model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5) and results[0][1].abs().sum() > 0


def test_lora_adapter_holds_the_trained_head_and_loads_with_peft(lora_run, tiny_qwen3):
    saved = load_file(str(lora_run / "adapter" / "adapter_model.safetensors"))
    assert any("score" in k for k in saved) and any("lora_A" in k for k in saved)
    assert json.loads((lora_run / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    torch.manual_seed(123)  # a head initialised differently from training: the adapter must replace it
    base = AutoModelForSequenceClassification.from_pretrained(tiny_qwen3, num_labels=1)
    peft = PeftModel.from_pretrained(base, lora_run / "adapter").eval()
    ours, tok = load_reward_model(str(lora_run), device="cpu", verbose=False)
    seqs = [tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n")["input_ids"], [1, 2, 3]]
    with torch.inference_mode():
        expected = [float(peft(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs]
    assert score_ids(ours, seqs, tok.pad_token_id) == pytest.approx(expected, abs=1e-5)


def test_loss_and_batch_equal_trls_reward_trainer(full_run, tmp_path):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(full_run / "model")
    tok = AutoTokenizer.from_pretrained(full_run / "model")
    examples = [{"chosen_ids": [5, 6, 7, 8], "rejected_ids": [5, 6, 9], "margin": 0.5},
                {"chosen_ids": [11, 12], "rejected_ids": [11, 13, 14, 15, 16], "margin": 0.0}]
    args = RewardConfig(output_dir=str(tmp_path), center_rewards_coefficient=0.01, report_to=[], use_cpu=True,
                        bf16=False, disable_dropout=False)
    trainer = RewardTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(examples))
    batch = trainer.data_collator(examples)
    trl_loss = trainer.compute_loss(model, dict(batch))
    from posttrain.preference.data import PreferencePair

    pairs = [PreferencePair([5, 6], [7, 8], [9], 0.5, 1), PreferencePair([11], [12], [13, 14, 15, 16], 0.0, 2)]
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    assert torch.equal(pad_right(seqs, tok.pad_token_id)[0], batch["input_ids"])  # the same sequences as TRL's
    assert torch.equal(margins(pairs), batch["margin"])
    shared = PairBatch.build(pairs, tok.pad_token_id)  # each pair's prompt + common beginning computed once
    assert int(shared.counts[1]) < int(shared.counts[0])
    loss, _ = RMLoss(model, None, 0.01)(shared, margins(pairs))
    assert float(loss) == pytest.approx(float(trl_loss), abs=1e-6)
    assert abs(float(trl_loss)) > 1e-3  # a real loss, not 0 = 0


def test_eval_rm_reports_accuracy_with_its_interval(full_run, tmp_path, capsys):
    held = write_jsonl(tmp_path / "held.jsonl", separable_pairs(40, seed=99) + [
        {"prompt": "q", "chosen": "same", "rejected": "same"}])
    out = tmp_path / "m.json"
    assert main(["eval-rm", str(full_run), "--data", str(held), "--device", "cpu", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["pairs"] == 40 and m["dropped"]["identical"] == 1 and m["accuracy"] >= 0.9
    assert m["accuracy_ci95_low"] < m["accuracy"] <= m["accuracy_ci95_high"]
    assert f"pairwise accuracy {m['accuracy']:.3f}" in capsys.readouterr().out
    assert main(["eval-rm", str(tmp_path), "--data", str(held)]) == 2  # not a reward model: a clear error
    assert "neither a run directory" in capsys.readouterr().err


def test_grpo_takes_the_reward_model_as_a_reward(full_run, tiny_qwen3, tmp_path):
    from posttrain.grpo.config import GRPORecipe
    from posttrain.grpo.loop import train as grpo_train

    rewards = json.dumps([{"name": "reward_model", "model": str(full_run), "device": "cpu", "batch_size": 3},
                          "math_accuracy"])
    cfg = load_recipe(None, [f"model.name={tiny_qwen3}", "data.path=posttrain.data.synthetic:problems",
                             "data.generator_kwargs={n: 8}", "data.template=chatml",
                             "data.columns={problem: problem, solution: null, answer: answer}",
                             f"output_dir={tmp_path / 'grpo'}", "lora.r=4", "lora.alpha=8", "train.batch_size=8",
                             "grpo.num_generations=4", "grpo.max_completion_length=6", "train.max_steps=1",
                             "grpo.log_completions_every=1", "grpo.max_prompt_length=64", f"rewards={rewards}"],
                      cls=GRPORecipe)
    grpo_train(cfg)
    step = json.loads((tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()[0])
    logged = [json.loads(line) for line in (tmp_path / "grpo" / "completions.jsonl").read_text().splitlines()]
    scores = [c["rewards"]["reward_model"] for c in logged]
    assert len(scores) == 8 and len(set(scores)) > 1
    assert all(c["reward"] == pytest.approx(c["rewards"]["reward_model"] + c["rewards"]["math_accuracy"])
               for c in logged)
    assert step["rewards/reward_model/mean"] == pytest.approx(sum(scores) / 8)


def test_qlora_trains_the_adapter_and_head_on_a_4bit_base(tiny_qwen3, data_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = train(recipe(tiny_qwen3, data_file, tmp_path / "q", "lora.r=4", "lora.alpha=8", "model.load_in_4bit=true",
                       "train.max_steps=2", "data.val_size=0"))
    saved = load_file(str(out / "adapter_model.safetensors"))
    head = next(v for k, v in saved.items() if "score" in k)
    assert head.shape == (1, 64) and torch.isfinite(head).all()
    ours, tok = load_reward_model(str(tmp_path / "q"), device="cpu", verbose=False)  # the base in 4-bit again
    assert ours.get_base_model().is_loaded_in_4bit  # the adapter stays unmerged on the 4-bit base
    assert all(map(math.isfinite, score_ids(ours, [[1, 2, 3], [4, 5]], tok.pad_token_id)))


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_qwen3, data_file, tmp_path):
    cfg = recipe(tiny_qwen3, data_file, tmp_path / "a", "lora.r=4", "lora.alpha=8", "train.max_steps=4",
                 "data.val_size=0", "train.save_every=2")
    whole = load_file(str(train(cfg) / "adapter_model.safetensors"))
    assert (tmp_path / "a" / "checkpoints" / "step-2").is_dir()
    shutil.rmtree(tmp_path / "a" / "adapter")  # as if stopped after step 2: --resume redoes steps 3-4
    again = load_file(str(train(cfg, resume=True) / "adapter_model.safetensors"))
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert any("score" in k for k in whole)


def test_init_adapter_starts_from_the_merged_sft_model(tiny_qwen3, data_file, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen3),
                         LoraConfig(r=2, task_type="CAUSAL_LM", init_lora_weights=False))  # a non-zero update
    sft.save_pretrained(tmp_path / "sft")
    merged = sft.merge_and_unload().state_dict()["model.layers.0.self_attn.q_proj.weight"]
    cfg = recipe(tiny_qwen3, data_file, tmp_path / "rm", "lora.r=4", f"init_adapter={tmp_path / 'sft'}")
    model, _ = load_for_training(cfg, verbose=False)
    weights = dict(model.named_parameters())
    start = weights["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert torch.equal(start, merged) and not start.requires_grad
    assert weights["base_model.model.score.modules_to_save.default.weight"].requires_grad
