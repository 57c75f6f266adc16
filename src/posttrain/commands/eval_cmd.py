"""``posttrain eval --model M [--adapter A] --benchmark NAME|FILE [--out DIR]``: accuracy on math benchmarks."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

EPILOG = """\
benchmarks: gsm8k math500 aime24 aime25 amc23 minerva dapo synthetic, or a path to a .jsonl/.json/.parquet file
(its name picks the schema: gsm8k.jsonl, math500.jsonl, ...; other files need 'problem' and 'answer' fields).
Named benchmarks load from the Hugging Face hub; offline, give --data-file FILE (one benchmark) or
--benchmark-dir DIR (holding NAME.jsonl files).

prompt styles (--prompt):
  boxed      the model's chat template, asking to reason step by step and put the answer in \\boxed{}  [default]
  reasoning  the seeds' GRPO template (<start_working_out> ... <SOLUTION>answer</SOLUTION>), stops on </SOLUTION>
  chat       the model's chat template with the bare problem; the answer is found automatically

outputs: with one model and one benchmark, --out DIR receives metrics.json, samples.jsonl, eval_config.json;
with several, DIR/<model>/<benchmark>/ each, plus DIR/comparison.md. A rerun with the same --out resumes.

examples:
  posttrain eval --model smollm2-135m-instruct --benchmark gsm8k --data-file gsm8k.jsonl --limit 50
  posttrain eval --model Qwen/Qwen3-4B-Base --adapter runs/sft --adapter runs/grpo --adapter none \\
      --benchmark math500 --prompt reasoning --max-new-tokens 2048 --out runs/compare
  posttrain eval --model runs/sft/model --benchmark aime24 --samples 16 --k 1 4 16 --temperature 0.6
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate models on math benchmarks (accuracy with 95%% CI, pass@k, maj@k, format rate)",
        description="Evaluate one or more models (optionally with LoRA adapters) on math benchmarks: greedy pass@1 "
                    "by default, or n sampled completions per problem for the unbiased pass@k and maj@k.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--model", action="append", required=True, metavar="M",
                   help="hub id, local directory, .gguf file or alias (smollm2-135m-instruct); repeat to compare")
    g.add_argument("--adapter", action="append", metavar="A",
                   help="LoRA adapter directory (or a run directory with adapter/); 'none' for the bare model. "
                        "One per --model, or several for a single --model")
    g.add_argument("--label", action="append", metavar="NAME", help="names for the table, one per evaluated model")
    g.add_argument("--benchmark", action="append", required=True, metavar="NAME|FILE",
                   help="benchmark name or file; repeat for several")
    g.add_argument("--data-file", metavar="FILE", help="local copy of the (single) named benchmark")
    g.add_argument("--benchmark-dir", metavar="DIR", help="directory with local copies named NAME.jsonl")
    g.add_argument("--limit", type=int, metavar="N", help="evaluate the first N problems (a random N with --limit-seed)")
    g.add_argument("--limit-seed", type=int, metavar="S", help="take a seeded random subset of --limit problems")
    g.add_argument("--difficulty", default="easy", help="synthetic benchmark level: easy, medium, hard, mixed")
    g.add_argument("--out", metavar="DIR", help="output directory (default runs/eval/<model>/<benchmark>)")

    g = p.add_argument_group("prompting and decoding")
    g.add_argument("--prompt", default="boxed", choices=["boxed", "reasoning", "chat"], help="prompt style")
    g.add_argument("--template", choices=["tokenizer", "chatml", "qwen3", "reasoning"],
                   help="chat template (default: reasoning for --prompt reasoning, else the model's own)")
    g.add_argument("--system-prompt", help="system prompt (for reasoning: replaces the seeds' one)")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="completion budget (default 1024)")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (default 16)")
    g.add_argument("--samples", type=int, default=1, help="completions per problem (default 1: greedy)")
    g.add_argument("--k", type=int, nargs="+", help="k for pass@k and maj@k (default 1, 2, 4, ... up to --samples)")
    g.add_argument("--temperature", type=float,
                   help="sampling temperature (default 0 = greedy for one sample, 0.6 for several)")
    g.add_argument("--top-p", type=float, help="nucleus sampling (default 1.0, or 0.95 for several samples)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0: off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--last-number", action="store_true",
                   help="score the last number when the answer is missing (still counted as a format failure)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers generate; vllm: vLLM (pip install 'posttrain[vllm]', CUDA only; an adapter "
                        "is served with LoRARequest). See docs/scale-out.md")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="vllm: its share of GPU memory")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _pairs(args) -> list[tuple[str, str | None]]:
    from posttrain.errors import UserError

    models, adapters = args.model, args.adapter or []
    adapters = [None if a in ("none", "-", "") else a for a in adapters]
    if not adapters:
        return [(m, None) for m in models]
    if len(adapters) == len(models):
        return list(zip(models, adapters))
    if len(models) == 1:
        return [(models[0], a) for a in adapters]
    raise UserError(f"{len(models)} --model and {len(adapters)} --adapter: give one adapter per model "
                    "('none' for a bare model), or several adapters for a single model")


