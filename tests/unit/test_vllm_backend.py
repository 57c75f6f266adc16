"""The vLLM backend's pieces that run without vLLM (the real engine is tested in tests/vllm, in the vLLM
environment): sampling settings mapped one to one, per-completion seeds, the OpenAI server request and its parsing,
outputs -> Rollouts, the merged weights pushed to the engine, the engine's arguments on CUDA and on CPU (the CUDA
ones cannot run here: they are pinned), LoRA ranks, the tensor-parallel prompt gather, the refusals, the config
section, and the missing-vLLM error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from posttrain.config import ConfigError, load_recipe
from posttrain.errors import UserError
from posttrain.grpo.config import GRPORecipe, VLLMConfig
from posttrain.rollout import SamplingParams, completion_seed
from posttrain.rollout.vllm import (build_rollouts, build_training_engine, completion_request, completion_seeds,
                                    llm_kwargs, merged_named_weights, parse_completion_choice, sampling_kwargs,
                                    vllm_weight_name)
from posttrain.rollout.vllm_engine import GiB, gather_tp_prompts, platform_kwargs, tp_rows, vllm_lora_rank

# vllm.SamplingParams' documented constructor arguments that the mapping may use (docs.vllm.ai, sampling params)
VLLM_SAMPLING_ARGS = {"n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
                      "max_tokens", "logprobs", "include_stop_str_in_output", "skip_special_tokens"}


def test_sampling_settings_map_one_to_one():
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, max_new_tokens=123,
                        stop_token_ids=(151645, 151643), stop_strings=("</SOLUTION>",), include_stop_str_in_output=True,
                        ignore_eos=False, seed=11, logprobs=True)
    kw = sampling_kwargs(sp, seed=99, n=1)
    assert set(kw) <= VLLM_SAMPLING_ARGS
    assert kw == {"n": 1, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 99, "max_tokens": 123,
                  "stop": ["</SOLUTION>"], "stop_token_ids": [151645, 151643], "include_stop_str_in_output": True,
                  "ignore_eos": False, "logprobs": 0, "skip_special_tokens": True}


def test_filters_off_and_no_logprobs():
    kw = sampling_kwargs(SamplingParams(top_k=0, ignore_eos=True, logprobs=False), seed=None)
    assert kw["top_k"] == -1 and kw["top_p"] == 1.0 and kw["min_p"] == 0.0  # vLLM's "off" values
    assert kw["stop"] is None and kw["stop_token_ids"] is None and kw["ignore_eos"] is True
    assert kw["logprobs"] is None and kw["seed"] is None
    assert sampling_kwargs(SamplingParams(temperature=0.0), seed=1)["temperature"] == 0.0  # greedy stays greedy


def test_completion_seeds_are_the_transformers_backends_keys():
    seeds = completion_seeds(7, [3, 5], 2)
    assert seeds == [completion_seed(7, 3, 0), completion_seed(7, 3, 1), completion_seed(7, 5, 0),
                     completion_seed(7, 5, 1)]
    # pinned: a changed mix would silently change every sampled completion of a resumed or repeated run
    assert completion_seed(7, 3, 0) == 8421308723474898258 and completion_seed(1, -1, 5) == 5789121629230313503
    assert len(set(seeds)) == 4
    # a prompt's completions do not depend on which other prompts share the batch
    assert completion_seeds(7, [5], 2) == seeds[2:]
    assert completion_seeds(8, [3], 1) != seeds[:1]


def test_openai_request_and_response():
    sp = SamplingParams(temperature=1.0, top_k=0, min_p=0.1, max_new_tokens=8, stop_token_ids=(2,), seed=0)
    body = completion_request(sp, [5, 6, 7], "posttrain-3", seed=42)
    assert body["model"] == "posttrain-3" and body["prompt"] == [5, 6, 7] and body["n"] == 1
    assert body["seed"] == 42 and body["top_k"] == -1 and body["min_p"] == 0.1 and body["max_tokens"] == 8
    assert body["stop_token_ids"] == [2] and body["return_tokens_as_token_ids"] is True and body["logprobs"] == 0
    assert "stop" not in body  # None values are left out
    choice = {"text": " 12", "finish_reason": "stop",
              "logprobs": {"tokens": ["token_id:220", "token_id:16", "token_id:2"],
                           "token_logprobs": [-0.5, -1.25, None]}}
    assert parse_completion_choice(choice) == ([220, 16, 2], [-0.5, -1.25, 0.0], " 12", "stop")
    ids, _, _, finish = parse_completion_choice({"text": "", "finish_reason": "length", "logprobs": {"tokens": []}})
    assert ids == [] and finish == "length"
    with pytest.raises(UserError, match="return_tokens_as_token_ids"):
        parse_completion_choice({"text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [-1.0]}})


def test_outputs_become_grouped_padded_rollouts():
    ro = build_rollouts([[1, 2], [3]], 2, [[10, 11, 12], [10], [20, 21], [22]], [[-1.0, -2.0, -3.0], [-0.5],
                        [-0.1, -0.2], [-0.3]], ["a", "b", "c", "d"], ["stop", "length", "stop", "stop"], pad_id=0)
    assert ro.completion_ids.tolist() == [[10, 11, 12], [10, 0, 0], [20, 21, 0], [22, 0, 0]]
    assert ro.lengths.tolist() == [3, 1, 2, 1]
    assert ro.logprobs[1].tolist() == [-0.5, 0.0, 0.0]
    assert ro.truncated.tolist() == [False, True, False, False]
    assert ro.prompt_of(3) == [3] and ro.stats["tokens"] == 7


def test_weight_names_follow_the_checkpoint():
    assert vllm_weight_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert vllm_weight_name("model.layers.1._checkpoint_wrapped_module.mlp.up_proj.weight") == \
        "model.layers.1.mlp.up_proj.weight"


def test_merged_weights_equal_peft_merge_and_unload(tiny_qwen3):
    """What is pushed to vLLM is the merged model: same names as the plain checkpoint, same values as PEFT's merge."""
    from transformers import AutoModelForCausalLM

    from posttrain.config import LoraConfig
    from posttrain.models import apply_lora

    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained adapter (B starts at zero)
    pushed = dict(merged_named_weights(model))
    base = {vllm_weight_name(n): p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # training weights untouched
    reference = dict(model.merge_and_unload().named_parameters())
    assert set(pushed) == set(reference)
    changed = 0
    for n, t in pushed.items():
        assert torch.allclose(t, reference[n], atol=1e-6), n
        changed += not torch.equal(t, base[n])
    assert changed == 7 * len([n for n in pushed if n.endswith("q_proj.weight")])  # the seven LoRA targets per layer


def test_engine_arguments_on_cuda():
    """The colocated engine on a GPU (pinned: no GPU here). Always the external launcher, one process included:
    vLLM's default multiprocess engine has no llm_engine.model_executor (review V1) and cannot take tensors by
    reference."""
    cfg = VLLMConfig(gpu_memory_utilization=0.4, tensor_parallel_size=2)
    kw, line = llm_kwargs("Qwen/Qwen3-4B-Base", cfg, world=4, rank=3, max_model_len=2048, dtype="bfloat16", seed=5)
    assert kw == {"model": "Qwen/Qwen3-4B-Base", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.4,
                  "enable_sleep_mode": True, "dtype": "bfloat16", "seed": 5 + 1, "enable_prefix_caching": True,
                  "logprobs_mode": "processed_logprobs", "distributed_executor_backend": "external_launcher",
                  "enforce_eager": False, "max_model_len": 2048}  # seed: one per TP group
    assert "sleep mode on" in line
    one, _ = llm_kwargs("m", VLLMConfig(enable_sleep_mode=False), world=1, rank=0, max_model_len=None, dtype="float32")
    assert one["distributed_executor_backend"] == "external_launcher" and one["enable_sleep_mode"] is False
    assert one["dtype"] == "float32" and "max_model_len" not in one  # the policy's dtype, never vLLM's auto
    with pytest.raises(UserError, match="tensor_parallel_size=2 must divide"):
        llm_kwargs("m", cfg, world=3, rank=0, max_model_len=None, dtype="auto")


def test_engine_arguments_on_cpu():
    """vLLM's CPU build: no sleep mode (asked for, an error naming the key), and an explicit KV cache: the share of
    free RAM in whole GiB, or VLLM_CPU_KVCACHE_SPACE when set (vLLM reads gpu_memory_utilization as a share of all
    RAM there and fails to start when that much is not free)."""
    kw, line = llm_kwargs("m", VLLMConfig(gpu_memory_utilization=0.3), world=1, rank=0, max_model_len=160,
                          dtype="float32", platform="cpu", free_ram=10 * GiB, env={})
    assert kw["enable_sleep_mode"] is False and kw["kv_cache_memory_bytes"] == 3 * GiB
    assert "gpu_memory_utilization" not in kw and kw["distributed_executor_backend"] == "external_launcher"
    assert "VLLM_CPU_KVCACHE_SPACE=3" in line and "10.0 GiB free RAM" in line
    memory, line = platform_kwargs("cpu", gpu_memory_utilization=0.85, sleep=None, key="eval", free_ram=GiB // 2,
                                   env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert memory == {"enable_sleep_mode": False, "kv_cache_memory_bytes": 2 * GiB} and "as set" in line
    assert platform_kwargs("cpu", gpu_memory_utilization=0.1, sleep=False, key="eval", free_ram=GiB,
                           env={})[0]["kv_cache_memory_bytes"] == GiB  # at least 1 GiB
    with pytest.raises(UserError, match=r"grpo.vllm.enable_sleep_mode=true: vLLM's CPU build has no sleep mode"):
        llm_kwargs("m", VLLMConfig(enable_sleep_mode=True), world=1, rank=0, max_model_len=None, dtype="float32",
                   platform="cpu", free_ram=GiB, env={})
    with pytest.raises(UserError, match="tensor_parallel_size > 1"):
        llm_kwargs("m", VLLMConfig(tensor_parallel_size=2), world=2, rank=0, max_model_len=None, dtype="float32",
                   platform="cpu", free_ram=GiB, env={})


def test_lora_rank_rounds_up_to_what_vllm_allows():
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 12, 16, 48, 64, 200, 300, 512)] == \
        [1, 8, 8, 16, 16, 64, 64, 256, 320, 512]
    with pytest.raises(UserError, match="ranks up to 512"):
        vllm_lora_rank(600)


