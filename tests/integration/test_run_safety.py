"""A run directory survives faults on a tiny Qwen3: damaged checkpoints are skipped (and resume stays bit for bit),
leftovers of a killed writer never block, a changed recipe is refused on --resume, a second writer is refused by
the lock, a finished run is not overwritten, and a full disk during the final save keeps the trained weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.config import load_recipe
from posttrain.errors import UserError
from posttrain.sft import train
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[2]
STEPS = ["train.max_steps=5", "train.save_every=2", "train.keep_checkpoints=0"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i % 5}?"},
                          {"role": "assistant", "content": f"It is {i + i % 5}."}]} for i in range(16)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", rows)


def overrides(model, data, out, *extra) -> list[str]:
    return [f"model.name={model}", f"data.path={data}", f"output_dir={out}", "data.template=chatml",
            "data.max_length=64", "lora.r=4", "lora.alpha=8", "train.lr=5e-3", "train.batch_size=2",
            "train.max_grad_norm=null", "lora.dropout=0.1", *extra]


def recipe(model, data, out, *extra):
    return load_recipe(None, overrides(model, data, out, *extra))


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def finished(tiny_qwen3, data_file, tmp_path_factory):
    """An uninterrupted 5-step run with checkpoints step-2 and step-4, and the adapter it ends with."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(recipe(tiny_qwen3, data_file, run, *STEPS))
    return run


def unfinished_copy(finished: Path, dest: Path) -> Path:
    """The run as a kill after step 4 leaves it: checkpoints, no adapter."""
    shutil.copytree(finished, dest)
    shutil.rmtree(dest / "adapter")
    return dest


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[:1000])


def _flip(f: Path):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the checksum can tell
    f.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": ("trainable.safetensors", _truncate, "has 1,000 bytes where"),
    "empty optimizer": ("optimizer.pt", lambda f: f.write_bytes(b""), "optimizer.pt has 0 bytes"),
    "one flipped bit": ("trainable.safetensors", _flip, "does not match its sha256"),
    "cut state.json": ("state.json", lambda f: f.write_text('{"epoch": 0, "ind'), "state.json has"),
    "weights missing": ("trainable.safetensors", lambda f: f.unlink(), "trainable.safetensors is missing"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped_and_resume_is_still_exact(kind, finished, tiny_qwen3, data_file,
                                                                          tmp_path, capsys):
    run = unfinished_copy(finished, tmp_path / "run")
    name, damage, problem = DAMAGE[kind]
    damage(run / "checkpoints" / "step-4" / name)
    capsys.readouterr()
    train(recipe(tiny_qwen3, data_file, run, *STEPS), resume=True)
    out = capsys.readouterr().out
    assert f"checkpoint {run / 'checkpoints' / 'step-4'} is damaged (" in out and problem in out, out
    assert "resuming from step-2, the newest intact checkpoint" in out and "resumed from step 2" in out
    a, b = adapter(finished), adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # steps 3-5 redone bit for bit
    manifest = json.loads((run / "checkpoints" / "step-4" / "manifest.json").read_text())  # step-4 written anew
    assert manifest["step"] == 4 and set(manifest["files"]) >= {"trainable.safetensors", "optimizer.pt", "state.json"}


def test_no_intact_checkpoint_says_how_to_start_over(finished, tiny_qwen3, data_file, tmp_path):
    run = unfinished_copy(finished, tmp_path / "run")
    for step in ("step-2", "step-4"):
        _truncate(run / "checkpoints" / step / "trainable.safetensors")
    with pytest.raises(UserError, match=r"--resume: no intact checkpoint in .*checkpoints \(step-4: trainable"
                                        r".*; step-2: .*\); delete .*checkpoints and run without --resume"):
        train(recipe(tiny_qwen3, data_file, run, *STEPS), resume=True)


def test_a_leftover_temporary_checkpoint_is_removed_instead_of_blocking(tiny_qwen3, data_file, tmp_path, capsys):
    """kill -9 or a full disk during the first checkpoint leaves only checkpoints/.tmp-step-1."""
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step-1").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-step-1" / "optimizer.pt").write_bytes(b"partial")
    capsys.readouterr()
    with pytest.raises(UserError, match=r"--resume: no checkpoint in .*checkpoints; run without --resume"):
        train(recipe(tiny_qwen3, data_file, run, "train.max_steps=2"), resume=True)
    assert ".tmp-step-1: left unfinished by an earlier run that was stopped or failed" in capsys.readouterr().out
    (run / "checkpoints" / ".tmp-step-1").mkdir()  # and without --resume (the review's deadlock's other half)
    train(recipe(tiny_qwen3, data_file, run, "train.max_steps=2"))
    assert ".tmp-step-1: left unfinished" in capsys.readouterr().out
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "checkpoints" / ".tmp-step-1").exists()


