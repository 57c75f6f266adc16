"""posttrain export of a reward model (a 2-step ``posttrain rm`` LoRA run on a tiny random Qwen3): the adapter
export loads with PEFT on a fresh sequence-classification base and the merged export with plain transformers, and
both score conversations as the run's own scorer (``load_reward_model`` + ``score_ids``) does; GGUF is refused
with its reason, for the run and for the merged folder alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from posttrain.cli import main
from posttrain.config import load_recipe
from posttrain.export import export
from posttrain.preference.config import RMRecipe
from posttrain.preference.reward_model import load_reward_model, score_ids
from posttrain.preference.rm import train
from tests.conftest import write_jsonl

CONVERSATIONS = [[{"role": "user", "content": f"Is {a} + {b} = {a + b + d}?"},
                  {"role": "assistant", "content": "yes" if d == 0 else "no, it is not"}]
                 for a, b, d in [(1, 2, 0), (3, 4, 1), (10, 20, 0), (7, 8, 2), (5, 5, 0)]]


@pytest.fixture(scope="module")
def rm_run(tiny_qwen3, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("rm-export")
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": "yes, right"}],
             "rejected": [{"role": "assistant", "content": f"no {i}"}]} for i in range(16)]
    data = write_jsonl(tmp / "pairs.jsonl", rows)
    cfg = load_recipe(None, [f"model.name={tiny_qwen3}", f"data.path={data}", f"output_dir={tmp / 'run'}",
                             "data.val_size=0", "train.batch_size=4", "train.max_steps=2", "train.lr=5e-2",
                             "train.warmup_steps=0", "lora.r=4", "lora.alpha=8", "train.seed=0"], cls=RMRecipe)
    train(cfg)
    return tmp / "run"


def run_scores(rm_run: Path) -> tuple[list[float], list[list[int]], int]:
    """The run's own scores of CONVERSATIONS (padded batches), the token ids and the pad id."""
    model, tok = load_reward_model(str(rm_run), device="cpu", verbose=False)
    seqs = [tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]
            for c in CONVERSATIONS]
    return score_ids(model, seqs, tok.pad_token_id, batch_size=3), seqs, tok.pad_token_id


def hf_scores(model, seqs) -> list[float]:
    with torch.inference_mode():
        return [float(model(input_ids=torch.tensor([s])).logits[0, 0]) for s in seqs]


def test_adapter_export_holds_the_head_and_scores_as_the_run(rm_run, tiny_qwen3, tmp_path):
    expected, seqs, _ = run_scores(rm_run)
    assert max(expected) - min(expected) > 1e-3  # the trained head separates something: a real comparison
    report = export(str(rm_run), "adapter", tmp_path / "adapter", device="cpu", verbose=False)
    assert report["reward_model"] and report["verification"]["max_abs_diff"] <= 1e-4
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and any("score" in m for m in cfg["modules_to_save"])
    torch.manual_seed(123)  # a fresh head, initialised differently from training: the adapter must replace it
    base = AutoModelForSequenceClassification.from_pretrained(tiny_qwen3, num_labels=1)
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert hf_scores(peft, seqs) == pytest.approx(expected, abs=1e-5)


def test_merged_export_is_a_plain_sequence_classifier_that_scores_as_the_run(rm_run, tmp_path):
    expected, seqs, pad = run_scores(rm_run)
    out = tmp_path / "merged"
    assert main(["export", str(rm_run), "--format", "merged", "--dtype", "float32", "--device", "cpu",
                 "--out", str(out)]) == 0
    config = AutoConfig.from_pretrained(out)
    assert config.architectures == ["Qwen3ForSequenceClassification"] and config.num_labels == 1
    assert config.pad_token_id == pad and not (out / "generation_config.json").exists()
    assert not any(p.name.startswith("adapter") for p in out.iterdir())  # merged: no PEFT files
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert [tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"]
            for c in CONVERSATIONS] == seqs  # the chat template travelled with it
    assert hf_scores(model, seqs) == pytest.approx(expected, abs=1e-4)
    report = json.loads((out / "export.json").read_text())
    assert report["reward_model"] and report["verification"]["rel_diff"] <= 1e-4
    assert len(report["verification"]["scores_source"]) == 3


def test_merged_bfloat16_export_passes_its_check(rm_run, tmp_path):
    report = export(str(rm_run), "merged", tmp_path / "bf16", device="cpu", verbose=False)
    assert report["dtype"] == "bfloat16" and report["verification"]["rel_diff"] <= 3e-2
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16")
    assert model.score.weight.dtype == torch.bfloat16 and model.score.weight.shape[0] == 1


def test_gguf_is_refused_for_a_reward_model_with_the_reason(rm_run, tmp_path, capsys):
    merged = tmp_path / "merged"
    export(str(rm_run), "merged", merged, dtype="float32", device="cpu", verify=False, verbose=False)
    for source in (rm_run, rm_run / "adapter", merged):
        assert main(["export", str(source), "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 2
        err = capsys.readouterr().err
        assert f"{source} is a reward model" in err and "causal language models only" in err
        assert "--format merged" in err
    assert not (tmp_path / "gguf").exists()
