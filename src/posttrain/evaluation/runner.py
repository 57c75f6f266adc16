"""Evaluate one model on one benchmark: prompt -> generate -> extract -> verify -> samples.jsonl -> metrics.json.

    from posttrain.evaluation import EvalConfig, evaluate, load_benchmark
    metrics = evaluate(model, tokenizer, load_benchmark("gsm8k"), EvalConfig(prompt="boxed"),
                       out_dir="runs/eval/gsm8k")

Decoding: greedy (``temperature=0``, one sample: pass@1 is the greedy accuracy), or ``samples`` sampled
completions per problem for the unbiased pass@k and maj@k (``accuracy`` is then the mean sampled pass@1). The
settings and their defaults are :class:`posttrain.config.EvalConfig`; with ``protocol`` set, the prompt, stop
strings, budget and answer reading are a published protocol's (:mod:`posttrain.evaluation.protocols`).

Compute dtype: the decoder's matmuls run in ``settings.compute_dtype`` resolved by GRPO's rule
(:func:`posttrain.models.resolve_compute_dtype`: ``auto`` is bf16 where the device has it natively, so on such a CPU
greedy answers can differ from float32's on a few problems); ``metrics.json`` and ``eval_config.json`` record the
dtype used, and a resumed run must use the same one.

Resumable: every finished problem's rows are appended to ``samples.jsonl`` and flushed, so an interrupted run
loses at most the batch in flight; a rerun with the same ``out_dir`` skips the finished problems. The settings
that change results (model, benchmark, prompt, template, decoding) are saved in ``eval_config.json`` and a rerun
with different ones is refused rather than mixed. ``metrics.json`` is written at the end, atomically.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path

from posttrain.config import EvalConfig
from posttrain.errors import UserError
from posttrain.evaluation.benchmarks import Benchmark, Problem
from posttrain.evaluation.generation import generate
from posttrain.evaluation.metrics import summarize
from posttrain.evaluation.prompts import extract
from posttrain.evaluation.protocols import answer_rules, prompt_text, resolve
from posttrain.fastpath.allocator import keep_freed_memory
from posttrain.models import resolve_compute_dtype
from posttrain.verify import VerifierPool, extract_with_rule

SAMPLES, METRICS, CONFIG = "samples.jsonl", "metrics.json", "eval_config.json"


def _sample_key(sample: int, pid: str) -> int:
    """The random stream key of sample ``sample`` of problem ``pid`` (mixed with ``settings.seed`` by the
    generator): the same completion whatever else shares its batch, and whatever the batch size."""
    return int.from_bytes(hashlib.sha256(f"{pid}|{sample}".encode()).digest()[:4], "big")


# --------------------------------------------------------------------------------------------------
# the run directory


def _read_done(out: Path, n_samples: int) -> dict[str, list[dict]]:
    """Finished problems in samples.jsonl (id -> rows); incomplete problems and a torn last line are dropped."""
    path = out / SAMPLES
    if not path.is_file():
        return {}
    by_id: dict[str, list[dict]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue                 # interrupted mid-write
            raise UserError(f"{path} line {i + 1} is not valid JSON; delete the file to start over") from None
        by_id.setdefault(str(row["id"]), []).append(row)
    done = {pid: rows for pid, rows in by_id.items() if len(rows) == n_samples}
    if len(done) != len(by_id) or sum(map(len, done.values())) != len(lines):
        _write_rows(path, [r for rows in done.values() for r in rows])
    return done


def _write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_config(out: Path, config: dict, absent: dict | None = None) -> None:
    """Refuse to add to ``out`` an evaluation with other settings. ``absent``: the values of keys that files
    written before the key existed lack (what those evaluations used)."""
    path = out / CONFIG
    if path.is_file():
        old = {**(absent or {}), **json.loads(path.read_text())}
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise UserError(f"{out} holds an evaluation with other settings ({shown}); results would mix. "
                            f"Use another --out, or delete {out} to start over")
    else:
        write_json(path, config)


def compute_dtype(model, settings: EvalConfig, generate_fn=None):
    """(the dtype the decoder's matmuls run in, or None for the weights' own; its name for metrics.json), by
    the rule GRPO's rollouts use (:func:`posttrain.models.resolve_compute_dtype`). Another backend
    (``generate_fn``: vLLM) computes in its own dtype, named by the generator's ``dtype_name`` when it has one."""
    if generate_fn is not None:
        return None, getattr(model, "dtype_name", None)
    weights = next(model.parameters()).dtype
    dtype = resolve_compute_dtype(settings.compute_dtype, model)
    return dtype, str(dtype or weights).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------


