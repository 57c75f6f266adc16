"""Standardize rows of any supported format into one shape: ``{"messages": [...]}`` or ``{"text": ...}``.

Formats: ShareGPT ``conversations`` (role and content keys auto-detected, role aliases mapped as Unsloth's
``standardize_data_formats`` does), OpenAI ``messages``, ``prompt``/``completion``, plain ``text``, and
problem/solution/answer columns (OpenMathReasoning style) mapped into an assistant turn.
"""

from __future__ import annotations

import re

from posttrain.config import ColumnMap, ReasoningMarkers
from posttrain.errors import UserError

ROW_KEY = "_row"  # the 1-based row number of the source that prepare_sft_data stamps on each row, for errors

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user", "input": "user",
    "assistant": "assistant", "gpt": "assistant", "output": "assistant", "model": "assistant", "bot": "assistant",
}


def column_names(row: dict) -> list[str]:
    """A row's column names as the user wrote them (without posttrain's row number)."""
    return sorted(k for k in row if k != ROW_KEY)


def detect_format(row: dict, source: str = "data") -> str:
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    if "problem" in row:
        return "columns"
    raise UserError(f"{source}: cannot tell the data format from the columns {column_names(row)}: expected one of "
                    "messages, conversations, prompt+completion, text, or problem/solution/answer "
                    "(set data.format and data.columns)")


def detect_sharegpt_keys(rows: list[dict], source: str = "data") -> tuple[str, str]:
    """Like Unsloth: from the first 10 rows, the key with fewer distinct values is the role key."""
    values: dict[str, set] = {}
    for row in rows[:10]:
        for msg in row.get("conversations") or []:
            if isinstance(msg, dict):
                for k, v in msg.items():
                    values.setdefault(k, set()).add(str(v))
    if len(values) < 2:
        raise UserError(f"{source}: ShareGPT 'conversations' messages need a role key and a content key (found "
                        f"keys {sorted(values)}), e.g. {{\"from\": \"human\", \"value\": \"...\"}}")
    keys = sorted(values, key=lambda k: len(values[k]))
    return keys[0], keys[-1]


def _messages(items, role_key: str, content_key: str, where: str, column: str) -> list[dict]:
    """A list of message objects -> standardized messages; anything else is an error naming the row and item."""
    if not isinstance(items, list):
        raise UserError(f"{where}: {column!r} must be a list of messages")
    for j, m in enumerate(items, 1):
        if not isinstance(m, dict):
            raise UserError(f"{where}: message {j} of {column!r} is {type(m).__name__} {_short(m)}, not an object; "
                            f"write each message as {{\"{role_key}\": \"user\", \"{content_key}\": \"...\"}}")
    return [_message(m.get(role_key), m.get(content_key), where) for m in items]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _message(role: str, content, where: str) -> dict:
    mapped = ROLE_ALIASES.get(str(role).lower())
    if mapped is None:
        raise UserError(f"{where}: unknown role {role!r}; known roles: {sorted(ROLE_ALIASES)}")
    if not isinstance(content, str):
        raise UserError(f"{where}: message content must be text, got {type(content).__name__}")
    return {"role": mapped, "content": content}


def strip_think(text: str) -> str:
    return text.replace("<think>", "").replace("</think>", "").strip()


def columns_to_messages(row: dict, cols: ColumnMap, template: str, markers: ReasoningMarkers,
                        where: str) -> list[dict]:
    for key in (cols.problem, cols.solution, cols.answer):
        if key is not None and key not in row:
            raise UserError(f"{where}: column {key!r} not found (columns: {column_names(row)}); set data.columns")
    solution = strip_think(str(row[cols.solution])) if cols.solution else ""
    answer = str(row[cols.answer]).strip() if cols.answer else None
    if template == "reasoning":
        m = markers
        body = f"{m.reasoning_start}{solution}{m.reasoning_end}"
        if answer is not None:
            body += f"{m.solution_start}{answer}{m.solution_end}"
    else:
        body = solution
        if answer is not None and "\\boxed" not in solution:
            body = f"{solution}\n\nThe final answer is $\\boxed{{{answer}}}$." if solution else f"\\boxed{{{answer}}}"
    return [{"role": "user", "content": str(row[cols.problem])}, {"role": "assistant", "content": body}]


def standardize(rows: list[dict], fmt: str, *, columns: ColumnMap | None = None, template: str = "tokenizer",
                markers: ReasoningMarkers | None = None, source: str = "data") -> list[dict]:
    """-> rows of ``{"messages": [...]}`` or ``{"text": str}``; other columns are kept beside them. Errors name
    ``source`` and the row: its ``ROW_KEY`` when stamped, else its 1-based position in ``rows``."""
    if not rows:
        return []
    markers = markers or ReasoningMarkers()
    fmt = detect_format(rows[0], source) if fmt == "auto" else fmt
    role_key = content_key = None
    if fmt == "sharegpt":
        role_key, content_key = detect_sharegpt_keys(rows, source)
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {row.get(ROW_KEY, i + 1)}"
        extra = {k: v for k, v in row.items() if k not in ("messages", "conversations", "prompt", "completion")}
        if fmt == "sharegpt":
            msgs = _messages(row.get("conversations"), role_key, content_key, where, "conversations")
        elif fmt == "openai":
            if "messages" not in row or not isinstance(row["messages"], list):
                raise UserError(f"{where}: expected a 'messages' list (OpenAI format)")
            msgs = _messages(row["messages"], "role", "content", where, "messages")
        elif fmt == "prompt_completion":
            for key in ("prompt", "completion"):
                if key not in row:
                    raise UserError(f"{where}: column {key!r} not found (columns: {column_names(row)})")
            p, c = row["prompt"], row["completion"]
            msgs = (_messages(p, "role", "content", where, "prompt") if isinstance(p, list)
                    else [{"role": "user", "content": str(p)}])
            msgs += (_messages(c, "role", "content", where, "completion") if isinstance(c, list)
                     else [{"role": "assistant", "content": str(c)}])
        elif fmt == "text":
            if not isinstance(row.get("text"), str):
                raise UserError(f"{where}: column 'text' not found or not text (columns: {column_names(row)})")
            out.append({**extra, "text": row["text"]})
            continue
        elif fmt == "columns":
            msgs = columns_to_messages(row, columns or ColumnMap(), template, markers, where)
        else:
            raise UserError(f"data.format={fmt!r} is not supported")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{where}: the conversation has no assistant turn to train on")
        out.append({**extra, "messages": msgs})
    return out


_NUMERIC = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def is_numeric_answer(value) -> bool:
    """The seeds' filter: ``pd.to_numeric(answer, errors="coerce")`` is not null (integers, negatives,
    decimals; LaTeX and expressions are dropped)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == value  # not NaN
    return isinstance(value, str) and bool(_NUMERIC.match(value))
