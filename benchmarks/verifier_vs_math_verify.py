"""posttrain's answer verifier vs Hugging Face math-verify, side by side.

    flock /tmp/posttrain-bench.lock python benchmarks/verifier_vs_math_verify.py [--json out.json]
        [--sections cases,ordinary,math500,freeform,freetext] [--engines posttrain,math-verify]

Measurements (each a section):
1. ``cases``: the case suite (tests/unit/verify_cases.py): correct verdicts (all cases, and the "math"
   subset whose verdict follows from mathematics alone rather than a grader policy), latency per pair
   (p50/p99/max), timeouts and hangs.
2. ``ordinary``: 600 synthetic pairs shaped like real rollouts (a ~1.1k-character chain of thought
   ending in \\boxed{} with an integer, fraction, radical, interval, decimal or polynomial answer; half
   equal in another spelling, half different), timed per pair.
3. ``math500``: each MATH-500 gold vs its own worked solution and vs another problem's gold.
4. ``freeform``: the free-form pairs of tests/unit/verify_freeform_cases.py (issue 16's kinds: answers in
   free text, relation spellings, named answers and chains, several answers, units, number spellings,
   matrices, conditions as sets, long reasoning traces, huge numbers).
5. ``freetext``: real solutions whose final answer sits in free text: every MATH-500 and Minerva solution
   with its last ``\\boxed{X}`` replaced by ``X`` (``so the answer is $\\boxed{5}$.`` becomes ``… is $5$.``),
   against its own gold (equal) and another problem's gold. The data is read at run time from
   ../shared/benchmarks (never copied into the repository).

"Before" numbers: run the same script with ``PYTHONPATH=<old checkout>/src`` and ``--engines posttrain``
(the engine falls back to the old package path ``posttrain.rewards``).

math-verify is called the documented way: ``verify(parse(gold), parse(prediction))`` (gold first),
with its default extraction and timeouts, in the main thread of its process; clean answers that are not
already in a box are wrapped in ``\\boxed{}`` for it (verl's convention), while in the sections freeform and
freetext a prediction with a box, a math delimiter or sentences is given as it is, for its own extraction
(a clean answer there is still boxed). posttrain runs
``VerifierPool.verify`` (in-process fast path, worker processes for sympy). Each engine runs in its own
child process under a watchdog: a pair that makes no progress for 60 s is recorded as a hang and the
child is restarted at the next pair.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HANG_S = 60.0
MV_TIMEOUT_S = 5.0


def load_cases():
    spec = importlib.util.spec_from_file_location("verify_cases", ROOT / "tests" / "unit" / "verify_cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CASES


def math500_pairs(path, seed=0):
    """Real data: each MATH-500 gold answer vs its own worked solution (must be equal: the solution ends
    in the same answer, often spelled differently) and vs another problem's gold (equal only when the
    two gold strings are identical)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    golds = [r["answer"] for r in rows]
    shuffled = golds[:]
    random.Random(seed).shuffle(shuffled)
    own = [(r["solution"], r["answer"], True, "own solution") for r in rows]
    other = [(s, g, s.strip() == g.strip(), "other gold") for s, g in zip(shuffled, golds)]
    return own + other


