"""``posttrain rm RECIPE [key=value ...] [--resume]`` and ``posttrain eval-rm MODEL --data FILE``."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "rm", help="train a Bradley-Terry reward model on preference pairs (full, LoRA, QLoRA)",
        description="Train an outcome reward model (a causal LM with a scalar head) on preference pairs from a YAML "
                    "recipe. Any key can be overridden as section.key=value, e.g.: posttrain rm tiny/rm "
                    "train.max_steps=2 output_dir=runs/try",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The run directory (output_dir) receives config.yaml, metrics.jsonl, checkpoints/ and the final "
               "adapter/ (LoRA, QLoRA: a PEFT SEQ_CLS adapter holding the head) or model/ (full fine-tuning: loads "
               "with AutoModelForSequenceClassification). Use it as a GRPO reward: rewards: [{name: reward_model, "
               "model: RUN}]; measure it: posttrain eval-rm RUN --data FILE.")
    p.add_argument("recipe", help="path to a recipe .yaml, or a shipped name like tiny/rm (see posttrain recipes)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. train.lr=1e-4 lora.r=8")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in output_dir, with the run's recipe")
    p.add_argument("--allow-changes", metavar="KEYS", action="append", default=[],
                   help="with --resume: accept these changed recipe keys or sections, comma-separated")
    p.set_defaults(func=run)

    e = sub.add_parser(
        "eval-rm", help="pairwise accuracy of a reward model on held-out preference pairs, with a 95%% interval",
        description="Score the chosen and the rejected answer of every pair and report the share of pairs ranked "
                    "right (ties count as wrong) with its 95% Wilson interval, TRL's reward metrics and the pairs "
                    "dropped from the data.")
    e.add_argument("model", help="a posttrain rm run directory, an adapter or model directory, or a hub id")
    e.add_argument("--data", required=True, help="preference pairs: a .jsonl/.json/.parquet/.csv file, a hub "
                                                 "dataset, or module:function (columns prompt, chosen, rejected)")
    e.add_argument("--split", default="train", help="hub dataset split (default: train)")
    e.add_argument("--max-length", type=int, default=4096, help="pairs with a longer side are dropped and counted "
                                                               "(default: 4096 tokens)")
    e.add_argument("--template", choices=["tokenizer", "chatml", "qwen3", "reasoning"], default="tokenizer",
                   help="chat template for pairs in messages form (default: the reward model's own)")
    e.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default: 16)")
    e.add_argument("--base", help="the base model of an adapter, when its run directory does not name it")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    e.add_argument("--out", help="also write the metrics to this JSON file")
    e.set_defaults(func=run_eval)


def run(args) -> int:
    from posttrain.config import load_recipe
    from posttrain.errors import UserError
    from posttrain.preference.config import RMRecipe

    cfg = load_recipe(args.recipe, args.overrides, RMRecipe)  # a bad recipe fails before the heavy imports
    from posttrain.preference.rm import train
    allow = [k.strip() for item in args.allow_changes for k in item.split(",") if k.strip()]
    if allow and not args.resume:
        raise UserError("--allow-changes goes with --resume (it accepts changes to the recipe of the run resumed)")
    train(cfg, resume=args.resume, allow_changes=allow)
    return 0


def run_eval(args) -> int:
    import json
    from pathlib import Path

    from posttrain.config import validate
    from posttrain.errors import UserError
    from posttrain.preference.config import PreferenceDataConfig
    from posttrain.preference.rm import evaluate

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: give a whole number >= 1")
    data = validate(PreferenceDataConfig, {"path": args.data, "split": args.split, "max_length": args.max_length},
                    "eval-rm options (--data, --split, --max-length)")
    m = evaluate(args.model, data, base=args.base, device=args.device, batch_size=args.batch_size,
                 template=args.template)
    dropped = ", ".join(f"{n} {k}" for k, n in m["dropped"].items() if n) or "none"
    print(f"pairwise accuracy {m['accuracy']:.3f} (95% CI {m['accuracy_ci95_low']:.3f}-{m['accuracy_ci95_high']:.3f})"
          f" on {m['pairs']} pairs of {args.data} (dropped: {dropped}); margin {m['margin']:.3f}, loss {m['loss']:.4f},"
          f" rewards {m['min_reward']:.3f} .. {m['mean_reward']:.3f} .. {m['max_reward']:.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(m, indent=2) + "\n")
    return 0
