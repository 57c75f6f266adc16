"""Math benchmarks: where each comes from on the hub, how its rows map to (problem, gold answer, metadata), and
loading from the hub or from a local JSONL/JSON/Parquet file with the same fields.

| name      | hub dataset (config, split)                         | problem field      | gold answer                       |
|-----------|-----------------------------------------------------|--------------------|-----------------------------------|
| gsm8k     | openai/gsm8k (main, test)                           | question           | after ``#### `` in ``answer``     |
| math500   | HuggingFaceH4/MATH-500 (test)                       | problem            | ``answer`` (+ subject, level)     |
| aime24    | HuggingFaceH4/aime_2024 (train)                     | problem            | ``answer``                        |
| aime25    | math-ai/aime25 (test)                               | problem            | ``answer``                        |
| amc23     | math-ai/amc23 (test)                                | question / problem | ``answer`` (27.0 -> 27)           |
| minerva   | math-ai/minervamath (test)                          | question / problem | ``answer``, else last ``\\boxed{}`` of ``solution`` |
| dapo      | open-r1/DAPO-Math-17k-Processed (en, train), held out | prompt / problem | ``solution`` / ``answer``         |
| synthetic | posttrain.data.synthetic (test split)               | problem            | ``answer``                        |

The DAPO held-out split: a problem is held out when the SHA-256 of its text falls in the lowest
``DAPO_HELDOUT_FRACTION`` (3%, about 520 of 17,398 problems) of the hash range. The decision depends on the
text alone, so training code excludes the same problems with ``is_dapo_heldout(problem)`` whatever order or
subset it loads. A local DAPO file is taken as the evaluation set as it is (no second filtering).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.errors import UserError
from posttrain.verify import extract_answer

DAPO_HELDOUT_FRACTION = 0.03


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    hub_id: str
    hub_config: str | None
    hub_split: str
    problem_fields: tuple[str, ...]      # the first one present is the problem text
    answer_fields: tuple[str, ...]       # the first one present is the gold answer
    gold: str = "field"                  # field | gsm8k (after ####) | boxed (last \boxed{} of the field)
    meta_fields: tuple[str, ...] = ()    # kept per problem; subject and level give per-group metrics
    id_fields: tuple[str, ...] = ("unique_id", "id", "idx")
    file_names: tuple[str, ...] = ()     # stems recognized when --benchmark is a path
    note: str = ""


SPECS: dict[str, BenchmarkSpec] = {s.name: s for s in [
    BenchmarkSpec("gsm8k", "openai/gsm8k", "main", "test", ("question",), ("answer",), gold="gsm8k",
                  note="GSM8K grade-school word problems (1,319 test problems)"),
    BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", None, "test", ("problem",), ("answer",),
                  meta_fields=("subject", "level"), file_names=("math500", "math_500", "math-500"),
                  note="MATH-500, the PRM800K subset of Hendrycks MATH test; per subject and level"),
    BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", None, "train", ("problem", "Problem"), ("answer", "Answer"),
                  file_names=("aime24", "aime_2024", "aime2024"), note="AIME 2024 (30 problems, integer answers)"),
    BenchmarkSpec("aime25", "math-ai/aime25", None, "test", ("problem", "question"), ("answer",),
                  file_names=("aime25", "aime_2025", "aime2025"), note="AIME 2025 (30 problems, integer answers)"),
    BenchmarkSpec("amc23", "math-ai/amc23", None, "test", ("question", "problem"), ("answer",),
                  file_names=("amc23", "amc_2023", "amc2023"), note="AMC 2023 (40 problems)"),
    BenchmarkSpec("minerva", "math-ai/minervamath", None, "test", ("question", "problem"), ("answer", "solution"),
                  gold="boxed_if_solution", meta_fields=("type",), file_names=("minerva", "minerva_math", "minervamath"),
                  note="Minerva OCW STEM problems (272)"),
    BenchmarkSpec("dapo", "open-r1/DAPO-Math-17k-Processed", "en", "train", ("prompt", "problem"),
                  ("solution", "answer"), file_names=("dapo", "dapo_math", "dapo-math"),
                  note=f"held-out {DAPO_HELDOUT_FRACTION:.0%} of DAPO-Math-17k (hash split, see is_dapo_heldout)"),
]}
NAMES = [*SPECS, "synthetic"]


@dataclass
class Problem:
    id: str
    problem: str
    answer: str
    meta: dict = field(default_factory=dict)


@dataclass
class Benchmark:
    name: str
    problems: list[Problem]
    source: str                          # hub id or file path, for the record

    def __len__(self) -> int:
        return len(self.problems)


def is_dapo_heldout(problem: str) -> bool:
    """True for the DAPO-Math-17k problems posttrain keeps out of training for evaluation."""
    h = int.from_bytes(hashlib.sha256(problem.strip().encode()).digest()[:8], "big") / 2**64
    return h < DAPO_HELDOUT_FRACTION


# --------------------------------------------------------------------------------------------------
# rows -> problems


def _gold_from_row(spec: BenchmarkSpec, row: dict, where: str) -> str:
    key = next((f for f in spec.answer_fields if row.get(f) is not None), None)
    if key is None:
        raise UserError(f"{where}: missing field '{spec.answer_fields[0]}' (the gold answer); {spec.name} rows need "
                        f"{_fields_hint(spec)}")
    value = row[key]
    if spec.gold == "gsm8k":
        text = str(value)
        if "####" not in text:
            raise UserError(f"{where}: field '{key}' has no '#### <number>' final line; GSM8K answers end with it")
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    if spec.gold == "boxed_if_solution" and key == "solution":
        gold = extract_answer(str(value), style="boxed")
        if gold is None:
            raise UserError(f"{where}: no 'answer' field and no \\boxed{{}} in 'solution' to take the gold answer from")
        return gold
    if isinstance(value, float) and value.is_integer():
        return str(int(value))           # AMC stores 27.0
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return str(value).strip()


def _fields_hint(spec: BenchmarkSpec) -> str:
    p = " or ".join(repr(f) for f in spec.problem_fields)
    a = " or ".join(repr(f) for f in spec.answer_fields)
    extra = " (with the answer after '#### ')" if spec.gold == "gsm8k" else ""
    return f"a problem field {p} and an answer field {a}{extra}"


def rows_to_problems(spec: BenchmarkSpec, rows: list[dict], source: str) -> list[Problem]:
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object with {_fields_hint(spec)}")
        pkey = next((f for f in spec.problem_fields if row.get(f) is not None), None)
        if pkey is None:
            raise UserError(f"{where}: missing field '{spec.problem_fields[0]}' (the problem text); "
                            f"{spec.name} rows need {_fields_hint(spec)}")
        problem = row[pkey]
        if isinstance(problem, list):    # a chat-format prompt: take the last user message
            problem = next((m.get("content", "") for m in reversed(problem) if m.get("role") == "user"), "")
        gold = _gold_from_row(spec, row, where)
        pid = next((str(row[f]) for f in spec.id_fields if row.get(f) is not None), None)
        meta = {f: row[f] for f in spec.meta_fields if row.get(f) is not None}
        out.append(Problem(id=pid if pid is not None else f"{spec.name}-{i}", problem=str(problem), answer=gold,
                           meta=meta))
    ids = [p.id for p in out]
    if len(set(ids)) != len(ids):        # ids repeat (e.g. concatenated files): fall back to the row number
        for i, p in enumerate(out):
            p.id = f"{spec.name}-{i}"
    return out


# --------------------------------------------------------------------------------------------------
# reading


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl, .json (a list, or {"data": [...]}) or .parquet file."""
    if not path.is_file():
        raise UserError(f"benchmark file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import datasets

        return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a list of problems (or JSONL, one problem per line)")
        return data
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {i + 1} is not valid JSON: {exc.msg}") from None
    return rows


def _spec_for_path(path: Path) -> BenchmarkSpec:
    stem = path.stem.lower()
    for spec in SPECS.values():
        if stem == spec.name or stem in spec.file_names or stem.startswith(spec.name):
            return spec
    # an unknown file: a generic problem/answer set
    return BenchmarkSpec(stem, "", None, "", ("problem", "question", "prompt"), ("answer", "solution"),
                         gold="boxed_if_solution", meta_fields=("subject", "level", "difficulty", "kind"))


def _hub_rows(spec: BenchmarkSpec) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_split)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one actionable message
        raise UserError(f"benchmark {spec.name}: could not load {spec.hub_id} from the hub "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); without hub access "
                        f"pass a local copy: --data-file PATH or --benchmark-dir DIR") from None
    rows = list(ds)
    if spec.name == "dapo":
        pfield = next((f for f in spec.problem_fields if f in (rows[0] if rows else {})), spec.problem_fields[0])
        rows = [r for r in rows if is_dapo_heldout(str(r.get(pfield, "")))]
    return rows


