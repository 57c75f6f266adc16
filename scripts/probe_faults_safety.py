"""Rerun the reliability review's probes of issue 17 items 1-4 (output safety, run-directory locks, damaged
checkpoints, resume with a changed recipe, full disks) and print a markdown table of verdicts.

    python3 scripts/probe_faults_safety.py [--keep DIR]

Every probe runs the real command line (``python -m posttrain.cli ...``) in a temporary directory, on a tiny
random Qwen3 with the real Qwen vocabulary (``posttrain.tiny``), with max_steps of at most 5. The full-disk
probes (F1-F6) mount a small tmpfs in a private mount namespace (``unshare -rm``); where that is not possible
they are reported as skipped. The review's old verdicts (``../shared/reference/reliability-review.md``) are
printed beside the new ones. A verdict is computed from what the probe observed, with the review's legend:
good = a clear one-line error naming the file/key and what to do, or correct behaviour; mixed = safe, but a
traceback or an unclear message; bad = data loss, a silent wrong result, or a raw traceback with no message.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBES: list[tuple[str, str, str, object]] = []  # (id, probe, the review's verdict, function)


def probe(pid: str, what: str, old: str):
    def register(fn):
        PROBES.append((pid, what, old, fn))
        return fn
    return register


class Ctx:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(REPO / "src")}
        self.recipe = root / "r.yaml"
        self.recipe.write_text("model: {name: x}\ndata: {path: x}\n")

    def cli(self, *args, timeout: int = 600):
        proc = subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=self.root)
        return proc.returncode, proc.stdout + proc.stderr

    def sft_args(self, out: Path, *extra) -> list[str]:
        return ["sft", self.recipe, f"model.name={self.model}", f"data.path={self.data}", f"output_dir={out}",
                "data.template=chatml", "data.max_length=64", "lora.r=4", "lora.alpha=8", "train.lr=5e-3",
                "train.batch_size=2", "train.max_grad_norm=null", *extra]

    def in_tmpfs(self, size: str, mount: Path, shell: str, timeout: int = 600):
        """Run ``shell`` with a tmpfs of ``size`` mounted at ``mount`` (private to it); afterwards the tree and
        the use of the tmpfs are printed after a marker."""
        script = (f"mount -t tmpfs -o size={size} tmpfs {mount} || exit 99; {shell}; rc=$?; echo __AFTER__; "
                  f"find {mount} | sort; df -k {mount} | tail -1; exit $rc")
        proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=self.root)
        out, _, after = proc.stdout.partition("__AFTER__")
        return proc.returncode, out + proc.stderr, after


def clear(rc: int, out: str, *must: str) -> bool:
    """rc 2, no traceback, and every phrase of ``must`` in the output."""
    return rc == 2 and "Traceback" not in out and all(m in out for m in must)


def last_line(out: str, key: str = "error") -> str:
    lines = [ln for ln in out.splitlines() if key in ln]
    return (lines[-1] if lines else out.strip().splitlines()[-1] if out.strip() else "")[:400]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def unfinished(ctx: Ctx, name: str) -> Path:
    run = ctx.root / name
    shutil.copytree(ctx.ref, run)
    shutil.rmtree(run / "adapter")
    return run


def same_adapter(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (a, b))
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


# --------------------------------------------------------------------------------------------------
# 8. export


@probe("E1", "export a run dir with no adapter/", "good (hint wrong)")
def e1(ctx):
    run = unfinished(ctx, "e1")
    rc, out = ctx.cli("export", run, "--format", "adapter", "--out", ctx.root / "e1-out")
    ok = clear(rc, out, "training did not finish", "--resume") and "pass one of them" not in out
    return ("good" if ok else "bad"), f"rc {rc}: {last_line(out)}"


@probe("E2", "export checkpoints/step-4", "mixed")
def e2(ctx):
    rc, out = ctx.cli("export", ctx.ref / "checkpoints" / "step-4", "--format", "adapter", "--out", ctx.root / "e2")
    return ("good" if clear(rc, out, "is a training checkpoint", "--resume, then use") else "mixed"), \
        f"rc {rc}: {last_line(out)}"


@probe("E5", "export --out = the source run dir, --overwrite", "bad")
def e5(ctx):
    run = ctx.root / "e5"
    shutil.copytree(ctx.ref, run)
    before = tree(run)
    rc, out = ctx.cli("export", run, "--format", "adapter", "--out", run, "--overwrite")
    kept = tree(run) == before
    return ("good" if kept and clear(rc, out, "is the source") else "bad"), \
        f"rc {rc}, run dir {'intact' if kept else 'CHANGED'}: {last_line(out)}"


@probe("E6", "export --out = the run's parent, --overwrite", "bad")
def e6(ctx):
    proj = ctx.root / "e6"
    shutil.copytree(ctx.ref, proj / "run1")
    (proj / "NOTES.md").write_text("precious\n")
    before = tree(proj)
    rc, out = ctx.cli("export", proj / "run1", "--format", "adapter", "--out", proj, "--overwrite")
    kept = tree(proj) == before
    return ("good" if kept and clear(rc, out, "contains the source") else "bad"), \
        f"rc {rc}, NOTES.md and run1/ {'intact' if kept else 'DELETED'}: {last_line(out)}"


# --------------------------------------------------------------------------------------------------
# 9. generate


def _generate(ctx, out: Path, inp: Path | None = None, *extra):
    return ctx.cli("generate", ctx.model, "--input", inp or ctx.prompts, "--output", out, "--max-new-tokens", "4",
                   "--preset", "greedy", *extra)


@probe("G4", "generate --output an existing notes.txt", "bad")
def g4(ctx):
    notes = ctx.root / "notes.txt"
    notes.write_text("my notes\nsecond line\n")
    rc, out = _generate(ctx, notes)
    rc2, out2 = _generate(ctx, notes, None, "--overwrite")
    kept = notes.read_text() == "my notes\nsecond line\n"
    ok = kept and clear(rc, out, "not the output of an earlier posttrain generate") and rc2 == 2
    return ("good" if ok else "bad"), f"rc {rc} (and {rc2} with --overwrite), notes {'intact' if kept else 'LOST'}: " \
                                      f"{last_line(out)}"


@probe("G5", "generate --output an unrelated 20-line JSONL dataset", "bad")
def g5(ctx):
    data = ctx.root / "dataset.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": i}) + "\n" for i in range(20)))
    before = data.read_text()
    rc, out = _generate(ctx, data)
    kept = data.read_text() == before
    return ("good" if kept and clear(rc, out, "it will not be overwritten") else "bad"), \
        f"rc {rc}, dataset {'intact (20 lines)' if kept else 'TRUNCATED'}: {last_line(out)}"


@probe("G6", "generate --output = --input", "bad")
def g6(ctx):
    inp = ctx.root / "inout.jsonl"
    shutil.copy(ctx.prompts, inp)
    before = inp.read_text()
    rc, out = _generate(ctx, inp, inp)
    kept = inp.read_text() == before
    return ("good" if kept and clear(rc, out, "is the --input file") else "bad"), \
        f"rc {rc}, input {'intact' if kept else 'REPLACED'}: {last_line(out)}"


# --------------------------------------------------------------------------------------------------
# 7. concurrency and pipelines


@probe("C1", "two sft runs into one output_dir, the second while the first runs", "bad")
def c1(ctx):
    run = ctx.root / "c1"
    args = ctx.sft_args(run, "train.max_steps=400", "train.save_every=50", "train.seed=1")  # long enough to overlap
    first = subprocess.Popen([sys.executable, "-m", "posttrain.cli", *map(str, args)], env=ctx.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300  # the first run holds the directory (its lock file appears), then the second starts
    while time.time() < deadline and first.poll() is None and not (run / ".lock").exists():
        time.sleep(0.1)
    rc2, out2 = ctx.cli(*ctx.sft_args(run, "train.max_steps=400", "train.save_every=50", "train.seed=2",
                                      "train.lr=1e-3"))
    first.communicate(timeout=600)
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    cfg_seed = "seed: 1" in (run / "config.yaml").read_text()
    ok = first.returncode == 0 and clear(rc2, out2, f"PID {first.pid}") and steps == list(range(1, 401)) and cfg_seed
    return ("good" if ok else "bad"), f"run 1 rc {first.returncode}, run 2 rc {rc2} ({last_line(out2)}); " \
                                      f"metrics steps 1-400 once each: {steps == list(range(1, 401))}, config.yaml " \
                                      f"is run 1's: {cfg_seed}"


@probe("C2", "--resume with a step-2 holding no weights (C1's leftover)", "bad")
def c2(ctx):
    run = unfinished(ctx, "c2")
    step4 = run / "checkpoints" / "step-4"
    for name in ("trainable.safetensors", "optimizer.pt", "manifest.json"):  # as C1 left step-2
        (step4 / name).unlink()
    rc, out = ctx.cli(*ctx.sft_args(run, *ctx.steps), "--resume")
    ok = rc == 0 and "is damaged (trainable.safetensors is missing)" in out and same_adapter(ctx.ref, run)
    return ("good" if ok else "bad"), f"rc {rc}: {last_line(out, 'damaged')}; resumed from step-2, adapter " \
                                      f"bit-identical: {rc == 0 and same_adapter(ctx.ref, run)}"


PIPE = """output_dir: {out}
stages:
  - {{name: {name}, command: sft, recipe: {recipe}, overrides: [{overrides}]}}
