"""The one JSONL reader (data.path, generate --input, verify --file, the pipeline report): rows, and errors that
name the file, the 1-based line (blank lines counted) and what to do."""

from __future__ import annotations

import json

import pytest

from posttrain.data.loading import read_jsonl
from posttrain.errors import UserError


def test_rows_in_order_blank_lines_skipped_and_line_separators_kept(tmp_path):
    p = tmp_path / "rows.jsonl"
    text = "a\u2028b"  # a JSON string may hold U+2028, which str.splitlines() would split on
    p.write_text(json.dumps({"i": 0}) + "\n\n   \n" + json.dumps({"i": 1, "t": text}, ensure_ascii=False) + "\r\n")
    assert read_jsonl(p) == [{"i": 0}, {"i": 1, "t": text}]


@pytest.mark.parametrize("content,message", [
    ('{"a": 1}\n\n{oops\n', r"bad.jsonl:3: not valid JSON \(.*\); each line of --input must be one JSON object"),
    ('{"a": 1}\n[1, 2]\n', r"bad.jsonl:2: expected a JSON object, got list; each line of --input must be one JSON"),
    ('{"a": 1}\n{"b": 2}\n', r"bad.jsonl:2: needs \"a\""),
])
def test_bad_lines_name_file_and_line(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=message):
        read_jsonl(p, what="--input", check=lambda row: None if "a" in row else 'needs "a"')


def test_unreadable_files_name_the_option(tmp_path):
    with pytest.raises(UserError, match=r"--file .*missing.jsonl: cannot open \(No such file or directory\)"):
        read_jsonl(tmp_path / "missing.jsonl", what="--file")
    p = tmp_path / "latin1.jsonl"
    p.write_bytes('{"name": "ok"}\n\n{"name": "café"}\n'.encode("latin-1"))  # the bad byte is on line 3
    with pytest.raises(UserError, match=r"data.path .*latin1.jsonl:3: not UTF-8 text \(byte 0xe9 at byte 14 of the "
                                        r"line\); save the file as UTF-8"):
        read_jsonl(p)
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n')  # a byte-order mark and CRLF line ends are fine
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]