def load_freeform():
    spec = importlib.util.spec_from_file_location("verify_freeform_cases", ROOT / "tests" / "unit" / "verify_freeform_cases.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CASES


def _last_box(text):
    """(start, end, content) of the last \\boxed{...} / \\fbox{...} in text (brace-matched), or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{" and text[j - 1] != "\\":
            depth += 1
        elif text[j] == "}" and text[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return start, j + 1, text[i + 1 : j]
    return None


def freetext_pairs(path, seed=0):
    """Real solutions with the final box removed (its content left in place), against their own gold and
    another problem's; ``path`` is MATH-500 (gold in "answer") or Minerva (gold = the last box)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    items = []
    for r in rows:
        box = _last_box(r["solution"])
        if box is None:
            continue
        start, end, content = box
        gold = r.get("answer", content)
        items.append((r["solution"][:start] + content + r["solution"][end:], gold))
    golds = [g for _, g in items]
    shuffled = golds[:]
    random.Random(seed).shuffle(shuffled)
    own = [(text, gold, True, "own solution, unboxed") for text, gold in items]
    other = [(text, o, o.strip() == g.strip(), "another gold") for (text, g), o in zip(items, shuffled)]
    return own + other


def ordinary_pairs(n=600, seed=0):
    """Synthetic rollouts: CoT filler + \\boxed{answer}; the gold in another spelling or a different value."""
    rng = random.Random(seed)
    filler_words = ("We compute the sum step by step. Note that 3 + 4 = 7 and 12 / 4 = 3, so the "
                    "expression simplifies. Substituting x = 2 gives 2^2 + 1 = 5. ").split()
    pairs = []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(2, 99)
        kind = i % 6
        same = rng.random() < 0.5
        if kind == 0:
            pred, gold = str(a), str(a if same else a + rng.randint(1, 9))
        elif kind == 1:
            pred, gold = rf"\frac{{{a}}}{{{b}}}", (rf"\dfrac{{{2 * a}}}{{{2 * b}}}" if same else rf"\frac{{{a + 1}}}{{{b}}}")
        elif kind == 2:
            pred, gold = rf"{b}\sqrt{{{a}}}", (rf"\sqrt{{{b * b * a}}}" if same else rf"\sqrt{{{b * b * a + 1}}}")
        elif kind == 3:
            pred = rf"(-\infty, {a}] \cup ({a + b}, \infty)"
            gold = rf"(-\infty,{a}]\cup({a + b},\infty)" if same else rf"(-\infty,{a})\cup({a + b},\infty)"
        elif kind == 4:
            pred, gold = f"{a}.{b}", (f"{a}.{b}0" if same else f"{a}.{b + 1}")
        else:
            pred, gold = f"x^2+{2 * b}x+{b * b}", (f"(x+{b})^2" if same else f"(x+{b + 1})^2")
        cot = " ".join(rng.choice(filler_words) for _ in range(200))[:1100]
        pairs.append((f"{cot}\n\nTherefore the answer is $\\boxed{{{pred}}}$.", gold, same, kind))
    return pairs


# ---------------------------------------------------------------- engines (run in child processes)
def _engine(name, pairs, start, conn, raw_pred=False):
    if name == "posttrain":
        try:
            from posttrain.verify import VerifierPool
        except ImportError:  # a checkout from before the verifier moved to posttrain.verify
            from posttrain.rewards import VerifierPool

        pool = VerifierPool(workers=2)
        pool.verify(r"\sin x", r"\cos x")  # start the workers outside the timings

        def run(pred, gold):
            before = pool.stats["pooled"]
            v = pool.verify(pred, gold)
            return v.equal, v.reason == "timeout", pool.stats["pooled"] > before
    else:
        import logging

        from math_verify import parse, verify

        logging.disable(logging.WARNING)

        def box(s):
            return s if ("\\boxed" in s or "\\fbox" in s) else "\\boxed{" + s + "}"

        def free(s):  # free text as it is; a clean answer boxed
            raw = any(t in s for t in ("$", "\\(", "\\[", "\\boxed", "\\fbox", "\n")) or re.search(
                r"[A-Za-z]{2,}\s+[A-Za-z]{2,}", s)
            return s if raw else box(s)

        def run(pred, gold):
            t = time.perf_counter()
            eq = bool(verify(parse(box(gold)), parse(free(pred) if raw_pred else box(pred))))
            return eq, time.perf_counter() - t >= MV_TIMEOUT_S * 0.95, False  # its timeouts answer False silently

    conn.send(("ready",))
    for i in range(start, len(pairs)):
        pred, gold = pairs[i][0], pairs[i][1]
        conn.send(("start", i))
        t = time.perf_counter()
        try:
            eq, timed_out, pooled = run(pred, gold)
        except BaseException as exc:  # noqa: BLE001 - an engine crash is a result, not the end of the benchmark
            eq, timed_out, pooled = False, False, False
            conn.send(("crash", i, type(exc).__name__))
        conn.send(("done", i, eq, timed_out, time.perf_counter() - t, pooled))
    conn.send(("end",))


def run_engine(name, pairs, raw_pred=False):
    """Results per pair: dict(equal, timeout, hang, crash, latency, pooled)."""
    ctx = mp.get_context("spawn")
    results = [None] * len(pairs)
    start = 0
    while start < len(pairs):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_engine, args=(name, pairs, start, child, raw_pred))
        proc.start()
        child.close()
        current, last = None, time.monotonic()
        started = False
        while True:
            if parent.poll(1.0):
                try:
                    msg = parent.recv()
                except EOFError:
                    msg = ("eof",)
                last = time.monotonic()
                if msg[0] == "ready":
                    started = True
                elif msg[0] == "start":
                    current = msg[1]
                elif msg[0] == "crash":
                    print(f"  {name}: pair {msg[1]} raised {msg[2]}", file=sys.stderr)
                elif msg[0] == "done":
                    _, i, eq, to, lat, pooled = msg
                    results[i] = {"equal": eq, "timeout": to, "hang": False, "latency": lat, "pooled": pooled}
                    current = None
                elif msg[0] in ("end", "eof"):
                    if msg[0] == "eof" and current is not None:
                        results[current] = {"equal": False, "timeout": False, "hang": False, "crash": True, "latency": 0.0}
                    start = len(pairs) if msg[0] == "end" else (current + 1 if current is not None else len(pairs))
                    break
            elif started and current is not None and time.monotonic() - last > HANG_S:
                results[current] = {"equal": False, "timeout": False, "hang": True, "latency": HANG_S}
                print(f"  {name}: pair {current} hung; restarting after it", file=sys.stderr)
                proc.kill()
                start = current + 1
                break
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    return results