_STYLE_RULE = {"boxed": "box", "tags": "tags", "auto": "tags", "gsm8k": "gsm8k", "final_answer": "final_answer",
               "dapo": "answer_line"}


def _rule(text: str, style, prompt: str, answer: str | None, fallback: bool) -> str:
    """The extraction rule that read ``answer`` (``box``, ``math_env``, ...), or why there is none
    (``truncated_box``, ``unfinished_think``, ``no_answer``): recorded in samples.jsonl and given to the
    verifier, which applies that rule's policy. Read again here with the default tags; when that reading
    differs (the style's own tags), the style's rule is named."""
    found = extract_with_rule(text, style.answer_style, prompt_suffix=prompt[-200:], last_number=fallback)
    if answer is None or found.answer == answer:
        return found.rule
    return _STYLE_RULE.get(style.answer_style, style.answer_style)


def _score(pool, style, settings: EvalConfig, items: list[tuple[Problem, int, str, object]]) -> list[dict]:
    extracted = [extract(c.text, style, markers=settings.markers, prompt=prompt) for _, _, prompt, c in items]
    scored = [e if e is not None or not settings.last_number else
              extract(c.text, style, markers=settings.markers, prompt=prompt, last_number=True)
              for e, (_, _, prompt, c) in zip(extracted, items)]
    rules = [_rule(c.text, style, prompt, s, e is None and settings.last_number)
             for s, e, (_, _, prompt, c) in zip(scored, extracted, items)]
    todo = [i for i, s in enumerate(scored) if s is not None]
    verdicts = dict(zip(todo, pool.verify_many([(scored[i], items[i][0].answer, rules[i]) for i in todo])))
    rows = []
    for i, (p, sample, prompt, c) in enumerate(items):
        v = verdicts.get(i)
        rows.append({
            "id": p.id, "sample": sample, "prompt": prompt, "completion": c.text,
            # (a Verdict is falsy when not equal: test it against None, not for truth)
            "extracted": scored[i], "normalized": v.pred_normalized if v is not None else None, "gold": p.answer,
            "verdict": v is not None and v.equal, "reason": v.reason if v is not None else
            ("truncated" if c.finish == "length" else "no_answer"),
            "rule": rules[i],  # which extraction rule read the answer, or why there is none (docs/verifier.md)
            "format_ok": extracted[i] is not None, "truncated": c.finish == "length", "finish": c.finish,
            "completion_tokens": c.n_tokens, **p.meta,
        })
    return rows


