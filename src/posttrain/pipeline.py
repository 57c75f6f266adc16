"""Run a pipeline file: stages (sft, grpo, eval, export) in order, each taking the previous stage's model.

    stages:
      - {name: eval_base, command: eval, benchmark: synthetic, limit: 100, prompt: reasoning}
      - {name: sft, recipe: recipes/tiny/quickstart_sft.yaml, overrides: [train.max_steps=40]}
      - {name: grpo, recipe: recipes/tiny/quickstart_grpo.yaml}
      - {name: eval_grpo, command: eval, benchmark: synthetic, limit: 100, prompt: reasoning}
      - {name: export, format: merged}

Top-level keys: ``stages`` (required), ``output_dir`` (the run directory RUN; ``--out`` overrides it) and
``model`` (the base model for every stage, applied as ``model.name=...`` to the stage recipes). A stage's
``command`` defaults to its ``name``; names are unique and each stage writes to ``RUN/<name>/``.

What "the previous stage's output" means: sft and grpo produce a model (``RUN/<name>/adapter`` or ``model/``);
a grpo stage after a training stage starts from its adapter (``init_adapter``) or its full weights
(``model.name``); an eval stage evaluates the latest trained model (the base model before any training);
an export stage exports the latest trained run directory.

Skip and resume: a stage is finished when ``RUN/<name>/DONE`` exists; it is written last and holds a fingerprint
of what the stage was asked to do and of the stage it took its model from, so a rerun skips finished stages,
refuses to skip one whose recipe or settings changed (delete its directory to redo it), and redoes one whose
input stage was redone since. An interrupted sft/grpo stage resumes from its latest
complete checkpoint (``train(cfg, resume=True)``); an interrupted eval resumes through its samples.jsonl; an
interrupted export is redone. At the end ``RUN/report.md`` (see ``posttrain.report``) is written from the
stages' metrics files.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.errors import UserError

COMMANDS = ("sft", "grpo", "eval", "export")
DONE = "DONE"
STARTED = "STARTED"  # what an unfinished stage was started with (a mismatch starts it over)
TOP_KEYS = {"stages", "output_dir", "model"}
STAGE_KEYS = {
    "sft": {"name", "command", "recipe", "overrides"},
    "grpo": {"name", "command", "recipe", "overrides"},
    "eval": {"name", "command", "label", "benchmark", "data_file", "benchmark_dir", "limit", "limit_seed",
             "difficulty", "prompt", "template", "system_prompt", "max_new_tokens", "batch_size", "samples",
             "temperature", "top_p", "top_k", "seed", "last_number", "adapter"},
    "export": {"name", "command", "format", "quant", "dtype", "verify"},
}


@dataclass
class Stage:
    name: str
    command: str
    spec: dict
    dir: Path


@dataclass
class Pipeline:
    path: Path
    run_dir: Path
    model: str | None
    stages: list[Stage] = field(default_factory=list)


def _where(path: Path, i: int, name: str | None = None) -> str:
    return f"{path}: stages[{i}]" + (f" ({name})" if name else "")


def load_pipeline(path: str | Path, out: str | Path | None = None,
                  extra: dict[str, dict] | None = None) -> Pipeline:
    """Parse and check a pipeline file. ``extra`` maps a stage name to keys merged into its spec (``overrides``
    are appended to the file's); used by ``posttrain quickstart --fast``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pipeline file {path} does not exist; give a .yaml like recipes/pipelines/quickstart.yaml")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise UserError(f"{path}: needs a non-empty 'stages:' list, e.g. stages: [{{name: sft, recipe: "
                        "recipes/tiny/sft.yaml}}]")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise UserError(f"{path}: unknown top-level key(s) {sorted(unknown)}; valid: {sorted(TOP_KEYS)}")
    run_dir = Path(out or data.get("output_dir") or f"runs/{path.stem}")
    pipe = Pipeline(path, run_dir, data.get("model"))
    seen: set[str] = set()
    extra = dict(extra or {})
    for i, spec in enumerate(data["stages"]):
        if not isinstance(spec, dict) or not spec.get("name"):
            raise UserError(f"{_where(path, i)}: each stage is a mapping with a 'name' (and 'command' when the "
                            f"name is not one of {', '.join(COMMANDS)})")
        spec = dict(spec)
        name = str(spec["name"])
        command = spec.get("command", name)
        if command not in COMMANDS:
            raise UserError(f"{_where(path, i, name)}: unknown stage command {command!r}; set command: to one of "
                            f"{', '.join(COMMANDS)} (it defaults to the stage's name)")
        if name in seen or name == "report.md" or "/" in name:
            raise UserError(f"{_where(path, i, name)}: stage names must be unique directory names; rename it")
        seen.add(name)
        for key, value in (extra.pop(name, None) or {}).items():
            spec[key] = list(spec.get("overrides") or []) + list(value) if key == "overrides" else value
        bad = set(spec) - STAGE_KEYS[command]
        if bad:
            raise UserError(f"{_where(path, i, name)}: unknown key(s) {sorted(bad)} for a {command} stage; valid: "
                            f"{sorted(STAGE_KEYS[command])}")
        if command in ("sft", "grpo"):
            if not spec.get("recipe"):
                raise UserError(f"{_where(path, i, name)}: a {command} stage needs recipe: PATH.yaml")
            spec["recipe"] = str(_find_recipe(path, spec["recipe"], _where(path, i, name)))
            if not isinstance(spec.get("overrides", []), list):
                raise UserError(f"{_where(path, i, name)}: overrides must be a list of key=value strings")
        if command == "eval" and not spec.get("benchmark"):
            raise UserError(f"{_where(path, i, name)}: an eval stage needs benchmark: NAME or FILE (e.g. synthetic)")
        if command == "export" and spec.get("format", "merged") not in ("adapter", "merged", "gguf"):
            raise UserError(f"{_where(path, i, name)}: format must be adapter, merged or gguf")
        pipe.stages.append(Stage(name, command, spec, run_dir / name))
    if extra:
        raise UserError(f"no stage named {sorted(extra)} in {path}; its stages: {sorted(seen)}")
    return pipe


