"""Load raw rows from a hub dataset, a local file (JSON, JSONL, Parquet, CSV) or a Python generator."""

from __future__ import annotations

import codecs
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Callable

from posttrain.config import DataConfig
from posttrain.errors import UserError

FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def resolve_source(cfg: DataConfig) -> str:
    if cfg.source != "auto":
        return cfg.source
    path = cfg.path
    if path.endswith(FILE_SUFFIXES) or Path(path).is_file():
        return "file"
    if ":" in path:
        return "generator"
    return "hub"


def load_callable(spec: str, what: str = "data.path"):
    """``package.module:function`` or ``path/to/file.py:function`` -> the function."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UserError(f"{what}={spec!r}: expected module:function or path/to/file.py:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise UserError(f"{what}: file not found: {path}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise UserError(f"{what}={spec!r}: module {target!r} not found ({exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{what}={spec!r}: {target} has no function {name!r}")
    return fn


def read_jsonl(path: str | Path, what: str = "data.path",
               check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """The JSON objects of a JSONL file, one per line (blank lines skipped). ``what`` names where the path came
    from (``data.path``, ``--input``, ``--file``) for the errors, which also name the file and the 1-based line.
    ``check(row)`` returns what is wrong with a row, or None; it is reported with the row's line."""
    p = Path(path)
    try:
        text = utf8_text(p.read_bytes(), f"{what} {p}")
    except OSError as exc:
        raise UserError(f"{what} {p}: cannot open ({exc.strerror}); check the path") from None
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if line.strip():
            rows.append(_json_object(line, f"{p}:{lineno}", what, check))
    return rows


def utf8_text(data: bytes, where: str) -> str:
    """``data`` decoded as UTF-8 (a byte-order mark dropped, line ends made ``\\n`` as ``read_text`` does), or a
    ``UserError`` naming ``where`` (the file), the 1-based line and the byte."""
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        offset = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"{where}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte {offset} of the line); "
                        "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _json_object(line: str, where: str, what: str, check: Callable[[dict], str | None] | None) -> dict:
    one = f"each line of {what} must be one JSON object"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg}); {one}") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}; {one}")
    problem = check(row) if check else None
    if problem:
        raise UserError(f"{where}: {problem}")
    return row


def read_file(path: str | Path) -> list[dict]:
    """The rows of a local data file. Every way a file can be unreadable (bad bytes, bad JSON, a damaged CSV or
    Parquet file) is a ``UserError`` naming the file, and the line where the format has lines."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data.path: file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and p.read_text(errors="ignore").lstrip()[:1] != "["):
        return read_jsonl(p)
    if suffix == ".json":
        try:
            data = json.loads(utf8_text(p.read_bytes(), f"data.path {p}"))
        except json.JSONDecodeError as exc:
            raise UserError(f"data.path {p}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not all(isinstance(r, dict) for r in data):
            raise UserError(f"data.path {p}: expected a list of JSON objects")
        return data
    if suffix in (".parquet", ".csv"):
        return _read_table(p, suffix)
    raise UserError(f"data.path {p}: unsupported file type {suffix!r}; use .json, .jsonl, .parquet or .csv")


def _read_table(p: Path, suffix: str) -> list[dict]:
    """A CSV or Parquet file's rows; a file pandas (or pyarrow) cannot parse is named with the parser's reason."""
    import pandas as pd

    kind = "Parquet" if suffix == ".parquet" else "CSV"
    try:
        df = pd.read_parquet(p) if suffix == ".parquet" else pd.read_csv(p, encoding="utf-8")
    except ImportError as exc:
        raise UserError(f"data.path {p}: reading {kind} needs {exc.name or 'pyarrow'}: pip install pyarrow") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"data.path {p}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save the CSV as "
                        "UTF-8") from None
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many types; all mean "this file is damaged"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"data.path {p}: not a readable {kind} file ({type(exc).__name__}: {reason}); check that "
                        f"it is complete and really {kind}") from None
    return df.to_dict(orient="records")


def load_rows(cfg: DataConfig) -> list[dict]:
    source = resolve_source(cfg)
    if source == "file":
        rows = read_file(cfg.path)
        where = cfg.path
    elif source == "generator":
        fn = load_callable(cfg.path)
        rows = [dict(r) for r in fn(**cfg.generator_kwargs)]
        where = cfg.path
    else:
        try:
            import datasets
        except ImportError:
            raise UserError("loading a hub dataset needs the datasets package: pip install datasets") from None
        try:
            ds = datasets.load_dataset(cfg.path, cfg.config_name, split=cfg.split)
        except Exception as exc:  # network, missing dataset, wrong split: all need the user's action
            raise UserError(f"data.path={cfg.path!r} (hub dataset, config={cfg.config_name}, split={cfg.split}) "
                            f"could not be loaded: {str(exc).splitlines()[0]}") from None
        rows = ds.to_list()
        where = cfg.path
    if not rows:
        raise UserError(f"data: {where} has no rows")
    return rows