def test_tensor_parallel_rows_follow_rank_order():
    """Rank r's completions are rows [offset_r * n, (offset_r + count_r) * n) of the group's generation."""
    assert tp_rows([2, 1, 3], 0, 4) == slice(0, 8)
    assert tp_rows([2, 1, 3], 1, 4) == slice(8, 12)
    assert tp_rows([2, 1, 3], 2, 4) == slice(12, 24)
    assert gather_tp_prompts([[1, 2]], [7], None, 1) == ([[1, 2]], [7], [1])  # one rank: unchanged


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    import json
    import os

    import torch.distributed as dist

    from posttrain.rollout.vllm_engine import tp_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = tp_group(2, world)
    prompts = [[rank, i] for i in range(rank % 2 + 1)]  # ranks 0 and 2 give one prompt, 1 and 3 two
    seeds = [10 * rank + i for i in range(len(prompts))]
    all_p, all_s, counts = gather_tp_prompts(prompts, seeds, group, 2)
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"prompts": all_p, "seeds": all_s, "counts": counts}, f)
    dist.destroy_process_group()


def test_tensor_parallel_prompts_are_gathered_in_the_group(tmp_path):
    """Four gloo processes, two TP groups of two (review V2): each group's ranks see the same prompts, in rank
    order, and only their own group's."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(4, port, str(tmp_path)), nprocs=4, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)]
    assert got[0] == got[1] == {"prompts": [[0, 0], [1, 0], [1, 1]], "seeds": [0, 10, 11], "counts": [1, 2]}
    assert got[2] == got[3] == {"prompts": [[2, 0], [3, 0], [3, 1]], "seeds": [20, 30, 31], "counts": [1, 2]}


def test_server_mode_refuses_a_merged_starting_adapter(tiny_qwen3, tmp_path):
    """init_adapter_mode=merge trains base+SFT, but the server serves the bare base (review V5)."""
    from transformers import AutoModelForCausalLM

    from posttrain.config import LoraConfig
    from posttrain.models import apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32), LoraConfig(r=4, alpha=8))
    cfg = load_recipe(None, [f"model.name={tiny_qwen3}", "data.path=d", "grpo.rollout_backend=vllm",
                             "grpo.vllm.mode=server", f"init_adapter={tmp_path}", "init_adapter_mode=merge"],
                      cls=GRPORecipe)
    with pytest.raises(UserError, match="init_adapter_mode=merge.*serves the bare base"):
        build_training_engine(cfg, model, None, None, tmp_path, 64)


def test_eval_adapter_vllm_cannot_serve_is_refused(tmp_path):
    from posttrain.evaluation.vllm_backend import adapter_rank

    (tmp_path / "adapter_config.json").write_text('{"r": 12, "bias": "none"}')
    assert adapter_rank(tmp_path) == 12
    (tmp_path / "adapter_config.json").write_text('{"r": 8, "bias": "lora_only"}')
    with pytest.raises(UserError, match="without bias and modules_to_save"):
        adapter_rank(tmp_path)


def test_config_section():
    base = ["model.name=m", "data.path=d"]
    cfg = load_recipe(None, base + ["grpo.rollout_backend=vllm", "grpo.vllm.mode=server", "grpo.vllm.server_port=8001",
                                    "grpo.importance_sampling_cap=2.0"], cls=GRPORecipe)
    assert cfg.grpo.vllm.mode == "server" and cfg.grpo.vllm.server_port == 8001
    assert cfg.grpo.vllm.enable_sleep_mode is None and cfg.grpo.vllm.enforce_eager is False  # sleep: by platform
    assert cfg.grpo.importance_sampling_cap == 2.0
    assert load_recipe(None, base, cls=GRPORecipe).grpo.importance_sampling_cap is None  # off by default
    with pytest.raises(ConfigError, match=r"unknown key 'grpo.vllm.gpu_mem'; valid keys here: .*gpu_memory_utilization"):
        load_recipe(None, base + ["grpo.vllm.gpu_mem=0.5"], cls=GRPORecipe)
    with pytest.raises(ConfigError, match="grpo.rollout_backend"):
        load_recipe(None, base + ["grpo.rollout_backend=sglang"], cls=GRPORecipe)


def test_missing_vllm_names_the_extra():
    code = ("import sys; sys.modules['vllm'] = None\n"
            "from posttrain.rollout.vllm import require_vllm\n"
            "require_vllm()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0
    assert "UserError" in res.stderr and "pip install 'posttrain[vllm]'" in res.stderr


def test_eval_with_the_vllm_backend_names_the_extra_here(tiny_qwen3, tmp_path):
    """No vLLM (or no GPU) on this machine: `posttrain eval --backend vllm` stops with one line naming the fix."""
    code = ("import sys; sys.modules['vllm'] = None\nfrom posttrain.cli import main\n"
            f"sys.exit(main(['eval', '--model', '{tiny_qwen3}', '--benchmark', 'synthetic', '--limit', '2', "
            f"'--backend', 'vllm', '--out', '{tmp_path / 'e'}', '--no-progress']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "pip install 'posttrain[vllm]'" in res.stderr and "Traceback" not in res.stderr
