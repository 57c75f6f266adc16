"""A pipeline's report: ``RUN/report.md`` with tables, and ``RUN/plots/*.png`` (matplotlib) for the curves.

Read only from what the stages wrote: ``RUN/<stage>/DONE`` (time), ``metrics.jsonl`` (sft: loss, val_loss;
grpo: reward, rewards/<name>/mean, completions/mean_length), ``metrics.json`` and ``samples.jsonl`` (eval).

Accuracy is greedy pass@1 with the Wilson 95% interval of each evaluation. Two evaluations of the same problems
are also compared pairwise: the difference of accuracies with a 95% interval from the per-problem differences
(normal approximation, ``mean(d) ± 1.96·sd(d)/√n``), which is what says whether a stage changed accuracy by
more than the noise of a finite test set. Published numbers for the benchmark (``posttrain.evaluation.references``)
stand beside ours, marked where the protocol or the test set differs.

Evaluations with several samples per problem are not accuracy rows: they give pass@k and maj@k at every k up to
the samples (``posttrain.evaluation.metrics.k_curves`` over ``samples.jsonl``), tabled and drawn as curves, which
is how a report shows whether RL raised maj@k (sharper) or pass@k (new solutions), as DeepSeekMath asked of GRPO.
Without matplotlib the tables are written and the plots skipped.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

from posttrain import runs
from posttrain.data.loading import read_jsonl
from posttrain.evaluation.metrics import k_curves
from posttrain.evaluation.references import reference_table
from posttrain.evaluation.report import percent
from posttrain.pipeline_config import TRAINING

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
    out: dict = {"stages": [], "evals": [], "sampled": [], "sft": {}, "grpo": {}, "dpo": {}, "rm": {}}
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
                entry = {"stage": st.name, "label": st.spec.get("label") or st.name, "n": m["n"],
                         "accuracy": m["accuracy"], "ci95": m["ci95"], "format_rate": m.get("format_rate"),
                         "truncation_rate": m.get("truncation_rate"),
                         "mean_completion_tokens": m.get("mean_completion_tokens"),
                         "benchmark": m.get("benchmark"), "model": m.get("model"),
                         "protocol": m.get("settings", {}).get("protocol"),
                         "prompt_style": m.get("settings", {}).get("prompt_style")}
                if m.get("n_samples", 1) > 1:
                    out["sampled"].append({**entry, "temperature": m["settings"].get("temperature"),
                                           **k_curves(_jsonl(d / "samples.jsonl"))})
                else:
                    out["evals"].append(entry)
        elif st.command in TRAINING:
            rows = _jsonl(d / "metrics.jsonl")
            if rows:
                out[st.command][st.name] = rows
    evals = out["evals"]
    out["comparisons"] = []
    # a pipeline with branches (start_from) compares every evaluation with the first one, the common starting
    # point; a chain compares each with the one before it
    branched = out["branched"] = any(st.spec.get("start_from") for st in stages)
    for prev, cur in ([(evals[0], e) for e in evals[1:]] if branched else zip(evals, evals[1:])):
        if prev["benchmark"] != cur["benchmark"]:
            continue
        diff = paired_difference(_jsonl(run_dir / prev["stage"] / "samples.jsonl"),
                                 _jsonl(run_dir / cur["stage"] / "samples.jsonl"))
        if diff:
            out["comparisons"].append({"before": prev["label"], "after": cur["label"], **diff})
    sampled = out["sampled"]
    out["sampled_change"] = None
    if len(sampled) > 1 and sampled[0]["benchmark"] == sampled[-1]["benchmark"]:
        out["sampled_change"] = paired_difference(_jsonl(run_dir / sampled[0]["stage"] / "samples.jsonl"),
                                                  _jsonl(run_dir / sampled[-1]["stage"] / "samples.jsonl"))
    return out


def _prompt(e: dict) -> str:
    return f"protocol {e['protocol']}" if e.get("protocol") else f"style {e.get('prompt_style') or '–'}"


def _accuracy_table(evals: list[dict]) -> list[str]:
    pct = partial(percent, unit="%", missing="–")  # this report's cells carry their unit
    lines = ["| evaluated | problems | accuracy | 95% interval | format rate | truncated | mean tokens | prompt |",
             "|---|---:|---:|---|---:|---:|---:|---|"]
    for e in evals:
        lo, hi = e["ci95"]
        lines.append(f"| {e['label']} | {e['n']} | {pct(e['accuracy'])} | {pct(lo)} – {pct(hi)} | "
                     f"{pct(e['format_rate'])} | {pct(e['truncation_rate'])} | "
                     f"{_num(e['mean_completion_tokens'], 1)} | {_prompt(e)} |")
    return lines


def _references(evals: list[dict]) -> list[str]:
    """The published numbers for each benchmark/protocol/size evaluated, marked against it."""
    lines, seen = [], set()
    for e in evals:
        key = (e["benchmark"], e["n"], e.get("protocol"))
        table = reference_table(*key, model=e.get("model"))
        if table and key not in seen:
            seen.add(key)
            lines += [f"Published numbers on {e['benchmark']}, beside ours ({e['n']} problems, {_prompt(e)}); "
                      "read a row as comparable only when its last column says yes:", "", table, ""]
    return lines


def _sampled_table(sampled: list[dict]) -> list[str]:
    """pass@k and maj@k of each sampled evaluation at k = 1, 2, 4, ... and the largest k."""
    n_max = max(s["n_samples"] for s in sampled)
    ks = sorted({*(2 ** i for i in range(n_max.bit_length()) if 2 ** i <= n_max), n_max})
    head = ["evaluated", "problems × samples", "temperature", *[f"pass@{k}" for k in ks], *[f"maj@{k}" for k in ks]]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|" + "---:|" * (2 * len(ks))]
    for s in sampled:
        cells = [percent(s["pass_at_k"][k - 1], "%", "–") if k <= s["n_samples"] else "–" for k in ks]
        cells += [percent(s["maj_at_k"][k - 1], "%", "–") if k <= s["n_samples"] else "–" for k in ks]
        lines.append(f"| {s['label']} | {s['n']} × {s['n_samples']} | {_num(s['temperature'], 2)} | "
                     + " | ".join(cells) + " |")
    return lines


def _sampled_change(first: dict, last: dict, paired: dict | None) -> str:
    """One sentence: how pass@k and maj@k moved from the first sampled evaluation to the last, at k = 1 and max;
    pass@1 with its paired interval (per problem, pass@1 is the fraction of its samples that are right)."""
    k = min(first["n_samples"], last["n_samples"])
    parts = [f"{name}@{kk} {100 * (last[key][kk - 1] - first[key][kk - 1]):+.1f} pts"
             for kk in sorted({1, k}) for name, key in (("pass", "pass_at_k"), ("maj", "maj_at_k"))]
    noise = ""
    if paired:
        lo, hi = paired["ci95"]
        noise = (f"; pass@1 paired over {paired['n']} problems: 95% interval {100 * lo:+.1f} to {100 * hi:+.1f} pts"
                 f", {'beyond' if paired['significant'] else 'within'} noise")
    return f"From {first['label']} to {last['label']}: " + ", ".join(parts) + noise + "."


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


def _first_last_table(kind: str, name: str, rows: list[dict], keys: list[str]) -> list[str]:
    """Means of ``keys`` over the first and the last few logged steps; validation metrics (``val_*``, logged only
    at evaluations) at the first and the last evaluation."""
    train = [r for r in rows if "step_time" in r or "loss" in r] or rows
    k = max(1, min(5, len(train) // 2))
    first, last = train[:k], train[-k:]
    lines = [f"{kind} stage `{name}`: {rows[-1]['step']} steps; means over the first and the last {k} steps "
             "(validation: the first and the last evaluation).", "", "| metric | first | last |", "|---|---:|---:|"]
    for key in keys:
        if key.startswith("val_"):
            vals = [r[key] for r in rows if key in r]
            if vals:
                lines.append(f"| {key} | {_num(vals[0])} | {_num(vals[-1])} |")
        elif any(key in r for r in train):
            lines.append(f"| {key} | {_num(_mean([r.get(key) for r in first]))} | "
                         f"{_num(_mean([r.get(key) for r in last]))} |")
    return lines + [""]


def _grpo_table(stages: dict[str, list[dict]]) -> list[str]:
    lines = []
    for name, rows in stages.items():
        keys = ["reward", *[f"rewards/{n}/mean" for n in _reward_names(rows)], "completions/mean_length",
                "completions/clipped_ratio", "frac_reward_zero_std", "step_time"]
        lines += _first_last_table("GRPO", name, rows, keys)
    return lines


DPO_KEYS = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected", "val_loss", "val_rewards/accuracies", "val_rewards/margins", "step_time"]
RM_KEYS = ["loss", "accuracy", "margin", "mean_reward", "val_loss", "val_accuracy", "val_margin", "step_time"]


def _preference_tables(data: dict) -> list[str]:
    lines = []
    for kind, title, keys in (("dpo", "DPO", DPO_KEYS), ("rm", "Reward model", RM_KEYS)):
        for name, rows in data[kind].items():
            lines += _first_last_table(title, name, rows, keys)
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
    for kind, key, title in (("dpo", "rewards/accuracies", "DPO"), ("rm", "accuracy", "Reward model")):
        if not data[kind]:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, rows in data[kind].items():
            train = [(r["step"], r[key]) for r in rows if key in r]
            if train:
                ax.plot(*zip(*train), label=f"{name} pairwise accuracy (train)")
            val = [(r["step"], r[f"val_{key}"]) for r in rows if f"val_{key}" in r]
            if val:
                ax.plot(*zip(*val), "o--", label=f"{name} pairwise accuracy (validation)")
        ax.set_xlabel("step")
        ax.set_ylabel("chosen ranked above rejected")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        save(fig, f"{kind}_accuracy.png", f"{title}: pairwise accuracy")
    if data["sampled"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, s in enumerate(data["sampled"]):
            color = f"C{i}"
            ax.plot(s["k"], [100 * v for v in s["pass_at_k"]], "o-", color=color, label=f"{s['label']} pass@k")
            ax.plot(s["k"], [100 * v for v in s["maj_at_k"]], "s--", color=color, label=f"{s['label']} maj@k")
        ax.set_xlabel("k (samples per problem)")
        ax.set_ylabel("%")
        ax.set_xticks(data["sampled"][0]["k"])
        ax.legend(fontsize=8)
        save(fig, "pass_maj_at_k.png", "pass@k and maj@k over k, before and after RL")
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
            lines += [("Paired differences between each evaluation and the first (the branches start from it):"
                       if data["branched"] else
                       "Paired differences between consecutive evaluations of the same problems:"), ""]
            lines += _comparison_table(data["comparisons"]) + [""]
        lines += _references(data["evals"])
    if data["sampled"]:
        lines += ["## pass@k and maj@k", "", "Sampled evaluations: pass@k is the unbiased estimate that one of k "
                  "samples is right (pass@1: the mean over all samples), maj@k that the majority answer of the "
                  "first k samples is (maj@1: the first sample alone). DeepSeekMath found that RL raised maj@k but "
                  "not pass@k (it sharpened the output distribution rather than adding solutions); these curves "
                  "show what this run's training did to both.", ""]
        lines += _sampled_table(data["sampled"]) + [""]
        if len(data["sampled"]) > 1:
            lines += [_sampled_change(data["sampled"][0], data["sampled"][-1], data["sampled_change"]), ""]
    if data["sft"]:
        lines += ["## SFT", ""] + _sft_table(data["sft"]) + [""]
    if data["grpo"]:
        lines += ["## GRPO", ""] + _grpo_table(data["grpo"])
    if data["dpo"] or data["rm"]:
        lines += ["## Preference stages (DPO, reward models)", ""] + _preference_tables(data)
    plots = _plots(data, run_dir / "plots")
    lines += ["## Plots", ""]
    if plots:
        for title, rel in plots:
            lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    else:
        lines += ["Plots skipped: matplotlib is not installed (`pip install matplotlib` or the dev extra).", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    (run_dir / "report.json").write_text(json.dumps(
        {k: v for k, v in data.items() if k not in TRAINING}, indent=2) + "\n")
    return run_dir / "report.md"
