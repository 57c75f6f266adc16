"""What a run directory is, how a training run ends, and how what it trained is loaded back.

A run directory ``RUN`` (``output_dir`` of ``posttrain sft`` / ``grpo``) holds:

    .lock            held while a process writes the run (``RunLock``: one writer per run directory)
    config.yaml      the resolved recipe (``config.save_recipe``); its ``model:`` section says how the base was
                     loaded (hub id, 4-bit or not), which an adapter alone does not record
    metrics.jsonl    one JSON object per logged step (``tracking.MetricsLogger``)
    checkpoints/     ``step-N/`` written atomically, for ``--resume`` (``checkpoint``)
    adapter/         the final PEFT adapter plus the tokenizer with the chat template used in training (LoRA)
    model/           the final full weights plus the tokenizer (full fine-tuning); exactly one of the two
    export/          ``posttrain export RUN --out RUN/export/FORMAT`` by convention (``export``)

``adapter/`` or ``model/`` appears only when training finished: ``save_final`` writes it beside and renames it.
A pipeline (``pipeline``) adds one folder per stage (a run directory, or an eval's ``metrics.json`` and
``samples.jsonl``), each finished stage stamped with a ``DONE`` file, plus ``report.md``.

A user names a trained artifact in one of four ways, and ``resolve`` turns each into a ``Source``: a run
directory, an adapter directory (``adapter_config.json``; its base is named by ``--base``, else by the run's
``config.yaml`` when it sits in a run directory, else by ``base_model_name_or_path``), a model directory
(``config.json``), or anything ``model.name`` accepts (hub id, ``.gguf`` file, alias). ``load`` loads a
``Source`` for inference; ``load_merged`` is the evaluation's form (an explicit base, the adapter merged in).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from posttrain.config import LoraConfig, ModelConfig
from posttrain.errors import UserError
from posttrain.fileops import remove_tree, tensor_bytes, writing
from posttrain.models import ALIASES, load_model, load_tokenizer, merge_adapter

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are then not protected from a second writer
    fcntl = None

CONFIG = "config.yaml"
ADAPTER = "adapter"
MODEL = "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


# --------------------------------------------------------------------------------------------------
# The end of a training run: graceful stop, peak memory, final save


class GracefulStop:
    """Ctrl-C / SIGTERM finish the current step, write a checkpoint and stop (a second Ctrl-C aborts)."""

    def __init__(self):
        self.requested = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("[posttrain] stopping after this step (a checkpoint will be written); Ctrl-C again to abort",
              flush=True)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_final(model, tokenizer, run_dir: Path, is_peft: bool, state_dict: dict | None = None) -> Path:
    """The adapter (or full model) and the tokenizer with its chat template, written atomically (a failed save
    leaves no ``.tmp-*`` behind and names a full disk). ``state_dict``: whole trainable weights gathered from
    sharded parameters (FSDP2, ZeRO-3)."""
    name = ADAPTER if is_peft else MODEL
    final = run_dir / name
    tmp = run_dir / f".tmp-{name}"
    remove_tree(tmp, run_dir)
    weights = state_dict if state_dict is not None else {
        n: p for n, p in model.named_parameters() if p.requires_grad or not is_peft}
    with writing(run_dir, f"the final {name}/", "free some space, then run the same command with --resume") as w:
        try:
            w.need(tensor_bytes(weights))
            model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
            tokenizer.save_pretrained(tmp)
        except BaseException:
            remove_tree(tmp, run_dir, ignore_errors=True)
            w.needed += _tokenizer_bytes(tokenizer)  # for the message: the tokenizer can outweigh an adapter
            raise
    remove_tree(final, run_dir)
    tmp.rename(final)
    return final


def _tokenizer_bytes(tokenizer) -> int:
    """About what ``tokenizer.save_pretrained`` writes: its tokenizer.json (0 when it is not a fast tokenizer)."""
    try:
        return len(tokenizer.backend_tokenizer.to_str().encode())
    except Exception:  # noqa: BLE001 - an estimate for a message; a slow tokenizer has no backend
        return 0


# --------------------------------------------------------------------------------------------------
# One writer per run directory


LOCK = ".lock"
_HELD: dict[str, "RunLock"] = {}  # the locks this process holds, by resolved path


class RunLock:
    """An advisory ``fcntl.flock`` on a lock file (``RUN/.lock``) that holds its holder's PID and command, so a
    second sft/grpo/run/export into the same output stops with a message naming that process.

    The kernel releases a flock when its process dies, kill -9 included: a lock file that exists but is not
    locked was left by a process that is gone, and is taken over with a message. ``release`` deletes the file
    (a process that opened it meanwhile notices, because the path then names another file or none, and tries
    again). Taking a lock this process already holds supersedes the earlier holder: a library user who calls
    ``train()`` again after an error must not be told that the run directory is in use by themselves. In a
    multi-process (DDP) run only the main process takes the lock (``session``)."""

    def __init__(self, path: Path, command: str, target: Path | None = None):
        self.path, self.command = Path(path), command
        self.target = target or self.path.parent  # what the lock protects, for the message
        self._fd: int | None = None
        self._key = ""

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD:
            _HELD[key].release()
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_lock(fd)
                os.close(fd)
                raise UserError(f"{self.target} is in use by another posttrain process ({_describe(holder)}, "
                                f"holding {self.path}): wait for it to finish or stop it, or choose another "
                                "output directory") from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # released and deleted between our open and our lock: take the new file
        else:
            raise UserError(f"could not lock {self.path}: it keeps being replaced; is another process looping on it?")
        stale = _read_lock(fd)
        if stale:
            print(f"[posttrain] {self.path} was left by {_describe(stale)}, which is no longer running (killed?); "
                  "taking it over", file=sys.stderr, flush=True)
        record = {"pid": os.getpid(), "command": self.command, "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd, self._key, _HELD[key] = fd, key, self
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        if _HELD.get(self._key) is self:
            del _HELD[self._key]

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run_dir(run_dir: str | Path, command: str) -> RunLock:
    """Take the lock of run directory ``run_dir`` (created if needed) for ``command`` (``posttrain sft``)."""
    return RunLock(Path(run_dir) / LOCK, command).acquire()


def _read_lock(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"pid": "unknown"}


def _describe(holder: dict) -> str:
    where = f" on {holder['host']}" if holder.get("host") not in (None, socket.gethostname()) else ""
    since = f", started {holder['started']}" if holder.get("started") else ""
    return f"PID {holder.get('pid', 'unknown')}{where}: {holder.get('command', 'posttrain')}{since}"


# --------------------------------------------------------------------------------------------------
# Reading a run directory


def is_run_dir(path: Path) -> bool:
    """A run directory has config.yaml and is not itself a model directory (config.json)."""
    return path.is_dir() and (path / CONFIG).is_file() and not (path / "config.json").is_file()


def final_output(run_dir: Path) -> tuple[str, Path] | None:
    """``("adapter", RUN/adapter)`` or ``("model", RUN/model)``; None while training has not finished."""
    if (run_dir / ADAPTER / "adapter_config.json").is_file():
        return ADAPTER, run_dir / ADAPTER
    if (run_dir / MODEL / "config.json").is_file():
        return MODEL, run_dir / MODEL
    return None


def trained_output(run_dir: Path, advice: str) -> tuple[str, Path]:
    """``final_output``, or a UserError ending with ``advice`` (what the caller's user should do)."""
    found = final_output(run_dir)
    if found is None:
        raise UserError(f"{run_dir} has neither {ADAPTER}/ nor {MODEL}/: training did not finish; {advice}")
    return found


def read_run_config(run_dir: Path) -> tuple[ModelConfig, LoraConfig | None]:
    """The ``model:`` and ``lora:`` sections of ``RUN/config.yaml``: how the run loaded its base."""
    path = run_dir / CONFIG
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"{path} has no model: section; is {run_dir} a posttrain run directory?")
    try:
        model = ModelConfig.model_validate(data["model"])
        lora = LoraConfig.model_validate(data["lora"]) if isinstance(data.get("lora"), dict) else None
    except ValidationError as exc:
        raise UserError(f"{path}: invalid model:/lora: section: {exc}".split("\n")[0]) from None
    return model, lora


