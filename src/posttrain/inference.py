"""Inference on a trained model: an interactive streaming chat and a batched, resumable JSONL generator.

Both load what ``posttrain.runs`` resolves (a run directory, an adapter directory, ``MODEL --adapter A``,
or any model ``model.name`` accepts) and render prompts with the model's chat template, or with one of
posttrain's built-in templates (``reasoning``: the seeds' GRPO template; ``chatml``; ``qwen3``).

Sampling presets are Qwen's recommendations: ``instruct`` (non-thinking) temperature 0.7, top-p 0.8, top-k 20;
``thinking`` temperature 0.6, top-p 0.95, top-k 20; both min-p 0. ``greedy`` is temperature 0.

``generate_file`` writes one output line per input line, in input order, flushing after every batch. A second
run continues after the last complete line (a torn last line is cut off first). It never truncates or replaces a
file it did not write: an ``--output`` that is the ``--input``, or that holds anything but its own earlier output,
is refused (``--overwrite`` included). Each line's sample is drawn from
its own random stream keyed by (seed, line index) through the rollout engine, so the output of an interrupted and
resumed run is the output of an uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

from posttrain import runs
from posttrain.data.loading import read_jsonl
from posttrain.errors import UserError
from posttrain.fileops import writing
from posttrain.rollout import stop_token_ids

PRESETS = {
    "instruct": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0},
    "thinking": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
    "greedy": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0},
}
TEMPLATES = ("tokenizer", "reasoning", "chatml", "qwen3")


def sampling_settings(preset: str, **overrides) -> dict:
    """A preset with the flags the user gave (None = keep the preset's value)."""
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}; choose one of {', '.join(PRESETS)}")
    s = dict(PRESETS[preset])
    s.update({k: v for k, v in overrides.items() if v is not None})
    if s["temperature"] < 0 or not 0 < s["top_p"] <= 1 or not 0 <= s["min_p"] < 1:
        raise UserError(f"sampling settings out of range: {s} (temperature >= 0, 0 < top_p <= 1, 0 <= min_p < 1)")
    return s


def load_for_inference(model: str, adapter: str | None = None, *, device: str = "auto", dtype: str = "auto",
                       template: str = "tokenizer", verbose: bool = True):
    src = runs.resolve(model, adapter=adapter)
    runs.check_base_exists(src)
    m, tok = runs.load(src, device=device, dtype=dtype, verbose=verbose)
    use_template(tok, template)
    return m, tok


