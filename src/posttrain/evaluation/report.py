"""Human-readable summaries of evaluation metrics: one line per run and a comparison table (Markdown). The published
numbers that stand beside them are :mod:`posttrain.evaluation.references`."""

from __future__ import annotations


def percent(x: float | None, unit: str = "", missing: str = "-") -> str:
    """A fraction as a percentage with one decimal (0.1234 -> "12.3" + unit); ``missing`` for None."""
    return missing if x is None else f"{100 * x:.1f}{unit}"


def metrics_line(m: dict) -> str:
    lo, hi = m["ci95"]
    extra = "".join(f" pass@{k} {percent(v)}%" for k, v in m.get("pass_at_k", {}).items() if k != "1")
    extra += "".join(f" maj@{k} {percent(v)}%" for k, v in m.get("maj_at_k", {}).items() if k != "1")
    protocol = m.get("settings", {}).get("protocol")
    name = f"{m['benchmark']} ({protocol})" if protocol else m["benchmark"]
    return (f"{name}: accuracy {percent(m['accuracy'])}% (95% CI {percent(lo)}-{percent(hi)}, n={m['n']}"
            f"{'' if m.get('n_samples', 1) == 1 else ' x ' + str(m['n_samples']) + ' samples'}){extra}; "
            f"format {percent(m['format_rate'])}%, truncated {percent(m['truncation_rate'])}%, "
            f"{m['mean_completion_tokens']:.0f} tokens/completion{_speed(m)}")


def _speed(m: dict) -> str:
    """``; 12.3 s, bfloat16, 390 tokens/s``: how long generating and scoring took, in which compute dtype."""
    if m.get("elapsed_s") is None:
        return ""
    dtype = f", {m['compute_dtype']}" if m.get("compute_dtype") else ""
    rate = f", {m['tokens_per_s']:.0f} tokens/s" if m.get("tokens_per_s") else ""
    return f"; {m['elapsed_s']:.1f} s{dtype}{rate}"


def comparison_table(results: list[tuple[str, dict]]) -> str:
    """A Markdown table of (label, metrics) pairs, one row each, with the union of their pass@k/maj@k columns."""
    ks = sorted({int(k) for _, m in results for k in m.get("pass_at_k", {}) if k != "1"})
    mks = sorted({int(k) for _, m in results for k in m.get("maj_at_k", {}) if k != "1"})
    head = (["model", "benchmark", "n", "accuracy %", "95% CI"] + [f"pass@{k}" for k in ks]
            + [f"maj@{k}" for k in mks] + ["format %", "truncated %", "tokens"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, m in results:
        lo, hi = m["ci95"]
        cells = ([label, m["benchmark"], str(m["n"]), percent(m["accuracy"]), f"{percent(lo)}-{percent(hi)}"]
                 + [percent(m.get("pass_at_k", {}).get(str(k))) for k in ks]
                 + [percent(m.get("maj_at_k", {}).get(str(k))) for k in mks]
                 + [percent(m["format_rate"]), percent(m["truncation_rate"]), f"{m['mean_completion_tokens']:.0f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_table(m: dict, field: str) -> str:
    """Accuracy per value of a metadata field (MATH-500 ``subject`` or ``level``)."""
    groups = m.get("by", {}).get(field, {})
    lines = [f"| {field} | n | accuracy % | 95% CI |", "|---|---|---|---|"]
    for key, g in groups.items():
        lo, hi = g["ci95"]
        lines.append(f"| {key} | {g['n']} | {percent(g['accuracy'])} | {percent(lo)}-{percent(hi)} |")
    return "\n".join(lines)
