"""Write a GGUF file with the ``gguf`` package alone: no llama.cpp checkout, no compiler.

Supported architectures: llama (SmolLM2, Llama-style), qwen2 (Qwen2/2.5) and qwen3 (dense Qwen3), with a
byte-level BPE tokenizer (the "gpt2" tokenizer model in llama.cpp's terms). The conventions follow llama.cpp's
``convert_hf_to_gguf.py``, checked against transformers' GGUF reader by the round trip in ``verify.py``:

- tensor names come from ``gguf.get_tensor_name_map`` (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q``);
- llama's q_proj / k_proj rows are permuted from Hugging Face's rotate-half layout to GGML's interleaved rope
  layout; qwen2/qwen3 use NeoX rope in llama.cpp and are written as they are;
- 1-D tensors (norms, biases) stay float32 in every output type, as llama.cpp does; 2-D tensors take the
  requested type (f16, bf16, q8_0; a tensor whose rows are not a multiple of 32 falls back to f16 in q8_0);
- a tied ``lm_head`` is not written (llama.cpp reuses ``token_embd`` when ``output.weight`` is absent);
- the vocabulary is padded to the embedding size with ``[PAD<i>]`` tokens of type UNUSED.

Tensors are converted and written one at a time (header and tensor table first), so peak memory is the model
plus one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from posttrain.errors import UserError

# our name -> (gguf architecture name, permute llama q/k)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False)}
OUTTYPES = ("f16", "bf16", "q8_0")

# llama.cpp pre-tokenizer names for the split regexes transformers knows (transformers' GGUF reader maps them back)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_TO_PRE = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def gguf_arch(config) -> tuple[str, bool]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"GGUF export supports the architectures {sorted(ARCHITECTURES)}; this model is "
                        f"{model_type!r}. Export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    return ARCHITECTURES[model_type]


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise UserError(f"GGUF export: rope scaling type {rope_type!r} is not supported yet (only plain rope); "
                        "export --format merged and convert with llama.cpp")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UserError("GGUF export: the model config has no rope_theta")
    return float(theta)


def llama_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Hugging Face rotate-half rows -> GGML interleaved rope rows (llama.cpp ``LlamaModel.permute``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------------
# Tokenizer


def pre_tokenizer_name(tok) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer (decides how text is split before BPE)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    for p in parts:
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex")
            if regex in SPLIT_TO_PRE:
                return SPLIT_TO_PRE[regex]
            raise UserError(f"GGUF export: the tokenizer splits text with a regex llama.cpp is not known to support "
                            f"({regex!r:.80}); export --format merged and convert with llama.cpp")
    vocab = tok.get_vocab()
    # SmolLM / SmolLM2 (StarCoder-style vocabulary): digits are split one by one. A tokenizer rebuilt from a GGUF
    # loses that Digits step, so recognise the vocabulary itself as well.
    smollm_vocab = len(vocab) == 49152 and all(vocab.get(t) == i for i, t in
                                               enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    if "Digits" in types or smollm_vocab:
        return "smollm"
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    raise UserError(f"GGUF export: unsupported tokenizer pre-processing {types}; posttrain writes byte-level BPE "
                    "tokenizers (Qwen, SmolLM, Llama 3). Export --format merged and convert with llama.cpp")


def tokenizer_metadata(tok, vocab_size: int) -> dict:
    """Vocabulary, token types and merges as llama.cpp's ``_set_vocab_gpt2`` writes them."""
    import gguf

    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or not _is_byte_level(spec):
        raise UserError("GGUF export: posttrain writes byte-level BPE tokenizers only (Qwen, SmolLM, Llama 3); "
                        "export --format merged and convert with llama.cpp")
    vocab = tok.get_vocab()
    if len(vocab) > vocab_size:
        raise UserError(f"GGUF export: the tokenizer has {len(vocab)} tokens but the embedding only {vocab_size} rows")
    reverse = {i: t for t, i in vocab.items()}
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tok("a", add_special_tokens=True)["input_ids"]
    bare = tok("a", add_special_tokens=False)["input_ids"]
    add_bos = tok.bos_token_id is not None and len(probe) > len(bare) and probe[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(probe) > len(bare) and probe[-1] == tok.eos_token_id
    return {"tokens": tokens, "types": [int(t) for t in types], "merges": merges, "pre": pre_tokenizer_name(tok),
            "add_bos": add_bos, "add_eos": add_eos}


def _is_byte_level(spec: dict) -> bool:
    def has_bytelevel(node) -> bool:
        if not node:
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has_bytelevel(n) for n in node.get("pretokenizers", []) + node.get("decoders", []))

    return has_bytelevel(spec.get("pre_tokenizer")) or has_bytelevel(spec.get("decoder"))


