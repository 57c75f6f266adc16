"""Synthetic math problems: seeded, disjoint splits, correct answers, difficulty changes the problems."""

import re

import pytest

from posttrain.data.synthetic import problems, split_of
from posttrain.errors import UserError


def test_same_arguments_same_problems_and_seed_changes_them():
    a = problems("train", n=50, difficulty="medium", seed=1)
    assert a == problems("train", n=50, difficulty="medium", seed=1)
    assert a != problems("train", n=50, difficulty="medium", seed=2)


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard", "mixed"])
def test_train_and_test_are_disjoint(difficulty):
    train = problems("train", n=1500, difficulty=difficulty, seed=0)
    test = problems("test", n=150, difficulty=difficulty, seed=0)
    assert len({p["id"] for p in train}) == 1500 and len({p["id"] for p in test}) == 150
    assert not {p["id"] for p in train} & {p["id"] for p in test}
    # the numbers of the computation, not the wording, decide the split
    assert not {(p["kind"], tuple(re.findall(r"\d+", p["problem"]))) for p in train} & \
        {(p["kind"], tuple(re.findall(r"\d+", p["problem"]))) for p in test}


def test_easy_answers_are_right():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}
    for p in problems("test", n=200, difficulty="easy"):
        a, op, b = re.search(r"(\d+) ([-+*/]) (\d+)", p["problem"]).groups()
        assert p["answer"] == str(ops[op](int(a), int(b)))
        assert p["steps"] == 1 and p["difficulty"] == 1
        assert p["solution"].endswith(f"The answer is {p['answer']}.")
        if op == "/":
            assert int(a) % int(b) == 0


def test_worked_solutions_compute_the_answer():
    """Every step line 'x op y = z' is true arithmetic and the last result is the answer."""
    for level in ("medium", "hard"):
        for p in problems("train", n=300, difficulty=level, seed=3):
            results = []
            for a, op, b, z in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", p["solution"]):
                a, b, z = int(a), int(b), int(z)
                assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == z, p
                results.append(z)
            assert results and str(results[-1]) == p["answer"], p
            # percent line in discounts: checked by the final multiplication instead
            assert int(p["answer"]) >= 0


def test_difficulty_changes_steps():
    mean_steps = {d: sum(p["steps"] for p in problems("train", n=200, difficulty=d)) / 200
                  for d in ("easy", "medium", "hard")}
    assert mean_steps["easy"] == 1 and mean_steps["medium"] == 2 and mean_steps["hard"] >= 3


def test_split_of_is_a_fixed_hash_partition():
    fractions = sum(split_of("k", (i,)) == "test" for i in range(10_000)) / 10_000
    assert 0.08 < fractions < 0.12
    assert split_of("k", (7,)) == split_of("k", (7,))


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="difficulty"):
        problems("train", n=1, difficulty="extreme")
    with pytest.raises(UserError, match="split"):
        problems("validation", n=1)
    with pytest.raises(UserError, match="only .* distinct test problems"):
        problems("test", n=5000, difficulty="easy")
