"""Benchmark loading from the shared offline copies and from user files; prompt building; bad input."""

import json
from pathlib import Path

import pytest

from posttrain.errors import UserError
from posttrain.evaluation.benchmarks import DAPO_HELDOUT_FRACTION, is_dapo_heldout, load_benchmark

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"
needs_shared = pytest.mark.skipif(not (SHARED / "gsm8k.jsonl").is_file(),
                                  reason=f"offline benchmark copies not found at {SHARED}")


@needs_shared
@pytest.mark.parametrize("name, rows, first_gold", [
    ("gsm8k", 1319, "18"), ("math500", 500, r"\left( 3, \frac{\pi}{2} \right)"), ("aime24", 30, "204"),
    ("amc23", 40, "27"), ("minerva", 272, "1.6"),
])
def test_shared_copies_load_with_gold_answers(name, rows, first_gold):
    b = load_benchmark(name, benchmark_dir=SHARED)
    assert b.name == name and len(b) == rows
    assert b.problems[0].answer == first_gold
    assert all(p.problem and p.answer for p in b.problems)
    assert len({p.id for p in b.problems}) == rows
    if name == "math500":
        assert {p.meta["level"] for p in b.problems} == {1, 2, 3, 4, 5}
        assert len({p.meta["subject"] for p in b.problems}) == 7


@needs_shared
def test_path_picks_schema_and_limits():
    b = load_benchmark(str(SHARED / "gsm8k.jsonl"), limit=5)
    assert b.name == "gsm8k" and [p.id for p in b.problems] == ["0", "1", "2", "3", "4"]
    r1 = load_benchmark(str(SHARED / "gsm8k.jsonl"), limit=5, limit_seed=1)
    assert [p.id for p in r1.problems] == [p.id for p in load_benchmark("gsm8k", data_file=SHARED / "gsm8k.jsonl",
                                                                         limit=5, limit_seed=1).problems]
    assert [p.id for p in r1.problems] != ["0", "1", "2", "3", "4"]


def test_missing_field_names_field_file_and_row(tmp_path):
    f = tmp_path / "gsm8k.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "answer": "2\n#### 2"}) + "\n" + json.dumps({"question": "2+2?"}) + "\n")
    with pytest.raises(UserError) as e:
        load_benchmark("gsm8k", data_file=f)
    msg = str(e.value)
    assert "'answer'" in msg and str(f) in msg and "row 2" in msg
    g = tmp_path / "mine.jsonl"
    g.write_text(json.dumps({"text": "What is 2+2?", "answer": "4"}) + "\n")
    with pytest.raises(UserError, match=r"missing field 'problem'.*mine.jsonl|mine.jsonl.*missing field 'problem'"):
        load_benchmark(str(g))
    h = tmp_path / "gsm8k_bad.jsonl"
    h.write_text(json.dumps({"question": "1+1?", "answer": "it is 2"}) + "\n")
    with pytest.raises(UserError, match="####"):
        load_benchmark(str(h))


def test_generic_file_and_unknown_name(tmp_path):
    g = tmp_path / "quiz.jsonl"
    g.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": i + 1, "level": i % 2}) + "\n"
                         for i in range(3)))
    b = load_benchmark(str(g))
    assert [p.answer for p in b.problems] == ["1", "2", "3"] and b.problems[1].meta == {"level": 1}
    with pytest.raises(UserError, match="unknown benchmark 'gsm9k'"):
        load_benchmark("gsm9k")
    with pytest.raises(UserError, match="not found"):
        load_benchmark(str(tmp_path / "nope.jsonl"))


def test_dapo_heldout_is_a_stable_fraction():
    texts = [f"Problem number {i}: find x." for i in range(20_000)]
    frac = sum(map(is_dapo_heldout, texts)) / len(texts)
    assert abs(frac - DAPO_HELDOUT_FRACTION) < 0.005
    assert is_dapo_heldout(texts[5]) == is_dapo_heldout(texts[5] + "\n")


def test_synthetic_benchmark_is_the_test_split():
    from posttrain.data.synthetic import problems

    b = load_benchmark("synthetic", limit=6, difficulty="medium")
    assert [p.id for p in b.problems] == [p["id"] for p in problems("test", n=6, difficulty="medium")]
    assert b.problems[0].meta["difficulty"] == 2


def test_hub_ids_and_dapo_heldout_filter(monkeypatch):
    """The hub path (no hub here): the right dataset ids, configs and splits are asked for, DAPO keeps only its
    held-out problems, and a hub failure says how to work offline."""
    import datasets

    asked = []

    def fake_load_dataset(path, name=None, split=None):
        asked.append((path, name, split))
        if path == "open-r1/DAPO-Math-17k-Processed":
            return [{"prompt": f"Find x number {i}.", "solution": str(i)} for i in range(2000)]
        if path == "openai/gsm8k":
            return [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_benchmark("gsm8k").problems[0].answer == "2"
    dapo = load_benchmark("dapo")
    assert 0 < len(dapo) < 2000 * 2 * DAPO_HELDOUT_FRACTION
    assert all(is_dapo_heldout(p.problem) for p in dapo.problems)
    with pytest.raises(UserError, match="--data-file"):
        load_benchmark("math500")
    assert asked == [("openai/gsm8k", "main", "test"), ("open-r1/DAPO-Math-17k-Processed", "en", "train"),
                     ("HuggingFaceH4/MATH-500", None, "test")]