# ---------------------------------------------------------------- report
def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(results, expected, subset=None):
    idx = range(len(results)) if subset is None else subset
    correct = sum(1 for i in idx if results[i]["equal"] == expected[i] and not results[i].get("hang"))
    lat = [results[i]["latency"] * 1000 for i in idx]
    return {
        "n": len(list(idx)),
        "correct": correct,
        "p50_ms": pct(lat, 0.50),
        "p99_ms": pct(lat, 0.99),
        "max_ms": max(lat),
        "timeouts": sum(1 for i in idx if results[i]["timeout"]),
        "pooled": sum(1 for i in idx if results[i].get("pooled")),
        "hangs": sum(1 for i in idx if results[i].get("hang")),
        "crashes": sum(1 for i in idx if results[i].get("crash")),
        "false_pos": sum(1 for i in idx if results[i]["equal"] and not expected[i]),
        "false_neg": sum(1 for i in idx if not results[i]["equal"] and expected[i]),
    }


def table(title, rows):
    head = "| engine | correct | false +/- | p50 | p99 | max | timeouts | hangs | to workers |"
    out = [f"\n### {title}\n", head, "|---|---|---|---|---|---|---|---|---|"]
    for name, s in rows:
        out.append(f"| {name} | {s['correct']}/{s['n']} | {s['false_pos']}/{s['false_neg']} | {s['p50_ms']:.2f} ms | "
                   f"{s['p99_ms']:.1f} ms | {s['max_ms']:.0f} ms | {s['timeouts']} | {s['hangs']} | {s['pooled']} |")
    return "\n".join(out)


SECTIONS = ("cases", "ordinary", "math500", "freeform", "freetext")
FREEFORM_KINDS = ("free text", "relation", "chain", "named", "several boxes", "parts", "units", "number spelling",
                  "decimal comma", "matrix", "vector", "condition", "long trace", "huge number")


