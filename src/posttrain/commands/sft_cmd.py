"""``posttrain sft RECIPE [key=value ...] [--resume]``."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sft", help="supervised fine-tuning (full, LoRA, QLoRA) from a YAML recipe",
        description="Supervised fine-tuning from a YAML recipe. Any key can be overridden as section.key=value, "
                    "e.g.: posttrain sft tiny/sft train.max_steps=2 output_dir=runs/try",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The run directory (output_dir) receives config.yaml, metrics.jsonl, checkpoints/ and the final "
               "adapter/ (LoRA, QLoRA) or model/ (full fine-tuning, lora=null).\n"
               "Run under `accelerate launch -m posttrain.cli sft ...` for several processes (DDP).")
    p.add_argument("recipe", help="path to a recipe .yaml, or a shipped name like tiny/sft (see posttrain recipes)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.lr=1e-4 lora.r=8")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in output_dir, with the run's recipe")
    p.add_argument("--allow-changes", metavar="KEYS", action="append", default=[],
                   help="with --resume: accept these changed recipe keys or sections, comma-separated (e.g. "
                        "train.max_steps,data); config.yaml records them and the step they start at")
    p.set_defaults(func=run)


def run(args) -> int:
    from posttrain.config import SFTRecipe, load_recipe

    cfg = load_recipe(args.recipe, args.overrides, SFTRecipe)  # a bad recipe fails before the heavy imports
    from posttrain.sft import train
    allow = [k.strip() for item in args.allow_changes for k in item.split(",") if k.strip()]
    if allow and not args.resume:
        from posttrain.errors import UserError

        raise UserError("--allow-changes goes with --resume (it accepts changes to the recipe of the run resumed)")
    train(cfg, resume=args.resume, allow_changes=allow)
    return 0
