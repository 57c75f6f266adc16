"""``posttrain quickstart [--out DIR] [--fast]``: the shipped pipeline pipelines/quickstart (package data, so a
wheel install runs it too)."""

from __future__ import annotations

import argparse
from pathlib import Path

from posttrain import recipes

# --fast: a smoke run of every stage (a minute or two), not a result
FAST = {
    "eval_base": {"limit": 8}, "eval_sft": {"limit": 8}, "eval_grpo": {"limit": 8},
    "sample_sft": {"limit": 4}, "sample_grpo": {"limit": 4},
    "sft": {"overrides": ["train.max_steps=2", "train.eval_every=0", "train.save_every=0"]},
    "grpo": {"overrides": ["train.max_steps=1", "train.save_every=0", "grpo.log_completions_every=0"]},
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quickstart", help="SmolLM2-135M on synthetic arithmetic: eval, SFT, eval, GRPO, eval, export, report",
        description="The shipped pipeline pipelines/quickstart (`posttrain recipes pipelines/quickstart` prints its "
                    "path): evaluate SmolLM2-135M-Instruct on held-out synthetic arithmetic, SFT it on the reasoning "
                    "format, GRPO it with the verifier's rewards, evaluate after each stage, export merged weights "
                    "and write report.md. About 6 minutes on a 2-core CPU; rerun to continue an interrupted run.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/quickstart, runs/quickstart-fast with --fast)")
    p.add_argument("--fast", action="store_true", help="a smoke run: 2 SFT steps, 1 GRPO step, 8 eval problems "
                                                         "(4 for the sampled evals)")
    p.set_defaults(func=run)


def run(args) -> int:
    from posttrain.pipeline import run_pipeline

    path = recipes.ROOT / "pipelines" / "quickstart.yaml"
    out = Path(args.out or ("runs/quickstart-fast" if args.fast else "runs/quickstart"))
    run_pipeline(path, out=out, extra=FAST if args.fast else None)
    print(f"[posttrain] quickstart done\n  report: {out / 'report.md'}\n  model:  {out / 'export' / 'merged'}"
          f" (merged weights; the LoRA adapter is {out / 'grpo' / 'adapter'})")
    return 0
