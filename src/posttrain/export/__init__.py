"""Export a trained model: a PEFT adapter, merged 16-bit safetensors, or GGUF (+ an Ollama Modelfile).

    export("runs/sft", "gguf", "runs/sft/export/gguf", quant="q8_0")

Every export is written into a hidden sibling directory (``.NAME.partial-PID``), loaded back and compared with
its source (``verify.py``), and only then renamed to ``out``; an export that is interrupted or fails its check
never leaves a directory that looks complete. ``--overwrite`` replaces only an earlier export (a folder with
``export.json``) or an empty folder, never the source, a folder that contains it, or a folder inside the weights
it reads; a lock beside ``out`` (``.NAME.lock``) keeps a second export from writing the same ``out``, and a full
disk is named as such (``fileops.writing``). ``export.json``, written last, records the source, the settings
and the round-trip numbers. Nothing is built: GGUF files are written with the ``gguf`` package (``gguf_writer``),
and only ``q4_k_m`` calls out to llama.cpp's ``llama-quantize`` when it is on the PATH. What a source may be (run
directory, adapter directory, model) and how it is loaded is ``posttrain.runs``'s. A reward model (``posttrain rm``)
exports as an adapter or a merged sequence classifier and is checked on its scores; GGUF refuses it (``reward``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from posttrain import runs
from posttrain.errors import UserError
from posttrain.export import reward as reward_mod
from posttrain.fileops import remove_tree, writing

FORMATS = ("adapter", "merged", "gguf")
QUANTS = ("f16", "bf16", "q8_0", "q4_k_m")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# bytes per parameter a GGUF export writes (q4_k_m: the f16 file it is quantized from, then ~0.6 per parameter)
_GGUF_BYTES = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q4_k_m": 2.6}


def _log(msg: str, verbose: bool = True) -> None:
    if verbose:
        print(f"[posttrain] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# Output directory: refuse to clobber, write beside it, rename when complete


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output(out: Path, overwrite: bool) -> None:
    """What can be refused before the source is read: a file, or an existing folder without ``--overwrite``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.exists() and not overwrite:
        raise UserError(f"output directory {out} already exists; pass --overwrite to replace it, or choose another --out")


def check_replace(out: Path, protect: list[Path], weights: list[Path]) -> None:
    """Refuse an ``--out`` whose replacement would delete what this export did not make: one of ``protect`` (the
    source and what the export reads) or a folder that contains one, a folder inside ``weights`` (the adapter or
    model directory read), or a non-empty folder that is not an earlier export (no ``export.json``)."""
    real = out.resolve()
    for p in protect:
        rp = p.resolve()
        if real == rp or real in rp.parents:
            what = "is the source" if real == rp else "contains the source"
            raise UserError(f"--out {out} {what} {p}: writing the export there would delete it. Choose an --out "
                            "outside it (by convention RUN/export/FORMAT for a run directory RUN)")
    for w in weights:
        if w.resolve() in real.parents:
            raise UserError(f"--out {out} is inside {w}, which this export reads; choose an --out outside it")
    if out.is_dir() and any(out.iterdir()) and not (out / "export.json").is_file():
        raise UserError(f"--out {out} exists and is not an export made by posttrain (it has no export.json), so "
                        "--overwrite will not delete it; choose another --out, or delete it yourself")


