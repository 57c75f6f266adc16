"""The thread count from the free cores (posttrain.threads): cgroup and /proc/stat text in their real formats, the
choice, the overrides, and a resumed run continuing with the count its checkpoint recorded."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import pytest
import torch

from posttrain.cli import main
from posttrain.errors import UserError
from posttrain.threads import (
    ENV,
    ThreadChoice,
    apply,
    busy_cores,
    cgroup_quota,
    choose_threads,
    decide,
    env_count,
    other_busy_cores,
    parse_cfs,
    parse_cpu_max,
    parse_proc_stat,
    resume_count,
)

# /proc/stat of a 2-core machine, 0.25 s apart: cpu0 spent the window in a busy loop (user), cpu1 idle but for a
# little system time; cpu1's iowait is idle time, cpu0's steal (another VM had the core) is busy time
STAT_1 = """cpu  3990854 193 376493 2381006 143388 0 1556 16798 0 0
cpu0 1423364 118 144170 1839156 35793 0 423 9040 0 0
cpu1 2567490 75 232323 541833 107595 0 1133 7758 0 0
intr 1024263784 0 9 0 0 0 0 0 0 0 0 0 0 0 0
ctxt 2041513271
btime 1764589000
processes 262518
procs_running 2
procs_blocked 0
softirq 405318474 2 101331089 21 3101064 0 0 57 129403153 0 171483088
"""
STAT_2 = """cpu  3990877 193 376494 2381032 143389 0 1556 16799 0 0
cpu0 1423387 118 144170 1839156 35793 0 423 9041 0 0
cpu1 2567490 75 232324 541859 107596 0 1133 7758 0 0
intr 1024265001 0 9 0 0 0 0 0 0 0 0 0 0 0 0
ctxt 2041514210
btime 1764589000
processes 262519
procs_running 3
procs_blocked 0
softirq 405318990 2 101331210 21 3101070 0 0 57 129403300 0 171483330
"""


def test_cgroup_quota_files_in_their_real_formats():
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("150000 100000\n") == 1.5
    assert parse_cpu_max("50000 100000\n") == 0.5
    assert parse_cfs("-1\n", "100000\n") is None
    assert parse_cfs("200000\n", "100000\n") == 2.0


def test_the_tightest_quota_of_the_cgroup_and_its_ancestors(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "job" / "cpu.max").write_text("150000 100000\n")
    (v2 / "job" / "step" / "cpu.max").write_text("300000 100000\n")
    assert cgroup_quota(v2, "0::/job/step\n") == 1.5
    assert cgroup_quota(v2, "0::/\n") is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker" / "abc").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/docker/abc\n"
    assert cgroup_quota(v1, membership) == 0.5
    assert cgroup_quota(tmp_path / "none", membership) is None


def test_busy_cores_from_two_proc_stat_snapshots():
    a, b = parse_proc_stat(STAT_1), parse_proc_stat(STAT_2)
    assert sorted(a) == [0, 1]  # per-core lines only; the "cpu" total and intr/ctxt/... lines are not cores
    assert busy_cores(a, b, {0}) == pytest.approx(24 / 24)  # 23 user + 1 steal of 24 ticks
    assert busy_cores(a, b, {1}) == pytest.approx(1 / 28)  # 1 system of 28; 26 idle + 1 iowait are not busy
    assert busy_cores(a, b) == pytest.approx(1 + 1 / 28)
    assert busy_cores(b, b) == 0.0  # no ticks passed: nothing known to be busy


@pytest.mark.parametrize("cpus,quota,busy,default,procs,want", [
    (2, None, 0.0, 2, 1, 2),     # idle: every core
    (2, None, 1.0, 2, 1, 1),     # one other busy process: the free core only
    (2, None, 0.2, 2, 1, 2),     # a little background work: the core still counts as free
    (2, None, 0.3, 2, 1, 1),     # more than BUSY_MARGIN of a core: it does not
    (2, None, 2.0, 2, 1, 1),     # everything busy: still one thread
    (8, 2.5, 0.0, 8, 1, 3),      # a fractional quota rounds up
    (8, 1.0, 6.5, 8, 1, 1),
    (16, None, 0.0, 8, 1, 8),    # never more than torch's default (its physical cores)
    (4, None, 0.0, 4, 2, 2),     # two processes of one launch share the cores
])
def test_the_automatic_count(cpus, quota, busy, default, procs, want):
    count, reason = decide(cpus, quota, busy, default, procs)
    assert count == want
    assert f"of {cpus} cores" in reason and f"{busy:.1f} busy with other work" in reason and ENV in reason


def test_environment_overrides_and_their_errors():
    assert choose_threads({ENV: "3", "OMP_NUM_THREADS": "1"}) == ThreadChoice(3, ENV, f"{ENV}=3")
    omp = choose_threads({"OMP_NUM_THREADS": "1"})
    assert (omp.count, omp.source) == (1, "OMP_NUM_THREADS")
    assert env_count({ENV: " "}, ENV) is None
    for bad in ("two", "0", "-1", "1.5"):
        with pytest.raises(UserError, match=rf"{ENV}='{bad}': the number of threads must be a positive integer"):
            choose_threads({ENV: bad})


def test_a_bad_override_stops_the_command_before_any_work(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(ENV, "many")
    assert main(["sft", "tiny/sft", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"{ENV}='many'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_apply_sets_torch_and_prints_one_line():
    before = torch.get_num_threads()
    out = io.StringIO()
    try:
        apply(ThreadChoice(1, ENV, f"{ENV}=1"), stream=out)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert out.getvalue() == f"[posttrain] threads: 1 ({ENV}=1)\n"


def test_a_busy_process_is_seen_and_our_own_work_is_not():
    """The real /proc/stat: a spinning process counts as most of a core; our own spinning does not count."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert other_busy_cores(None, 0.4) >= 0.7
    finally:
        spin.kill()
        spin.wait()


