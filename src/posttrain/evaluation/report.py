"""Human-readable summaries of evaluation metrics: one line per run and a comparison table (Markdown)."""

from __future__ import annotations


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def metrics_line(m: dict) -> str:
    lo, hi = m["ci95"]
    extra = "".join(f" pass@{k} {_pct(v)}%" for k, v in m.get("pass_at_k", {}).items() if k != "1")
    extra += "".join(f" maj@{k} {_pct(v)}%" for k, v in m.get("maj_at_k", {}).items() if k != "1")
    return (f"{m['benchmark']}: accuracy {_pct(m['accuracy'])}% (95% CI {_pct(lo)}-{_pct(hi)}, n={m['n']}"
            f"{'' if m.get('n_samples', 1) == 1 else ' x ' + str(m['n_samples']) + ' samples'}){extra}; "
            f"format {_pct(m['format_rate'])}%, truncated {_pct(m['truncation_rate'])}%, "
            f"{m['mean_completion_tokens']:.0f} tokens/completion")


def comparison_table(results: list[tuple[str, dict]]) -> str:
    """A Markdown table of (label, metrics) pairs, one row each, with the union of their pass@k/maj@k columns."""
    ks = sorted({int(k) for _, m in results for k in m.get("pass_at_k", {}) if k != "1"})
    mks = sorted({int(k) for _, m in results for k in m.get("maj_at_k", {}) if k != "1"})
    head = (["model", "benchmark", "n", "accuracy %", "95% CI"] + [f"pass@{k}" for k in ks]
            + [f"maj@{k}" for k in mks] + ["format %", "truncated %", "tokens"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, m in results:
        lo, hi = m["ci95"]
        cells = ([label, m["benchmark"], str(m["n"]), _pct(m["accuracy"]), f"{_pct(lo)}-{_pct(hi)}"]
                 + [_pct(m.get("pass_at_k", {}).get(str(k))) for k in ks]
                 + [_pct(m.get("maj_at_k", {}).get(str(k))) for k in mks]
                 + [_pct(m["format_rate"]), _pct(m["truncation_rate"]), f"{m['mean_completion_tokens']:.0f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_table(m: dict, field: str) -> str:
    """Accuracy per value of a metadata field (MATH-500 ``subject`` or ``level``)."""
    groups = m.get("by", {}).get(field, {})
    lines = [f"| {field} | n | accuracy % | 95% CI |", "|---|---|---|---|"]
    for key, g in groups.items():
        lines.append(f"| {key} | {g['n']} | {_pct(g['accuracy'])} | {_pct(g['ci95'][0])}-{_pct(g['ci95'][1])} |")
    return "\n".join(lines)