def _reads(source: str, src) -> tuple[list[Path], list[Path]]:
    """(what ``--out`` must neither be nor contain, what it must not lie inside) for ``source``: the path given,
    and the adapter, tokenizer and local model directories the export reads."""
    local_model = Path(src.model.name).expanduser()
    weights = [p for p in (src.adapter_dir, Path(src.tokenizer_dir) if src.tokenizer_dir else None, local_model)
               if p is not None and p.is_dir()]
    given = Path(source).expanduser()
    return ([given] if given.exists() else []) + weights, weights


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool, protect: list[Path] = (), weights: list[Path] = ()):
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` with one rename. The caller
    holds ``out``'s lock."""
    check_output(out, overwrite)
    check_replace(out, protect, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed export
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            remove_tree(stale, out.parent, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    remove_tree(tmp, out.parent, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        remove_tree(tmp, out.parent, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        remove_tree(old, out.parent, ignore_errors=True)
    else:
        tmp.rename(out)


# --------------------------------------------------------------------------------------------------


def find_llama_quantize(explicit: str | None = None) -> str:
    path = explicit or os.environ.get("POSTTRAIN_LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    if path and Path(path).is_file() and os.access(path, os.X_OK):
        return path
    raise UserError(
        "--quant q4_k_m needs llama.cpp's llama-quantize program, and none was found "
        f"({'not executable: ' + path if path else 'not on the PATH'}). Get it from a llama.cpp release archive "
        "(the llama-*-bin-* downloads on llama.cpp's GitHub releases page contain llama-quantize), from a package "
        "manager (brew install llama.cpp), or build it (cmake -B build && cmake --build build --target "
        "llama-quantize); then put it on the PATH or pass --llama-quantize PATH. posttrain writes f16, bf16 and "
        "q8_0 GGUF files without it.")


def default_name(source: str, src) -> str:
    p = Path(source)
    if p.is_dir():
        name = (p.parent.name if p.name in (runs.ADAPTER, runs.MODEL) else p.name) or "model"
    else:
        name = Path(src.model.name).stem if src.model.name.endswith(".gguf") else src.model.name.rstrip("/").split("/")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "model"


def export(source: str, fmt: str, out: str | Path, *, quant: str = "q8_0", dtype: str = "bfloat16",
           base: str | None = None, overwrite: bool = False, verify: bool = True, device: str = "auto",
           llama_quantize: str | None = None, name: str | None = None, verbose: bool = True) -> dict:
    """Export ``source`` (run dir, adapter dir, model) as ``fmt`` into ``out``; returns the report (export.json)."""
    from posttrain.export import merge as merge_mod

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "gguf" and quant not in QUANTS:
        raise UserError(f"--quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if dtype not in merge_mod.DTYPES:
        raise UserError(f"--dtype {dtype!r}; choose one of {', '.join(merge_mod.DTYPES)}")
    out = Path(out).expanduser()
    check_output(out, overwrite)
    src = runs.resolve(source, base=base)
    reward = reward_mod.is_reward_model(src)
    if reward and fmt == "gguf":
        raise UserError(f"{source} {reward_mod.GGUF_REFUSAL}")
    quantizer = find_llama_quantize(llama_quantize) if fmt == "gguf" and quant == "q4_k_m" else None
    protect, weights = _reads(source, src)
    check_replace(out, protect, weights)
    if fmt == "adapter" and src.adapter_dir is None:
        raise UserError(f"{source} holds full weights, not a LoRA adapter; export it with --format merged or gguf")
    runs.check_base_exists(src)
    t0 = time.perf_counter()
    report: dict = {"format": fmt, "source": str(source), "base": src.model.name, "base_from": src.base_from,
                    "adapter": str(src.adapter_dir) if src.adapter_dir else None, "load_in_4bit": src.model.load_in_4bit,
                    "reward_model": reward}
    _log(f"exporting {src.description} as {fmt} -> {out}", verbose)
    advice = "free some space or choose another --out, then run the export again"
    with runs.RunLock(out.parent / f".{out.name}.lock", "posttrain export", target=out), \
            writing(out.parent, f"the {fmt} export", advice) as space, \
            staged_output(out, overwrite, protect, weights) as tmp:
        if fmt == "adapter":
            _export_adapter(src, tmp, report, verify=verify, device=device, verbose=verbose, space=space,
                            reward=reward)
        else:
            _export_dense(src, fmt, tmp, report, quant=quant, dtype=dtype, verify=verify, device=device, reward=reward,
                          quantizer=quantizer, name=name or default_name(source, src), verbose=verbose, space=space,
                          final_dir=out)
        report["files"] = sorted(p.name for p in tmp.iterdir())
        report["seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    _log(f"wrote {out} in {report['seconds']}s ({', '.join(report['files'])})", verbose)
    return report


def _checks(reward: bool):
    """(load, probe_ids, outputs) for the round trip: a causal LM's logits on the probe, or a reward model's
    scores of its probe conversations (``export.reward``)."""
    from posttrain.export import verify as verify_mod

    if reward:
        return reward_mod.load, reward_mod.probe_ids, reward_mod.scores
    return runs.load, verify_mod.probe_ids, verify_mod.logits


def _export_adapter(src, tmp: Path, report: dict, *, verify: bool, device: str, verbose: bool, space,
                    reward: bool = False) -> None:
    from posttrain.export import verify as verify_mod

    adir = src.adapter_dir
    space.need(sum((adir / f).stat().st_size for f in ADAPTER_FILES + runs.TOKENIZER_FILES if (adir / f).is_file()))
    for fname in ADAPTER_FILES + runs.TOKENIZER_FILES:
        if (adir / fname).is_file():
            shutil.copy2(adir / fname, tmp / fname)
    if (tmp / "adapter_model.bin").is_file() and not (tmp / "adapter_model.safetensors").is_file():
        import torch
        from safetensors.torch import save_file

        state = torch.load(tmp / "adapter_model.bin", map_location="cpu", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_model.bin").unlink()
    if not (tmp / "adapter_model.safetensors").is_file():
        raise UserError(f"{adir} has no adapter_model.safetensors (or .bin); is it a complete PEFT adapter?")
    cfg = json.loads((tmp / "adapter_config.json").read_text())
    notes = []
    if cfg.get("use_dora"):
        notes.append("DoRA adapters are not supported by vLLM's LoRA loader; export --format merged for vLLM")
    if cfg.get("modules_to_save"):
        notes.append(f"modules_to_save={cfg['modules_to_save']}: vLLM loads only LoRA weights; use --format merged")
    if cfg.get("bias", "none") != "none":
        notes.append(f"bias={cfg['bias']!r}: vLLM needs --enable-lora-bias for adapters with trained biases")
    if int(cfg.get("r") or 0) > 16:
        notes.append(f"rank {cfg['r']} > 16: start vLLM with --max-lora-rank {cfg['r']} (its default is 16)")
    report["vllm_notes"] = notes
    for n in notes:
        _log("note: " + n, verbose)
    if not src.tokenizer_dir:
        _log("note: the adapter directory has no tokenizer; the base model's tokenizer will be used", verbose)
    if verify:
        load, probe_ids, outputs = _checks(reward)
        model, tok = load(src, device=device, verbose=verbose)
        ids = probe_ids(tok)
        ref = outputs(model, ids)
        del model
        report["verification"] = verify_mod.verify_adapter(tmp, src, ref, ids, device=device, load=load,
                                                           outputs=outputs)
        _log(f"round trip: PeftModel.from_pretrained on the export matches the source "
             f"(max |Δlogit| {report['verification']['max_abs_diff']:.1e})", verbose)


def _export_dense(src, fmt: str, tmp: Path, report: dict, *, quant: str, dtype: str, verify: bool, device: str,
                  quantizer: str | None, name: str, verbose: bool, space, final_dir: Path | None = None,
                  reward: bool = False) -> None:
    from posttrain.export import merge as merge_mod
    from posttrain.export import verify as verify_mod

    load, probe_ids, outputs = _checks(reward)
    from_4bit = src.model.load_in_4bit
    ref = ids = None
    if verify and from_4bit:  # the reference is the model as trained: 4-bit base + adapter
        model, tok = load(src, device=device, verbose=verbose)
        ids = probe_ids(tok)
        ref = outputs(model, ids)
        del model  # a fresh load is merged: on CPU bnb repacks 4-bit weights (lossily) at an inference forward
    model, tok = load(src, device=device, verbose=verbose and ref is None)
    if verify and ref is None:
        ids = probe_ids(tok)
        ref = outputs(model, ids)
    # a 4-bit base is merged in float32 layer by layer (merge.merge_4bit), a dense one by PEFT in its own dtype
    merged = merge_mod.merge_4bit(model, dtype) if from_4bit else merge_mod.cast(merge_mod.merge(model), dtype)
    report["dtype"] = dtype
    n_params = sum(p.numel() for p in merged.parameters())
    space.need(n_params * (merged.dtype.itemsize if fmt == "merged" else _GGUF_BYTES[quant]))
    if src.adapter_dir is not None:
        _log(f"merged the adapter into {'4-bit weights dequantized to float32' if from_4bit else 'dense'} weights, "
             f"saved as {dtype}",
             verbose)
    if fmt == "merged":
        merge_mod.save_merged(merged, tok, tmp)
        if verify:
            check = reward_mod.verify_merged if reward else verify_mod.verify_merged
            report["verification"] = check(tmp, ref, ids, dtype, from_4bit)
            v = report["verification"]
            _log(f"round trip: reloaded with transformers, max |Δlogit| / max |logit| = {v['rel_diff']:.1e} "
                 f"(tolerance {v['tolerance']:.0e}), argmax agreement {v['argmax_agreement']:.0%}", verbose)
        return

    from posttrain.export import gguf_writer, ollama
    from posttrain.rollout import stop_token_ids

    eos = stop_token_ids(merged, tok)
    gguf_name = f"{name}-{quant}.gguf"
    path = tmp / gguf_name
    t0 = time.perf_counter()
    if quant == "q4_k_m":
        f16 = tmp / f"{name}-f16.tmp.gguf"
        gguf_writer.write_gguf(merged, tok, f16, "f16", name=name, eos_token_id=eos[0])
        proc = subprocess.run([quantizer, str(f16), str(path), "Q4_K_M"], capture_output=True, text=True)
        f16.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise UserError(f"llama-quantize failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    else:
        gguf_writer.write_gguf(merged, tok, path, quant, name=name, eos_token_id=eos[0])
    report.update(quant=quant, gguf=gguf_name, gguf_bytes=path.stat().st_size)
    _log(f"wrote {gguf_name} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s", verbose)
    stops = [tok.convert_ids_to_tokens(i) for i in eos]
    ollama.write_modelfile(tmp, gguf_name, tok, stops, final_dir=final_dir,  # tmp is renamed to final_dir
                           log=lambda msg: _log(msg, verbose))
    if verify:
        reference = merged.float()
        report["merge_check"] = verify_mod.compare(ref, verify_mod.logits(reference, ids))
        v = verify_mod.verify_gguf(path, reference, tok, ids, quant)
        report["verification"] = v
        _log(f"round trip: transformers' GGUF reader, max |Δlogit| / max |logit| = {v['rel_diff']:.1e}, greedy "
             f"decoding matches the merged model for {v['greedy_match_tokens']}/{verify_mod.GREEDY_TOKENS} tokens",
             verbose)
