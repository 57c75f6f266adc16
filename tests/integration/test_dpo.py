"""posttrain dpo on a tiny real Qwen3 (random weights, real vocabulary): the loss equals TRL 1.16's
DPOTrainer._compute_loss on the same model and batch; LoRA DPO widens the chosen-vs-rejected margin while the
reference is exactly the adapter-disabled (base) model; full fine-tuning stores the starting model's reference
log-probs with the run and --resume reads them back; DPO-specific bad input fails with a clear message."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain.cli import main
from posttrain.config import ConfigError, LoraConfig, ModelConfig, load_recipe, validate
from posttrain.errors import UserError
from posttrain.models import load_model
from posttrain.preference.config import PreferenceDataConfig
from posttrain.preference.data import load_pairs, split_pairs
from posttrain.preference.dpo import (
    REFERENCE_FILE,
    Reference,
    SequenceLogps,
    train,
)
from posttrain.preference.dpo_config import DPORecipe
from posttrain.preference.pair_batch import PairBatch
from posttrain.preference.losses import dpo_loss


def pair_rows(n: int = 24) -> list[dict]:
    return [{"prompt": f"Question {i}: what is {i % 7} plus {i % 5}? Answer:", "chosen": f" {i % 7 + i % 5}",
             "rejected": f" {i % 7 + i % 5 + 1 + i % 3} or so"} for i in range(n)]


def recipe(tiny, out, **over) -> DPORecipe:
    data = {"output_dir": str(out), "model": {"name": str(tiny)}, "lora": {"r": 8, "alpha": 16},
            "data": {"path": "rows", "max_length": 64},
            "train": {"batch_size": 4, "max_steps": 6, "lr": 2e-3, "seed": 1, "compute_dtype": "float32"},
            "dpo": {"beta": 0.1}}
    for key, value in over.items():
        node, *path = key.split("__")
        target = data
        for part in [node, *path][:-1]:
            target = target.setdefault(part, {})
        target[[node, *path][-1]] = value
    return validate(DPORecipe, data, "test")


def metrics_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def plain_logps(model, pairs) -> torch.Tensor:
    """(pairs, 2) summed completion log-probs from transformers' full logits, one sequence at a time."""
    out = []
    for p in pairs:
        row = []
        for completion in (p.chosen_ids, p.rejected_ids):
            ids = torch.tensor([p.prompt_ids + completion])
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
            targets = ids[0, 1:]
            row.append(logp.gather(-1, targets[:, None])[len(p.prompt_ids) - 1:].sum())
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.fixture(scope="module")
def tok_pairs(tiny_qwen3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    return tok, load_pairs(PreferenceDataConfig(path="rows", max_length=64), tok, rows=pair_rows()).pairs


# ---------------------------------------------------------------------------------------------- TRL


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_loss_equals_trl_dpo_trainer_on_the_same_model_and_batch(tiny_qwen3, tok_pairs, loss_type, eps):
    """TRL 1.16's DPOTrainer._compute_loss called on a PEFT model (reference: the adapter disabled, TRL's
    ``use_adapter(model, None)``) with TRL's own collator, against posttrain's forward + reference + dpo_loss."""
    from accelerate import Accelerator
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    tok, pairs = tok_pairs
    model, _ = load_model(ModelConfig(name=str(tiny_qwen3)), LoraConfig(r=8, alpha=16), verbose=False)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():  # a trained-looking adapter: policy and reference differ
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    idx = list(range(6))
    batch = PairBatch.build([pairs[i] for i in idx], tok.pad_token_id)
    policy = SequenceLogps(model, chunk_size=7)  # several chunks
    chosen, rejected = policy(batch).chunk(2)
    ref_c, ref_r = Reference("adapter_off")(policy, batch, None, "train", idx)
    n_c, n_r = batch.tokens.chunk(2)
    loss, metrics = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1, loss_type=loss_type, label_smoothing=eps,
                             chosen_tokens=n_c, rejected_tokens=n_r)

    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    inputs = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(
        [{"prompt_ids": pairs[i].prompt_ids, "chosen_ids": pairs[i].chosen_ids,
          "rejected_ids": pairs[i].rejected_ids} for i in idx])
    trainer = SimpleNamespace(  # the attributes _compute_loss reads (trl/trainer/dpo_trainer.py, TRL 1.16)
        model=model, ref_model=None, accelerator=Accelerator(cpu=True), aux_loss_enabled=False,
        precompute_ref_logps=False, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=0.1, label_smoothing=eps, use_weighting=False, _tp_size=1, _total_train_tokens=0,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), _metrics=defaultdict(lambda: defaultdict(list)))
    trl_loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    assert trl_loss.item() == pytest.approx(loss.mean().item(), rel=1e-5, abs=1e-6)
    trl_metrics = trainer._metrics["train"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert trl_metrics[key][0] == pytest.approx(metrics[key].mean().item(), rel=1e-4, abs=1e-5), key
    assert abs(trl_metrics["rewards/margins"][0]) > 1e-4  # the adapter really moved the policy off the reference


# ---------------------------------------------------------------------------------------------- LoRA


def test_lora_dpo_widens_the_margin_against_the_adapter_disabled_reference(tiny_qwen3, tok_pairs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    train(recipe(tiny_qwen3, run, data__val_size=4, train__eval_every=5, train__max_steps=10, train__lr=1e-2),
          rows=pair_rows())
    rows = metrics_of(run)
    first, last = rows[0], rows[-1]
    # step 1: the new adapter is zero, so the policy is its reference: loss log 2, rewards 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(first["rewards/margins"]) < 1e-5
    assert last["rewards/margins"] > 0.2 and last["rewards/accuracies"] >= 0.75 and last["loss"] < 0.6
    assert "val_rewards/accuracies" in last and last["val_loss"] < math.log(2)
    assert rows[4]["val_loss"] > last["val_loss"]
    assert not (run / REFERENCE_FILE).exists()  # adapter_off: nothing precomputed

    tok, pairs = tok_pairs
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    base_logps = plain_logps(base, pairs[:8])
    base_more = plain_logps(base, pairs[8:10])   # before the adapter goes onto these modules
    peft = PeftModel.from_pretrained(base, str(run / "adapter"))
    policy = SequenceLogps(peft, chunk_size=1024)
    batch = PairBatch.build(pairs[:8], tok.pad_token_id)
    ref_c, ref_r = Reference("adapter_off")(policy, batch, None, "train", list(range(8)))
    torch.testing.assert_close(torch.stack([ref_c, ref_r], 1), base_logps, atol=2e-4, rtol=1e-5)
    with torch.no_grad():
        trained = torch.stack(policy(batch).chunk(2), 1)
    torch.testing.assert_close(trained, plain_logps(peft, pairs[:8]), atol=2e-4, rtol=1e-5)
    # a step's reference in one forward (prefetch), read back per micro-batch; pairs outside it still computed
    ref = Reference("adapter_off")
    ref.prefetch(policy, None, pairs, list(range(8)), "train", tok.pad_token_id, "cpu")
    half = PairBatch.build(pairs[4:8], tok.pad_token_id)
    torch.testing.assert_close(torch.stack(ref(policy, half, None, "train", [4, 5, 6, 7]), 1), base_logps[4:],
                               atol=2e-4, rtol=1e-5)
    other = PairBatch.build(pairs[8:10], tok.pad_token_id)
    torch.testing.assert_close(torch.stack(ref(policy, other, None, "train", [8, 9]), 1), base_more,
                               atol=2e-4, rtol=1e-5)
    with torch.no_grad():   # the adapter is on again after the prefetch
        torch.testing.assert_close(torch.stack(policy(batch).chunk(2), 1), trained)
    ref.clear()
    assert ref.step is None
    margin = lambda t: (t[:, 0] - t[:, 1]).mean()
    assert margin(trained) > margin(base_logps) + 1.0  # chosen rose against rejected

    # continuing that adapter: disabling it would compare with the bare base, so the reference is the starting
    # adapter's log-probs, precomputed; at step 1 policy = reference (loss log 2), where the base would give less
    more = recipe(tiny_qwen3, tmp_path / "continued", lora=None, init_adapter=str(run / "adapter"),
                  train__max_steps=1)
    assert more.resolved_reference() == "precomputed"
    train(more, rows=pair_rows())
    assert metrics_of(tmp_path / "continued")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (tmp_path / "continued" / REFERENCE_FILE).is_file()


def test_shared_answer_beginnings_are_computed_once_with_the_values_and_gradients_of_whole_sequences(tiny_qwen3):
    """PairBatch runs each pair's prompt + common answer beginning once and both tails on its cache: the summed
    log-probs and their LoRA gradients equal those of the two whole sequences run apart (answers sharing 0, some,
    and all of one side's tokens)."""
    from posttrain.preference.data import PreferencePair

    model, _ = load_model(ModelConfig(name=str(tiny_qwen3)), LoraConfig(r=8, alpha=16), verbose=False)
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    pairs = [PreferencePair([5, 6, 7], [8, 9, 10, 11, 12], [8, 9, 10, 13], None, 1),  # share 3 answer tokens
             PreferencePair([5, 20], [21, 22], [23, 24, 25, 26, 27, 28], None, 2),  # share none
             PreferencePair([30, 31, 32, 33, 34, 35], [36, 37], [36, 37, 38], None, 3)]  # chosen within rejected
    batch = PairBatch.build(pairs, pad_id=0)
    assert batch.counts[1] < batch.counts[0]  # fewer positions computed than the whole sequences hold
    shared = SequenceLogps(model, chunk_size=5)(batch)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    grads = torch.autograd.grad(shared.sum(), lora)
    plain = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            ids = torch.tensor([p.prompt_ids + getattr(p, side)])
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])
            plain.append(logp[len(p.prompt_ids) - 1:].sum())
    plain = torch.stack(plain)
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-5)
    for g, h in zip(grads, torch.autograd.grad(plain.sum(), lora)):
        torch.testing.assert_close(g, h, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- full fine-tuning


def test_full_fine_tuning_stores_the_reference_and_resume_reads_it(tiny_qwen3, tok_pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "full"
    cfg = recipe(tiny_qwen3, run, lora=None, train__max_steps=2, train__save_every=1, train__lr=1e-4,
                 data__val_size=4, train__eval_every=2)
    assert cfg.resolved_reference() == "precomputed"
    train(cfg, rows=pair_rows())
    stored = load_file(run / REFERENCE_FILE)
    assert stored["train"].shape == (20, 2) and stored["val"].shape == (4, 2)
    pairs = tok_pairs[1]
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)
    train_pairs, _ = split_pairs(pairs, 4, cfg.data.seed)
    torch.testing.assert_close(stored["train"][:6], plain_logps(base, train_pairs[:6]), atol=2e-4, rtol=1e-5)
    first = metrics_of(run)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 1: policy = starting model = reference

    # --resume reads the stored table (shifted here, so its use shows in the rewards) instead of recomputing
    shift = 50.0
    save_file({"train": stored["train"] + torch.tensor([shift, 0.0]), "val": stored["val"]}, str(run / REFERENCE_FILE),
              metadata=_metadata(run))
    more = recipe(tiny_qwen3, run, lora=None, train__max_steps=3, train__save_every=1, train__lr=1e-4,
                  data__val_size=4, train__eval_every=2)
    train(more, resume=True, allow_changes=["train.max_steps"], rows=pair_rows())
    resumed = [r for r in metrics_of(run) if r["step"] >= 2]
    assert resumed and all(r["rewards/chosen"] < -0.1 * shift + 1 for r in resumed)

    with pytest.raises(UserError, match="other pairs"):  # the stored table belongs to other pairs
        train(recipe(tiny_qwen3, run, lora=None, train__max_steps=4, train__save_every=1, train__lr=1e-4,
                     data__val_size=4, train__eval_every=2),
              resume=True, allow_changes=["train.max_steps"], rows=pair_rows(25))
    (run / REFERENCE_FILE).unlink()
    with pytest.raises(UserError, match="cannot be recomputed from a trained checkpoint"):
        train(more, resume=True, rows=pair_rows())


def _metadata(run) -> dict:
    from safetensors import safe_open

    with safe_open(str(run / REFERENCE_FILE), "pt") as f:
        return f.metadata()


# ---------------------------------------------------------------------------------------------- CLI, bad input


def test_cli_runs_simpo_from_a_recipe_file(tiny_qwen3, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(12)))
    rec = tmp_path / "dpo.yaml"
    rec.write_text(f"model: {{name: {tiny_qwen3}}}\nlora: {{r: 4, alpha: 8}}\ndata: {{path: {data}, max_length: 64}}\n"
                   "train: {batch_size: 4, max_steps: 2, lr: 1.0e-3}\n")
    out = tmp_path / "simpo"
    assert main(["dpo", str(rec), f"output_dir={out}", "dpo.loss_type=simpo", "dpo.beta=2.0"]) == 0
    rows = metrics_of(out)
    assert (out / "adapter" / "adapter_config.json").is_file() and len(rows) == 2
    # simpo's rewards are beta x the length-averaged log-probs: not zero at step 1, unlike DPO's
    assert rows[0]["rewards/chosen"] == pytest.approx(2.0 * rows[0]["logps/chosen"], rel=1e-5)
    assert rows[0]["rewards/chosen"] < -1


