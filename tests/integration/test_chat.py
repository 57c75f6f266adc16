"""posttrain chat driven as a person would drive it: a real terminal (tmux), typed lines, the screen read back.

The model is SmolLM2-135M-Instruct with greedy decoding, so every reply can be predicted: the test computes the
expected replies with plain transformers and looks for them on the screen.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TMUX = shutil.which("tmux")
INTRO, ASK = "My name is Ada.", "What is my name?"
QUESTION = "What is the capital of France?"
POET = "You are a poet. Answer with a short poem."
MAX_NEW = 20

pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install -y tmux)")


def expected_replies():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models import materialize_alias

    path = materialize_alias("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def reply(messages):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    intro = reply([{"role": "user", "content": INTRO}])
    return {"intro": intro,
            "with_history": reply([{"role": "user", "content": INTRO}, {"role": "assistant", "content": intro},
                                   {"role": "user", "content": ASK}]),
            "fresh": reply([{"role": "user", "content": ASK}]),
            "poet": reply([{"role": "system", "content": POET}, {"role": "user", "content": QUESTION}]),
            "plain": reply([{"role": "user", "content": QUESTION}])}


class Terminal:
    def __init__(self, name: str, command: str, env: dict):
        self.name = name
        subprocess.run([TMUX, "new-session", "-d", "-s", name, "-x", "220", "-y", "60", command], env=env, check=True)

    def screen(self) -> str:
        out = subprocess.run([TMUX, "capture-pane", "-p", "-J", "-S", "-1000", "-t", self.name], capture_output=True,
                             text=True)
        return out.stdout

    def type(self, text: str) -> None:
        subprocess.run([TMUX, "send-keys", "-t", self.name, "-l", text], check=True)
        subprocess.run([TMUX, "send-keys", "-t", self.name, "Enter"], check=True)

    def wait_for(self, predicate, timeout: float = 180) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out; the screen shows:\n{self.screen()}")

    def alive(self) -> bool:
        return subprocess.run([TMUX, "has-session", "-t", self.name], capture_output=True).returncode == 0

    def close(self) -> None:
        if self.alive():
            subprocess.run([TMUX, "kill-session", "-t", self.name], capture_output=True)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_chat_session_in_a_terminal(tmp_path):
    from posttrain.errors import UserError

    try:
        want = {k: flat(v) for k, v in expected_replies().items()}
    except UserError as exc:
        pytest.skip(str(exc))
    assert want["with_history"] != want["fresh"] and want["poet"] != want["plain"]  # the checks below can tell
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TERM="xterm")
    log = tmp_path / "chat.log"
    command = (f"{sys.executable} -m posttrain.cli chat smollm2-135m-instruct --preset greedy "
               f"--max-new-tokens {MAX_NEW} 2>{log}; echo CHAT-EXITED-$?; sleep 30")
    term = Terminal(f"posttrain-chat-{os.getpid()}", command, env)
    try:
        term.wait_for(lambda s: "you>" in s)
        assert "temperature 0.0" in term.screen()  # the preset is shown
        turns = 1

        def ask(text: str) -> str:
            """Type a line, wait for the next prompt, return what was printed in between."""
            nonlocal turns
            turns += 1
            term.type(text)
            screen = term.wait_for(lambda s: s.count("you>") >= turns)
            return flat(screen.split("you>")[-2])

        assert want["intro"] in ask(INTRO)
        assert want["with_history"] in ask(ASK)  # the second turn sees the first
        assert "[conversation cleared]" in ask("/reset")
        assert want["fresh"] in ask(ASK)  # after /reset the model no longer knows the name
        assert "[system prompt set" in ask(f"/system {POET}")
        assert want["poet"] in ask(QUESTION)
        term.type("/exit")
        screen = term.wait_for(lambda s: "CHAT-EXITED-" in s, timeout=30)
        assert "CHAT-EXITED-0" in screen, log.read_text()[-2000:]
    finally:
        term.close()