def has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()


def find_adapter(path: str) -> Path:
    """What ``--adapter`` names: an adapter directory, or a run directory holding ``adapter/``."""
    p = Path(path).expanduser()
    for cand in (p, p / ADAPTER):
        if (cand / "adapter_config.json").is_file():
            return cand
    raise UserError(f"--adapter {path}: no adapter_config.json there or in {p / ADAPTER}; give the adapter directory "
                    "saved by posttrain sft/grpo or PEFT (a full fine-tune is a model, not an adapter)")


# --------------------------------------------------------------------------------------------------
# Resolving what the user named


@dataclass
class Source:
    model: ModelConfig  # the base (when adapter_dir is set) or the model itself
    adapter_dir: Path | None = None
    tokenizer_dir: str | None = None  # None: the model's own tokenizer
    lora: LoraConfig | None = None
    base_from: str = ""  # where the base model's name came from, for error messages

    @property
    def description(self) -> str:
        if self.adapter_dir:
            return f"adapter {self.adapter_dir} on base {self.model.name}"
        return f"model {self.model.name}"


def _alias_of(name: str) -> str:
    """An adapter trained on a built-in alias records the alias's cache path; map it back to the alias so the
    adapter still finds its base on another machine (or after the cache moved)."""
    p = Path(name)
    return p.name if p.name in ALIASES and p.parent.name == "models" else name


