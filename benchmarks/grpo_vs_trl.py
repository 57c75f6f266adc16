"""GRPO step time and peak memory: posttrain vs TRL's GRPOTrainer on the same work, in one run.

Setting (both systems): SmolLM2-135M-Instruct in fp32, LoRA r 16 / alpha 32 / dropout 0 on the seven linear
projections, 4 prompts x 4 generations, exactly 64 new tokens per completion (EOS cannot end a completion
early), temperature 1.0, beta 0 (no reference forward), one iteration, loss_type dapo, AdamW (torch), the same
two reward functions, the same synthetic prompts rendered with SmolLM2's chat template. posttrain trains the
16 completions in micro-batches of two groups (8) with gradient accumulation, a pure memory/speed choice: the
``dapo`` loss normalizes by the step's token count, so the update is the same as one batch of 16 (TRL's).

TRL runs three ways: its defaults (gradient checkpointing on, bf16 autocast on, as GRPOConfig sets them),
"tuned" as the issue measured it (gradient checkpointing off, fp32), and "best" (checkpointing off, bf16
autocast) for CPUs where bf16 is fast (AVX512-BF16 / AMX). posttrain runs with its defaults: float32 master
weights, ``compute_dtype: auto`` (bf16 autocast for the decoder layers on such CPUs, float32 head and
log-softmax; on CPU its frozen weights packed for oneDNN, the lean decode forward, float32 attention in
training and one fused autograd node per LoRA layer). Each system runs in its own subprocess, so peak RSS is its
own; each runs 1 warm-up step and ``--steps`` measured steps; ``--rounds 2`` runs the whole sequence twice and keeps each system's faster round
(the machine is shared and noisy; ratios hold better than absolute times).

Also printed: posttrain's rollout tokens/s beside plain ``model.generate`` on the same 16 x 64 tokens (sampling,
LoRA unmerged, as TRL generates), and beside the memory-bandwidth bound of decoding (every decode step reads
all weights once: rows x bandwidth / weight bytes), the bandwidth measured here with a large tensor copy.

    flock /tmp/posttrain-bench.lock python benchmarks/grpo_vs_trl.py [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from busy import busy_process

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_PROMPTS, G, NEW_TOKENS = 4, 4, 64


def model_dir() -> str:
    from posttrain.models import materialize_alias

    return str(materialize_alias("smollm2-135m-instruct"))


def prompts(n: int = 64) -> list[dict]:
    from posttrain.data.synthetic import problems

    return [{"prompt": [{"role": "user", "content": p["problem"]}], "answer": p["answer"]}
            for p in problems("train", n, "easy", seed=0)]


def _text(c) -> str:
    return c[0]["content"] if isinstance(c, list) else str(c)


def reward_number(prompts, completions, answer, **kwargs):
    """1.0 when the last number of the completion is the answer."""
    import re

    out = []
    for c, a in zip(completions, answer):
        nums = re.findall(r"-?\d+", _text(c))
        out.append(1.0 if nums and nums[-1] == str(a) else 0.0)
    return out


def reward_short(prompts, completions, **kwargs):
    """Prefer short answers: 1 - characters / 400."""
    return [max(0.0, 1.0 - len(_text(c)) / 400) for c in completions]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- posttrain


def run_posttrain(steps: int, out: Path) -> dict:
    import torch

    from posttrain.config import load_recipe
    from posttrain.grpo.loop import train
    from posttrain.grpo.config import GRPORecipe
    from posttrain.threads import apply

    apply()  # the thread count `posttrain grpo` would choose here (the free cores; POSTTRAIN_THREADS overrides)
    rows = prompts()
    for r in rows:
        r["problem"] = r.pop("prompt")[0]["content"]
    cfg = load_recipe(None, [
        f"model.name={model_dir()}", "data.path=unused", "data.columns={problem: problem, solution: null, answer: answer}",
        "data.template=tokenizer", "data.max_length=512", f"output_dir={out}", "lora.r=16", "lora.alpha=32",
        f"lora.target_modules=[{','.join(SEVEN)}]", f"train.batch_size={2 * G}", f"train.grad_accum={N_PROMPTS // 2}",
        "train.loss_chunk_size=256",
        f"train.max_steps={steps + 1}", "train.lr=1e-5", "train.warmup_steps=0", "train.scheduler=constant",
        f"grpo.num_generations={G}", f"grpo.max_completion_length={NEW_TOKENS}", "grpo.ignore_eos=true",
        "grpo.beta=0", "grpo.num_iterations=1", "grpo.loss_type=dapo", "grpo.temperature=1.0",
        "grpo.log_completions_every=0", "grpo.max_prompt_length=256"], cls=GRPORecipe)
    train(cfg, reward_funcs=[reward_number, reward_short], rows=rows)
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    res = {"step_time": sum(x["step_time"] for x in m) / len(m),
           "rollout_time": sum(x["rollout_time"] for x in m) / len(m),
           "train_time": sum(x["train_time"] for x in m) / len(m),
           "rollout_tokens_per_s": sum(x["tokens_per_s"] for x in m) / len(m),
           "steps": [x["step_time"] for x in m], "peak_rss_mb": peak_rss_mb()}
    res["generate_tokens_per_s"], res["bandwidth_gbs"], res["weight_mb"] = plain_generate_and_bandwidth()
    res["threads"] = torch.get_num_threads()
    return res


def plain_generate_and_bandwidth() -> tuple[float, float, float]:
    """tokens/s of model.generate (LoRA unmerged, sampling) on 16 x 64 tokens; memory bandwidth in GB/s."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    weight_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=SEVEN, task_type="CAUSAL_LM")).eval()
    texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in prompts()[:N_PROMPTS]]
    enc = tok([t for t in texts for _ in range(G)], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        model.generate(**enc, do_sample=True, max_new_tokens=4, min_new_tokens=4)  # warm-up
        t0 = time.perf_counter()
        model.generate(**enc, do_sample=True, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, top_k=0)
        gen_tps = N_PROMPTS * G * NEW_TOKENS / (time.perf_counter() - t0)
    x = torch.empty(256 * 2**20 // 4)  # 256 MB
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    bw = 5 * 2 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9  # read + write
    return gen_tps, bw, weight_mb


# ---------------------------------------------------------------------------------------------- TRL


def run_trl(steps: int, out: Path, tuned: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ds = Dataset.from_list(prompts())
    kw = {"tuned": {"gradient_checkpointing": False, "bf16": False},
          "best": {"gradient_checkpointing": False, "bf16": True}, "default": {}}[tuned]
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=N_PROMPTS * G, gradient_accumulation_steps=1,
                      num_generations=G, max_completion_length=NEW_TOKENS,
                      generation_kwargs={"min_new_tokens": NEW_TOKENS}, temperature=1.0, beta=0.0, num_iterations=1,
                      loss_type="dapo", learning_rate=1e-5, lr_scheduler_type="constant", optim="adamw_torch",
                      max_steps=steps + 1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                      seed=3407, dataloader_num_workers=0, **kw)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_number, reward_short], args=args, train_dataset=ds,
                          processing_class=tok,
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=SEVEN,
                                                 task_type="CAUSAL_LM"))
    times, gen_times = [], []
    inner = trainer._generate_and_score_completions

    def timed_generate(*a, **k):  # measurement only: how much of a step is generation + scoring
        t0 = time.perf_counter()
        r = inner(*a, **k)
        gen_times.append(time.perf_counter() - t0)
        return r

    trainer._generate_and_score_completions = timed_generate

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Timer())
    trainer.train()
    m = times[1:]
    g = gen_times[1:]
    return {"step_time": sum(m) / len(m), "rollout_time": sum(g) / len(g), "train_time": (sum(m) - sum(g)) / len(m),
            "steps": m, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
            "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16}


# ---------------------------------------------------------------------------------------------- driver


def child(system: str, steps: int, result: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if system == "posttrain":
            res = run_posttrain(steps, out)
        else:
            res = run_trl(steps, out, tuned=system.split("-", 1)[1])
    Path(result).write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2, help="measured steps per system (after 1 warm-up step)")
    ap.add_argument("--systems", default="posttrain,trl-default,trl-tuned,trl-best")
    ap.add_argument("--rounds", type=int, default=1, help="run the sequence this many times; keep each system's best")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--busy", action="store_true",
                    help="run every system beside one competing busy process (benchmarks/busy.py), as on a shared "
                         "machine")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, args.result)
        return
    results: dict = {}
    with busy_process(args.busy):
        run_rounds(args, results)
    if args.busy:
        print("\nBeside one busy process (benchmarks/busy.py):")
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def run_rounds(args, results: dict) -> None:
    for round_ in range(args.rounds):
        for system in args.systems.split(","):
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                result = f.name
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", system, "--steps", str(args.steps),
                                   "--result", result], env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{system} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", file=sys.stderr)
                continue
            res = json.loads(Path(result).read_text())
            res["all_rounds"] = results.get(system, {}).get("all_rounds", []) + [res["step_time"]]
            if system not in results or res["step_time"] < results[system]["step_time"]:
                results[system] = res
            results[system]["all_rounds"] = res["all_rounds"]
            print(f"[bench] round {round_ + 1} {system}: {res['step_time']:.1f} s/step, peak RSS "
                  f"{res['peak_rss_mb']:.0f} MB ({time.perf_counter() - t0:.0f} s total)", flush=True)


