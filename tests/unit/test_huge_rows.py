"""Huge rows cost what they are worth (reliability review D9: one 50 MB row drove tokenization to 12.9 GB before it
was dropped): a row far over data.max_length is judged from a prefix and dropped, counted with the other long
rows, and the decision is exact (never a row that would have fit)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from posttrain.config import DataConfig
from posttrain.data.tokenize import CHARS_PER_TOKEN_CAP, prepare_sft_data, surely_longer
from tests.conftest import write_jsonl


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_surely_longer_is_exact(qwen_tok):
    rng = random.Random(0)
    words = ["alpha", "beta", "42", "x^2", "\\frac{1}{2}", "the", "answer", "is", "\n", "    "]
    for max_tokens in (8, 64, 300):
        cap = max_tokens * CHARS_PER_TOKEN_CAP
        for size in (cap // 2, cap, cap + 1, 3 * cap, 20 * cap):
            text = "".join(rng.choice(words) + " " for _ in range(size))[:size]
            if surely_longer(qwen_tok, text, max_tokens):  # when it says so, the text really is longer
                assert size > cap and n_tokens(qwen_tok, text) > max_tokens, (max_tokens, size)
        assert not surely_longer(qwen_tok, "word " * (cap // 5), max_tokens)  # never judged at or under the cap
        assert surely_longer(qwen_tok, "word " * (4 * cap), max_tokens)
    # a run of spaces is 128 characters a token in Qwen's vocabulary: 100,000 of them are 782 tokens, under
    # max_length 2048 although far over its character cap, and kept
    spaces = " " * 100_000
    assert not surely_longer(qwen_tok, spaces, 2048) and n_tokens(qwen_tok, spaces) <= 2048
    assert surely_longer(qwen_tok, " " * 300_000, 2048)  # more than 2048 tokens of the longest can cover


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_a_50_mb_row_is_dropped_cheaply_and_counted(tmp_path, qwen_tok):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(8)]
    rows.insert(3, {"messages": [{"role": "user", "content": "Summarize this:"},
                                 {"role": "assistant", "content": "word " * 10_000_000}]})  # 50 MB
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    base = peak_rss_mb()
    t0 = time.perf_counter()
    train, _, stats = prepare_sft_data(DataConfig(path=str(path), template="chatml", max_length=256), qwen_tok)
    seconds, grown = time.perf_counter() - t0, peak_rss_mb() - base
    print(f"50 MB row: {seconds:.1f} s, peak RSS +{grown:.0f} MB")
    assert stats.rows == 9 and stats.dropped_too_long == 1 and len(train) == 8
    assert [e["row"] for e in train] == [1, 2, 3, 5, 6, 7, 8, 9]  # row 4 (1-based, as its line) was dropped
    assert grown < 1500, f"peak RSS grew by {grown:.0f} MB (tokenizing the row whole took 12.9 GB)"
    assert seconds < 60