def _adapter_source(adapter_dir: Path, base: str | None) -> Source:
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        acfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{cfg_path} could not be read: {exc}") from None
    run_dir = adapter_dir.parent
    lora = None
    if base:
        model, base_from = ModelConfig(name=base), "--base"
    elif (run_dir / CONFIG).is_file():
        model, lora = read_run_config(run_dir)
        base_from = f"{run_dir / CONFIG} (model.name)"
    else:
        name = acfg.get("base_model_name_or_path")
        if not name:
            raise UserError(f"{cfg_path} does not name its base model (base_model_name_or_path); pass --base MODEL")
        model, base_from = ModelConfig(name=_alias_of(name)), f"{cfg_path} (base_model_name_or_path)"
    tok_dir = str(adapter_dir) if has_tokenizer(adapter_dir) else None
    return Source(model=model, adapter_dir=adapter_dir, tokenizer_dir=tok_dir, lora=lora, base_from=base_from)


def resolve(path: str, base: str | None = None, adapter: str | None = None) -> Source:
    """Resolve SOURCE (run directory, adapter directory, model directory, hub id, .gguf, alias); ``adapter``
    puts an adapter on SOURCE, which is then its base."""
    p = Path(path).expanduser()
    if adapter:
        return _adapter_source(find_adapter(adapter), base or path)
    if is_run_dir(p):
        kind, out = trained_output(p, "finish it with posttrain sft|grpo RECIPE --resume (its checkpoints/ hold "
                                      "training state, not a loadable model)")
        if kind == ADAPTER:
            return _adapter_source(out, base)
        model, _ = read_run_config(p)
        return Source(model=model.model_copy(update={"name": str(out), "load_in_4bit": False, "gguf_file": None}),
                      base_from=str(p))
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return _adapter_source(p, base)
    _refuse_checkpoint(p)
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(f"{p} is neither a run directory (config.yaml + adapter/ or model/), an adapter directory "
                        "(adapter_config.json) nor a model directory (config.json)")
    return Source(model=ModelConfig(name=path), base_from="the command line")


