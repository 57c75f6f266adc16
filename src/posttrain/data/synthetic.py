"""Built-in synthetic math problems: seeded generators with a worked solution (for SFT) and an exact integer
answer (for GRPO rewards and evaluation).

    >>> from posttrain.data.synthetic import problems
    >>> p = problems("train", n=2, difficulty="easy", seed=0)[0]
    >>> sorted(p)
    ['answer', 'difficulty', 'id', 'kind', 'problem', 'solution', 'steps']

Recipes use it as a generator data source: ``data.path: posttrain.data.synthetic:problems`` with
``data.generator_kwargs: {n: 2000, difficulty: easy}`` (columns ``problem``/``solution``/``answer``).

Difficulty levels:
- ``easy`` (1): one operation on small integers, e.g. "What is 7 + 5?" (learnable by a 135M model on a CPU).
- ``medium`` (2): two-step word problems and bracketed expressions.
- ``hard`` (3): three- and four-step word problems (shopping with change, distances at two speeds, sharing
  after baking, discounts) with larger numbers.
- ``mixed``: each problem draws its level uniformly.

Train and test are disjoint by construction: a problem's *computation* (its kind and numbers, not its wording
or names) is hashed, and the hash alone decides its split (``test_fraction`` of the space goes to test). So the
same arithmetic never appears in both splits under different wording, whatever seeds and sizes are asked for.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from posttrain.errors import UserError

LEVELS = {"easy": 1, "medium": 2, "hard": 3}
NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Ravi", "Sofia", "Tom"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells"]

# A generator takes a Random and returns (kind, numbers, problem, solution lines, answer).
Generated = tuple[str, tuple[int, ...], str, list[str], int]


# --------------------------------------------------------------------------------------------------
# easy: one operation


def _easy(rng: random.Random) -> Generated:
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        ans = a + b
    elif op == "-":
        a = rng.randint(1, 50)
        b = rng.randint(0, a)
        ans = a - b
    elif op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        ans = a * b
    else:
        b, ans = rng.randint(2, 12), rng.randint(1, 12)
        a = b * ans
    question = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}."])
    return f"arith{op}", (a, b), question.format(a=a, op=op, b=b), [f"{a} {op} {b} = {ans}."], ans


# --------------------------------------------------------------------------------------------------
# medium: two steps


def _buy_give(rng: random.Random) -> Generated:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    c = rng.randint(1, a + b)
    ans = a + b - c
    q = (f"{name} has {a} {item}. {name} gets {b} more and then gives {c} to a friend. "
         f"How many {item} does {name} have now?")
    return "buy_give", (a, b, c), q, [f"After getting more: {a} + {b} = {a + b}.",
                                       f"After giving some away: {a + b} - {c} = {ans}."], ans


def _boxes_plus(rng: random.Random) -> Generated:
    item = rng.choice(ITEMS)
    a, b, c = rng.randint(2, 15), rng.randint(2, 12), rng.randint(1, 20)
    ans = a * b + c
    q = f"A box holds {a} {item}. How many {item} are there in {b} full boxes and {c} loose {item}?"
    return "boxes_plus", (a, b, c), q, [f"In the boxes: {a} * {b} = {a * b}.",
                                         f"With the loose ones: {a * b} + {c} = {ans}."], ans


def _wage_spend(rng: random.Random) -> Generated:
    name = rng.choice(NAMES)
    a, b = rng.randint(5, 25), rng.randint(2, 10)
    c = rng.randint(1, a * b)
    ans = a * b - c
    q = f"{name} earns ${a} per hour and works {b} hours, then spends ${c}. How many dollars does {name} have left?"
    return "wage_spend", (a, b, c), q, [f"Earned: {a} * {b} = {a * b} dollars.",
                                         f"Left after spending: {a * b} - {c} = {ans} dollars."], ans


def _bracket(rng: random.Random) -> Generated:
    a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(2, 9)
    ans = (a + b) * c
    q = f"What is ({a} + {b}) * {c}?"
    return "bracket", (a, b, c), q, [f"First the brackets: {a} + {b} = {a + b}.",
                                      f"Then multiply: {a + b} * {c} = {ans}."], ans


# --------------------------------------------------------------------------------------------------
# hard: three or four steps, larger numbers


def _shopping_change(rng: random.Random) -> Generated:
    name = rng.choice(NAMES)
    q1, p1, q2, p2 = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(1, 12)
    cost = q1 * p1 + q2 * p2
    bill = rng.choice([b for b in (50, 100, 200) if b >= cost] or [((cost // 100) + 1) * 100])
    ans = bill - cost
    q = (f"{name} buys {q1} notebooks at ${p1} each and {q2} pens at ${p2} each, and pays with a ${bill} bill. "
         f"How many dollars of change does {name} get?")
    steps = [f"Notebooks: {q1} * {p1} = {q1 * p1} dollars.", f"Pens: {q2} * {p2} = {q2 * p2} dollars.",
             f"Total: {q1 * p1} + {q2 * p2} = {cost} dollars.", f"Change: {bill} - {cost} = {ans} dollars."]
    return "shopping_change", (q1, p1, q2, p2, bill), q, steps, ans


def _two_speeds(rng: random.Random) -> Generated:
    v, t1, w, t2 = rng.randint(30, 90), rng.randint(2, 6), rng.randint(20, 80), rng.randint(1, 5)
    ans = v * t1 + w * t2
    q = (f"A car drives at {v} km per hour for {t1} hours, then at {w} km per hour for {t2} hours. "
         f"How many kilometers does it travel in total?")
    steps = [f"First part: {v} * {t1} = {v * t1} km.", f"Second part: {w} * {t2} = {w * t2} km.",
             f"Total: {v * t1} + {w * t2} = {ans} km."]
    return "two_speeds", (v, t1, w, t2), q, steps, ans


def _bake_share(rng: random.Random) -> Generated:
    d, each = rng.randint(2, 8), rng.randint(2, 12)
    b = rng.randint(2, 6)
    # choose a batch size a and eaten count c so that a*b - c = d*each exactly
    a = rng.randint(max(2, d * each // b + 1), d * each // b + 12)  # at least one cookie eaten
    c = a * b - d * each
    q = (f"A baker makes {b} batches of {a} cookies. {c} cookies are eaten, and the rest are shared equally "
         f"among {d} children. How many cookies does each child get?")
    steps = [f"Baked: {b} * {a} = {a * b} cookies.", f"Left after eating: {a * b} - {c} = {d * each} cookies.",
             f"Each child: {d * each} / {d} = {each} cookies."]
    return "bake_share", (a, b, c, d), q, steps, each


def _discount(rng: random.Random) -> Generated:
    name = rng.choice(NAMES)
    pct = rng.choice([10, 20, 25, 50])
    price = rng.randint(2, 20) * (100 // _gcd(100, pct))  # discount is a whole number of dollars
    n = rng.randint(2, 5)
    off = price * pct // 100
    ans = n * (price - off)
    q = (f"A jacket costs ${price}. It is on sale for {pct}% off. {name} buys {n} jackets at the sale price. "
         f"How many dollars does {name} pay?")
    steps = [f"Discount: {pct}% of {price} = {off} dollars.", f"Sale price: {price} - {off} = {price - off} dollars.",
             f"For {n} jackets: {n} * {price - off} = {ans} dollars."]
    return "discount", (price, pct, n), q, steps, ans


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


GENERATORS: dict[int, list[Callable[[random.Random], Generated]]] = {
    1: [_easy],
    2: [_buy_give, _boxes_plus, _wage_spend, _bracket],
    3: [_shopping_change, _two_speeds, _bake_share, _discount],
}


# --------------------------------------------------------------------------------------------------


def split_of(kind: str, numbers: tuple[int, ...], test_fraction: float = 0.1) -> str:
    """'test' or 'train' for a computation, decided by its hash alone (so the two splits are disjoint)."""
    key = f"{kind}|{','.join(map(str, numbers))}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def _level(difficulty: str | int) -> int | None:
    if isinstance(difficulty, int) and difficulty in (1, 2, 3):
        return difficulty
    if difficulty == "mixed":
        return None
    if isinstance(difficulty, str) and difficulty in LEVELS:
        return LEVELS[difficulty]
    raise UserError(f"synthetic difficulty {difficulty!r} is not one of easy, medium, hard, mixed (or 1, 2, 3)")


def problems(split: str = "train", n: int = 1000, difficulty: str | int = "easy", seed: int = 0,
             test_fraction: float = 0.1) -> list[dict]:
    """``n`` distinct problems of ``split`` ('train' or 'test'), each a dict with ``problem``, ``solution``
    (worked steps ending in "The answer is N."), ``answer`` (the exact integer as a string), ``id``,
    ``difficulty`` (1-3), ``kind`` and ``steps``. Same arguments, same problems."""
    if split not in ("train", "test"):
        raise UserError(f"synthetic split {split!r}: use 'train' or 'test'")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"synthetic test_fraction={test_fraction}: must be between 0 and 1")
    if n < 1:
        raise UserError(f"synthetic n={n}: must be at least 1")
    fixed = _level(difficulty)
    rng = random.Random(f"posttrain-synthetic|{split}|{difficulty}|{seed}")
    out: list[dict] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, max(200 * n, 20_000)
    while len(out) < n:
        attempts += 1
        if attempts > max_attempts:
            raise UserError(f"synthetic: only {len(out)} distinct {split} problems found at difficulty={difficulty!r} "
                            f"(asked for {n}); ask for fewer or use a harder level, which has more problems")
        level = fixed or rng.randint(1, 3)
        kind, numbers, question, steps, answer = rng.choice(GENERATORS[level])(rng)
        key = f"{kind}|{','.join(map(str, numbers))}"
        if key in seen or split_of(kind, numbers, test_fraction) != split:
            continue
        seen.add(key)
        out.append({
            "id": f"synthetic-{hashlib.sha256(key.encode()).hexdigest()[:10]}",
            "problem": question,
            "solution": "\n".join(steps + [f"The answer is {answer}."]),
            "answer": str(answer),
            "difficulty": level,
            "kind": kind,
            "steps": len(steps),
        })
    return out
