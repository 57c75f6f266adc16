"""The Python half of ``scripts/gpu_check.sh``: build the models and data the checks train on, and read what each
check wrote to decide PASS or FAIL. The shell script runs posttrain's own command line on the shipped recipes; this
file only prepares inputs and judges outputs, so a check passes because the real command did what a user needs
(finite losses, an adapter that trained and saved, an evaluation that scored every problem, an export that loaded
back), not because a command exited 0.

Every judgement prints one line (the note of the results table) and exits 0 (PASS) or 1 (FAIL, the line says why).
The verdicts read files only (metrics.jsonl, safetensors headers and bytes, metrics.json, export.json), without
torch, so they take milliseconds.

    python3 scripts/gpu_check.py env cuda|cpu
    python3 scripts/gpu_check.py models WORK cuda|cpu
    python3 scripts/gpu_check.py train RUN_DIR [--init ADAPTER_DIR] [--same-first-loss RUN_DIR]
    python3 scripts/gpu_check.py eval OUT_DIR N [--like OUT_DIR]
    python3 scripts/gpu_check.py export OUT_DIR merged|gguf
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

OPTIONAL = ("bitsandbytes", "vllm", "deepspeed", "flash_attn", "unsloth", "trl")
# Qwen3-shaped but small: grouped KV heads as in Qwen3-4B/14B (head_dim 128 on cuda; 64 on cpu: vLLM-CPU has no
# head_dim 16 attention), the real 151,936-token vocabulary.
SHAPES = {"cuda": {"hidden": 1024, "layers": 4, "heads": 8, "kv_heads": 2, "intermediate": 3072},
          "cpu": {"hidden": 128, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 256}}
ROWS = {"cuda": (64, 16), "cpu": (32, 8)}  # (training rows, benchmark problems)


class Fail(Exception):
    """A check's verdict is FAIL; the message is the table's note."""


def env(device: str) -> str:
    import torch

    import posttrain  # noqa: F401  (the package and its pydantic/yaml dependencies import)

    if device == "cuda" and not torch.cuda.is_available():
        raise Fail(f"no CUDA device visible to torch {torch.__version__} (GPU_CHECK_DEVICE=cpu runs the dry run)")
    where = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)"
    versions = {m: getattr(importlib.import_module(m), "__version__", "?")
                for m in ("transformers", "accelerate", "peft")}
    have = [m for m in OPTIONAL if importlib.util.find_spec(m)]
    return (f"{where}; torch {torch.__version__}; " + " ".join(f"{k} {v}" for k, v in versions.items()) +
            f"; optional: {', '.join(have) or 'none'}")


def models(work: Path, device: str) -> str:
    """A base model (tied head, eos <|endoftext|>, like Qwen3-4B-Base), an instruct model (untied head, Qwen3's
    chat template, like Qwen3-14B), and the data the recipes are pointed at: ShareGPT chats for the QLoRA recipe and
    a held-out benchmark file for evaluation (the SFT and GRPO recipes use the built-in generator)."""
    from posttrain.data.synthetic import problems
    from posttrain.tiny import save_tiny_qwen3

    shape = SHAPES[device]
    save_tiny_qwen3(work / "base", base=True, **shape)
    save_tiny_qwen3(work / "inst", base=False, tie=False, **shape)
    n_train, n_bench = ROWS[device]
    chats = [{"conversations": [{"from": "human", "value": r["problem"]}, {"from": "gpt", "value": r["solution"]}]}
             for r in problems("train", n_train, "easy", seed=1)]
    (work / "sharegpt.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    bench = [{"problem": r["problem"], "answer": r["answer"]} for r in problems("test", n_bench, "easy", seed=0)]
    (work / "bench.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bench))
    return (f"Qwen3 vocabulary, hidden {shape['hidden']}, {shape['layers']} layers, head_dim "
            f"{shape['hidden'] // shape['heads']}, {shape['heads']}/{shape['kv_heads']} heads; {n_train} rows")


# ------------------------------------------------------------------------------------------- safetensors, no torch


def tensors(path: Path) -> dict[str, bytes]:
    """name -> raw bytes of every tensor in a safetensors file (read by its documented header layout)."""
    blob = path.read_bytes()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    body = blob[8 + size:]
    return {k: body[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}


def adapter_tensors(adapter: Path) -> dict[str, bytes]:
    path = adapter / "adapter_model.safetensors"
    if not path.is_file():
        raise Fail(f"no {path.relative_to(adapter.parent)}")
    return tensors(path)


# ------------------------------------------------------------------------------------------------------ verdicts


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise Fail(f"no {path.name} in {run}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(run: Path, init: Path | None, same_first_loss: Path | None) -> str:
    """A training run: it reached the last step of its recipe (``train.max_steps`` of the run's config.yaml, so a
    ``--set`` override counts) with finite logged losses, and its adapter trained: some lora_B is non-zero (PEFT
    starts every lora_B at zero) or, continuing ``init``, some tensor differs from it."""
    import yaml

    steps = yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"]
    rows = metrics(run)
    if not rows or rows[-1].get("step") != steps:
        raise Fail(f"metrics.jsonl ends at step {rows[-1].get('step') if rows else 0}, not {steps}")
    bad = [r["step"] for r in rows if not math.isfinite(r.get("loss", float("nan")))]
    if bad:
        raise Fail(f"non-finite loss at steps {bad}")
    saved = adapter_tensors(run / "adapter")
    if not any("lora_" in k for k in saved) or any("lora_" not in k for k in saved if "modules_to_save" not in k):
        raise Fail(f"adapter/ holds {len(saved)} tensors, not only LoRA ones: {sorted(saved)[:3]}")
    if init is not None:
        start = adapter_tensors(init)
        if saved.keys() != start.keys():
            raise Fail(f"the adapter's tensors are not those of init_adapter {init}")
        if all(saved[k] == start[k] for k in saved):
            raise Fail(f"the adapter equals init_adapter {init}: training never changed it")
    elif not any(any(v) for k, v in saved.items() if "lora_B" in k):
        raise Fail("every lora_B of the saved adapter is zero: the adapter never trained")
    first, last = rows[0], rows[-1]
    note = f"{steps} steps, loss {first['loss']:.4g} -> {last['loss']:.4g}"
    if same_first_loss is not None:
        other = metrics(same_first_loss)[0]["loss"]
        if not math.isclose(first["loss"], other, rel_tol=2e-2):
            raise Fail(f"step-1 loss {first['loss']:.5g} differs from the single-process run's {other:.5g}")
        note += f" (step-1 loss = single process's {other:.4g})"
    for key, fmt in (("step_time", "{:.2f} s/step"), ("peak_memory_mb", "peak {:.0f} MB"), ("kl", "kl {:.2g}"),
                     ("rollout_time", "rollout {:.2f} s")):
        if isinstance(last.get(key), (int, float)):
            note += ", " + fmt.format(last[key])
    return note


def evaluation(out: Path, n: int, like: Path | None) -> str:
    """An evaluation: every problem scored once (metrics.json and samples.jsonl agree) and completions generated;
    with ``like``, the share of problems whose greedy completion is identical to the other backend's."""
    path = out / "metrics.json"
    if not path.is_file():
        raise Fail(f"no metrics.json in {out}")
    m = json.loads(path.read_text())
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines() if x.strip()]
    if m.get("n") != n or len(samples) != n:
        raise Fail(f"{m.get('n')} problems in metrics.json, {len(samples)} samples; expected {n}")
    if not m.get("mean_completion_tokens"):
        raise Fail("no completion tokens generated")
    note = (f"n={n} accuracy {100 * m['accuracy']:.0f}%, {m['mean_completion_tokens']:.0f} tokens/completion, "
            f"{m.get('tokens_per_s', 0):.0f} tokens/s")
    if like is not None and (like / "samples.jsonl").is_file():
        rows = [json.loads(x) for x in (like / "samples.jsonl").read_text().splitlines() if x.strip()]
        other = {r["id"]: r["completion"] for r in rows}
        same = sum(other.get(s["id"]) == s["completion"] for s in samples)
        note += f"; identical to the transformers backend for {same}/{n} (random weights: near-ties flip)"
    return note