def evaluate(model, tokenizer, benchmark: Benchmark, settings: EvalConfig | None = None, *,
             out_dir: str | Path | None = None, model_id: str | None = None, progress: bool = True,
             generate_fn=None) -> dict:
    """Evaluate ``model`` on ``benchmark``; returns the metrics dict (also written to ``out_dir/metrics.json``
    with one row per sample in ``out_dir/samples.jsonl`` when ``out_dir`` is given). ``generate_fn`` replaces
    :func:`posttrain.evaluation.generation.generate` (same call; e.g. the vLLM backend's)."""
    settings = resolve(settings or EvalConfig())   # a protocol's budget and reader where not given
    style, stops = answer_rules(settings)
    dtype, dtype_name = compute_dtype(model, settings, generate_fn)
    # evaluations written before the compute dtype was recorded ran in the weights' dtype
    absent = {} if generate_fn else {"compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if generate_fn is None:
        generate_fn = functools.partial(generate, compute_dtype=dtype)
        keep_freed_memory()  # the KV cache and activations come back from the heap, not as fresh pages per batch
    out = Path(out_dir) if out_dir is not None else None
    done: dict[str, list[dict]] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _check_config(out, {"model": model_id, "benchmark": benchmark.name, **settings.fingerprint(),
                            "compute_dtype": dtype_name}, absent=absent)
        done = _read_done(out, settings.samples)

    prompts = {p.id: prompt_text(tokenizer, p.problem, settings) for p in benchmark.problems}
    pending = [p for p in benchmark.problems if p.id not in done]
    lengths = {p.id: len(tokenizer(prompts[p.id], add_special_tokens=False)["input_ids"]) for p in pending}
    pending.sort(key=lambda p: -lengths[p.id])   # similar lengths share a batch; the longest run first
    # a generator that schedules its own batches (vLLM) takes many prompts per call
    batch_size = max(settings.batch_size, getattr(model, "prompts_per_call", 0))
    per_batch = max(1, batch_size // settings.samples)

    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(benchmark.problems), initial=len(benchmark.problems) - len(pending),
                   desc=f"eval {benchmark.name}", unit="problem", dynamic_ncols=True)
    t0, new_tokens = time.perf_counter(), 0
    sink = open(out / SAMPLES, "a", encoding="utf-8") if out is not None else None
    pool = VerifierPool()
    try:
        for b in range(0, len(pending), per_batch):
            group = pending[b: b + per_batch]
            seqs = [(p, s) for p in group for s in range(settings.samples)]
            completions = []
            for c in range(0, len(seqs), batch_size):
                chunk = seqs[c: c + batch_size]
                completions += generate_fn(
                    model, tokenizer, [prompts[p.id] for p, _ in chunk], max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k, stop=stops,
                    seed=settings.seed if settings.temperature > 0 else None,
                    seeds=[_sample_key(s, p.id) for p, s in chunk])
            rows = _score(pool, style, settings, [(p, s, prompts[p.id], c) for (p, s), c in zip(seqs, completions)])
            new_tokens += sum(r["completion_tokens"] for r in rows)
            for r in rows:
                done.setdefault(r["id"], []).append(r)
            if sink is not None:
                sink.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                sink.flush()
            if bar is not None:
                bar.update(len(group))
                finished = [done[p.id] for p in benchmark.problems if p.id in done]
                correct = sum(r["verdict"] for rows_ in finished for r in rows_)
                bar.set_postfix(acc=f"{correct / max(1, settings.samples * len(finished)):.3f}",
                                tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
    finally:
        pool.close()
        if sink is not None:
            sink.close()
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    elapsed = time.perf_counter() - t0

    ids = [p.id for p in benchmark.problems]
    rows = [r for pid in ids for r in sorted(done[pid], key=lambda r: r["sample"])]
    group_by = sorted({k for p in benchmark.problems for k in p.meta})
    metrics = {
        "benchmark": benchmark.name, "source": benchmark.source, "model": model_id,
        **summarize(rows, ks=settings.k, group_by=group_by),
        "settings": settings.to_dict(), "compute_dtype": dtype_name,
        "elapsed_s": round(elapsed, 2), "new_completion_tokens": new_tokens,
        "tokens_per_s": round(new_tokens / elapsed, 1) if elapsed > 0 else None,
    }
    if out is not None:
        current = set(ids)
        others = [r for pid, rs in done.items() if pid not in current for r in rs]  # kept from a larger run
        _write_rows(out / SAMPLES, rows + others)
        write_json(out / METRICS, metrics)
    return metrics
