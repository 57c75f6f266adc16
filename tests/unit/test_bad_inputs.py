"""Bad bytes and bad files name the file and the row (reliability review D2, D3, D7, D8, D12, D16, D17, R18, E10,
G7, V11-V13): each is a one-line UserError (or argparse error) instead of a traceback, and rows and lines count
from 1 everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from posttrain.cli import main
from posttrain.config import DataConfig, ModelConfig
from posttrain.data.formats import standardize
from posttrain.data.loading import read_file
from posttrain.data.tokenize import prepare_sft_data
from posttrain.errors import UserError
from tests.conftest import write_jsonl

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes((json.dumps(CHAT) + "\n").encode() * 3 + b'{"text": "caf\xe9"}\n')  # one Latin-1 row, line 4
    with pytest.raises(UserError, match=r"d.jsonl:4: not UTF-8 text \(byte 0xe9 at byte 14 of the line\)"):
        read_file(p)
    p = tmp_path / "whole.json"
    p.write_bytes('[{"text": "\u00e9t\u00e9"}]'.encode("latin-1"))  # D8: a whole file in Latin-1
    with pytest.raises(UserError, match=r"whole.json:1: not UTF-8 text"):
        read_file(p)
    p = tmp_path / "l1.csv"
    p.write_bytes("text\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"l1.csv: not UTF-8 text \(byte 0xe9\); save the CSV as UTF-8"):
        read_file(p)


def test_damaged_csv_and_parquet_name_the_file(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text('text,answer\n"unterminated,1\nok,2\n')
    with pytest.raises(UserError, match=r"bad.csv: not a readable CSV file \(ParserError: .*\); check that it is "
                                        r"complete and really CSV"):
        read_file(csv)
    pq = tmp_path / "bad.parquet"
    pq.write_bytes(b"PAR1" + os.urandom(200))  # a torn file: no footer
    with pytest.raises(UserError, match=r"bad.parquet: not a readable Parquet file \(.*\)"):
        read_file(pq)
    good = tmp_path / "good.csv"
    good.write_text("text,answer\nabc,1\n")
    assert read_file(good) == [{"text": "abc", "answer": 1}]


def test_messages_that_are_not_objects_name_the_row_and_message():
    rows = [CHAT, {"messages": ["hello", "world"]}]
    with pytest.raises(UserError, match=r"f.jsonl row 2: message 1 of 'messages' is str 'hello', not an object; "
                                        r'write each message as \{"role": "user", "content": "..."\}'):
        standardize(rows, "auto", source="f.jsonl")
    with pytest.raises(UserError, match=r"row 1: message 2 of 'completion' is int 3, not an object"):
        standardize([{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant",
                                                                                     "content": "b"}, 3]}], "auto")
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    with pytest.raises(UserError, match=r"row 2: message 1 of 'conversations' is list \['human', 'hi'\], not an "
                                        r'object; write each message as \{"from": "user", "value": "..."\}'):
        standardize([sharegpt, {"conversations": [["human", "hi"]]}], "sharegpt")
    with pytest.raises(UserError, match=r"g.jsonl: ShareGPT 'conversations' messages need a role key and a content "
                                        r"key \(found keys \[\]\)"):
        standardize([{"conversations": [["human", "hi"]]}], "sharegpt", source="g.jsonl")


def test_rows_count_from_one_like_the_lines_and_the_internal_row_number_stays_hidden(tmp_path, qwen_tok):
    rows = [CHAT] * 30 + [{"prompt_text": "x"}]  # D2: line 31 has no messages
    path = write_jsonl(tmp_path / "missing_col.jsonl", rows)
    with pytest.raises(UserError, match=r"missing_col.jsonl row 31: expected a 'messages' list"):
        prepare_sft_data(DataConfig(path=str(path), template="chatml"), qwen_tok)
    path = write_jsonl(tmp_path / "cols.jsonl", [{"question": "q", "answer": "a"}])  # D3
    with pytest.raises(UserError) as err:
        prepare_sft_data(DataConfig(path=str(path), template="chatml"), qwen_tok)
    assert str(err.value).startswith(f"{path}: cannot tell the data format from the columns ['answer', 'question']")


def test_a_model_alias_typo_suggests_the_alias():
    from posttrain.models import resolve_source

    with pytest.raises(UserError, match=r"model.name: unknown model 'smollm2-135m-instruc'; did you mean "
                                        r"smollm2-135m-instruct\?"):
        resolve_source(ModelConfig(name="smollm2-135m-instruc"))
    assert resolve_source(ModelConfig(name="Qwen/Qwen3-4B-Base")) == ("Qwen/Qwen3-4B-Base", None)  # a hub id
    assert resolve_source(ModelConfig(name="gpt2")) == ("gpt2", None)  # an id without organisation is no typo


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"),
                    reason="checks the offline message (HF_HUB_OFFLINE=1)")
def test_an_uncached_hub_id_while_offline_says_so():
    from posttrain.models import load_tokenizer

    with pytest.raises(UserError, match=r"model.name='nobody/not-cached-anywhere' is not in the local Hugging Face "
                                        r"cache, and HF_HUB_OFFLINE is set.*unset HF_HUB_OFFLINE"):
        load_tokenizer("nobody/not-cached-anywhere")


@pytest.mark.parametrize("args,message", [
    (["--workers", "0"], "argument --workers: 0: give 1 or more"),
    (["--workers", "-3"], "argument --workers: -3: give 1 or more"),
    (["--timeout", "nan"], "argument --timeout: nan: give a finite number of seconds above 0"),
    (["--timeout", "-1"], "argument --timeout: -1: give a finite number of seconds above 0"),
])
def test_verify_options_out_of_range_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["verify", *args, "1", "1"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_verify_file_with_bad_bytes_names_the_line(tmp_path, capsys):
    p = tmp_path / "pairs.jsonl"
    p.write_bytes(b'{"prediction": "1", "gold": "1"}\n{"prediction": "\xff\xfe", "gold": "1"}\n')
    assert main(["verify", "--file", str(p)]) == 2
    assert f"--file {p}:2: not UTF-8 text (byte 0xff at byte 17 of the line)" in capsys.readouterr().err


def test_a_reader_that_closes_the_pipe_gets_no_traceback(tmp_path):
    p = tmp_path / "many.jsonl"
    p.write_text("".join(json.dumps({"prediction": str(i), "gold": str(i), "pad": "x" * 200}) + "\n"
                         for i in range(3000)))  # about 700 KB of results: more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from posttrain.cli import main; sys.exit(main())",
                             "verify", "--file", str(p), "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert json.loads(first)["equal"] is True
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_chat_skips_a_line_of_bad_bytes_and_goes_on(tiny_qwen3):
    import io

    from posttrain.inference import ChatSession, chat_loop, load_for_inference

    model, tok = load_for_inference(str(tiny_qwen3), template="chatml", verbose=False)
    session = ChatSession(model, tok, {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0},
                          max_new_tokens=2)
    lines = iter([b"caf\xe9", "caf\udce9 au lait", "hello", "/exit"])

    def read(prompt):  # a strict stdin raises; a surrogateescape one passes the bytes through as surrogates
        line = next(lines)
        if isinstance(line, bytes):
            line.decode("utf-8")
        return line

    out = io.StringIO()
    assert chat_loop(session, read=read, out=out) == 0
    text = out.getvalue()
    assert text.count("[that line is not UTF-8 text (byte 0xe9); it was skipped: type it again]") == 2
    assert "assistant> " in text and len(session.history) == 2  # the good line was answered and kept
    assert session.history[0]["content"] == "hello"
