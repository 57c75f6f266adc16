"""``posttrain dpo RECIPE [key=value ...] [--resume]``."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "dpo", help="direct preference optimization (DPO, IPO, SimPO) on preference pairs from a YAML recipe",
        description="Preference optimization from a YAML recipe: DPO (dpo.loss_type=sigmoid), IPO (ipo), SimPO "
                    "(simpo, reference-free) or rDPO (robust). Any key can be overridden as section.key=value, e.g.: "
                    "posttrain dpo tiny/dpo dpo.beta=0.2 output_dir=runs/try",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The run directory (output_dir) receives config.yaml, metrics.jsonl (TRL's rewards/* and logps/* "
               "names), checkpoints/, reference_logps.safetensors when the reference is precomputed, and the final "
               "adapter/ (LoRA, QLoRA) or model/ (full fine-tuning, lora=null).")
    p.add_argument("recipe", help="path to a recipe .yaml, or a shipped name like tiny/dpo (see posttrain recipes)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. dpo.beta=0.2 train.lr=5e-6")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in output_dir, with the run's recipe (and its "
                        "stored reference log-probabilities)")
    p.add_argument("--allow-changes", metavar="KEYS", action="append", default=[],
                   help="with --resume: accept these changed recipe keys or sections, comma-separated (e.g. "
                        "train.max_steps); config.yaml records them and the step they start at")
    p.set_defaults(func=run)


def run(args) -> int:
    from posttrain.config import load_recipe
    from posttrain.errors import UserError
    from posttrain.preference.dpo_config import DPORecipe

    cfg = load_recipe(args.recipe, args.overrides, DPORecipe)  # a bad recipe fails before the heavy imports
    from posttrain.preference.dpo import train
    allow = [k.strip() for item in args.allow_changes for k in item.split(",") if k.strip()]
    if allow and not args.resume:
        raise UserError("--allow-changes goes with --resume (it accepts changes to the recipe of the run resumed)")
    train(cfg, resume=args.resume, allow_changes=allow)
    return 0