def _find_recipe(pipeline_path: Path, recipe: str, where: str) -> Path:
    """A recipe path as written, else relative to the pipeline file's folder or one of its parents (so a
    pipeline under recipes/pipelines/ can name recipes/tiny/x.yaml from any working directory)."""
    p = Path(recipe)
    candidates = [p] if p.is_absolute() else [p, *(d / p for d in pipeline_path.resolve().parents)]
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"{where}: recipe file {recipe} not found (looked in the working directory and above "
                    f"{pipeline_path.parent}); fix the path")


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_done(stage_dir: Path) -> dict | None:
    f = stage_dir / DONE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def _mark_done(stage: Stage, fingerprint: str, seconds: float, info: dict) -> None:
    tmp = stage.dir / (DONE + ".tmp")
    tmp.write_text(json.dumps({"stage": stage.name, "command": stage.command, "fingerprint": fingerprint,
                               "seconds": round(seconds, 1), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                               **info}, indent=2) + "\n")
    tmp.replace(stage.dir / DONE)


def _trained_output(run: Path) -> tuple[str, Path]:
    for kind in ("adapter", "model"):
        if (run / kind).is_dir():
            return kind, run / kind
    raise UserError(f"{run} has neither adapter/ nor model/: the training stage did not finish; delete {run} "
                    "and run the pipeline again")


# --------------------------------------------------------------------------------------------------
# stages


def _train_config(stage: Stage, pipe: Pipeline, prev: Path | None):
    from posttrain.config import SFTRecipe, load_recipe
    from posttrain.grpo.config import GRPORecipe

    overrides = list(stage.spec.get("overrides") or [])
    head = [f"model.name={pipe.model}"] if pipe.model else []
    if prev is not None:
        kind, path = _trained_output(prev)
        if stage.command == "grpo" and kind == "adapter":
            if not any(o.split("=", 1)[0].strip() == "init_adapter" for o in overrides):
                head.append(f"init_adapter={path}")
        else:  # a full fine-tune (or sft after sft): continue from its weights
            head = [f"model.name={path}"]
    cls = SFTRecipe if stage.command == "sft" else GRPORecipe
    return load_recipe(stage.spec["recipe"], head + overrides + [f"output_dir={stage.dir}"], cls)


