"""Pairs from an evaluation's samples: a verified-right completion against a wrong one of the same problem, never
a truncated one as chosen, distinct texts only; no pair at all is an error naming the file."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import UserError
from posttrain.preference.sampled import pairs_from_samples


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(pid, text, verdict, truncated=False):
    return {"id": pid, "completion": text, "verdict": verdict, "truncated": truncated, "gold": "5"}


def test_right_against_wrong_of_the_same_problem(tmp_path):
    path = write(tmp_path / "samples.jsonl", [
        row("a", "2+3=5 <SOLUTION>5</SOLUTION>", True), row("a", "2+3=6 <SOLUTION>6</SOLUTION>", False),
        row("a", "2+3=5 <SOLUTION>5</SOLUTION>", True),                     # a duplicate text: one candidate
        row("b", "all right", True), row("b", "also right", True),          # no wrong sample: no pair
        row("c", "cut off 5", True, truncated=True), row("c", "wrong 4", False),  # a truncated text is never chosen
        row("d", "right 5", True), row("d", "wrong 1", False), row("d", "wrong 2", False), row("d", "right five", True),
    ])
    pairs = pairs_from_samples(path, {"a": "2+3?", "b": "b?", "c": "c?", "d": "d?"}, pairs_per_problem=2)
    by = {}
    for p in pairs:
        by.setdefault(p["id"], []).append(p)
    assert sorted(by) == ["a", "d"]
    assert len(by["a"]) == 1 and len(by["d"]) == 2
    a = by["a"][0]
    assert a["prompt"] == [{"role": "user", "content": "2+3?"}]
    assert a["chosen"][0]["content"].endswith("5</SOLUTION>") and a["rejected"][0]["content"].endswith("6</SOLUTION>")
    assert {p["chosen"][0]["content"] for p in by["d"]} == {"right 5", "right five"}
    assert {p["rejected"][0]["content"] for p in by["d"]} == {"wrong 1", "wrong 2"}


def test_no_pair_is_an_error_naming_the_file(tmp_path):
    path = write(tmp_path / "samples.jsonl", [row("a", "x", True), row("a", "y", True)])
    with pytest.raises(UserError, match="samples.jsonl: no problem has both a right and a wrong sample"):
        pairs_from_samples(path, {"a": "?"})


def test_one_right_answer_pairs_with_every_wrong_one(tmp_path):
    """A peaked model often has one right text and several wrong ones: each wrong one gets a pair (up to
    pairs_per_problem), all with that right answer; one pair per problem keeps the first pair."""
    path = write(tmp_path / "samples.jsonl", [row("a", "right", True)] + [row("a", f"wrong {k}", False)
                                                                          for k in range(3)])
    pairs = pairs_from_samples(path, {"a": "?"}, pairs_per_problem=4)
    assert [p["chosen"][0]["content"] for p in pairs] == ["right"] * 3
    assert sorted(p["rejected"][0]["content"] for p in pairs) == ["wrong 0", "wrong 1", "wrong 2"]
    two = pairs_from_samples(path, {"a": "?"}, pairs_per_problem=2)
    assert len(two) == 2 and two == pairs[:2]
    one = pairs_from_samples(path, {"a": "?"}, pairs_per_problem=1)
    assert one == pairs[:1]


def test_a_kept_sampling_of_other_problems_is_not_paired(tmp_path):
    """out_dir keeps a finished sampling for the next stage; asked for another split or count, sampled_pairs
    says so (before loading any model) instead of pairing the wrong samples."""
    from posttrain.preference.sampled import sampled_pairs

    from posttrain.config import EvalConfig

    settings = EvalConfig(prompt="reasoning", samples=2, temperature=1.0, max_new_tokens=8, batch_size=32, seed=0)
    (tmp_path / "eval_config.json").write_text(json.dumps({"model": "no-such-model", "benchmark": "synthetic-train",
                                                           **settings.fingerprint(), "compute_dtype": "bfloat16"}))
    (tmp_path / "metrics.json").write_text(json.dumps({"benchmark": "synthetic-train", "n": 4}))
    write(tmp_path / "samples.jsonl", [row("train-0", "right", True), row("train-0", "wrong", False)])
    with pytest.raises(UserError, match=r"already holds another sampling \(benchmark synthetic-train \(asked: "
                                        r"synthetic-test\)"):
        sampled_pairs("no-such-model", str(tmp_path), n=4, samples=2, max_new_tokens=8, split="test")
    with pytest.raises(UserError, match=r"n 4 \(asked: 6\)"):
        sampled_pairs("no-such-model", str(tmp_path), n=6, samples=2, max_new_tokens=8)
    pairs = sampled_pairs("no-such-model", str(tmp_path), n=4, samples=2, max_new_tokens=8)
    assert len(pairs) == 1 and pairs[0]["chosen"][0]["content"] == "right"
