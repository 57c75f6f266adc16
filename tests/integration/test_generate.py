"""posttrain generate on the tiny Qwen3 (real Qwen vocabulary and chat template): batched output in input order,
resume after a torn write equals an uninterrupted run (per-line random streams), and bad input is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.errors import UserError
from posttrain.inference import generate_file, load_for_inference, sampling_settings

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [{"prompt": f"Count to {i}.", "id": f"p{i}"} for i in range(5)] + [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}], "id": "m"}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from posttrain.tiny import save_tiny_qwen3

    root = tmp_path_factory.mktemp("generate_tiny")
    base = save_tiny_qwen3(root / "qwen3")
    model, tok = load_for_inference(str(base), verbose=False)
    inp = root / "prompts.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    return {"base": base, "model": model, "tok": tok, "input": inp}


SAMPLING = sampling_settings("instruct")  # sampled, not greedy: resume must reproduce random draws too


def run(tiny, out, **kw):
    return generate_file(tiny["model"], tiny["tok"], tiny["input"], out, sampling=SAMPLING, max_new_tokens=6,
                         batch_size=4, seed=7, progress=False, **kw)


def test_output_lines_follow_input_order_with_fields_copied(tiny, tmp_path):
    out = tmp_path / "out.jsonl"
    stats = run(tiny, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["generated"] == len(PROMPTS) and stats["skipped"] == 0
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    assert [r["id"] for r in rows] == [p["id"] for p in PROMPTS]
    assert rows[-1]["messages"] == PROMPTS[-1]["messages"]
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and 1 <= r["completion_tokens"] <= 6
        assert isinstance(r["completion"], str)


def test_resume_after_torn_write_equals_uninterrupted_run(tiny, tmp_path):
    full = tmp_path / "full.jsonl"
    run(tiny, full)
    lines = full.read_bytes().split(b"\n")
    resumed = tmp_path / "resumed.jsonl"
    # what a kill in the middle of a write leaves: three complete lines and part of the fourth
    resumed.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][: len(lines[3]) // 2])
    stats = run(tiny, resumed)
    assert stats["skipped"] == 3 and stats["generated"] == len(PROMPTS) - 3
    assert resumed.read_bytes() == full.read_bytes()
    again = run(tiny, resumed)  # finished: nothing to do
    assert again["generated"] == 0 and resumed.read_bytes() == full.read_bytes()


def test_output_of_another_input_is_refused_and_overwrite_starts_over(tiny, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"index": 0, "prompt": "something else", "completion": "x"}) + "\n")
    with pytest.raises(UserError, match="--overwrite"):
        run(tiny, out)
    stats = run(tiny, out, overwrite=True)
    assert stats["generated"] == len(PROMPTS)


def test_bad_input_line_is_named(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        generate_file(tiny["model"], tiny["tok"], bad, tmp_path / "o.jsonl", sampling=SAMPLING, progress=False)


def test_cli_resumes_with_progress(tiny, tmp_path):
    """The command line continues a file a killed run left behind: 4 lines written in-process (the same settings
    as the command below), then one `posttrain generate` finishes it."""
    args = dict(sampling=sampling_settings("greedy"), max_new_tokens=4, batch_size=3, seed=0, progress=False)
    full = tmp_path / "full.jsonl"
    generate_file(tiny["model"], tiny["tok"], tiny["input"], full, **args)
    out = tmp_path / "cli.jsonl"
    out.write_text("\n".join(full.read_text().splitlines()[:4]) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "posttrain.cli", "generate", str(tiny["base"]), "--input", str(tiny["input"]),
           "--output", str(out), "--preset", "greedy", "--max-new-tokens", "4", "--batch-size", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "continuing after line 4" in proc.stderr and "2 generated, 4 already done" in proc.stdout
    assert "generate" in proc.stderr and "prompt" in proc.stderr  # the progress bar
    assert out.read_text() == full.read_text()


def test_a_file_that_is_not_its_own_output_is_never_truncated(tiny, tmp_path):
    """The review's G4-G6: notes, an unrelated dataset and the input itself were emptied with exit 0."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nline two\n")
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("".join(json.dumps({"question": f"q{i}", "answer": i}) + "\n" for i in range(20)))
    one_line = tmp_path / "one.txt"
    one_line.write_text("no newline at the end")
    for path in (notes, dataset, one_line):
        before = path.read_bytes()
        for overwrite in (False, True):
            with pytest.raises(UserError, match=rf"--output {path} exists and is not the output of an earlier "
                                                r"posttrain generate \(line 1: .*\); it will not be overwritten"):
                run(tiny, path, overwrite=overwrite)
            assert path.read_bytes() == before
    inp = tiny["input"].read_bytes()
    for overwrite in (False, True):
        with pytest.raises(UserError, match="is the --input file; give another --output"):
            run(tiny, tiny["input"], overwrite=overwrite)
    assert tiny["input"].read_bytes() == inp


def test_a_damaged_line_inside_an_earlier_output_is_refused_not_cut(tiny, tmp_path):
    """Only the torn last piece (no newline) is cut; a bad complete line means the file is not ours to truncate."""
    out = tmp_path / "out.jsonl"
    run(tiny, out)
    lines = out.read_text().splitlines()
    damaged = "\n".join(lines[:2] + ["garbage"] + lines[3:]) + "\n"
    out.write_text(damaged)
    with pytest.raises(UserError, match=r"line 3: not JSON"):
        run(tiny, out)
    assert out.read_text() == damaged