"""


@probe("C5", "pipeline rerun with a changed sft setting", "good (provenance nit)")
def c5(ctx):
    run = ctx.root / "c5"
    ov = ", ".join(f"'{o}'" for o in ctx.sft_args(run)[2:] if not o.startswith("output_dir"))
    p1, p2 = ctx.root / "c5a.yaml", ctx.root / "c5b.yaml"
    p1.write_text(PIPE.format(out=run, name="sft", recipe=ctx.recipe, overrides=ov + ", train.max_steps=1"))
    p2.write_text(PIPE.format(out=run, name="sft", recipe=ctx.recipe, overrides=ov + ", train.max_steps=2"))
    rc1, out1 = ctx.cli("run", p1)
    rc2, out2 = ctx.cli("run", p2)
    kept = (run / "pipeline.yaml").read_text() == p1.read_text()
    ok = rc1 == 0 and clear(rc2, out2, "was finished with a different recipe") and kept
    return ("good" if ok else "mixed"), f"first rc {rc1}; rerun rc {rc2} ({last_line(out2)}); pipeline.yaml " \
                                        f"{'still the file that ran' if kept else 'OVERWRITTEN by the refused file'}"


@probe("C6", "pipeline stage named '..'", "bad")
def c6(ctx):
    parent = ctx.root / "c6"
    parent.mkdir()
    (parent / "SENTINEL.txt").write_text("precious\n")
    p = ctx.root / "c6.yaml"
    p.write_text(f"output_dir: {parent / 'run'}\nstages:\n  - {{name: '..', command: eval, benchmark: synthetic, "
                 "limit: 1}\n")
    rc, out = ctx.cli("run", p)
    kept = (parent / "SENTINEL.txt").is_file()
    return ("good" if kept and clear(rc, out, "a stage name is a plain folder name") else "bad"), \
        f"rc {rc}, SENTINEL.txt {'intact' if kept else 'DELETED'}: {last_line(out)}"


# --------------------------------------------------------------------------------------------------
# 5. interruption and resume


def _damaged(ctx, name: str, damage) -> tuple[str, str]:
    run = unfinished(ctx, name)
    damage(run / "checkpoints" / "step-4")
    rc, out = ctx.cli(*ctx.sft_args(run, *ctx.steps), "--resume")
    exact = rc == 0 and same_adapter(ctx.ref, run)
    ok = exact and "is damaged" in out and "resuming from step-2" in out
    return ("good" if ok else "bad"), f"rc {rc}: {last_line(out, 'damaged')}; adapter bit-identical to the " \
                                      f"uninterrupted run: {exact}"


@probe("I5", "latest checkpoint's trainable.safetensors cut to 1000 bytes, --resume", "bad")
def i5(ctx):
    return _damaged(ctx, "i5", lambda d: (d / "trainable.safetensors").write_bytes(
        (d / "trainable.safetensors").read_bytes()[:1000]))


@probe("I6", "the same file cut to 0 bytes", "bad")
def i6(ctx):
    return _damaged(ctx, "i6", lambda d: (d / "trainable.safetensors").write_bytes(b""))


@probe("I7", "optimizer.pt truncated", "bad")
def i7(ctx):
    return _damaged(ctx, "i7", lambda d: (d / "optimizer.pt").write_bytes((d / "optimizer.pt").read_bytes()[:500]))


@probe("I8", "state.json truncated", "bad")
def i8(ctx):
    return _damaged(ctx, "i8", lambda d: (d / "state.json").write_text('{"epoch": 0, "ind'))


@probe("I9", "--resume train.lr=5e-2 train.max_steps=7 (changed recipe)", "bad")
def i9(ctx):
    run = unfinished(ctx, "i9")
    rc, out = ctx.cli(*ctx.sft_args(run, *ctx.steps, "train.lr=5e-2", "train.max_steps=7"), "--resume")
    listed = "train.lr: 0.005 -> 0.05 (cannot change" in out and "train.max_steps: 5 -> 7" in out
    rc2, out2 = ctx.cli(*ctx.sft_args(run, *ctx.steps, "train.max_steps=7"), "--resume", "--allow-changes",
                        "train.max_steps")
    cfg = (run / "config.yaml").read_text()
    recorded = cfg.startswith("# resumed at step 4: train.max_steps: 5 -> 7") and "lr: 0.005" in cfg
    ok = clear(rc, out) and listed and rc2 == 0 and recorded
    return ("good" if ok else "bad"), f"rc {rc}, both keys listed: {listed}; with --allow-changes train.max_steps " \
                                      f"rc {rc2}, config.yaml records it: {recorded}"


@probe("I10", "--resume lora.r=8 (checkpoint has r 4)", "bad")
def i10(ctx):
    run = unfinished(ctx, "i10")
    rc, out = ctx.cli(*ctx.sft_args(run, *ctx.steps, "lora.r=8"), "--resume")
    return ("good" if clear(rc, out, "lora.r: 4 -> 8 (cannot change on resume") else "bad"), \
        f"rc {rc}: {last_line(out, 'lora.r')}"


@probe("I11", "only a leftover checkpoints/.tmp-step-1, rerun and --resume", "bad")
def i11(ctx):
    run = ctx.root / "i11"
    (run / "checkpoints" / ".tmp-step-1").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-step-1" / "optimizer.pt").write_bytes(b"partial")
    rc1, out1 = ctx.cli(*ctx.sft_args(run, "train.max_steps=1"), "--resume")
    (run / "checkpoints" / ".tmp-step-1").mkdir(parents=True)
    rc2, out2 = ctx.cli(*ctx.sft_args(run, "train.max_steps=1"))
    ok = (clear(rc1, out1, "removing", "run without --resume") and rc2 == 0 and "removing" in out2
          and (run / "adapter").is_dir())
    return ("good" if ok else "bad"), f"--resume rc {rc1} ({last_line(out1)}); rerun rc {rc2}: " \
                                      f"{last_line(out2, 'removing')}"


# --------------------------------------------------------------------------------------------------
# 6. full disk (a tmpfs in a private mount namespace)


def _after_ok(after: str, mount: Path, forbidden=(".tmp-", ".partial-")) -> bool:
    return not any(f in after for f in forbidden)


@probe("F1", "sft checkpoint does not fit (full fine-tune, tmpfs 30 MB)", "bad")
def f1(ctx):
    small = ctx.root / "f1"
    small.mkdir()
    args = " ".join(map(str, ctx.sft_args(small / "run", "lora=null", "train.max_steps=2", "train.save_every=1")))
    rc, out, after = ctx.in_tmpfs("30M", small, f"{sys.executable} -m posttrain.cli {args}")
    ok = clear(rc, out, "no space left on device", "MB needed") and _after_ok(after, small)
    return ("good" if ok else "bad"), f"rc {rc}: {last_line(out)}; leftovers: {not _after_ok(after, small)}"


@probe("F2", "final adapter does not fit (tmpfs 3 MB; the tokenizer is larger)", "mixed")
def f2(ctx):
    small = ctx.root / "f2"
    small.mkdir()
    args = " ".join(map(str, ctx.sft_args(small / "run", *ctx.steps)))
    rc, out, after = ctx.in_tmpfs("3M", small, f"{sys.executable} -m posttrain.cli {args}")
    ok = clear(rc, out, "no space left on device", "writing the final adapter/", "trained weights are kept in") \
        and _after_ok(after, small) and "step-5/manifest.json" in after
    return ("good" if ok else "mixed"), f"rc {rc}: {last_line(out)}"


@probe("F3", "export --format merged into a full tmpfs (10 MB)", "mixed")
def f3(ctx):
    small = ctx.root / "f3"
    small.mkdir()
    rc, out, after = ctx.in_tmpfs("10M", small, f"{sys.executable} -m posttrain.cli export {ctx.ref} --format merged "
                                                f"--out {small / 'merged'}")
    ok = clear(rc, out, "no space left on device", "MB needed") and _after_ok(after, small)
    return ("good" if ok else "mixed"), f"rc {rc}: {last_line(out)}"


@probe("F4", "export --format adapter into a full tmpfs (3 MB)", "mixed")
def f4(ctx):
    small = ctx.root / "f4"
    small.mkdir()
    rc, out, after = ctx.in_tmpfs("3M", small, f"{sys.executable} -m posttrain.cli export {ctx.ref} --format adapter "
                                               f"--out {small / 'adapter'} --no-verify")
    ok = clear(rc, out, "no space left on device") and _after_ok(after, small)
    return ("good" if ok else "mixed"), f"rc {rc}: {last_line(out)}"


@probe("F5", "generate --output on a full tmpfs", "mixed")
def f5(ctx):
    small = ctx.root / "f5"
    small.mkdir()
    fill = f"dd if=/dev/zero of={small / 'fill'} bs=4k 2>/dev/null"
    rc, out, after = ctx.in_tmpfs("64k", small, f"{fill}; {sys.executable} -m posttrain.cli generate {ctx.model} "
                                                f"--input {ctx.prompts} --output {small / 'out.jsonl'} "
                                                "--max-new-tokens 4 --preset greedy")
    return ("good" if clear(rc, out, "no space left on device", "continues after the last complete line")
            else "mixed"), f"rc {rc}: {last_line(out)}"


@probe("F6", "verify --file --out on a full tmpfs", "mixed")
def f6(ctx):
    small = ctx.root / "f6"
    small.mkdir()
    pairs = ctx.root / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prediction": "{i}", "gold": "{i}"}}\n' for i in range(3000)))
    fill = f"dd if=/dev/zero of={small / 'fill'} bs=4k 2>/dev/null"
    rc, out, after = ctx.in_tmpfs("64k", small, f"{fill}; {sys.executable} -m posttrain.cli verify --file {pairs} "
                                                f"--out {small / 'v.jsonl'} --workers 1")
    return ("good" if clear(rc, out, "no space left on device") else "mixed"), f"rc {rc}: {last_line(out)}"


# --------------------------------------------------------------------------------------------------


def setup(ctx: Ctx) -> None:
    from posttrain.tiny import save_tiny_qwen3

    ctx.model = save_tiny_qwen3(ctx.root / "tiny-qwen3")
    ctx.data = ctx.root / "chat.jsonl"
    ctx.data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i % 5}?"},
        {"role": "assistant", "content": f"It is {i + i % 5}."}]}) + "\n" for i in range(16)))
    ctx.prompts = ctx.root / "prompts.jsonl"
    ctx.prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(6)))
    ctx.steps = ["train.max_steps=5", "train.save_every=2", "train.keep_checkpoints=0"]
    ctx.ref = ctx.root / "ref"
    rc, out = ctx.cli(*ctx.sft_args(ctx.ref, *ctx.steps))
    assert rc == 0, out


def can_mount() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1M tmpfs /mnt"], capture_output=True).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="keep the probes' files in this directory (default: a temporary one, removed)")
    ap.add_argument("--only", help="comma-separated probe ids")
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="posttrain-probes-"))
    root.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(root)
    t0 = time.time()
    setup(ctx)
    mount = can_mount()
    rows = []
    for pid, what, old, fn in PROBES:
        if args.only and pid not in args.only.split(","):
            continue
        t = time.time()
        if pid.startswith("F") and not mount:
            verdict, seen = "skipped", "no private tmpfs here (unshare -rm + mount)"
        else:
            try:
                verdict, seen = fn(ctx)
            except Exception as exc:  # noqa: BLE001 - a probe that crashes is a finding, not the end of the table
                verdict, seen = "bad", f"the probe itself failed: {type(exc).__name__}: {exc}"
        rows.append((pid, what, old, verdict, seen.replace("|", "\\|").replace("\n", " ")))
        print(f"[probe] {pid} {verdict} ({time.time() - t:.0f}s)", file=sys.stderr, flush=True)
    print("| id | probe | review's verdict | verdict now | observed |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    counts = {v: sum(r[3] == v for r in rows) for v in ("good", "mixed", "bad", "skipped")}
    print(f"\n{len(rows)} probes in {time.time() - t0:.0f}s: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if counts["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