def test_resume_with_a_changed_recipe_is_refused_or_recorded(finished, tiny_qwen3, data_file, tmp_path, capsys):
    run = unfinished_copy(finished, tmp_path / "run")
    with pytest.raises(UserError) as refused:
        train(recipe(tiny_qwen3, data_file, run, *STEPS, "train.lr=0.05", "train.max_steps=7"), resume=True)
    assert str(refused.value).splitlines()[1:3] == [
        "  train.max_steps: 5 -> 7",
        "  train.lr: 0.005 -> 0.05 (cannot change on resume: the optimizer state in the checkpoint restores it)"]
    assert "--allow-changes train.max_steps to continue" in str(refused.value)
    with pytest.raises(UserError, match=r"lora.r: 4 -> 8 \(cannot change on resume"):
        train(recipe(tiny_qwen3, data_file, run, *STEPS, "lora.r=8"), resume=True)
    capsys.readouterr()
    train(recipe(tiny_qwen3, data_file, run, *STEPS, "train.max_steps=7"), resume=True,
          allow_changes=["train.max_steps"])
    assert "resumed from step 4 with changed settings (train.max_steps: 5 -> 7)" in capsys.readouterr().out
    text = (run / "config.yaml").read_text()
    assert text.startswith("# resumed at step 4: train.max_steps: 5 -> 7\n")
    assert yaml.safe_load(text)["train"]["max_steps"] == 7
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 8))


def test_a_checkpoint_that_does_not_fit_the_model_names_the_tensor(finished, tiny_qwen3, data_file, tmp_path):
    """config.yaml edited to another LoRA rank: the comparison passes, the checkpoint's shapes do not."""
    run = unfinished_copy(finished, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["lora"]["r"] = 8
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match=r"checkpoint .*step-4 does not fit the model: .*lora_A.* has shape \(4, .*\) "
                                        r"in the checkpoint and \(8, .*\) in the model"):
        train(recipe(tiny_qwen3, data_file, run, *STEPS, "lora.r=8"), resume=True)


def test_a_second_writer_is_refused_and_a_finished_run_is_not_overwritten(finished, tiny_qwen3, data_file, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom posttrain.runs import lock_run_dir\n"
                               "lock_run_dir(sys.argv[1], 'posttrain grpo'); print('locked', flush=True); "
                               "time.sleep(120)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"in use by another posttrain process \(PID {holder.pid}.*posttrain grpo"):
            train(recipe(tiny_qwen3, data_file, run, "train.max_steps=1"))
    finally:
        holder.kill()
        holder.wait()
    assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()  # nothing was written
    before = adapter(finished)
    with pytest.raises(UserError, match=r"holds a finished run \(adapter/\); choose another output_dir"):
        train(recipe(tiny_qwen3, data_file, finished, "train.max_steps=1", "train.lr=1"))
    after = adapter(finished)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1M tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a private tmpfs (unshare -rm and mount)")
def test_a_full_disk_at_the_final_save_is_named_and_keeps_the_trained_weights(finished, tiny_qwen3, data_file,
                                                                              tmp_path):
    """A real full disk: a 3 MB tmpfs holds the checkpoints (a few hundred kB) but not the final save (the
    tokenizer alone is larger). The run says so, writes a checkpoint of its last step, and --resume on a disk
    with space writes the same adapter as the uninterrupted run."""
    small, keep = tmp_path / "small", tmp_path / "kept"
    small.mkdir()
    args = overrides(tiny_qwen3, data_file, small / "run", *STEPS)
    (tmp_path / "r.yaml").write_text("model: {name: x}\ndata: {path: x}\n")
    script = (f"mount -t tmpfs -o size=3M tmpfs {small} && {sys.executable} -m posttrain.cli sft "
              f"{tmp_path / 'r.yaml'} {' '.join(args)}; "
              f"rc=$?; cp -a {small / 'run'} {keep}; exit $rc")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"no space left on device in {small / 'run'} writing the final adapter/" in proc.stderr, proc.stderr
    assert "MB free" in proc.stderr and "Traceback" not in proc.stderr
    assert f"The trained weights are kept in {small / 'run' / 'checkpoints' / 'step-5'}" in proc.stderr
    assert not (keep / ".tmp-adapter").exists() and not (keep / "adapter").exists()
    cfg = yaml.safe_load((keep / "config.yaml").read_text())
    train(recipe(tiny_qwen3, data_file, keep, *STEPS), resume=True)  # output_dir is a safe change
    assert cfg["output_dir"] == str(small / "run")
    a, b = adapter(finished), adapter(keep)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_given_as_a_model_says_how_to_get_the_model(finished, capsys):
    """The review's E2: exporting checkpoints/step-4 said only "neither a run directory ... nor a model"."""
    from posttrain.cli import main

    for path in (finished / "checkpoints" / "step-4", finished / "checkpoints"):
        assert main(["export", str(path), "--format", "adapter", "--out", str(finished / "export" / "x")]) == 2
        err = capsys.readouterr().err
        assert f"of the run {finished} (weights with optimizer state, for --resume), not a loadable model. Finish " \
               f"the run with posttrain sft|grpo RECIPE output_dir={finished} --resume, then use {finished}" in err, err
