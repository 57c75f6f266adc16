"""``posttrain grpo RECIPE [key=value ...] [--resume]``."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "grpo", help="GRPO: reinforcement learning from verifiable rewards, from a YAML recipe",
        description="GRPO from a YAML recipe: sample grpo.num_generations completions per prompt, score them with "
                    "the rewards, and train on group-relative advantages. Any key can be overridden as "
                    "section.key=value, e.g.: posttrain grpo tiny/grpo train.max_steps=2 "
                    "grpo.num_generations=4 output_dir=runs/try",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Batch: train.batch_size x train.grad_accum completions per step and process, a multiple of "
               "grpo.num_generations.\n"
               "The run directory (output_dir) receives config.yaml, metrics.jsonl (reward, reward_std, "
               "rewards/<name>/mean, frac_reward_zero_std, completions/*, kl, entropy, clip_ratio/*, step_time, "
               "tokens_per_s), completions.jsonl (sample completions with their rewards), checkpoints/ and the "
               "final adapter/ (or model/ with lora=null).\n"
               "Start from an SFT adapter with init_adapter=runs/sft/adapter.\n"
               "Run under `accelerate launch -m posttrain.cli grpo ...` for several processes (prompts are "
               "sharded, each group stays on one process).")
    p.add_argument("recipe", help="path to a recipe .yaml, or a shipped name like tiny/grpo (see posttrain recipes)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides, e.g. grpo.beta=0.04 grpo.loss_type=grpo train.lr=1e-5")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in output_dir, with the run's recipe")
    p.add_argument("--allow-changes", metavar="KEYS", action="append", default=[],
                   help="with --resume: accept these changed recipe keys or sections, comma-separated (e.g. "
                        "train.max_steps,data); config.yaml records them and the step they start at")
    p.set_defaults(func=run)


def run(args) -> int:
    from posttrain.config import load_recipe
    from posttrain.grpo.config import GRPORecipe

    cfg = load_recipe(args.recipe, args.overrides, GRPORecipe)  # a bad recipe fails before the heavy imports
    from posttrain.grpo.loop import train
    allow = [k.strip() for item in args.allow_changes for k in item.split(",") if k.strip()]
    if allow and not args.resume:
        from posttrain.errors import UserError

        raise UserError("--allow-changes goes with --resume (it accepts changes to the recipe of the run resumed)")
    train(cfg, resume=args.resume, allow_changes=allow)
    return 0
