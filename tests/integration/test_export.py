"""posttrain export on real models: a tiny random Qwen3 with the real Qwen vocabulary, and SmolLM2-135M-Instruct.

Tolerances (logits compared in float32 on the probe conversation of ``posttrain.export.verify``):
- adapter export, reloaded with PeftModel.from_pretrained: max |Δlogit| <= 1e-5 (same weights, same code path);
- merged float32 export, reloaded with plain transformers, vs base + adapter: max |Δlogit| <= 1e-4;
- merged bfloat16 export: max |Δlogit| / max |logit| <= 3e-2 and identical next-token argmax at >= 95% of positions;
- merged from a 4-bit (QLoRA) base vs 4-bit base + adapter: max |Δlogit| / max |logit| <= 5e-2;
- GGUF (SmolLM2 f16; tiny Qwen3 q8_0 and bf16 under -m slow) read back by transformers' GGUF loader: greedy decoding of 32 tokens identical to the merged
  model's, computed here independently of the exporter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.errors import UserError
from posttrain.export import export
from posttrain.export.verify import probe_ids

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPO = Path(__file__).resolve().parents[2]


def make_adapter(base_dir: Path, out: Path, scale: float, seed: int = 1, base_4bit: bool = False) -> Path:
    """A real PEFT adapter with random (non-zero) B matrices, saved with the base's tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * scale)
    peft.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def make_run(run_dir: Path, model_name: str, adapter_from: Path, load_in_4bit: bool = False) -> Path:
    """A run directory as the SFT trainer writes it: config.yaml + adapter/."""
    import shutil

    run_dir.mkdir(parents=True)
    shutil.copytree(adapter_from, run_dir / "adapter")
    cfg = {"output_dir": str(run_dir), "model": {"name": model_name, "load_in_4bit": load_in_4bit},
           "lora": {"r": 8, "alpha": 16, "target_modules": LORA_TARGETS}, "data": {"path": "unused.jsonl"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_dir


def peft_model(base, adapter_dir, **kw):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **kw)
    return PeftModel.from_pretrained(m, str(adapter_dir)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def greedy32(model, ids):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                             do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from posttrain.tiny import save_tiny_qwen3

    root = tmp_path_factory.mktemp("export_tiny")
    base = save_tiny_qwen3(root / "qwen3")
    adapter = make_adapter(base, root / "adapter", scale=0.05)
    return {"root": root, "base": base, "adapter": adapter}


@pytest.fixture(scope="session")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["base"])


# --------------------------------------------------------------------------------------------------
# adapter and merged


def test_adapter_export_loads_with_peft_and_keeps_the_chat_template(tiny, tokenizer, tmp_path):
    out = tmp_path / "lora"
    report = export(str(tiny["adapter"]), "adapter", out)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "export.json"} <= {
        p.name for p in out.iterdir()}
    assert report["verification"]["max_abs_diff"] <= 1e-5
    ids = probe_ids(tokenizer)
    src = logits(peft_model(tiny["base"], tiny["adapter"]), ids)
    exported = peft_model(tiny["base"], out)
    got = logits(exported, ids)
    assert (src - got).abs().max().item() <= 1e-5
    with exported.disable_adapter():
        base_only = logits(exported, ids)
    assert (base_only - src).abs().max().item() > 1e-3  # the adapter is not a no-op
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_export_matches_base_plus_adapter(tiny, tokenizer, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / f"merged-{dtype}"
    export(str(tiny["adapter"]), "merged", out, dtype=dtype)
    assert list(out.glob("*.safetensors")) and (out / "chat_template.jinja").is_file()
    from safetensors import safe_open

    with safe_open(next(out.glob("*.safetensors")), "pt") as f:  # saved in the requested precision
        assert {f.get_tensor(k).dtype for k in f.keys()} == {getattr(torch, dtype)}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in k for k in merged.state_dict())
    ids = probe_ids(tokenizer)
    ref = logits(peft_model(tiny["base"], tiny["adapter"]), ids)
    got = logits(merged, ids)
    diff = (ref - got).abs().max().item()
    if dtype == "float32":
        assert diff <= 1e-4, diff
    else:
        assert diff / ref.abs().max().item() <= 3e-2, diff
        assert (ref.argmax(-1) == got.argmax(-1)).float().mean().item() >= 0.95
    gen = GenerationConfig.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in (gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template


def test_merged_from_4bit_base_is_dequantized_first(tiny, tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run = make_run(tmp_path / "qlora-run", str(tiny["base"]), tiny["adapter"], load_in_4bit=True)
    out = tmp_path / "merged"
    report = export(str(run), "merged", out, dtype="float32")
    assert report["load_in_4bit"] is True
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    ids = probe_ids(tokenizer)
    ref = logits(peft_model(tiny["base"], run / "adapter", quantization_config=bnb, device_map={"": "cpu"}), ids)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = logits(merged, ids)
    assert (ref - got).abs().max().item() / ref.abs().max().item() <= 5e-2
    # the merged weights are the NF4 weights, not the original ones: they differ from a merge onto the dense base
    dense = logits(peft_model(tiny["base"], run / "adapter").merge_and_unload(), ids)
    assert (dense - got).abs().max().item() > (ref - got).abs().max().item()


# --------------------------------------------------------------------------------------------------
# GGUF


def _gguf_meta(path: Path) -> tuple[dict, dict]:
    """Metadata and {tensor name: ggml type name} read straight from the file."""
    meta, tensors = _read_gguf(path)
    return meta, {name: t for name, (t, _) in tensors.items()}


def _read_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata, {name: (ggml type name, loader of the dequantized float32 array)}). transformers' reader is used
    where it exists because gguf.GGUFReader takes ~20 s to parse a Qwen vocabulary on this machine."""
    import gguf

    try:
        from transformers.integrations.gguf import reader
    except ImportError:
        r = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in r.fields.items()}
        return meta, {t.name: (t.tensor_type.name, lambda t=t: gguf.quants.dequantize(t.data, t.tensor_type)
                               .reshape(tuple(reversed([int(x) for x in t.shape])))) for t in r.tensors}
    meta, _ = reader.read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",))
    header = reader.GgufHeader.from_file(str(path))
    raw = reader.load_gguf_state_dict(header)
    out = {}
    for info in header.tensors:
        qtype = gguf.GGMLQuantizationType(info.ggml_type)

        def load(name=info.name, qtype=qtype, shape=info.shape):
            data = raw[name].data
            if qtype.name in ("F32", "F16"):  # plain floats; block types (BF16, Q8_0, ...) are dequantized from bytes
                data = data.view(np.float32 if qtype.name == "F32" else np.float16)
            return gguf.quants.dequantize(data, qtype).reshape(shape).astype(np.float32)

        out[info.name] = (qtype.name, load)
    return meta, out


def _reference_greedy(base, adapter, tok, dtype=torch.bfloat16):
    """The merged model (merged in float32, stored in 16 bits as the exporter does), decoded greedily."""
    merged = peft_model(base, adapter).merge_and_unload().to(dtype).float()
    return greedy32(merged, probe_ids(tok))


def test_gguf_smollm2_f16_round_trip_and_modelfile(tmp_path):
    from posttrain.models import materialize_alias

    try:
        base = materialize_alias("smollm2-135m-instruct")
    except UserError as exc:
        pytest.skip(str(exc))
    from transformers import AutoTokenizer

    adapter = make_adapter(base, tmp_path / "adapter", scale=0.002)
    run = make_run(tmp_path / "run", "smollm2-135m-instruct", adapter)
    out = tmp_path / "gguf"
    report = export(str(run), "gguf", out, quant="f16")
    tok = AutoTokenizer.from_pretrained(base)
    want = _reference_greedy(base, adapter, tok)
    v = report["verification"]
    assert len(want) == 32 and v["greedy_gguf"] == want, (v["greedy_gguf"], want)
    assert v["rel_diff"] <= 5e-3
    path = out / report["gguf"]
    meta, types = _gguf_meta(path)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied embeddings
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{report['gguf']}" in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "You are a helpful AI assistant named SmolLM" in modelfile  # the template's default system prompt


def test_gguf_tiny_qwen3_q8_0_file_holds_the_merged_model(tiny, tokenizer, tmp_path):
    """Fast: the file read back tensor by tensor (no transformers model load) equals the merged weights."""
    out = tmp_path / "gguf"
    report = export(str(tiny["adapter"]), "gguf", out, quant="q8_0", name="tiny", verify=False)
    assert report["gguf"] == "tiny-q8_0.gguf" and (out / "Modelfile").is_file()
    modelfile = (out / "Modelfile").read_text()  # names the export folder, not the staging one it was written in
    assert modelfile.startswith(f"# Ollama: ollama create my-model -f {out.resolve() / 'Modelfile'} ")
    assert "\nTEMPLATE " in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    meta, tensors = _read_gguf(out / "tiny-q8_0.gguf")
    cfg = json.loads((tiny["base"] / "config.json").read_text())
    assert meta["general.architecture"] == "qwen3" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["qwen3.block_count"] == cfg["num_hidden_layers"] and meta["qwen3.attention.head_count_kv"] == 2
    assert meta["qwen3.attention.key_length"] == cfg["head_dim"]
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = meta["tokenizer.ggml.tokens"]  # the real Qwen vocabulary, padded to the embedding size
    assert len(tokens) == 151936 and tokens[151645] == "<|im_end|>" and tokens[-1] == "[PAD151935]"
    merged = peft_model(tiny["base"], tiny["adapter"]).merge_and_unload().to(torch.bfloat16).float().state_dict()
    pairs = {"token_embd.weight": "model.embed_tokens.weight", "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight", "output_norm.weight": "model.norm.weight"}
    for gname, hf in pairs.items():
        qtype, load = tensors[gname]
        want = merged[hf].numpy()
        got = load()
        if qtype == "F32":
            assert np.array_equal(got, want), gname
        else:  # q8_0: 8-bit values with one scale per 32 weights
            assert qtype == "Q8_0"
            assert np.abs(got - want).max() <= np.abs(want).max() / 127, gname
    assert "output.weight" not in tensors  # tied embeddings


@pytest.mark.slow
def test_gguf_tiny_qwen3_q8_0_round_trip(tiny, tokenizer, tmp_path):
    """The transformers round trip for Qwen3 (slow: ~40 s of CPU parsing the Qwen vocabulary twice)."""
    out = tmp_path / "gguf"
    report = export(str(tiny["adapter"]), "gguf", out, quant="q8_0", name="tiny")
    want = _reference_greedy(tiny["base"], tiny["adapter"], tokenizer)
    v = report["verification"]
    assert v["greedy_gguf"] == want and v["rel_diff"] <= 5e-2


def test_llama_permutation_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from posttrain.export.gguf_writer import llama_permute

    w = torch.randn(3 * 64, 40).numpy()  # 3 kv heads of head_dim 64
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    back = proc.process(llama_permute(w, 9, 3), "blk.0.attn_k.weight").weights
    assert (back == w).all() and not (llama_permute(w, 9, 3) == w).all()


def test_q4_k_m_without_llama_quantize_says_how_to_get_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no llama-quantize on it
    monkeypatch.delenv("POSTTRAIN_LLAMA_QUANTIZE", raising=False)
    with pytest.raises(UserError, match="llama-quantize") as err:
        export(str(tiny["adapter"]), "gguf", tmp_path / "q4", quant="q4_k_m")
    assert "--llama-quantize" in str(err.value) and "q8_0" in str(err.value)
    assert not (tmp_path / "q4").exists()


# --------------------------------------------------------------------------------------------------
# bad input


def test_missing_base_is_named(tiny, tmp_path, capsys):
    import shutil

    adapter = tmp_path / "orphan"
    shutil.copytree(tiny["adapter"], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone" / "Qwen3-4B-Base")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["export", str(adapter), "--format", "merged", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "gone" / "Qwen3-4B-Base") in err and "--base" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_unless_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(tiny["adapter"]), "--format", "adapter", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces an earlier export (export.json) or an empty folder, never a folder of someone else's
    assert main(["export", str(tiny["adapter"]), "--format", "adapter", "--out", str(out), "--overwrite",
                 "--no-verify"]) == 2
    assert "is not an export made by posttrain (it has no export.json)" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    for _ in range(2):  # into the empty folder, then over that export
        assert main(["export", str(tiny["adapter"]), "--format", "adapter", "--out", str(out), "--overwrite",
                     "--no-verify"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "export.json").is_file()
    assert not list(tmp_path.glob(".out.*"))  # no leftovers beside it: no partial, no old copy, no lock


def test_overwrite_never_deletes_the_source_or_a_folder_holding_it(tiny, tmp_path, capsys):
    """The review's E5/E6: --out equal to the run, or its parent, with --overwrite deleted them (exit 0)."""
    proj = tmp_path / "proj"
    run = make_run(proj / "run1", str(tiny["base"]), tiny["adapter"])
    (proj / "NOTES.md").write_text("precious")
    before = sorted(str(p.relative_to(proj)) for p in proj.rglob("*"))
    cases = {run: "is the source", proj: "contains the source", tmp_path: "contains the source",
             run / "adapter" / "exp": f"is inside {run / 'adapter'}, which this export reads"}
    for out, why in cases.items():
        assert main(["export", str(run), "--format", "adapter", "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err, err
    assert sorted(str(p.relative_to(proj)) for p in proj.rglob("*")) == before
    assert main(["export", str(run), "--format", "adapter", "--out", str(run / "export" / "adapter"),
                 "--no-verify"]) == 0  # inside the run directory (the convention RUN/export/FORMAT) is fine
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_a_second_export_into_the_same_out_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "merged"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom posttrain.runs import RunLock\n"
                               "RunLock(sys.argv[1], 'posttrain export').acquire(); print('locked', flush=True); "
                               "time.sleep(120)", str(tmp_path / ".merged.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["export", str(tiny["adapter"]), "--format", "merged", "--out", str(out)]) == 2
        assert f"in use by another posttrain process (PID {holder.pid}: posttrain export" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_killed_export_leaves_nothing_that_looks_complete(tiny, tmp_path):
    out = tmp_path / "merged"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "export", str(tiny["adapter"]), "--format",
                             "merged", "--dtype", "float32", "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    partial = None
    while time.time() < deadline and proc.poll() is None:  # kill it as soon as weights are being written
        partial = next((p for p in tmp_path.glob(".merged.partial-*") if any(p.glob("*.safetensors"))), None)
        if partial:
            break
        time.sleep(0.02)
    assert partial is not None, "the export finished or failed before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert not (partial / "export.json").exists()
    export(str(tiny["adapter"]), "merged", out, dtype="float32", verify=False)  # a new export cleans up
    assert (out / "export.json").is_file() and not partial.exists()


# --------------------------------------------------------------------------------------------------
# slow: the other GGUF types through the command line


@pytest.mark.slow
def test_cli_gguf_bf16_tiny_qwen3(tiny, tokenizer, tmp_path):
    out = tmp_path / "bf16"
    assert main(["export", str(tiny["adapter"]), "--format", "gguf", "--quant", "bf16", "--out", str(out)]) == 0
    report = json.loads((out / "export.json").read_text())
    assert report["verification"]["greedy_match_tokens"] == 32
    assert report["verification"]["greedy_gguf"] == _reference_greedy(tiny["base"], tiny["adapter"], tokenizer)
    _, types = _gguf_meta(out / report["gguf"])
    assert types["blk.1.ffn_down.weight"] == "BF16"


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("llama-quantize") is None, reason="llama-quantize is not on the PATH")
def test_q4_k_m_with_llama_quantize(tiny, tmp_path):
    report = export(str(tiny["adapter"]), "gguf", tmp_path / "q4", quant="q4_k_m", name="tiny")
    _, types = _gguf_meta(tmp_path / "q4" / "tiny-q4_k_m.gguf")
    assert "Q4_K" in types.values()
    assert report["verification"]["greedy_match_tokens"] >= 0  # reported; 4-bit need not match token for token
    assert not list((tmp_path / "q4").glob("*f16*"))  # the intermediate f16 file is gone
