"""A pipeline's report: ``RUN/report.md`` with tables, and ``RUN/plots/*.png`` (matplotlib) for the curves.

Read only from what the stages wrote: ``RUN/<stage>/DONE`` (time), ``metrics.jsonl`` (sft: loss, val_loss;
grpo: reward, rewards/<name>/mean, completions/mean_length), ``metrics.json`` and ``samples.jsonl`` (eval).

Accuracy is greedy pass@1 with the Wilson 95% interval of each evaluation. Two evaluations of the same problems
are also compared pairwise: the difference of accuracies with a 95% interval from the per-problem differences
(normal approximation, ``mean(d) ± 1.96·sd(d)/√n``), which is what says whether a stage changed accuracy by
more than the noise of a finite test set. Without matplotlib the tables are written and the plots skipped.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

from posttrain import runs
from posttrain.data.loading import read_jsonl
from posttrain.evaluation.report import percent

Z95 = 1.959963984540054


def _jsonl(path: Path) -> list[dict]:
    return read_jsonl(path, what=path.name) if path.is_file() else []


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def paired_difference(before: list[dict], after: list[dict]) -> dict | None:
    """Accuracy difference (after - before) over the problems both evaluated, with a 95% interval."""
    def per_problem(rows):
        out: dict[str, list[float]] = {}
        for r in rows:
            out.setdefault(r["id"], []).append(float(bool(r["verdict"])))
        return {k: sum(v) / len(v) for k, v in out.items()}

    a, b = per_problem(before), per_problem(after)
    ids = sorted(set(a) & set(b))
    n = len(ids)
    if n < 2:
        return None
    d = [b[i] - a[i] for i in ids]
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return {"n": n, "diff": mean, "ci95": [mean - half, mean + half], "significant": mean - half > 0 or mean + half < 0}


# --------------------------------------------------------------------------------------------------


def collect(run_dir: Path, stages) -> dict:
    """Everything the report shows, as plain data (also written to report.json)."""
    out: dict = {"stages": [], "evals": [], "sft": {}, "grpo": {}}
    for st in stages:
        d = run_dir / st.name
        done = _json(d / "DONE") if (d / "DONE").is_file() else None
        final = runs.final_output(d)
        out["stages"].append({"name": st.name, "command": st.command, "done": done is not None,
                              "seconds": done.get("seconds") if done else None,
                              "output": (done or {}).get("output") or (str(final[1]) if final else None)})
        if st.command == "eval":
            m = _json(d / "metrics.json")
            if m:
                label = st.spec.get("label") or st.name
                out["evals"].append({"stage": st.name, "label": label, "n": m["n"], "accuracy": m["accuracy"],
                                     "ci95": m["ci95"], "format_rate": m.get("format_rate"),
                                     "truncation_rate": m.get("truncation_rate"),
                                     "mean_completion_tokens": m.get("mean_completion_tokens"),
                                     "benchmark": m.get("benchmark"), "model": m.get("model")})
        elif st.command in ("sft", "grpo"):
            rows = _jsonl(d / "metrics.jsonl")
            if rows:
                out[st.command][st.name] = rows
    evals = out["evals"]
    out["comparisons"] = []
    for prev, cur in zip(evals, evals[1:]):
        if prev["benchmark"] != cur["benchmark"]:
            continue
        diff = paired_difference(_jsonl(run_dir / prev["stage"] / "samples.jsonl"),
                                 _jsonl(run_dir / cur["stage"] / "samples.jsonl"))
        if diff:
            out["comparisons"].append({"before": prev["label"], "after": cur["label"], **diff})
    return out


def _accuracy_table(evals: list[dict]) -> list[str]:
    pct = partial(percent, unit="%", missing="–")  # this report's cells carry their unit
    lines = ["| evaluated | problems | accuracy | 95% interval | format rate | truncated | mean tokens |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for e in evals:
        lo, hi = e["ci95"]
        lines.append(f"| {e['label']} | {e['n']} | {pct(e['accuracy'])} | {pct(lo)} – {pct(hi)} | "
                     f"{pct(e['format_rate'])} | {pct(e['truncation_rate'])} | "
                     f"{_num(e['mean_completion_tokens'], 1)} |")
    return lines


def _comparison_table(comps: list[dict]) -> list[str]:
    lines = ["| change | problems | accuracy difference | 95% interval (paired) | beyond the interval? |",
             "|---|---:|---:|---|---|"]
    for c in comps:
        lo, hi = c["ci95"]
        verdict = ("yes, up" if lo > 0 else "yes, down") if c["significant"] else "no (within noise)"
        lines.append(f"| {c['before']} → {c['after']} | {c['n']} | {100 * c['diff']:+.1f} pts | "
                     f"{100 * lo:+.1f} – {100 * hi:+.1f} pts | {verdict} |")
    return lines


def _sft_table(stages: dict[str, list[dict]]) -> list[str]:
    lines = ["| stage | steps | first loss | last loss | last val loss | tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, rows in stages.items():
        vals = [r["val_loss"] for r in rows if "val_loss" in r]
        lines.append(f"| {name} | {rows[-1]['step']} | {_num(rows[0].get('loss'))} | {_num(rows[-1].get('loss'))} | "
                     f"{_num(vals[-1]) if vals else '–'} | {_num(_mean([r.get('tokens_per_s') for r in rows]), 0)} |")
    return lines


def _reward_names(rows: list[dict]) -> list[str]:
    return sorted({k.split("/")[1] for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})


def _grpo_table(stages: dict[str, list[dict]]) -> list[str]:
    lines = []
    for name, rows in stages.items():
        k = max(1, min(5, len(rows) // 2))
        first, last = rows[:k], rows[-k:]
        lines += [f"GRPO stage `{name}`: {rows[-1]['step']} steps; means over the first and the last {k} steps.", "",
                  "| metric | first | last |", "|---|---:|---:|"]
        keys = ["reward", *[f"rewards/{n}/mean" for n in _reward_names(rows)], "completions/mean_length",
                "completions/clipped_ratio", "frac_reward_zero_std", "step_time"]
        for key in keys:
            if any(key in r for r in rows):
                lines.append(f"| {key} | {_num(_mean([r.get(key) for r in first]))} | "
                             f"{_num(_mean([r.get(key) for r in last]))} |")
        lines.append("")
    return lines


def _plots(data: dict, plot_dir: Path) -> list[tuple[str, str]]:
    """PNG files -> [(title, relative path)]; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    made = []

    def save(fig, name, title):
        fig.tight_layout()
        fig.savefig(plot_dir / name, dpi=110)
        plt.close(fig)
        made.append((title, f"{plot_dir.name}/{name}"))

    if data["sft"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, rows in data["sft"].items():
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{name} train loss")
            val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
            if val:
                ax.plot(*zip(*val), "o--", label=f"{name} val loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        save(fig, "sft_loss.png", "SFT loss")
    if data["grpo"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, rows in data["grpo"].items():
            steps = [r["step"] for r in rows]
            ax.plot(steps, [r.get("reward") for r in rows], lw=2, label=f"{name} total reward")
            for rn in _reward_names(rows):
                ax.plot(steps, [r.get(f"rewards/{rn}/mean") for r in rows], lw=1, label=rn)
        ax.set_xlabel("step")
        ax.set_ylabel("mean reward")
        ax.legend(fontsize=8)
        save(fig, "grpo_reward.png", "GRPO reward (total and per reward function)")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, rows in data["grpo"].items():
            ax.plot([r["step"] for r in rows], [r.get("completions/mean_length") for r in rows], label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("mean completion length (tokens)")
        ax.legend()
        save(fig, "completion_length.png", "GRPO completion length")
    if data["evals"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [e["label"] for e in data["evals"]]
        acc = [100 * e["accuracy"] for e in data["evals"]]
        err = [[100 * max(0.0, e["accuracy"] - e["ci95"][0]) for e in data["evals"]],
               [100 * max(0.0, e["ci95"][1] - e["accuracy"]) for e in data["evals"]]]
        ax.bar(range(len(acc)), acc, yerr=err, capsize=6, color="#4c72b0", label="accuracy (95% interval)")
        fmt = [100 * (e["format_rate"] or 0) for e in data["evals"]]
        ax.plot(range(len(fmt)), fmt, "s", color="#dd8452", label="format rate")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")
        ax.legend(fontsize=8)
        save(fig, "accuracy.png", "Accuracy before and after each stage")
    return made


def write_report(pipe) -> Path:
    """Write ``report.md``, ``report.json`` and ``plots/`` into the pipeline's run directory."""
    run_dir = Path(pipe.run_dir)
    data = collect(run_dir, pipe.stages)
    lines = [f"# Pipeline report: {run_dir.name}", "", f"Pipeline file: `{pipe.path}`; run directory: `{run_dir}`.", "",
             "## Stages", "", "| stage | command | status | time |", "|---|---|---|---:|"]
    for s in data["stages"]:
        lines.append(f"| {s['name']} | {s['command']} | {'done' if s['done'] else 'not run'} | "
                     f"{_num(s['seconds'], 0) + ' s' if s['seconds'] is not None else '–'} |")
    total = sum(s["seconds"] or 0 for s in data["stages"])
    lines += ["", f"Total stage time: {total:.0f} s ({total / 60:.1f} min)"
              " (of the runs that finished each stage; an interrupted run's earlier part is not counted).", ""]
    outputs = [(s["name"], s["output"]) for s in data["stages"] if s.get("output")]
    if outputs:
        lines += ["Models: " + "; ".join(f"{name}: `{path}`" for name, path in outputs) + ".", ""]
    if data["evals"]:
        lines += ["## Accuracy", "", f"Benchmark: {data['evals'][0]['benchmark']}; greedy pass@1 with the Wilson 95% "
                  "interval; format rate = the answer was found in the expected format.", ""]
        lines += _accuracy_table(data["evals"]) + [""]
        if data["comparisons"]:
            lines += ["Paired differences between consecutive evaluations of the same problems:", ""]
            lines += _comparison_table(data["comparisons"]) + [""]
    if data["sft"]:
        lines += ["## SFT", ""] + _sft_table(data["sft"]) + [""]
    if data["grpo"]:
        lines += ["## GRPO", ""] + _grpo_table(data["grpo"])
    plots = _plots(data, run_dir / "plots")
    lines += ["## Plots", ""]
    if plots:
        for title, rel in plots:
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    else:
        lines += ["Plots skipped: matplotlib is not installed (`pip install matplotlib` or the dev extra).", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    (run_dir / "report.json").write_text(json.dumps(
        {k: v for k, v in data.items() if k not in ("sft", "grpo")}, indent=2) + "\n")
    return run_dir / "report.md"