def test_resume_keeps_the_count_the_run_used():
    busier = ThreadChoice(1, "auto", "of 2 cores, 1.0 busy with other work; POSTTRAIN_THREADS=N overrides")
    count, line = resume_count(recorded=2, override=None, current=1, now=busier)
    assert count == 2 and "as the run used before --resume" in line
    assert "the machine looks busier now (of 2 cores, 1.0 busy with other work: 1 would be chosen)" in line
    count, line = resume_count(recorded=2, override=None, current=2, now=ThreadChoice(2, "auto", "of 2 cores"))
    assert count == 2 and "busier" not in line
    count, line = resume_count(recorded=2, override=1, current=2, now=None)
    assert count == 1 and "not bit-identical" in line
    count, line = resume_count(recorded=None, override=None, current=2, now=None)
    assert count == 2 and "does not record" in line


def test_resumed_run_continues_with_the_recorded_count(tiny_qwen3, tmp_path, capsys):
    """A run trained with 1 thread, resumed in a process set to 2: its checkpoint recorded 1, the resumed steps use
    1 again and end on the same adapter, bit for bit."""
    from safetensors.torch import load_file

    from posttrain.config import load_recipe
    from posttrain.sft import train
    from tests.conftest import write_jsonl

    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 2?"},
                          {"role": "assistant", "content": f"{i + 2}."}]} for i in range(8)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    run = tmp_path / "run"
    cfg = load_recipe(None, [f"model.name={tiny_qwen3}", f"data.path={data}", f"output_dir={run}",
                             "data.template=chatml", "data.max_length=64", "lora.r=4", "lora.alpha=8",
                             "train.batch_size=2", "train.max_steps=2", "train.save_every=1", "train.warmup_steps=0",
                             "data.val_size=0"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(cfg)
        first = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        state = (run / "checkpoints" / "step-1" / "state.json").read_text()
        assert '"threads": 1' in state
        torch.set_num_threads(2)
        capsys.readouterr()
        train(cfg, resume=True)  # continues from step-1: step 2 again
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "[posttrain] threads: 1, as the run used before --resume" in capsys.readouterr().out
    again = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
