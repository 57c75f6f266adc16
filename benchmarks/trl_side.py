"""What the side-by-side benchmarks (sft_vs_trl, dpo_vs_trl, rm_vs_trl) share on TRL's side and for their loss
checks: a seeded starting adapter, a TRL trainer's run timed step by step with the tokens of each batch, and each
system run in its own subprocess (its own peak RSS) that reports one ``RESULT {json}`` line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_init_adapter(out: Path, seed: int) -> None:
    """The loss checks' shared starting point: a seeded LoRA r 16 adapter on the seven projections, saved once."""
    import torch
    from peft import LoraConfig, get_peft_model

    from posttrain.config import ModelConfig
    from posttrain.models import load_model

    model, _ = load_model(ModelConfig(name="smollm2-135m-instruct"), None, for_training=False, verbose=False)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=SEVEN))
    peft.save_pretrained(str(out))


@dataclass
class TimedRun:
    times: list[float] = field(default_factory=list)             # seconds of each optimizer step
    tokens_per_batch: list[int] = field(default_factory=list)    # non-padding tokens of each collated batch
    logs: list[dict] = field(default_factory=list)               # the trainer's logs that carry a loss

    def measured(self, key: str) -> float:
        """``times`` or ``tokens_per_batch`` summed over every step but the first (a warm-up)."""
        values = self.times if key == "seconds" else self.tokens_per_batch
        return sum(values[i] for i in range(1, len(self.times)))


def train_timed(trainer) -> TimedRun:
    """``trainer.train()`` with each step timed and each batch's tokens counted (its attention mask, else all)."""
    from transformers import TrainerCallback

    run = TimedRun()
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        run.tokens_per_batch.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch
                                    else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            run.times.append(time.perf_counter() - self.t)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                run.logs.append(dict(logs))

    trainer.add_callback(Timer())
    trainer.train()
    return run


def run_in_subprocess(script: str, system: str, args: list[str]) -> dict | None:
    """Run ``script --worker SYSTEM ARGS`` in a subprocess and return its ``RESULT`` dict plus ``wall_s``; None (with
    the worker's output on stderr) when it printed none."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--worker", system, *args], check=False, capture_output=True,
                          text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"{system} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", file=sys.stderr)
        return None
    res = json.loads(line[7:])
    res["wall_s"] = time.perf_counter() - t0
    print(f"[bench] {system}: {res}", file=sys.stderr, flush=True)
    return res


def best_of_rounds(systems: list[str], rounds: int, run) -> dict[str, dict]:
    """Each system's fastest result (tokens/s) over ``rounds`` alternating runs of ``run(system, round)`` (round
    1, 2, ...: a worker writes its run under a folder named for it, so it never finds the previous round's
    output). A failed run (None) stops the benchmark: a best of fewer rounds than asked would pass for the count."""
    results: dict[str, dict] = {}
    for k, system in enumerate([s for _ in range(rounds) for s in systems]):
        res = run(system, k // len(systems) + 1)
        if res is None:
            raise SystemExit(f"{system} failed in round {k // len(systems) + 1} of {rounds} (see above)")
        old = results.get(system)
        if old is None or res["tokens"] / res["seconds"] > old["tokens"] / old["seconds"]:
            results[system] = res
    return results