def _run_train(stage: Stage, cfg) -> dict:
    from posttrain.checkpoint import checkpoints_dir, list_checkpoints

    if stage.command == "sft":
        from posttrain.sft import train
    else:
        from posttrain.grpo.loop import train
    resume = bool(list_checkpoints(stage.dir))
    if not resume and checkpoints_dir(stage.dir).exists():
        shutil.rmtree(checkpoints_dir(stage.dir))  # only incomplete checkpoints: nothing to resume from
    if resume:
        print(f"[posttrain] {stage.name}: resuming from {list_checkpoints(stage.dir)[-1]}")
    train(cfg, resume=resume)
    return {"resumed": resume}


def _eval_target(stage: Stage, pipe: Pipeline, prev: Path | None, first_model: str | None) -> tuple[str, str | None]:
    adapter = stage.spec.get("adapter")
    if prev is not None and adapter is None:
        kind, path = _trained_output(prev)
        if kind == "model":
            return str(path), None
        run_cfg = yaml.safe_load((prev / "config.yaml").read_text())
        return run_cfg["model"]["name"], str(path)
    model = pipe.model or first_model
    if model is None:
        raise UserError(f"{pipe.path}: stage {stage.name} evaluates the base model but the pipeline names none: "
                        "add model: NAME at the top of the pipeline")
    return model, None if adapter in (None, "none") else str(adapter)


def _eval_settings(spec: dict):
    from posttrain.evaluation import EvalSettings

    n = int(spec.get("samples", 1))
    temperature = float(spec.get("temperature", 0.0 if n == 1 else 0.6))
    settings = EvalSettings(
        prompt_style=spec.get("prompt", "boxed"), template=spec.get("template"),
        system_prompt=spec.get("system_prompt"), max_new_tokens=int(spec.get("max_new_tokens", 1024)),
        batch_size=int(spec.get("batch_size", 16)), n_samples=n, temperature=temperature,
        top_p=float(spec.get("top_p", 1.0 if n == 1 else 0.95)), top_k=int(spec.get("top_k", 0)),
        ks=tuple(sorted({*(2 ** i for i in range(n.bit_length()) if 2 ** i <= n), n})),
        seed=int(spec.get("seed", 0)), last_number=bool(spec.get("last_number", False)))
    settings.check()
    return settings


def _run_eval(stage: Stage, model_name: str, adapter: str | None) -> dict:
    from posttrain.commands.eval_cmd import load_for_eval
    from posttrain.evaluation import evaluate, load_benchmark
    from posttrain.evaluation.report import metrics_line

    s = stage.spec
    settings = _eval_settings(s)
    bench = load_benchmark(str(s["benchmark"]), data_file=s.get("data_file"), benchmark_dir=s.get("benchmark_dir"),
                           limit=s.get("limit"), limit_seed=s.get("limit_seed"), difficulty=s.get("difficulty", "easy"))
    model, tok = load_for_eval(model_name, adapter)
    model_id = model_name + (f" + {adapter}" if adapter else "")
    m = evaluate(model, tok, bench, settings, out_dir=stage.dir, model_id=model_id, progress=True)
    print(f"[posttrain] {stage.name}: " + metrics_line(m))
    del model
    return {"model": model_name, "adapter": adapter, "label": s.get("label") or stage.name}


def _run_export(stage: Stage, source: Path) -> dict:
    from posttrain.export import export

    fmt = stage.spec.get("format", "merged")
    out = stage.dir / fmt
    export(str(source), fmt, out, quant=stage.spec.get("quant", "q8_0"), dtype=stage.spec.get("dtype", "bfloat16"),
           overwrite=True, verify=bool(stage.spec.get("verify", True)))
    return {"source": str(source), "output": str(out), "format": fmt}


# --------------------------------------------------------------------------------------------------
# the runner


