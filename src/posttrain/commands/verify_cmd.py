"""``posttrain verify``: compare answers with posttrain's verifier.

    posttrain verify PREDICTION GOLD          prints the verdict; exit 0 when equal, 1 when not
    posttrain verify --file pairs.jsonl       one JSON line per pair with "equal" and "reason" added
                     [--out results.jsonl]    (to --out or stdout); a summary goes to stderr
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from posttrain.errors import UserError
from posttrain.verify import VerifierPool


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check whether a predicted answer equals the gold answer",
        description="Compare a predicted answer with a gold answer (LaTeX or plain text). Exit status 0 "
        "when equal, 1 when not. With --file, compare every line of a JSONL file of "
        '{"prediction": ..., "gold": ...} objects.',
    )
    p.add_argument("prediction", nargs="?", help="the predicted answer (a \\boxed{} in it is unwrapped)")
    p.add_argument("gold", nargs="?", help="the gold answer")
    p.add_argument("--file", help="JSONL file of {\"prediction\": ..., \"gold\": ...} lines (other fields kept)")
    p.add_argument("--out", help="write the JSONL results here instead of stdout (with --file)")
    p.add_argument("--timeout", type=positive_seconds, default=2.0,
                   help="seconds per pair for symbolic checks (default 2)")
    p.add_argument("--workers", type=positive_int, default=None, help="verifier worker processes (default: up to 4)")
    p.add_argument("--json", action="store_true", help="print the single verdict as JSON")
    p.set_defaults(func=run)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse reports the option and the value otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give 1 or more")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0 (nan and inf are refused, not silently used)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: give a finite number of seconds above 0")
    return value


def run(args) -> int:
    if args.file:
        if args.prediction is not None:
            raise UserError("give either PREDICTION GOLD or --file, not both")
        return _run_file(args)
    if args.prediction is None or args.gold is None:
        raise UserError("give PREDICTION and GOLD (e.g. posttrain verify '\\frac{1}{2}' 0.5), or --file pairs.jsonl")
    with VerifierPool(workers=args.workers or 1, timeout=args.timeout) as pool:
        v = pool.verify(args.prediction, args.gold)
    if args.json:
        print(json.dumps(v.to_dict(), ensure_ascii=False))
    else:
        print(f"{'equal' if v.equal else 'not equal'} ({v.reason})")
        print(f"  prediction: {v.pred_normalized}")
        print(f"  gold:       {v.gold_normalized}")
    return 0 if v.equal else 1


def _pair_problem(row: dict) -> str | None:
    missing = [k for k in ("prediction", "gold") if k not in row]
    return f"missing key {missing[0]!r}; each line needs \"prediction\" and \"gold\"" if missing else None


def _run_file(args) -> int:
    from posttrain.data.loading import read_jsonl  # not at the top: cli imports every command module

    rows = read_jsonl(args.file, what="--file", check=_pair_problem)
    t0 = time.perf_counter()
    with VerifierPool(workers=args.workers, timeout=args.timeout) as pool:
        verdicts = pool.verify_many([(_text(r["prediction"]), _text(r["gold"])) for r in rows])
        stats = dict(pool.stats)
    elapsed = time.perf_counter() - t0
    try:
        out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    except OSError as exc:
        raise UserError(f"--out {args.out!r}: cannot write ({exc.strerror})") from None
    try:
        for row, v in zip(rows, verdicts):
            out.write(json.dumps({**row, "equal": v.equal, "reason": v.reason}, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    n_equal = sum(v.equal for v in verdicts)
    print(
        f"verify: {len(rows)} pairs, {n_equal} equal, {len(rows) - n_equal} not equal, "
        f"{stats['timeouts']} timeouts; {stats['fast']} decided in-process, {stats['pooled']} by workers; "
        f"{elapsed:.2f} s" + (f"; results in {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0


def _text(x) -> str:
    if x is None:
        return ""
    return x if isinstance(x, str) else json.dumps(x) if isinstance(x, (list, dict)) else str(x)
