import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True)


def test_help_lists_commands_and_sft_help_explains_overrides():
    res = run("--help")
    assert res.returncode == 0
    for cmd in ("sft", "verify"):
        assert cmd in res.stdout
    res = run("sft", "--help")
    assert res.returncode == 0 and "key=value" in res.stdout and "--resume" in res.stdout


def test_bad_recipe_is_one_line_error_without_traceback(tmp_path):
    res = run("sft", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2
    assert "recipe file not found" in res.stderr and "Traceback" not in res.stderr
    bad = tmp_path / "r.yaml"
    bad.write_text("model: {name: x}\ndata: {path: x}\ntrain: {lr: 1e-4, epochz: 2}\n")
    res = run("sft", str(bad))
    assert res.returncode == 2 and "unknown key 'train.epochz'" in res.stderr and "Traceback" not in res.stderr