def build_sections(args):
    """(label, pairs, expected, subsets, raw_pred) for each requested section whose data exists."""
    bench = ROOT.parent / "shared" / "benchmarks"
    out = []
    if "cases" in args.sections:
        cases = load_cases()
        out.append(("case suite", cases, [c[2] for c in cases], {
            "all cases": None, "math-determined cases": [i for i, c in enumerate(cases) if c[4] == "math"]}, False))
    if "ordinary" in args.sections:
        ordinary = ordinary_pairs(args.ordinary)
        out.append(("ordinary answers", ordinary, [p[2] for p in ordinary], {
            "integers, fractions, radicals, intervals (the latency target)": [i for i, p in enumerate(ordinary) if p[3] < 4],
            "all six kinds (+ decimals, polynomials)": None}, False))
    if "math500" in args.sections and Path(args.math500).is_file():
        real = math500_pairs(args.math500)
        out.append(("MATH-500", real, [p[2] for p in real], {
            "gold vs its own solution": [i for i, p in enumerate(real) if p[3] == "own solution"],
            "gold vs another problem's gold": [i for i, p in enumerate(real) if p[3] == "other gold"]}, False))
    if "freeform" in args.sections:
        ff = load_freeform()
        subsets = {"all free-form pairs": None,
                   "ordinary size (all but the huge-number pairs; the p99 < 20 ms target)":
                       [i for i, c in enumerate(ff) if "huge number" not in c[3]]}
        subsets.update({k: [i for i, c in enumerate(ff) if k in c[3]] for k in FREEFORM_KINDS})
        out.append(("free-form", ff, [c[2] for c in ff], subsets, True))
    if "freetext" in args.sections:
        for name, path in (("MATH-500", Path(args.math500)), ("Minerva", bench / "minerva_math.jsonl")):
            if path.is_file():
                ft = freetext_pairs(path)
                out.append((f"{name} solutions, final answer in free text", ft, [p[2] for p in ft], {
                    "unboxed solution vs its own gold": [i for i, p in enumerate(ft) if p[3] == "own solution, unboxed"],
                    "unboxed solution vs another gold": [i for i, p in enumerate(ft) if p[3] == "another gold"]}, True))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write all numbers and per-case verdicts here")
    ap.add_argument("--ordinary", type=int, default=600, help="number of synthetic ordinary pairs")
    ap.add_argument("--math500", default=str(ROOT.parent / "shared" / "benchmarks" / "math500.jsonl"),
                    help="MATH-500 jsonl for the real-data sections (skipped when missing)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--engines", default="posttrain,math-verify", help="comma-separated: posttrain, math-verify")
    args = ap.parse_args(argv)
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    engines = [x.strip() for x in args.engines.split(",") if x.strip()]
    if "math-verify" in engines:
        import math_verify  # noqa: F401 - fail early when the peer is missing

    report, blob = [], {}
    for label, pairs, exp, subsets, raw_pred in build_sections(args):
        res = {}
        for engine in engines:
            t = time.perf_counter()
            print(f"running {engine} on the {label} ({len(pairs)} pairs)...", file=sys.stderr)
            res[engine] = run_engine(engine, pairs, raw_pred=raw_pred)
            print(f"  {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for sub, idx in subsets.items():
            if idx == []:
                continue
            rows = [(e, summarize(res[e], exp, idx)) for e in res]
            report.append(table(f"{label}: {sub}", rows))
            blob[f"{label}: {sub}"] = dict(rows)
        if label != "ordinary answers":
            for e in res:
                wrong = [(c[3], c[0][-60:], c[1][:40], c[2]) for c, r in zip(pairs, res[e]) if r["equal"] != c[2]]
                blob[f"wrong verdicts: {label}: {e}"] = wrong
                report.append(f"\n{label}: {e} wrong on {len(wrong)}" + (" (first 40)" if len(wrong) > 40 else "") + ": " +
                              "; ".join(f"[{w[0]}] {w[1]!r} vs {w[2]!r} (expected {w[3]})" for w in wrong[:40]))
        else:
            for kind in range(6):
                idx = [i for i, p in enumerate(pairs) if p[3] == kind]
                blob[f"ordinary kind {kind}"] = {e: summarize(res[e], exp, idx) for e in res}
    print("\n".join(report))
    if args.json:
        Path(args.json).write_text(json.dumps(blob, indent=1, default=str))


if __name__ == "__main__":
    main()
