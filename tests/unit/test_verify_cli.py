"""``posttrain verify``: one pair (exit status 0/1) and a JSONL file (results + summary)."""

import json

import pytest

from posttrain.cli import main


def test_single_pair_equal(capsys):
    assert main(["verify", r"\frac{1}{2}", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("equal (exact)")
    assert r"prediction: \frac{1}{2}" in out


def test_single_pair_not_equal(capsys):
    assert main(["verify", "(2,5]", "[2,5)"]) == 1
    assert capsys.readouterr().out.startswith("not equal (different_brackets)")


def test_single_pair_json_and_symbolic(capsys):
    assert main(["verify", "--json", r"\sin^2 x+\cos^2 x", "1"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["equal"] is True and v["gold_normalized"] == "1"


def test_file_mode_keeps_fields_and_writes_out(tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    rows = [{"prediction": r"\boxed{3}", "gold": "3", "id": 1}, {"prediction": "2", "gold": "3", "id": 2},
            {"prediction": 5, "gold": "5.0", "id": 3}, {"prediction": r"\log_2 8", "gold": "3", "id": 4}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "out.jsonl"
    assert main(["verify", "--file", str(src), "--out", str(out), "--workers", "1"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == [1, 2, 3, 4]
    assert [g["equal"] for g in got] == [True, False, True, True]
    assert got[1]["reason"] == "different_value" and got[1]["prediction"] == "2"
    err = capsys.readouterr().err
    assert "4 pairs, 3 equal, 1 not equal, 0 timeouts" in err


def test_file_mode_to_stdout(tmp_path, capsys):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prediction": "1", "gold": "1"}) + "\n")
    assert main(["verify", "--file", str(src)]) == 0
    assert json.loads(capsys.readouterr().out)["equal"] is True


@pytest.mark.parametrize(
    "content,message",
    [('{"gold": "1"}\n', "p.jsonl:1: missing key 'prediction'"),
     ('{"prediction": "1", "gold": "1"}\nnot json\n', "p.jsonl:2: not valid JSON"),
     ("[1, 2]\n", "p.jsonl:1: expected a JSON object")],
)
def test_bad_files_are_user_errors(tmp_path, capsys, content, message):
    src = tmp_path / "p.jsonl"
    src.write_text(content)
    assert main(["verify", "--file", str(src)]) == 2
    assert message in capsys.readouterr().err


def test_usage_errors(capsys, tmp_path):
    assert main(["verify", "1"]) == 2
    assert "give PREDICTION and GOLD" in capsys.readouterr().err
    assert main(["verify", "--file", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot open" in capsys.readouterr().err
