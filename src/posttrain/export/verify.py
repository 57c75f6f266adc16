"""Round-trip checks: every export is loaded back the way its users will load it and compared with the model
it came from, on one probe conversation rendered with the model's chat template.

- adapter: base + ``PeftModel.from_pretrained(exported dir)``; logits equal the source adapter's (atol 1e-4).
- merged:  ``AutoModelForCausalLM.from_pretrained(exported dir)``; logits match base + adapter within a relative
  tolerance set by the output dtype (max |Δlogit| / max |logit|: float32 1e-4, bfloat16 3e-2, float16 1e-2;
  plus 2e-2 when the base was 4-bit, whose bitsandbytes matmul rounds differently from a dense one), and the
  next-token argmax agrees at >= 95% of the probe positions.
- gguf: transformers' GGUF reader loads the file (tokenizer and weights); the probe tokenizes to the same ids,
  the chat template is the same string, logits match the merged model (f16/bf16: 5e-3, q8_0: 1.2e-1) and greedy
  decoding of 32 tokens is identical (for q8_0 the agreement is reported, not required; q4_k_m is reported only).

Why these GGUF tolerances: transformers dequantizes the file to float32 and keeps float32 activations, so f16 and
bf16 files come back as the merged weights (the check is tight and greedy decoding must agree). q8_0 is checked
at the precision llama.cpp itself reaches on a correct q8_0 file, with margin. The GGUF review of posttrain
91725cd (2026-11-21; shared/reference/gguf-llamacpp-review.md: llama.cpp 0c1e570 through llama-cpp-python 0.3.36,
one thread, max |Δlogit| / max |logit| over all prompt positions against transformers in float32) measured for
q8_0 6.0e-2 (SmolLM2 fine-tuned), 7.9e-2 (SmolLM2 base) and 2.5e-2 (tiny Qwen3), while transformers' reading of
the same base file gave 4.4e-2, close to the old 5e-2 limit. 1.2e-1 is 1.5x the worst llama.cpp figure and
still well below what a 4-bit file shows (q4_k_m 3.2e-1 in llama.cpp) or a misplaced tensor causes (order 1).

All logits are computed in float32 on the CPU or the model's device.
"""

from __future__ import annotations

from pathlib import Path

from posttrain import runs

MERGED_RTOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
GGUF_RTOL = {"f16": 5e-3, "bf16": 5e-3, "q8_0": 1.2e-1}  # q8_0: what llama.cpp meets, with margin (docstring)
GREEDY_TOKENS = 32
PROBE = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is 12 + 30? Reply with the number, then one short sentence about it."},
]


class VerificationError(RuntimeError):
    """The exported files do not reproduce the source model; the export is not kept."""


def probe_ids(tok):
    import torch

    if getattr(tok, "chat_template", None):
        try:
            ids = tok.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt")["input_ids"]
        except Exception:  # a template without a system role
            ids = tok.apply_chat_template(PROBE[1:], add_generation_prompt=True, return_tensors="pt")["input_ids"]
    else:
        ids = tok(PROBE[1]["content"], return_tensors="pt")["input_ids"]
    return ids.to(torch.long)


def logits(model, ids):
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(ids.to(device)).logits.float().cpu()


def compare(ref, got) -> dict:
    diff = (ref - got).abs().max().item()
    scale = ref.abs().max().item() or 1.0
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    return {"max_abs_diff": round(diff, 6), "logit_scale": round(scale, 4), "rel_diff": diff / scale,
            "argmax_agreement": round(agree, 4)}


def greedy(model, ids, n: int = GREEDY_TOKENS) -> list[int]:
    """n greedy tokens; EOS is suppressed (min_new_tokens) so both models always produce n tokens to compare."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _fail(what: str, result: dict, tol: float):
    raise VerificationError(f"{what}: max |Δlogit| / max |logit| = {result['rel_diff']:.2e} exceeds {tol:.0e} "
                            f"(argmax agreement {result['argmax_agreement']:.0%}); the export was not kept")


def verify_merged(out_dir: Path, ref_logits, ids, dtype: str, from_4bit: bool, device: str = "cpu") -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).to(device).eval()
    result = compare(ref_logits, logits(model, ids))
    tol = MERGED_RTOL[dtype] + (2e-2 if from_4bit else 0.0)
    result["tolerance"] = tol
    if result["rel_diff"] > tol or result["argmax_agreement"] < 0.95:
        _fail("merged weights reloaded with transformers differ from base + adapter", result, tol)
    tok = AutoTokenizer.from_pretrained(str(out_dir))
    if not torch.equal(probe_ids(tok), ids):
        raise VerificationError("the saved tokenizer does not reproduce the chat template's token ids")
    gen = GenerationConfig.from_pretrained(str(out_dir))
    result["eos_token_id"] = gen.eos_token_id
    return result


def verify_adapter(out_dir: Path, src, ref_logits, ids, device: str = "auto", load=runs.load, outputs=logits) -> dict:
    """``load``/``outputs``: how the source kind is loaded and what is compared (``export.reward``'s for a reward
    model: scores of its probes)."""
    tok_dir = str(out_dir) if (out_dir / "tokenizer_config.json").is_file() else src.tokenizer_dir
    exported = runs.Source(model=src.model, adapter_dir=out_dir, tokenizer_dir=tok_dir, lora=src.lora,
                           base_from=src.base_from)
    model, _ = load(exported, device=device, verbose=False)
    result = compare(ref_logits, outputs(model, ids))
    result["tolerance"] = 1e-4
    if result["max_abs_diff"] > 1e-4:
        _fail("the exported adapter loaded with PeftModel.from_pretrained differs from the source", result, 1e-4)
    return result


def verify_gguf(path: Path, merged, tok, ids, quant: str) -> dict:
    """Load ``path`` with transformers' GGUF reader and compare it with the merged model ``merged``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.export.gguf_writer import chat_template_of

    kwargs = {}
    if merged.config.model_type == "qwen3":
        # transformers' GGUF config mapping for qwen3 ignores attention.key_length and assumes head_dim 128 (true
        # for every released Qwen3); give it the value the file holds so smaller test models load too.
        kwargs["head_dim"] = _gguf_key_length(path)
    gtok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    gmodel = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                  **kwargs).eval()
    if chat_template_of(gtok) != chat_template_of(tok):
        raise VerificationError(f"{path.name}: the chat template read back differs from the tokenizer's")
    gids = probe_ids(gtok)
    if not torch.equal(gids, ids):
        raise VerificationError(f"{path.name}: the GGUF tokenizer encodes the probe differently "
                                f"({gids[0, :12].tolist()}... vs {ids[0, :12].tolist()}...)")
    ref = logits(merged, ids)
    result = compare(ref, logits(gmodel, ids))
    want = greedy(merged, ids)
    got = greedy(gmodel, ids)
    match = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
    result.update(greedy_reference=want, greedy_gguf=got, greedy_match_tokens=match,
                  sample_text=tok.decode(got, skip_special_tokens=False))
    tol = GGUF_RTOL.get(quant)
    result["tolerance"] = tol
    if tol is not None and (result["rel_diff"] > tol):
        _fail(f"{path.name} loaded with transformers differs from the merged model", result, tol)
    if quant in ("f16", "bf16") and match < len(want):
        raise VerificationError(f"{path.name}: greedy decoding diverges from the merged model at token {match} "
                                f"of {len(want)}; the export was not kept")
    return result


def _gguf_key_length(path: Path) -> int:
    from transformers.integrations.gguf.reader import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(path), ())
    arch = meta["general.architecture"]
    return int(meta[f"{arch}.attention.key_length"])
