"""Exporting a reward model (``posttrain rm``): what differs from a causal LM's export.

A reward model is a causal LM body with a one-label ``score`` head (``AutoModelForSequenceClassification``,
``num_labels=1``; ``posttrain.preference.reward_model``). It is exported as:

- adapter: the PEFT ``SEQ_CLS`` adapter, which holds the trained head (``modules_to_save``), as a causal adapter is;
- merged:  LoRA and head folded into one plain transformers sequence-classification checkpoint (config
  ``architectures: [...ForSequenceClassification]``, ``num_labels: 1``, ``pad_token_id`` set: the head reads the
  last token that is not the pad token), with the tokenizer and chat template and no generation config;
- gguf:    refused (:data:`GGUF_REFUSAL`).

The round trip compares scores, not next-token logits: the reward of each :data:`PROBE_ANSWERS` answer to the
probe question of ``verify.py`` (one unpadded forward per conversation), from the exported files loaded back
the way users load them, against the source model. The merged check uses ``verify.MERGED_RTOL`` relative to the
largest |score|; the argmax is not required to agree (near-tied probe scores may swap under bfloat16 rounding).
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import runs
from posttrain.errors import UserError
from posttrain.export import verify as verify_mod

GGUF_REFUSAL = (
    "is a reward model (a sequence classifier with a one-label score head), and GGUF export is for causal "
    "language models only: llama.cpp's converter and runtime (and Ollama) load a GGUF as a text generator, with "
    "no place for a scalar reward head, so posttrain can neither write one nor verify it. Export it with "
    "--format merged (plain transformers AutoModelForSequenceClassification) or --format adapter (PEFT, with its "
    "head), and score with transformers, vLLM's reward task, or posttrain's reward_model reward")
PROBE_ANSWERS = ["42. Twelve plus thirty is forty-two.", "41. Twelve plus thirty is forty-one.",
                 "I cannot answer that."]


def is_reward_model(src: runs.Source) -> bool:
    """True for a ``SEQ_CLS`` adapter (a ``posttrain rm`` LoRA run) or a model whose local ``config.json`` names a
    ``...ForSequenceClassification`` architecture (a full ``posttrain rm`` run, a merged reward model)."""
    if src.adapter_dir is not None:
        cfg = json.loads((src.adapter_dir / "adapter_config.json").read_text())
        return cfg.get("task_type") == "SEQ_CLS"
    config = Path(src.model.name).expanduser() / "config.json"
    if not config.is_file():
        return False  # a hub id, .gguf or alias: loaded as a causal LM, as before
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{config} could not be read: {exc}") from None
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load(src: runs.Source, *, device: str = "auto", dtype: str = "auto", dequantize: bool = False,
         verbose: bool = True):
    """``runs.load`` for a reward model: (model, tokenizer), the adapter (if any) unmerged on the base loaded as in
    training (a 4-bit base dequantized when ``dequantize``), ``config.pad_token_id`` the tokenizer's pad id."""
    from posttrain.preference.data import pad_token_id
    from posttrain.preference.reward_model import load_sequence_classifier

    cfg = src.model.model_copy(update={"device": device, "dtype": dtype})
    model, tok = load_sequence_classifier(cfg, verbose=verbose)
    model, tok = runs.attach(model, tok, src, dequantize and cfg.load_in_4bit)
    model.eval()
    model.config.pad_token_id = pad_token_id(tok, str(src.adapter_dir or src.model.name))
    return model, tok


def probe_ids(tok) -> list:
    """One token-id tensor per probe conversation (question + each of :data:`PROBE_ANSWERS`), rendered with the
    chat template (plain text + EOS without one), as the reward model's training pairs were."""
    from posttrain.preference.reward_model import render

    question = verify_mod.PROBE[-1]["content"]
    out = []
    for answer in PROBE_ANSWERS:
        prompt = list(verify_mod.PROBE) if getattr(tok, "chat_template", None) else question + "\n"
        try:
            text = render(tok, prompt, answer, "the exported reward model")
        except Exception:  # noqa: BLE001 - a template without a system role (jinja raises its own errors)
            text = render(tok, prompt[1:], answer, "the exported reward model")
        out.append(tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"])
    return out


def scores(model, probes):
    """(1, len(probes)) float32 scores, one unpadded forward per probe."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(ids.to(device)).logits.float().cpu().reshape(1, 1) for ids in probes], dim=1)


def verify_merged(out_dir: Path, ref, probes, dtype: str, from_4bit: bool) -> dict:
    """Load ``out_dir`` with plain ``AutoModelForSequenceClassification`` and compare its probe scores with
    ``ref`` (the source's); the head must have one label and a pad token to find the last token."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    if model.config.num_labels != 1 or model.config.pad_token_id is None:
        raise verify_mod.VerificationError(
            f"{out_dir}: the saved config has num_labels={model.config.num_labels}, pad_token_id="
            f"{model.config.pad_token_id}; a reward model needs one label and a pad id. The export was not kept")
    result = verify_mod.compare(ref, scores(model, probes))
    tol = verify_mod.MERGED_RTOL[dtype] + (2e-2 if from_4bit else 0.0)
    result.update(tolerance=tol, scores_source=ref[0].tolist(), num_labels=1)
    if result["rel_diff"] > tol:
        raise verify_mod.VerificationError(
            f"merged reward model reloaded with transformers differs from the source: max |Δscore| / max |score| "
            f"= {result['rel_diff']:.2e} exceeds {tol:.0e}; the export was not kept")
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    if any(not torch.equal(a, b) for a, b in zip(probe_ids(tok), probes)):
        raise verify_mod.VerificationError("the saved tokenizer does not reproduce the chat template's token ids")
    return result
