"""Evaluation on math benchmarks: benchmark loading, prompts and published protocols, batched generation, answer
verification, pass@k / maj@k metrics with intervals, published reference numbers, and comparison tables.

    from posttrain.evaluation import EvalConfig, evaluate, load_benchmark
    bench = load_benchmark("math500")                      # or "path/to/file.jsonl", or data_file=...
    metrics = evaluate(model, tokenizer, bench, EvalConfig(prompt="boxed"), out_dir="runs/x/eval/math500")
    metrics["accuracy"], metrics["ci95"], metrics["format_rate"], metrics["truncation_rate"]
    evaluate(model, tokenizer, load_benchmark("gsm8k"), EvalConfig(protocol="gsm8k-8shot"))  # DeepSeekMath-Base's
"""

from posttrain.config import EvalConfig
from posttrain.evaluation.benchmarks import NAMES as BENCHMARKS
from posttrain.evaluation.benchmarks import Benchmark, Problem, is_dapo_heldout, load_benchmark
from posttrain.evaluation.metrics import k_curves, maj_at_k, pass_at_k, summarize, wilson_interval
from posttrain.evaluation.protocols import PROTOCOLS
from posttrain.evaluation.references import REFERENCES, reference_table
from posttrain.evaluation.runner import evaluate

__all__ = [
    "BENCHMARKS", "Benchmark", "EvalConfig", "PROTOCOLS", "Problem", "REFERENCES", "evaluate", "is_dapo_heldout",
    "k_curves", "load_benchmark", "maj_at_k", "pass_at_k", "reference_table", "summarize", "wilson_interval",
]