def export(out: Path, fmt: str) -> str:
    """An export: export.json records the round trip posttrain ran (reloaded and compared with its source)."""
    path = out / "export.json"
    if not path.is_file():
        raise Fail(f"no export.json in {out}")
    e = json.loads(path.read_text())
    v = e.get("verification")
    if e.get("format") != fmt or not v:
        raise Fail(f"export.json: format {e.get('format')}, verification {v}")
    note = f"round trip rel |dlogit| {v['rel_diff']:.1e} (tolerance {v['tolerance']:.0e})"
    if fmt == "gguf":
        note += f", {e['gguf']} {e['gguf_bytes'] / 2**20:.1f} MiB, greedy {v.get('greedy_match_tokens')} tokens equal"
    return note + (", 4-bit base dequantized" if e.get("load_in_4bit") else "")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("env").add_argument("device", choices=["cuda", "cpu"])
    m = sub.add_parser("models")
    m.add_argument("work", type=Path)
    m.add_argument("device", choices=["cuda", "cpu"])
    t = sub.add_parser("train")
    t.add_argument("run", type=Path)
    t.add_argument("--init", type=Path)
    t.add_argument("--same-first-loss", type=Path)
    e = sub.add_parser("eval")
    e.add_argument("out", type=Path)
    e.add_argument("n", type=int)
    e.add_argument("--like", type=Path)
    x = sub.add_parser("export")
    x.add_argument("out", type=Path)
    x.add_argument("format", choices=["merged", "gguf"])
    a = p.parse_args(argv)
    try:
        note = {"env": lambda: env(a.device), "models": lambda: models(a.work, a.device),
                "train": lambda: train(a.run, a.init, a.same_first_loss),
                "eval": lambda: evaluation(a.out, a.n, a.like), "export": lambda: export(a.out, a.format)}[a.what]()
    except Fail as exc:
        print(f"FAIL: {exc}")
        return 1
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