def report(r: dict) -> None:
    print(f"\nGRPO step, SmolLM2-135M-Instruct (float32 weights), LoRA r16 (7 projections), {N_PROMPTS} prompts x {G} "
          f"generations x {NEW_TOKENS} new tokens, beta 0, 1 iteration; CPU threads "
          f"{r.get('posttrain', {}).get('threads', '?')}\n")
    print("| system | step time (s) | generation + rewards (s) | loss + update (s) | peak RSS (MB) | rounds (s/step) |")
    print("|---|---:|---:|---:|---:|---|")
    names = {"posttrain": "posttrain (compute_dtype auto)",
             "trl-default": "TRL GRPOTrainer, defaults (grad. checkpointing, bf16 autocast)",
             "trl-tuned": "TRL GRPOTrainer, tuned as in the issue (no checkpointing, fp32)",
             "trl-best": "TRL GRPOTrainer, best here (no checkpointing, bf16 autocast)"}
    for k in ("posttrain", "trl-default", "trl-tuned", "trl-best"):
        if k in r:
            x = r[k]
            rounds = ", ".join(f"{v:.1f}" for v in x.get("all_rounds", [x["step_time"]]))
            print(f"| {names[k]} | {x['step_time']:.1f} | {x['rollout_time']:.1f} | {x['train_time']:.1f} | "
                  f"{x['peak_rss_mb']:.0f} | {rounds} |")
    p = r.get("posttrain")
    if p:
        print()
        for k, target in (("trl-default", 0.3), ("trl-tuned", 0.6), ("trl-best", None)):
            if k in r:
                ratio = p["step_time"] / r[k]["step_time"]
                mem = p["peak_rss_mb"] <= r[k]["peak_rss_mb"]
                goal = f" (target <= {target}x: {'met' if ratio <= target else 'MISSED'})" if target else ""
                print(f"posttrain / {k}: step time {ratio:.2f}x{goal}, peak RSS "
                      f"{p['peak_rss_mb'] / r[k]['peak_rss_mb']:.2f}x ({'met' if mem else 'MISSED'} <= 1x)")
        rows = N_PROMPTS * G
        bound = rows * p["bandwidth_gbs"] * 1e9 / (p["weight_mb"] * 2**20)
        print(f"\nrollout tokens/s: posttrain {p['rollout_tokens_per_s']:.0f} | plain model.generate (LoRA unmerged) "
              f"{p['generate_tokens_per_s']:.0f} | memory-bandwidth bound {bound:.0f} ({rows} rows x "
              f"{p['bandwidth_gbs']:.1f} GB/s / {p['weight_mb']:.0f} MB of weights per decode step)")


if __name__ == "__main__":
    main()