def run_pipeline(path: str | Path, out: str | Path | None = None, extra: dict[str, dict] | None = None,
                 report: bool = True) -> Path:
    """Run (or continue) the pipeline; returns the run directory, which holds one folder per stage and
    report.md."""
    pipe = load_pipeline(path, out, extra)
    pipe.run_dir.mkdir(parents=True, exist_ok=True)
    (pipe.run_dir / "pipeline.yaml").write_text(pipe.path.read_text())
    print(f"[posttrain] pipeline {pipe.path} -> {pipe.run_dir} ({', '.join(s.name for s in pipe.stages)})")
    prev: Path | None = None        # the latest training stage's run directory
    first_model: str | None = None  # the base model of the first training stage
    t_all = time.perf_counter()
    for k, stage in enumerate(pipe.stages, 1):
        head = f"[posttrain] stage {k}/{len(pipe.stages)} {stage.name} ({stage.command})"
        cfg, target, source = None, None, None
        if stage.command in ("sft", "grpo"):
            cfg = _train_config(stage, pipe, prev)
            first_model = first_model or cfg.model.name
            fp = _fingerprint({"command": stage.command, "recipe": cfg.model_dump(mode="json")})
        elif stage.command == "eval":
            if prev is None and first_model is None:
                first_model = _first_train_model(pipe)
            target = _eval_target(stage, pipe, prev, first_model)
            fp = _fingerprint({"command": "eval", "spec": stage.spec, "target": target})
        else:
            if prev is None:
                raise UserError(f"{pipe.path}: export stage {stage.name} comes before any sft/grpo stage: nothing "
                                "trained to export; move it after a training stage")
            source = prev
            fp = _fingerprint({"command": "export", "spec": stage.spec, "source": str(source)})
        # what this stage consumed: the DONE stamp of the training stage before it (redone upstream -> redo)
        upstream = read_done(prev) if prev is not None else None
        stamp = _fingerprint([upstream.get("fingerprint"), upstream.get("finished_at")]) if upstream else None
        done = read_done(stage.dir)
        if done is not None and done.get("fingerprint") != fp:
            raise UserError(f"stage {stage.name} in {stage.dir} was finished with a different recipe or settings; "
                            f"delete {stage.dir} to redo it (and the stages after it), or run into another --out")
        if done is not None and done.get("input") != stamp:
            print(f"{head}: its input stage {prev.name} was redone since; redoing {stage.name}")
            shutil.rmtree(stage.dir)
            done = None
        if done is not None:
            print(f"{head}: done already, skipped")
        else:
            print(f"{head} -> {stage.dir}")
            started = stage.dir / STARTED
            begun = json.loads(started.read_text()) if started.is_file() else None
            if begun is not None and begun != {"fingerprint": fp, "input": stamp}:
                print(f"{head}: the unfinished run in {stage.dir} had other settings or input; starting it over")
                shutil.rmtree(stage.dir)
            stage.dir.mkdir(parents=True, exist_ok=True)
            started.write_text(json.dumps({"fingerprint": fp, "input": stamp}) + "\n")
            t0 = time.perf_counter()
            try:
                if cfg is not None:
                    info = _run_train(stage, cfg)
                elif target is not None:
                    info = _run_eval(stage, *target)
                else:
                    info = _run_export(stage, source)
            except UserError as exc:  # e.g. Ctrl-C in training: checkpoint saved, then UserError
                raise UserError(f"stage {stage.name}: {exc}. Finished stages are kept: run the pipeline again to "
                                "continue") from None
            _mark_done(stage, fp, time.perf_counter() - t0, {"input": stamp, **info})
            gc.collect()
        if stage.command in ("sft", "grpo"):
            prev = stage.dir
    print(f"[posttrain] pipeline finished in {time.perf_counter() - t_all:.0f}s")
    if report:
        from posttrain.report import write_report

        path_md = write_report(pipe)
        print(f"[posttrain] report: {path_md}")
    return pipe.run_dir


def _first_train_model(pipe: Pipeline) -> str | None:
    """The model name of the first sft/grpo stage's recipe (for an eval of the base model before it)."""
    if pipe.model:
        return pipe.model
    for stage in pipe.stages:
        if stage.command in ("sft", "grpo"):
            data = yaml.safe_load(Path(stage.spec["recipe"]).read_text()) or {}
            name = (data.get("model") or {}).get("name")
            for o in stage.spec.get("overrides") or []:
                key, _, value = o.partition("=")
                if key.strip() == "model.name":
                    name = value.strip()
            return name
    return None