def use_template(tok, template: str) -> None:
    if template not in TEMPLATES:
        raise UserError(f"--template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "tokenizer":
        if not getattr(tok, "chat_template", None):
            raise UserError("this model's tokenizer has no chat template (a base model?); pass --template "
                            "chatml, qwen3 or reasoning (the template it was trained with)")
        return
    from posttrain.data.templates import install_template

    install_template(tok, template)


def render(tok, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    out = tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


# --------------------------------------------------------------------------------------------------
# Chat


class ChatSession:
    """A conversation: system prompt, history, and streamed replies."""

    def __init__(self, model, tok, sampling: dict, *, max_new_tokens: int = 1024, system: str | None = None,
                 enable_thinking: bool | None = None, seed: int | None = None):
        self.model, self.tok = model, tok
        self.sampling, self.max_new_tokens = sampling, max_new_tokens
        self.system, self.enable_thinking, self.seed = system, enable_thinking, seed
        self.history: list[dict] = []
        self.stop_ids = list(stop_token_ids(model, tok))

    def reset(self) -> None:
        self.history = []

    def messages(self, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history + [{"role": "user", "content": user_text}]

    def reply(self, user_text: str, on_text: Callable[[str], None]) -> str:
        """Generate the assistant's reply, calling ``on_text`` with each new piece of text as it is decoded.
        Ctrl-C stops the reply early; an interrupted turn is not kept in the history."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        ids = torch.tensor([render(self.tok, self.messages(user_text), self.enable_thinking)])
        device = next(self.model.parameters()).device
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        class Interrupt(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        s = self.sampling
        kwargs = dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), streamer=streamer,
                      max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids,
                      pad_token_id=self.tok.pad_token_id, stopping_criteria=StoppingCriteriaList([Interrupt()]))
        if s["temperature"] > 0:
            kwargs.update(do_sample=True, temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"] or None,
                          min_p=s["min_p"] or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.seed is not None:
            torch.manual_seed(self.seed + len(self.history))
        error: list[BaseException] = []

        def work():
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the main thread
                error.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        pieces: list[str] = []
        try:
            for piece in streamer:
                pieces.append(piece)
                on_text(piece)
        except KeyboardInterrupt:
            stop.set()
            thread.join()
            raise
        thread.join()
        if error:
            raise error[0]
        text = "".join(pieces)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        return text


HELP = """commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset),
          /system (show it), /exit (or Ctrl-D); Ctrl-C stops a reply"""


def chat_loop(session: ChatSession, *, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Read a line, stream the reply; handle the slash commands. Returns when the user leaves."""
    def say(text: str) -> None:
        out.write(text)
        out.flush()

    if read is input and hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # bad bytes cost their own line, not the rest of the chunk
    say(f"{HELP}\n")
    while True:
        try:
            line = read("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            say("\n")
            return 0
        except UnicodeDecodeError as exc:  # a strict stdin
            say(f"[that line is not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); it was skipped: type it again]\n")
            continue
        text = line.strip()
        if not text:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes that are not UTF-8 come through as surrogate escapes
            ch = text[exc.start]
            what = f"byte 0x{ord(ch) - 0xdc00:02x}" if "\udc80" <= ch <= "\udcff" else f"U+{ord(ch):04X}"
            say(f"[that line is not UTF-8 text ({what}); it was skipped: type it again]\n")
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/help":
            say(HELP + "\n")
            continue
        if text == "/reset":
            session.reset()
            say("[conversation cleared]\n")
            continue
        if text == "/system" or text.startswith("/system "):
            new = text[len("/system"):].strip()
            if not new:
                say(f"[system prompt: {session.system!r}]\n")
                continue
            session.system = new
            session.reset()
            say("[system prompt set; conversation cleared]\n")
            continue
        if text.startswith("/"):
            say(f"[unknown command {text.split()[0]}; {HELP}]\n")
            continue
        say("\nassistant> ")
        try:
            session.reply(text, say)
        except KeyboardInterrupt:
            say("\n[stopped; this turn is not kept]\n")
            continue
        say("\n")


# --------------------------------------------------------------------------------------------------
# Batched generation from a JSONL file


def _prompt_problem(row: dict) -> str | None:
    if isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list):
        return None
    return "each line needs \"prompt\" (a string) or \"messages\" (a list of {role, content})"


def read_prompts(path: Path) -> list[dict]:
    rows = read_jsonl(path, what="--input", check=_prompt_problem)
    if not rows:
        raise UserError(f"--input {path} has no prompts")
    return rows


OUTPUT_KEYS = ("index", "completion", "finish_reason", "completion_tokens")


def _not_output(raw: bytes, index: int) -> str | None:
    """Why line ``raw`` is not an output line of ``generate_file`` for input line ``index`` (0-based); None if it
    is one (whichever input it came from)."""
    try:
        rec = json.loads(raw)
    except ValueError:
        return "not JSON"
    if not isinstance(rec, dict) or rec.get("index") != index or "completion" not in rec:
        return f"not an output line with \"index\": {index} and a \"completion\""
    return None


def _refuse(out_path: Path, line: int, why: str) -> UserError:
    return UserError(f"--output {out_path} exists and is not the output of an earlier posttrain generate (line {line}: "
                     f"{why}); it will not be overwritten: choose another --output, or delete it yourself")


def completed_lines(out_path: Path, rows: list[dict]) -> int:
    """How many lines of ``out_path`` are finished outputs of ``rows``, in order. Only a file that this command
    wrote for this input is continued, and only its torn last piece (after the last newline: an interrupted write)
    is cut off; any other non-empty file is refused, never truncated."""
    if not out_path.exists():
        return 0
    data = out_path.read_bytes()
    *complete, torn = data.split(b"\n")
    for good, raw in enumerate(complete):
        why = "it has more lines than --input has prompts" if good >= len(rows) else _not_output(raw, good)
        if why:
            raise _refuse(out_path, good + 1, why)
        rec = json.loads(raw)
        if any(rec.get(k) != v for k, v in rows[good].items() if k not in OUTPUT_KEYS):
            raise UserError(f"{out_path}: line {good + 1} is not the output of input line {good + 1}; it belongs to "
                            "another input file. Pass --overwrite to start over or choose another --output")
    if torn:
        head = f'{{"index": {len(complete)},'.encode()  # how every line generate_file writes begins
        if not (head.startswith(torn) or torn.startswith(head)):
            raise _refuse(out_path, len(complete) + 1, "an unfinished line that generate did not write")
        with out_path.open("r+b") as f:
            f.truncate(len(data) - len(torn))
    return len(complete)


def _start_over(out_path: Path) -> None:
    """--overwrite: delete ``out_path`` when it is empty or an earlier output of generate (of any input)."""
    if not out_path.exists():
        return
    first = out_path.read_bytes().split(b"\n", 1)[0]
    why = _not_output(first, 0) if first else None
    if why:
        raise _refuse(out_path, 1, why)
    out_path.unlink()


def generate_file(model, tok, input_path: str | Path, output_path: str | Path, *, sampling: dict,
                  max_new_tokens: int = 512, batch_size: int = 8, system: str | None = None, raw: bool = False,
                  enable_thinking: bool | None = None, seed: int = 0, overwrite: bool = False,
                  progress: bool = True, compute_dtype: str = "auto") -> dict:
    """Complete every row of ``input_path`` into ``output_path`` (resumable). ``compute_dtype``: the decoder's
    matmul dtype by GRPO's rule (:func:`posttrain.models.resolve_compute_dtype`: ``auto`` is bf16 where the
    device has it natively); the returned stats name the one used."""
    from tqdm.auto import tqdm

    from posttrain.models import resolve_compute_dtype
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.hf import HFRolloutEngine

    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.exists() and input_path.exists() and output_path.samefile(input_path):
        raise UserError(f"--output {output_path} is the --input file; give another --output (the input is kept)")
    rows = read_prompts(input_path)
    if overwrite:
        _start_over(output_path)
    done = completed_lines(output_path, rows)
    if done and progress:
        print(f"[posttrain] {output_path} has {done} of {len(rows)} lines; continuing after line {done}",
              file=sys.stderr)
    if done == len(rows):
        return {"total": len(rows), "skipped": done, "generated": 0, "tokens": 0, "seconds": 0.0,
                "compute_dtype": None}
    if raw and any("prompt" not in r for r in rows):
        raise UserError("--raw sends \"prompt\" strings as they are; rows with \"messages\" need the chat template")

    def prompt_ids(row: dict) -> list[int]:
        if raw:
            return tok(row["prompt"], add_special_tokens=True)["input_ids"]
        msgs = row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}]
        if system and not (msgs and msgs[0].get("role") == "system"):
            msgs = [{"role": "system", "content": system}] + list(msgs)
        return render(tok, msgs, enable_thinking)

    params = SamplingParams(temperature=sampling["temperature"], top_p=sampling["top_p"],
                            top_k=sampling["top_k"], min_p=sampling["min_p"], max_new_tokens=max_new_tokens,
                            stop_token_ids=stop_token_ids(model, tok), seed=seed, logprobs=False)
    dtype = resolve_compute_dtype(compute_dtype, model)
    engine = HFRolloutEngine(model, tok, compute_dtype=dtype, head_dtype=dtype)
    dtype_name = str(dtype or next(model.parameters()).dtype).removeprefix("torch.")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(total=len(rows), initial=done, unit="prompt", desc="generate", disable=not progress, file=sys.stderr)
    advice = "free some space and run the same command again: it continues after the last complete line"
    with writing(output_path.parent, str(output_path), advice), output_path.open("a") as f:
        for start in range(done, len(rows), batch_size):
            idx = list(range(start, min(start + batch_size, len(rows))))
            ro = engine.generate([prompt_ids(rows[i]) for i in idx], 1, params, seeds=idx)
            lengths = ro.lengths.tolist()
            for k, i in enumerate(idx):
                rec = {"index": i, **{k2: v for k2, v in rows[i].items() if k2 not in OUTPUT_KEYS},
                       "completion": ro.texts[k], "finish_reason": ro.finish_reasons[k],
                       "completion_tokens": int(lengths[k])}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            tokens += int(sum(lengths))
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
    bar.close()
    seconds = time.perf_counter() - t0
    return {"total": len(rows), "skipped": done, "generated": len(rows) - done, "tokens": tokens,
            "seconds": round(seconds, 2), "compute_dtype": dtype_name}