def _label(model: str, adapter: str | None) -> str:
    def short(path: str) -> str:
        p = Path(path.rstrip("/"))
        name = p.parent.name if p.name in ("adapter", "model", "final") and p.parent.name else p.name
        return name or path
    base = short(model)
    return f"{base}+{short(adapter)}" if adapter else base


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "model"


def resolve_adapter(path: str) -> Path:
    from posttrain.errors import UserError

    p = Path(path)
    for cand in (p, p / "adapter"):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise UserError(f"--adapter {path}: no adapter_config.json there or in {p / 'adapter'}; give the adapter "
                    "directory saved by posttrain sft/grpo (a full fine-tune is a --model instead)")


def load_for_eval(model_name: str, adapter: str | None, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) ready for generation; a LoRA adapter is merged, and its saved tokenizer (with the
    chat template training used) replaces the base one."""
    from posttrain.config import ModelConfig
    from posttrain.models import load_model, load_tokenizer

    model, tok = load_model(ModelConfig(name=model_name, device=device, dtype=dtype), None, for_training=False)
    if adapter:
        from peft import PeftModel

        path = resolve_adapter(adapter)
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        model.eval()
        if (path / "tokenizer_config.json").is_file():
            tok = load_tokenizer(str(path))
    return model, tok


def run(args) -> int:
    import gc
    import json

    from posttrain.errors import UserError
    from posttrain.evaluation import EvalSettings, evaluate, load_benchmark
    from posttrain.evaluation.report import comparison_table, group_table, metrics_line

    pairs = _pairs(args)
    labels = args.label or [_label(m, a) for m, a in pairs]
    if len(labels) != len(pairs):
        raise UserError(f"{len(labels)} --label for {len(pairs)} evaluated models")
    if len(set(labels)) != len(labels):
        raise UserError(f"evaluated models need distinct names, got {labels}: pass --label for each")
    if args.data_file and len(args.benchmark) > 1:
        raise UserError("--data-file is the local copy of one benchmark; with several use --benchmark-dir")
    n = args.samples
    temperature = args.temperature if args.temperature is not None else (0.0 if n == 1 else 0.6)
    top_p = args.top_p if args.top_p is not None else (1.0 if n == 1 else 0.95)
    ks = tuple(args.k) if args.k else tuple(sorted({*(2 ** i for i in range(n.bit_length()) if 2 ** i <= n), n}))
    settings = EvalSettings(prompt_style=args.prompt, template=args.template, system_prompt=args.system_prompt,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, n_samples=n,
                            temperature=temperature, top_p=top_p, top_k=args.top_k, ks=ks, seed=args.seed,
                            last_number=args.last_number)
    settings.check()
    benches = [load_benchmark(b, data_file=args.data_file, benchmark_dir=args.benchmark_dir, limit=args.limit,
                              limit_seed=args.limit_seed, difficulty=args.difficulty) for b in args.benchmark]
    single = len(pairs) == 1 and len(benches) == 1
    root = Path(args.out) if args.out else Path("runs/eval")

    results = []
    for (model_name, adapter), label in zip(pairs, labels):
        generate_fn = None
        if getattr(args, "backend", "hf") == "vllm":
            from posttrain.config import ModelConfig
            from posttrain.models import load_tokenizer, resolve_source
            from posttrain.rollout.vllm import VLLMEvalGenerator

            source, _ = resolve_source(ModelConfig(name=model_name))
            path = resolve_adapter(adapter) if adapter else None
            model = VLLMEvalGenerator(source, str(path) if path else None, dtype=args.dtype,
                                      gpu_memory_utilization=args.gpu_memory_utilization)
            tok = load_tokenizer(str(path) if path and (path / "tokenizer_config.json").is_file() else source)
            generate_fn = model.generate
        else:
            model, tok = load_for_eval(model_name, adapter, args.device, args.dtype)
        model_id = model_name + (f" + {adapter}" if adapter else "")
        for bench in benches:
            out = root if single and args.out else root / _slug(label) / bench.name
            print(f"[posttrain] {label} on {bench.name} ({len(bench)} problems from {bench.source}) -> {out}")
            m = evaluate(model, tok, bench, settings, out_dir=out, model_id=model_id, progress=not args.no_progress,
                         generate_fn=generate_fn)
            print(f"[posttrain] {label}: " + metrics_line(m))
            for field in ("subject", "level"):
                if field in m.get("by", {}):
                    print(group_table(m, field))
            results.append((label, m))
        del model
        gc.collect()
    table = comparison_table(results)
    print(table)
    if not single:
        root.mkdir(parents=True, exist_ok=True)
        (root / "comparison.md").write_text(table + "\n")
        (root / "comparison.json").write_text(json.dumps(
            [{"label": label, **{k: v for k, v in m.items() if k != "by"}} for label, m in results], indent=2) + "\n")
    return 0
