"""Deleting only inside the owning directory, naming a full disk, and one writer per run directory (the lock)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import fileops
from posttrain.errors import UserError
from posttrain.runs import LOCK, RunLock, lock_run_dir

SRC = Path(fileops.__file__).resolve().parent


def test_remove_tree_deletes_only_strictly_inside_its_owner(tmp_path):
    run = tmp_path / "proj" / "run"
    (run / "stage" / "sub").mkdir(parents=True)
    (tmp_path / "proj" / "NOTES.md").write_text("precious")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (run / "link").symlink_to(outside)
    for bad in (run, run / "..", run / "stage" / ".." / "..", run / "link", tmp_path):
        with pytest.raises(UserError, match="refusing to delete .*nothing was deleted"):
            fileops.remove_tree(bad, run)
    assert (tmp_path / "proj" / "NOTES.md").read_text() == "precious" and (outside / "keep.txt").is_file()
    fileops.remove_tree(run / "stage", run)
    assert not (run / "stage").exists() and run.is_dir()
    fileops.remove_tree(run / "never-existed", run)  # nothing to do


def test_every_rmtree_in_the_package_goes_through_remove_tree():
    """``shutil.rmtree`` is called in fileops.remove_tree only: every other deletion of a tree is checked."""
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "rmtree":
                calls.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert [c.split(":")[0] for c in calls] == ["fileops.py"], calls


def test_a_real_enospc_is_named_with_the_space_free(tmp_path):
    with pytest.raises(UserError, match=r"no space left on device in .* writing the notes \(.* MB free\); "
                                        "free some space"):
        with fileops.writing(tmp_path, "the notes"):
            with open("/dev/full", "w") as f:  # the kernel's ENOSPC, as on a full disk
                f.write("x" * 10_000)
                f.flush()
    # the same error as safetensors and torch report it (wrapped, message only) is recognised too
    with pytest.raises(UserError, match="no space left on device"):
        with fileops.writing(tmp_path, "weights"):
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(KeyError):  # anything else passes through unchanged
        with fileops.writing(tmp_path, "weights"):
            raise KeyError("a bug, not a full disk")


def test_need_refuses_a_write_that_cannot_fit_before_writing_anything(tmp_path):
    free = fileops.free_bytes(tmp_path)
    with pytest.raises(UserError, match=rf"about {(free + 2**30) / 2**20:,.1f} MB needed, .* MB free"):
        with fileops.writing(tmp_path, "a checkpoint") as w:
            w.need(free + 2**30)
            (tmp_path / "written").write_text("must not happen")
    assert not (tmp_path / "written").exists()


HOLD = """
import sys, time
from posttrain.runs import lock_run_dir
lock_run_dir(sys.argv[1], "posttrain sft")
print("locked", flush=True)
time.sleep(120)
"""


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_killed_holder_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        with pytest.raises(UserError, match=rf"{run} is in use by another posttrain process \(PID {proc.pid}.*"
                                            r"posttrain sft.*\): wait for it to finish"):
            lock_run_dir(run, "posttrain grpo")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (run / LOCK).is_file()  # kill -9 leaves the file, but the kernel released the lock
    lock = lock_run_dir(run, "posttrain grpo")
    assert f"was left by PID {proc.pid}" in capsys.readouterr().err
    assert f'"pid": {os.getpid()}' in (run / LOCK).read_text()
    lock.release()
    assert not (run / LOCK).exists()  # a clean end leaves nothing that looks stale
    lock_run_dir(run, "posttrain sft")
    assert "was left by" not in capsys.readouterr().err


def test_the_same_process_taking_its_lock_again_supersedes_its_earlier_holder(tmp_path):
    """train() called again after an error in the same process (tests, notebooks) is not "in use by itself"."""
    first = lock_run_dir(tmp_path, "posttrain sft")
    second = RunLock(tmp_path / LOCK, "posttrain sft").acquire()
    assert first._fd is None and second._fd is not None
    code = f"from posttrain.runs import lock_run_dir; lock_run_dir({str(tmp_path)!r}, 'x')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and f"PID {os.getpid()}" in proc.stderr  # still held against other processes
    second.release()


def test_a_full_disk_in_a_command_without_its_own_guard_is_one_line(tmp_path):
    """``posttrain verify --file --out`` onto a full device (the kernel's /dev/full): no OSError traceback."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prediction": "{i}", "gold": "{i}"}}\n' for i in range(2000)))
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "verify", "--file", str(pairs), "--out",
                           "/dev/full", "--workers", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "posttrain verify: error: no space left on device" in proc.stderr