def load_benchmark(name: str, *, data_file: str | Path | None = None, benchmark_dir: str | Path | None = None,
                   limit: int | None = None, limit_seed: int | None = None, difficulty: str | int = "easy",
                   synthetic_n: int = 200) -> Benchmark:
    """A benchmark by name (hub, or ``data_file``, or ``benchmark_dir/<name>.jsonl``) or by path to a file.

    ``limit`` keeps the first N problems, or a random N with ``limit_seed``. ``difficulty`` and
    ``synthetic_n`` apply to ``synthetic`` (its test split, seed 0)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be at least 1")
    if name == "synthetic":
        from posttrain.data.synthetic import problems as synthetic_problems

        n = limit if limit is not None and limit_seed is None else synthetic_n
        rows = synthetic_problems("test", n=n, difficulty=difficulty, seed=0)
        spec = BenchmarkSpec("synthetic", "", None, "", ("problem",), ("answer",), meta_fields=("difficulty", "kind"))
        bench = Benchmark("synthetic", rows_to_problems(spec, rows, "synthetic"), f"posttrain.data.synthetic ({difficulty})")
    else:
        path = Path(data_file) if data_file else None
        if name in SPECS:
            spec = SPECS[name]
            if path is None and benchmark_dir is not None:
                candidates = [Path(benchmark_dir) / f"{stem}.jsonl" for stem in (spec.name, *spec.file_names)]
                path = next((p for p in candidates if p.is_file()), None)
                if path is None:
                    raise UserError(f"benchmark {name}: none of {[str(c) for c in candidates]} exists in --benchmark-dir")
        elif Path(name).suffix.lower() in (".jsonl", ".json", ".parquet") or Path(name).exists():
            if data_file:
                raise UserError("give the benchmark file either as --benchmark PATH or as --data-file, not both")
            path = Path(name)
            spec = _spec_for_path(path)
        else:
            raise UserError(f"unknown benchmark {name!r}: use one of {', '.join(NAMES)} or a path to a .jsonl file")
        if path is not None:
            rows, source = read_rows(path), str(path)
        else:
            rows, source = _hub_rows(spec), f"hf:{spec.hub_id}"
        if not rows:
            raise UserError(f"benchmark {spec.name}: {source} has no problems")
        bench = Benchmark(spec.name, rows_to_problems(spec, rows, source), source)
    if limit is not None and limit < len(bench.problems):
        if limit_seed is None:
            bench.problems = bench.problems[:limit]
        else:
            bench.problems = random.Random(limit_seed).sample(bench.problems, limit)
    return bench
