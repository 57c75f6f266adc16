"""Metric math for evaluation: pure functions over plain numbers, each checkable by hand.

- ``pass_at_k(n, c, k)``: the unbiased estimator of Chen et al. 2021 (Codex paper, eq. 1),
  ``1 - C(n-c, k) / C(n, k)``, computed as a running product so it never overflows.
- ``maj_at_k``: majority vote over the first ``k`` samples' normalized answers (samples without an answer do not
  vote); ties go to the answer seen first; the problem counts as solved when the winning answer is correct.
  Using the first ``k`` samples (not an average over all k-subsets) is the common practice (Minerva, DeepSeekMath).
- ``wilson_interval``: the Wilson score interval for a binomial proportion (95% by default). For ``n`` samples per
  problem the proportion is the mean per-problem pass@1, and the interval is Wilson's with the fractional success
  count ``sum(c_i / n)`` over the N problems: a per-problem score in [0, 1] with mean p has variance at most
  p(1 - p), so this is conservative and, unlike a normal interval, never collapses to a point at 0 or 1.
- ``summarize(rows, ks)``: all of the above from ``samples.jsonl`` rows (one row per sample); ``k_curves(rows)``:
  pass@k and maj@k at every k up to the samples per problem, for plotting.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn without replacement from ``n`` (``c`` correct) is
    correct. ``k`` must be at most ``n``."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n} c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n} k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``successes`` out of ``n`` (``successes`` may be fractional, see module doc)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return (max(0.0, min(p, center - half)), min(1.0, max(p, center + half)))  # rounding never excludes p


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the one that appeared first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> bool:
    """Whether the majority answer among the first ``k`` samples is correct (``answers[i]`` is sample i's
    normalized answer or None, ``correct[i]`` its verdict)."""
    if len(answers) != len(correct):
        raise ValueError("answers and correct must have the same length")
    if not 1 <= k <= len(answers):
        raise ValueError(f"need 1 <= k <= {len(answers)}, got k={k}")
    winner = majority_vote(answers[:k])
    if winner is None:
        return False
    return any(c for a, c in zip(answers[:k], correct[:k]) if a == winner)


def _problem_table(rows: Iterable[dict]) -> dict[str, list[dict]]:
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_id[str(r["id"])].append(r)
    for samples in by_id.values():
        samples.sort(key=lambda r: r.get("sample", 0))
    return by_id


def _accuracy_block(scores: list[float]) -> dict:
    n = len(scores)
    acc = sum(scores) / n if n else 0.0
    lo, hi = wilson_interval(sum(scores), n)
    return {"n": n, "accuracy": acc, "ci95": [lo, hi]}


def summarize(rows: Iterable[dict], ks: Sequence[int] = (1,), group_by: Sequence[str] = ("subject", "level")) -> dict:
    """Metrics from sample rows. Each row has ``id``, ``sample``, ``verdict`` (bool), ``normalized`` (the
    normalized extracted answer or None), ``format_ok``, ``truncated``, ``completion_tokens`` and, optionally,
    the ``group_by`` fields. Every problem must have the same number of samples."""
    table = _problem_table(rows)
    if not table:
        return {"n": 0, "n_samples": 0, "accuracy": 0.0, "ci95": [0.0, 1.0], "format_rate": 0.0,
                "truncation_rate": 0.0, "mean_completion_tokens": 0.0, "pass_at_k": {}, "maj_at_k": {}}
    sizes = {len(s) for s in table.values()}
    if len(sizes) != 1:
        raise ValueError(f"problems have different sample counts {sorted(sizes)}; every problem needs n samples")
    n_samples = sizes.pop()
    per_problem = []
    for pid, samples in table.items():
        c = sum(bool(s["verdict"]) for s in samples)
        per_problem.append((pid, samples, c))

    scores = [c / n_samples for _, _, c in per_problem]
    out = _accuracy_block(scores)
    out["n_samples"] = n_samples
    out["correct"] = sum(c for _, _, c in per_problem)
    all_samples = [s for _, samples, _ in per_problem for s in samples]
    total = len(all_samples)
    out["format_rate"] = sum(bool(s["format_ok"]) for s in all_samples) / total
    out["truncation_rate"] = sum(bool(s["truncated"]) for s in all_samples) / total
    out["mean_completion_tokens"] = sum(int(s["completion_tokens"]) for s in all_samples) / total
    out["pass_at_k"] = {}
    out["maj_at_k"] = {}
    for k in sorted(set(ks)):
        if k > n_samples:
            continue
        out["pass_at_k"][str(k)] = sum(pass_at_k(n_samples, c, k) for _, _, c in per_problem) / len(per_problem)
        out["maj_at_k"][str(k)] = sum(
            maj_at_k([s.get("normalized") for s in samples], [bool(s["verdict"]) for s in samples], k)
            for _, samples, _ in per_problem) / len(per_problem)

    groups: dict[str, dict] = {}
    for field in group_by:
        buckets: dict[str, list[float]] = defaultdict(list)
        for (_, samples, _), score in zip(per_problem, scores):
            value = samples[0].get(field)
            if value is not None:
                buckets[str(value)].append(score)
        if buckets:
            groups[field] = {key: _accuracy_block(v) for key, v in sorted(buckets.items())}
    if groups:
        out["by"] = groups
    return out


def k_curves(rows: Iterable[dict]) -> dict:
    """pass@k and maj@k for every k from 1 to the samples per problem, from ``samples.jsonl`` rows: the curves
    DeepSeekMath drew for its SFT and RL models (RL raised maj@k, not pass@k: a policy that only sharpens its
    output distribution moves maj@k; one that finds new solutions moves pass@k at large k). Returns
    ``{"n", "n_samples", "k": [...], "pass_at_k": [...], "maj_at_k": [...]}``."""
    rows = list(rows)
    per_problem = Counter(str(r["id"]) for r in rows)
    n_samples = max(per_problem.values(), default=0)
    m = summarize(rows, ks=range(1, n_samples + 1), group_by=())
    ks = list(range(1, n_samples + 1))
    return {"n": m["n"], "n_samples": m["n_samples"], "k": ks, "pass_at_k": [m["pass_at_k"][str(k)] for k in ks],
            "maj_at_k": [m["maj_at_k"][str(k)] for k in ks]}