def _refuse_checkpoint(p: Path) -> None:
    """A checkpoint (``RUN/checkpoints/step-N``) or the folder of them is training state, not a model: say how to
    get the model out of it."""
    step = (p / "state.json").is_file() and (p / "trainable.safetensors").is_file()
    if p.is_dir() and (step or (p.name == "checkpoints" and is_run_dir(p.parent))):
        run = p.parents[1] if step else p.parent
        raise UserError(f"{p} is {'a training checkpoint' if step else 'the checkpoints folder'} of the run {run} "
                        "(weights with optimizer state, for --resume), not a loadable model. Finish the run with "
                        f"posttrain sft|grpo RECIPE output_dir={run} --resume, then use {run}")


def check_base_exists(src: Source) -> None:
    """Fail early, before any loading, when a base given as a local path is missing."""
    name = src.model.name
    if name in ALIASES:
        return
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".gguf")
    if looks_local and not Path(name).expanduser().exists():
        what = f"base model {name!r} of the adapter {src.adapter_dir}" if src.adapter_dir else f"model {name!r}"
        raise UserError(f"{what} (named in {src.base_from}) was not found. Pass --base MODEL with a hub id or a "
                        "local model directory")


# --------------------------------------------------------------------------------------------------
# Loading for inference



def attach(model, tok, src: Source, dequantize: bool, merge: bool = False):
    """What every loader does after the base: a 4-bit base made dense (``dequantize``), the run's saved tokenizer
    (with the chat template training used) in place of the base's, the adapter on top (unmerged, or merged into
    the weights with ``merge``)."""
    if dequantize:
        model = model.dequantize()
        model.hf_quantizer = None
        model.is_quantized = False
    if src.tokenizer_dir:
        tok = load_tokenizer(src.tokenizer_dir)
    if src.adapter_dir is not None and merge:
        model = merge_adapter(model, Path(src.adapter_dir))
    elif src.adapter_dir is not None:
        from peft import PeftModel  # peft's import takes 1.6 s: only loading an adapter pays it

        model = PeftModel.from_pretrained(model, str(src.adapter_dir))
    return model, tok

def load(src: Source, *, device: str = "auto", dtype: str = "auto", dequantize: bool = False, verbose: bool = True,
         merge: bool = False):
    """-> (model, tokenizer). With an adapter the model is a ``PeftModel`` (unmerged, or a plain model with the
    adapter merged in with ``merge``) on the base loaded as in training (4-bit when the run used 4-bit).
    ``dequantize=True`` turns a 4-bit base back into dense weights first (what ``merge`` needs: merging into 4-bit
    weights would quantize the LoRA update away)."""
    cfg = src.model.model_copy(update={"device": device, "dtype": dtype})
    lora = (src.lora or LoraConfig()) if cfg.load_in_4bit else None  # load_model asks for it with 4-bit bases
    try:
        model, tok = load_model(cfg, lora, for_training=False, verbose=verbose)
    except UserError as exc:
        if src.adapter_dir is None:
            raise
        raise UserError(f"base model {cfg.name!r} of the adapter {src.adapter_dir} (named in {src.base_from}) "
                        f"could not be loaded: {exc}. Pass --base MODEL with a hub id or local directory") from None
    model, tok = attach(model, tok, src, dequantize and cfg.load_in_4bit, merge)
    if src.adapter_dir is not None:
        model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def load_merged(model_name: str, adapter: str | None, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) for evaluation: ``model_name`` loaded as given (the run's ``config.yaml`` is not read),
    an adapter (or a run directory holding one) merged into its weights, and the adapter's saved tokenizer (with
    the chat template training used) in place of the base one."""
    path = find_adapter(adapter) if adapter else None
    src = Source(model=ModelConfig(name=model_name), adapter_dir=path,
                 tokenizer_dir=str(path) if path and has_tokenizer(path) else None, base_from="--model")
    return load(src, device=device, dtype=dtype, merge=True)