def test_dpo_specific_bad_input_is_named(tiny_qwen3, tmp_path, capsys):
    base = {"model": {"name": "m"}, "data": {"path": "rows"}}
    for dpo, lora, match in [({"loss_type": "ipo", "label_smoothing": 0.1}, {}, "not used by dpo.loss_type=ipo"),
                             ({"loss_type": "simpo", "reference": "precomputed"}, {}, "simpo uses no reference"),
                             ({"reference": "adapter_off"}, None, "needs a LoRA adapter"),
                             ({"label_smoothing": 0.5}, {}, "dpo.label_smoothing")]:
        with pytest.raises(ConfigError, match=match):
            validate(DPORecipe, {**base, "dpo": dpo, "lora": lora}, "test")
    with pytest.raises(ConfigError, match="unknown key 'dpo.gamma'"):
        load_recipe(None, ["model.name=m", "data.path=x", "dpo.gamma=1"], DPORecipe)
    # implicit prompts (no prompt column): two pairs whose sides share no beginning have no prompt to condition on
    rows = [{"chosen": "Yes indeed", "rejected": "No way"}, {"chosen": "Sure thing", "rejected": "Never"}]
    rows += [{"chosen": f"Q: {i}+1? A: {i + 1}", "rejected": f"Q: {i}+1? A: {i + 2}"} for i in range(6)]
    with pytest.raises(UserError, match=r"rows row 1 \(2 pairs in all\) has no prompt tokens"):
        train(recipe(tiny_qwen3, tmp_path / "a"), rows=rows)
    with pytest.raises(UserError, match="6 training pairs cannot fill one step of 8 pairs"):
        train(recipe(tiny_qwen3, tmp_path / "b", train__batch_size=8), rows=pair_rows(6))
