"""posttrain generate MODEL --input prompts.jsonl --output out.jsonl: batched, resumable generation."""

from __future__ import annotations

import argparse

from posttrain.commands.chat_cmd import add_sampling_args, sampling_from_args

EPILOG = """\
Each input line is a JSON object with "prompt" (a string, sent as a user message through the chat template;
--raw sends it as it is) or "messages" (a list of {role, content}). Other keys are copied to the output.
Each output line is the input line plus "index", "completion", "finish_reason" (stop | length) and
"completion_tokens", in input order.

Resumable: run the same command again and it continues after the last complete output line (every line's
sample comes from its own random stream keyed by --seed and the line's index, so a resumed file equals an
uninterrupted one). --overwrite starts over.

examples:
  posttrain generate runs/sft --input prompts.jsonl --output runs/sft/samples.jsonl
  posttrain generate smollm2-135m-instruct --input p.jsonl --output o.jsonl --preset greedy --batch-size 16
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate completions for a JSONL file of prompts (batched, resumable)",
                              description="Batched, resumable generation from a JSONL file.", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="run dir, adapter dir, model dir, hub id, .gguf or alias")
    p.add_argument("--adapter", help="PEFT adapter directory (or a run directory with adapter/) to put on MODEL")
    p.add_argument("--input", required=True, help="prompts, one JSON object per line")
    p.add_argument("--output", required=True, help="completions, one JSON object per line (appended on resume)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    p.add_argument("--raw", action="store_true", help="send \"prompt\" strings without the chat template")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the decoder's matmuls: auto is bfloat16 where the device computes it natively (a "
                        "CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), as in GRPO's rollouts; float32 for "
                        "float32 completions (default auto)")
    add_sampling_args(p)
    p.set_defaults(func=run, seed=0)


def run(args) -> int:
    from posttrain.errors import UserError
    from posttrain.inference import generate_file, load_for_inference

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    sampling = sampling_from_args(args)
    model, tok = load_for_inference(args.model, args.adapter, device=args.device, dtype=args.dtype,
                                    template=args.template)
    stats = generate_file(model, tok, args.input, args.output, sampling=sampling,
                          max_new_tokens=args.max_new_tokens or 512, batch_size=args.batch_size, system=args.system,
                          raw=args.raw, enable_thinking=args.enable_thinking, seed=args.seed or 0,
                          overwrite=args.overwrite, compute_dtype=args.compute_dtype)
    rate = stats["tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    print(f"[posttrain] {args.output}: {stats['generated']} generated, {stats['skipped']} already done, "
          f"{stats['tokens']} tokens in {stats['seconds']}s ({rate:.1f} tokens/s"
          + (f", {stats['compute_dtype']})" if stats["compute_dtype"] else ")"), flush=True)
    return 0
