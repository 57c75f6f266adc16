"""posttrain export SOURCE --format adapter|merged|gguf [--quant ...] --out DIR"""

from __future__ import annotations

import argparse

EPILOG = """\
SOURCE is a run directory (config.yaml + adapter/ or model/), an adapter directory (adapter_config.json),
or a model (hub id, local directory, .gguf file, alias).

formats:
  adapter   the PEFT adapter + tokenizer/chat template, loadable by PeftModel.from_pretrained and vLLM
  merged    LoRA merged into 16-bit safetensors (a 4-bit base is dequantized first), tokenizer, chat template,
            generation_config.json whose eos_token_id stops generation
  gguf      llama / qwen2 / qwen3 GGUF with tokenizer and chat template inside, plus an Ollama Modelfile;
            --quant f16 | bf16 | q8_0 need nothing else; q4_k_m needs llama.cpp's llama-quantize

A reward model (posttrain rm) exports as adapter (with its head) or merged (a one-label sequence classifier
for AutoModelForSequenceClassification); gguf is refused for it (llama.cpp serves causal LMs).

Each export is loaded back and compared with its source before it is kept (--no-verify skips this).
The output appears only when complete; an existing --out is refused unless --overwrite.

examples:
  posttrain export runs/sft --format merged --out runs/sft/export/merged
  posttrain export runs/sft --format gguf --quant q8_0 --out runs/sft/export/gguf
  posttrain export runs/sft/adapter --base Qwen/Qwen3-4B-Base --format adapter --out lora
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export an adapter, merged 16-bit weights, or GGUF (+ Ollama Modelfile)",
                              description="Export a trained model and prove it by loading it back.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="run directory, adapter directory, or model")
    p.add_argument("--format", required=True, choices=["adapter", "merged", "gguf"], help="what to write")
    p.add_argument("--out", required=True, help="output directory (created; must not exist unless --overwrite)")
    p.add_argument("--quant", default="q8_0", choices=["f16", "bf16", "q8_0", "q4_k_m"],
                   help="GGUF tensor type (default q8_0, as Unsloth's save_pretrained_gguf)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the merged weights (merged, and the weights a GGUF is encoded from; default bfloat16)")
    p.add_argument("--base", help="base model for an adapter (overrides adapter_config.json / the run's config.yaml)")
    p.add_argument("--name", help="model name used for the GGUF file name (default: from SOURCE)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the round-trip check (saves a reload; for models too large to load twice)")
    p.add_argument("--device", default="auto", help="device to merge on: auto, cpu, cuda (default auto)")
    p.add_argument("--llama-quantize", metavar="PATH", help="llama-quantize program for q4_k_m (default: on the PATH)")
    p.set_defaults(func=run)


def run(args) -> int:
    from posttrain.export import export

    export(args.source, args.format, args.out, quant=args.quant, dtype=args.dtype, base=args.base,
           overwrite=args.overwrite, verify=args.verify, device=args.device, llama_quantize=args.llama_quantize,
           name=args.name)
    return 0
