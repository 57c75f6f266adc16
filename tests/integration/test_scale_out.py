"""Multi-process training on CPU: FSDP2 (torch ``fully_shard`` over gloo, two processes) through posttrain's
distributed helpers equals one unsharded process; an FSDP accelerate config on CPU is refused instead of
silently running DDP. (DDP through ``accelerate launch`` is tested in test_sft.py / test_grpo.py.)

Why FSDP2 is driven with ``fully_shard`` here and not through ``accelerate launch``: accelerate 1.x turns FSDP on
only for GPU-type setups; on CPU it keeps ``DistributedType.MULTI_CPU`` and ignores the FSDP plugin. torch's
FSDP2 itself runs on CPU with gloo, so the parts posttrain adds for FSDP2 (gradient norms of DTensors, gathering
whole weights for generation and for saving, loading whole tensors back into shards) are tested here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("fsdp2_worker.py")


def test_fsdp2_two_cpu_processes_equal_one_unsharded(tiny_qwen3, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              "29617", str(WORKER), str(tiny_qwen3), str(tmp_path / "fsdp")],
                             env=env, capture_output=True, text=True, timeout=600)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    plain = subprocess.run([sys.executable, str(WORKER), str(tiny_qwen3), str(tmp_path / "plain"), "--plain"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("fsdp", "plain"))
    assert a["sharded"] and a["world"] == 2 and not b["sharded"]
    assert a["norms"] == pytest.approx(b["norms"], rel=1e-5)
    # each rank decoded its own prompt for a different number of steps with whole weights gathered once:
    # the same tokens as the unsharded model
    assert a["tokens"] == b["tokens"]
    assert [len(r[0]) for r in a["tokens"]] == [6, 9]
    wa, wb = load_file(str(tmp_path / "fsdp.safetensors")), load_file(str(tmp_path / "plain.safetensors"))
    assert wa.keys() == wb.keys() and all("lora_" in k for k in wa)
    for k in wa:  # whole tensors, not shards, equal to the unsharded run's after two Adam steps (float32 sums in
        # another order on two ranks of two rows than on one of four: measured up to 1.8e-6 after lr 1e-2 Adam)
        assert wa[k].shape == wb[k].shape
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=5e-6, msg=k)


def test_fsdp_accelerate_config_on_cpu_is_refused(tiny_qwen3, tmp_path):
    """accelerate would run DDP under an FSDP config on CPU; posttrain says so and stops."""
    cfg = tmp_path / "fsdp_cpu.yaml"
    shipped = REPO / "src/posttrain/recipes/accelerate/fsdp2_8gpu.yaml"
    text = shipped.read_text().replace("num_processes: 8", "num_processes: 2")
    cfg.write_text(text)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"},
                                                     {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                            for i in range(8)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg), "--main_process_port", "29618",
           "-m", "posttrain.cli", "sft", "tiny/sft", f"model.name={tiny_qwen3}",
           f"data.path={data}", "data.format=auto", "data.template=chatml", "data.val_size=0", "data.columns=null",
           f"output_dir={tmp_path / 'run'}", "train.max_steps=1"]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode != 0
    assert "accelerate enables FSDP only on GPUs" in res.stderr and "cpu_2proc.yaml" in res.stderr
    assert not (tmp_path / "run" / "adapter").exists()
