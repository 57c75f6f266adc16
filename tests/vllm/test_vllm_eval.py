"""``posttrain eval --backend vllm`` on vLLM's CPU build equals the transformers backend's greedy completions in
float32, for the bare model and for a LoRA adapter served by the same engine (one engine per base model). The vLLM
run uses ``--dtype auto``: float32 on CPU for both backends (vLLM's own auto would run this float32 checkpoint in
bf16, and the completions would differ)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="needs vLLM: scripts/setup.sh vllm, then .venv-vllm/bin/python -m pytest tests/vllm")
pytestmark = pytest.mark.vllm

from posttrain.cli import main  # noqa: E402


def _completions(out, label):
    rows = [json.loads(x) for x in (out / label / "synthetic" / "samples.jsonl").read_text().splitlines()]
    return {r["id"]: (r["completion"], r["completion_tokens"], r["finish"]) for r in rows}


def test_eval_vllm_equals_transformers_greedy_in_fp32(smollm2_dir, scaled_adapter, tiny_qwen3_vllm, tmp_path,
                                                      capsys):
    """SmolLM2 bare and with an adapter (one engine), then a second base model (the first engine shut down
    before the second starts)."""
    budget = ["--benchmark", "synthetic", "--limit", "4", "--max-new-tokens", "32", "--no-progress"]
    smol = ["--model", str(smollm2_dir), "--model", str(smollm2_dir), "--adapter", "none",
            "--adapter", str(scaled_adapter), "--label", "bare", "--label", "adapter"]
    tiny = ["--model", str(tiny_qwen3_vllm), "--adapter", "none", "--label", "tiny"]
    assert main(["eval", *smol, *tiny, *budget, "--backend", "vllm", "--enforce-eager",
                 "--out", str(tmp_path / "vllm")]) == 0
    printed = capsys.readouterr().out
    assert "vLLM on cpu: KV cache 1 GiB (= VLLM_CPU_KVCACHE_SPACE=1; VLLM_CPU_KVCACHE_SPACE as set)" in printed
    assert "dtype float32 (--dtype auto, resolved as the transformers backend does)" in printed
    assert printed.count("vLLM on cpu") == 2  # one engine per base model: the adapter shared SmolLM2's
    assert len(_completions(tmp_path / "vllm", "tiny")) == 4
    for label in ("bare", "adapter", "tiny"):   # metrics.json names the dtype vLLM computed in
        saved = json.loads((tmp_path / "vllm" / label / "synthetic" / "metrics.json").read_text())
        assert saved["compute_dtype"] == "float32", label
    assert main(["eval", *smol, *budget, "--backend", "hf", "--dtype", "float32", "--compute-dtype", "float32",
                 "--out", str(tmp_path / "hf")]) == 0
    for label in ("bare", "adapter"):
        got, want = _completions(tmp_path / "vllm", label), _completions(tmp_path / "hf", label)
        assert len(got) == 4 and got == want, label
    bare, adapted = _completions(tmp_path / "vllm", "bare"), _completions(tmp_path / "vllm", "adapter")
    assert sum(bare[k][0] != adapted[k][0] for k in bare) >= 3  # the adapter is applied, not ignored
