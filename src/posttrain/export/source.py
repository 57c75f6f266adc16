"""What a trained artifact is and how to load it: a run directory, an adapter directory, or a model.

A run directory (written by ``posttrain sft`` / ``grpo``) holds ``config.yaml`` and either ``adapter/`` (a PEFT
adapter plus the tokenizer with the chat template used in training) or ``model/`` (full weights). An adapter
directory names its base in ``adapter_config.json`` (``base_model_name_or_path``); when it sits inside a run
directory the run's ``model:`` section wins, because it also says how the base was loaded (4-bit or not).
Anything else is a model as ``model.name`` accepts it (hub id, local directory, ``.gguf`` file, alias).

Used by ``export``, ``chat`` and ``generate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import LoraConfig, ModelConfig
from posttrain.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


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


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()


def _read_run_config(run_dir: Path) -> tuple[ModelConfig, LoraConfig | None]:
    import yaml

    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"{path} has no model: section; is {run_dir} a posttrain run directory?")
    try:
        model = ModelConfig.model_validate(data["model"])
        lora = LoraConfig.model_validate(data["lora"]) if isinstance(data.get("lora"), dict) else None
    except Exception as exc:  # pydantic ValidationError
        raise UserError(f"{path}: invalid model:/lora: section: {exc}".split("\n")[0]) from None
    return model, lora


def _alias_of(name: str) -> str:
    """An adapter trained on a built-in alias records the alias's cache path; map it back to the alias so the
    adapter still finds its base on another machine (or after the cache moved)."""
    from posttrain.models import ALIASES

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
    elif (run_dir / "config.yaml").is_file():
        model, lora = _read_run_config(run_dir)
        base_from = f"{run_dir / 'config.yaml'} (model.name)"
    else:
        name = acfg.get("base_model_name_or_path")
        if not name:
            raise UserError(f"{cfg_path} does not name its base model (base_model_name_or_path); pass --base MODEL")
        model, base_from = ModelConfig(name=_alias_of(name)), f"{cfg_path} (base_model_name_or_path)"
    tok_dir = str(adapter_dir) if _has_tokenizer(adapter_dir) else None
    return Source(model=model, adapter_dir=adapter_dir, tokenizer_dir=tok_dir, lora=lora, base_from=base_from)


def resolve(path: str, base: str | None = None, adapter: str | None = None) -> Source:
    """Resolve SOURCE (run directory, adapter directory, model directory, hub id, .gguf, alias)."""
    p = Path(path).expanduser()
    if adapter:
        a = Path(adapter).expanduser()
        if not (a / "adapter_config.json").is_file():
            raise UserError(f"--adapter {a}: no adapter_config.json there; give a directory saved by PEFT "
                            "(a run's adapter/ folder)")
        src = _adapter_source(a, base or path)
        return src
    if p.is_dir() and (p / "config.yaml").is_file() and not (p / "config.json").is_file():
        if (p / "adapter" / "adapter_config.json").is_file():
            return _adapter_source(p / "adapter", base)
        if (p / "model" / "config.json").is_file():
            model, _ = _read_run_config(p)
            return Source(model=model.model_copy(update={"name": str(p / "model"), "load_in_4bit": False,
                                                         "gguf_file": None}), base_from=str(p))
        raise UserError(f"run directory {p} has neither adapter/ nor model/; did training finish? "
                        "(checkpoints are under checkpoints/; pass one of them with its adapter/ folder)")
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return _adapter_source(p, base)
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(f"{p} is neither a run directory (config.yaml + adapter/ or model/), an adapter directory "
                        "(adapter_config.json) nor a model directory (config.json)")
    return Source(model=ModelConfig(name=path), base_from="the command line")


def load(src: Source, *, device: str = "auto", dtype: str = "auto", dequantize: bool = False, verbose: bool = True):
    """-> (model, tokenizer). With an adapter the model is a ``PeftModel`` (unmerged) on the base loaded as in
    training (4-bit when the run used 4-bit). ``dequantize=True`` turns a 4-bit base back into dense weights first
    (what ``merge`` needs: merging into 4-bit weights would quantize the LoRA update away)."""
    from posttrain.models import load_model, load_tokenizer

    cfg = src.model.model_copy(update={"device": device, "dtype": dtype})
    lora = (src.lora or LoraConfig()) if cfg.load_in_4bit else None  # load_model asks for it with 4-bit bases
    try:
        model, tok = load_model(cfg, lora, for_training=False, verbose=verbose)
    except UserError as exc:
        if src.adapter_dir is None:
            raise
        raise UserError(f"base model {cfg.name!r} of the adapter {src.adapter_dir} (named in {src.base_from}) "
                        f"could not be loaded: {exc}. Pass --base MODEL with a hub id or local directory") from None
    if dequantize and cfg.load_in_4bit:
        model = model.dequantize()
        model.hf_quantizer = None
        model.is_quantized = False
    if src.tokenizer_dir:
        tok = load_tokenizer(src.tokenizer_dir)
    if src.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(src.adapter_dir))
        model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def check_base_exists(src: Source) -> None:
    """Fail early, before any loading, when a base given as a local path is missing."""
    name = src.model.name
    from posttrain.models import ALIASES

    if name in ALIASES:
        return
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".gguf")
    if looks_local and not Path(name).expanduser().exists():
        what = f"base model {name!r} of the adapter {src.adapter_dir}" if src.adapter_dir else f"model {name!r}"
        raise UserError(f"{what} (named in {src.base_from}) was not found. Pass --base MODEL with a hub id or a "
                        "local model directory")
