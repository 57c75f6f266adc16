"""posttrain chat MODEL [--adapter A]: an interactive, streaming chat in the terminal."""

from __future__ import annotations

import argparse

EPILOG = """\
MODEL is a run directory, an adapter directory, a model directory, a hub id, a .gguf file or an alias
(smollm2-135m-instruct); --adapter puts a PEFT adapter on MODEL.

In the chat: /reset forgets the conversation, /system TEXT sets the system prompt (and resets),
/exit or Ctrl-D leaves, Ctrl-C stops a reply.

sampling presets (Qwen's recommendations): instruct = temperature 0.7, top-p 0.8, top-k 20;
thinking = 0.6, 0.95, 20; greedy = temperature 0. The default is thinking with --template reasoning or
--think, instruct otherwise; --temperature/--top-p/--top-k/--min-p override single values.

examples:
  posttrain chat runs/sft
  posttrain chat smollm2-135m-instruct --preset greedy
  posttrain chat Qwen/Qwen3-4B-Base --adapter runs/grpo/adapter --template reasoning
"""


def add_sampling_args(p) -> None:
    p.add_argument("--template", default="tokenizer", choices=["tokenizer", "reasoning", "chatml", "qwen3"],
                   help="chat template: the tokenizer's own (default) or a posttrain built-in")
    p.add_argument("--preset", choices=["instruct", "thinking", "greedy"],
                   help="sampling preset (default: thinking for --template reasoning / --think, else instruct)")
    p.add_argument("--temperature", type=float, help="overrides the preset (0 = greedy)")
    p.add_argument("--top-p", type=float, help="overrides the preset")
    p.add_argument("--top-k", type=int, help="overrides the preset (0 = off)")
    p.add_argument("--min-p", type=float, help="overrides the preset")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per reply")
    think = p.add_mutually_exclusive_group()
    think.add_argument("--think", dest="enable_thinking", action="store_true", default=None,
                       help="Qwen3 templates: thinking mode on (enable_thinking=True)")
    think.add_argument("--no-think", dest="enable_thinking", action="store_false",
                       help="Qwen3 templates: thinking mode off (enable_thinking=False)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def sampling_from_args(args) -> dict:
    from posttrain.inference import sampling_settings

    preset = args.preset or ("thinking" if args.template == "reasoning" or args.enable_thinking else "instruct")
    return sampling_settings(preset, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             min_p=args.min_p)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal (streaming)",
                              description="Interactive, streaming chat with a trained model.", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="run dir, adapter dir, model dir, hub id, .gguf or alias")
    p.add_argument("--adapter", help="PEFT adapter directory (or a run directory with adapter/) to put on MODEL")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from posttrain.inference import ChatSession, chat_loop, load_for_inference

    sampling = sampling_from_args(args)
    model, tok = load_for_inference(args.model, args.adapter, device=args.device, dtype=args.dtype,
                                    template=args.template)
    shown = ", ".join(f"{k} {v}" for k, v in sampling.items())
    print(f"[posttrain] chat template: {args.template}; sampling: {shown}", flush=True)
    session = ChatSession(model, tok, sampling, max_new_tokens=args.max_new_tokens or 1024, system=args.system,
                          enable_thinking=args.enable_thinking, seed=args.seed)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    return chat_loop(session)