def chat_template_of(tok) -> str | None:
    tpl = getattr(tok, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default") or next(iter(tpl.values()), None)
    return tpl


# --------------------------------------------------------------------------------------------------
# Writing


def _tensor_type(name: str, shape: tuple, outtype: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return Q.F32
    if outtype == "bf16":
        return Q.BF16
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def _convert(array: np.ndarray, qtype) -> np.ndarray:
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def gguf_tensors(model, arch: str, permute: bool):
    """Yield (gguf name, float32 numpy array producer) for every tensor the GGUF needs, in a stable order."""
    import gguf
    import torch

    config = model.config
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    out = []
    for hf_name, tensor in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is None:
            raise UserError(f"GGUF export: no GGUF name for tensor {hf_name!r} of a {arch} model")
        name = f"{gguf_base}.{suffix}"

        def load(t=tensor, hf_name=hf_name):
            a = t.detach().to(device="cpu", dtype=torch.float32).numpy()
            if permute and hf_name.endswith("self_attn.q_proj.weight"):
                a = llama_permute(a, n_head, n_head)
            elif permute and hf_name.endswith("self_attn.k_proj.weight"):
                a = llama_permute(a, n_head, n_kv)
            return a

        out.append((name, tuple(tensor.shape), load))
    return out


def write_gguf(model, tok, path: str | Path, outtype: str = "f16", *, name: str = "model",
               eos_token_id: int | None = None) -> Path:
    """Write ``model`` (a merged, unquantized transformers model) and ``tok`` to one GGUF file."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"GGUF outtype {outtype!r}; the gguf package writes {OUTTYPES} (q4_k_m goes through llama-quantize)")
    config = model.config
    arch, permute = gguf_arch(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    path = Path(path)
    w = gguf.GGUFWriter(path, arch)
    w.add_type("model")
    w.add_name(name)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    if outtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(int(config.num_attention_heads))
    w.add_head_count_kv(int(config.num_key_value_heads))
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_key_length(int(head_dim))
    w.add_value_length(int(head_dim))
    if arch == "llama":
        w.add_rope_dimension_count(int(head_dim))
        w.add_vocab_size(int(config.vocab_size))

    meta = tokenizer_metadata(tok, int(config.vocab_size))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    bos = tok.bos_token_id if tok.bos_token_id is not None else getattr(config, "bos_token_id", None)
    eos = eos_token_id if eos_token_id is not None else tok.eos_token_id
    if bos is not None:
        w.add_bos_token_id(int(bos))
    if eos is not None:
        w.add_eos_token_id(int(eos))
    if tok.unk_token_id is not None:
        w.add_unk_token_id(int(tok.unk_token_id))
    if tok.pad_token_id is not None:
        w.add_pad_token_id(int(tok.pad_token_id))
    w.add_add_bos_token(bool(meta["add_bos"]))
    w.add_add_eos_token(bool(meta["add_eos"]))
    template = chat_template_of(tok)
    if template:
        w.add_chat_template(template)

    # pass 1: tensor table (shapes and byte sizes), pass 2: data, one tensor at a time
    plan = []
    for gname, shape, load in gguf_tensors(model, arch, permute):
        qtype = _tensor_type(gname, shape, outtype)
        nbytes = _nbytes(shape, qtype)
        w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        plan.append((gname, load, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, load, qtype in plan:
        data = _convert(load(), qtype)
        w.write_tensor_data(data)
    w.close()
    return path


def _nbytes(shape: tuple, qtype) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * type_size
