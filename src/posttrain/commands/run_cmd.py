"""``posttrain run PIPELINE.yaml [--out DIR]``: run the stages of a pipeline file in order."""

from __future__ import annotations

import argparse

EPILOG = """\
A pipeline file lists stages that run in order, each taking the previous stage's model:
  output_dir: runs/my-pipeline          # the run directory (--out overrides it)
  model: smollm2-135m-instruct          # optional: the base model of every stage (model.name=...)
  stages:
    - {name: eval_base, command: eval, benchmark: synthetic, limit: 100, prompt: reasoning}
    - {name: sft, recipe: tiny/quickstart_sft, overrides: [train.max_steps=24]}
    - {name: grpo, recipe: tiny/quickstart_grpo}                   # starts from the sft adapter
    - {name: eval_grpo, command: eval, benchmark: synthetic, limit: 100, prompt: reasoning}
    - {name: export, format: merged}                               # adapter | merged | gguf (quant:, dtype:)
command defaults to the name (sft, grpo, eval, export). eval stages take the options of `posttrain eval`
(benchmark, limit, difficulty, prompt, template, max_new_tokens, batch_size, samples, temperature, ...).

Each stage writes RUN/<name>/ and, last, RUN/<name>/DONE. Running again skips finished stages, resumes an
interrupted sft/grpo stage from its latest checkpoint and an interrupted eval from its samples.jsonl.
At the end RUN/report.md (tables) and RUN/plots/*.png are written from the stages' metrics.
"""


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run a pipeline file (sft, grpo, eval, export stages) with a report at the end",
                       description="Run the stages of a pipeline file in order; rerun to continue it.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", help="a pipeline: the path to a .yaml, or a shipped name like pipelines/quickstart")
    p.add_argument("--out", metavar="DIR", help="run directory (default: the file's output_dir)")
    p.set_defaults(func=run)


def run(args) -> int:
    from posttrain.pipeline import run_pipeline

    run_pipeline(args.pipeline, out=args.out)
    return 0
