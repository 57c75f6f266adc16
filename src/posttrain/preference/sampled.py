"""Verifiable preference pairs sampled from a model: the issue's "chosen = a verified-correct answer, rejected =
a wrong one", for the model's own completions rather than written ones.

``sampled_pairs`` (a data generator: ``data.path: posttrain.preference.sampled:sampled_pairs``) samples
``samples`` completions per synthetic training problem from a model (an SFT adapter on its base), scores each with
posttrain's verifier through ``posttrain eval``'s own machinery (so the prompt, the stop rules and the answer
reading are the evaluation's), and pairs a correct completion with a wrong one of the same problem. The samples are
kept in ``out_dir`` (``samples.jsonl``, resumable): a reward-model stage and a DPO stage that name the same
``out_dir`` share one sampling. Problems whose samples are all right or all wrong give no pair.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from posttrain.config import EvalConfig
from posttrain.errors import UserError


def sampled_pairs(model: str, out_dir: str, adapter: str | None = None, n: int = 128, samples: int = 4,
                  temperature: float = 1.0, max_new_tokens: int = 96, difficulty: str | int = "easy",
                  seed: int = 0, pairs_per_problem: int = 1, prompt: str = "reasoning",
                  batch_size: int = 32, split: str = "train") -> list[dict]:
    """Rows ``{prompt, chosen, rejected, answer}`` in messages form, from the synthetic problems of ``split``
    ('train'; 'test' gives held-out pairs for ``posttrain eval-rm``) (the problem as the user turn; render them with
    the template the model was trained with, e.g. ``data.template: reasoning``)."""
    from posttrain import runs
    from posttrain.data.synthetic import problems
    from posttrain.evaluation import evaluate
    from posttrain.evaluation.benchmarks import Benchmark, Problem

    if samples < 2:
        raise UserError(f"sampled_pairs: samples={samples}; a pair needs at least 2 samples per problem")
    rows = problems(split, n=n, difficulty=difficulty, seed=seed)
    bench = Benchmark(f"synthetic-{split}", [Problem(f"{split}-{i}", r["problem"], str(r["answer"]))
                                             for i, r in enumerate(rows)],
                      f"posttrain.data.synthetic {split} ({difficulty})")
    settings = EvalConfig(prompt=prompt, samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, seed=seed)
    out = Path(out_dir)
    model_id = model + (f" + {adapter}" if adapter else "")
    _check_kept(out, model_id, bench.name, len(bench.problems), settings)
    if not (out / "metrics.json").is_file():
        net, tok = runs.load_merged(model, adapter)
        evaluate(net, tok, bench, settings, out_dir=out, model_id=model_id)
        del net
    return pairs_from_samples(out / "samples.jsonl", {p.id: p.problem for p in bench.problems},
                              pairs_per_problem=pairs_per_problem, seed=seed)


def _check_kept(out: Path, model_id: str, benchmark: str, n: int, settings: EvalConfig) -> None:
    """A finished sampling in ``out`` is reused only when it is this one: the evaluation's own settings record
    (``eval_config.json``: what changes the completions, :meth:`EvalConfig.fingerprint`) and the problem count.
    Another split, count or setting would pair the wrong samples (or none)."""
    import json

    if not (out / "metrics.json").is_file():
        return
    config = out / "eval_config.json"
    have = json.loads(config.read_text()) if config.is_file() else {}
    have.pop("compute_dtype", None)
    have["n"] = json.loads((out / "metrics.json").read_text()).get("n")
    want = {"model": model_id, "benchmark": benchmark, "n": n, **settings.fingerprint()}
    diff = [f"{k} {have.get(k)} (asked: {want.get(k)})" for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)]
    if diff:
        raise UserError(f"sampled_pairs: {out} already holds another sampling ({'; '.join(diff)}); give another "
                        "out_dir, or remove that one to sample again")


def pairs_from_samples(path: Path, problem_text: dict[str, str], *, pairs_per_problem: int = 1,
                       seed: int = 0) -> list[dict]:
    """Pair right and wrong completions of each problem in an evaluation's ``samples.jsonl`` (distinct texts;
    a completion cut at the token budget is never chosen): up to ``pairs_per_problem`` pairs, each distinct
    completion of the larger side in one pair (a model that has one right answer and three wrong ones gives
    three pairs, all with that right answer)."""
    from posttrain.data.loading import read_jsonl

    by_problem: dict[str, list[dict]] = defaultdict(list)
    for row in read_jsonl(path, "samples.jsonl"):
        by_problem[row["id"]].append(row)
    rng = random.Random(f"posttrain-sampled-pairs|{seed}")
    out = []
    for pid, rows in by_problem.items():
        right = sorted({r["completion"] for r in rows if r["verdict"] and not r.get("truncated")})
        wrong = sorted({r["completion"] for r in rows if not r["verdict"]})
        rng.shuffle(right)
        rng.shuffle(wrong)
        if not right or not wrong:
            continue
        # every distinct completion of the larger side once, its partner cycling through the smaller side
        combos = [(right[i % len(right)], wrong[i % len(wrong)]) for i in range(max(len(right), len(wrong)))]
        for chosen, rejected in combos[:pairs_per_problem]:
            out.append({"prompt": [{"role": "user", "content": problem_text[pid]}],
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}], "answer": rows[0]["gold"],
                        "id": pid})
    if not out:
        raise UserError(f"{path}: no problem has both a right and a wrong sample, so there are no pairs; sample more "
                        "(samples, n) or at a higher temperature")
    return out
