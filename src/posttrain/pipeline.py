"""Run a pipeline file: stages (sft, grpo, eval, export) in order, each taking the previous stage's model.

    stages:
      - {name: eval_base, command: eval, benchmark: synthetic, limit: 100, prompt: reasoning}
      - {name: sft, recipe: tiny/quickstart_sft, overrides: [train.max_steps=40]}
      - {name: grpo, recipe: tiny/quickstart_grpo}
      - {name: eval_grpo, command: eval, benchmark: synthetic, limit: 100, prompt: reasoning}
      - {name: export, format: merged}

Top-level keys: ``stages`` (required), ``output_dir`` (the run directory RUN; ``--out`` overrides it) and
``model`` (the base model for every stage, applied as ``model.name=...`` to the stage recipes). A stage's
``command`` defaults to its ``name``; names are unique and each stage writes to ``RUN/<name>/``. The keys of
each kind of stage, their types and defaults are the models in ``posttrain.pipeline_config`` (``posttrain config
show pipeline`` lists them).

What "the previous stage's output" means: sft and grpo produce a model (``RUN/<name>/adapter`` or ``model/``);
a grpo stage after a training stage starts from its adapter (``init_adapter``) or its full weights
(``model.name``); an eval stage evaluates the latest trained model (the base model before any training);
an export stage exports the latest trained run directory.

Skip and resume: a stage is finished when ``RUN/<name>/DONE`` exists; it is written last and holds a fingerprint
of what the stage was asked to do and of the stage it took its model from, so a rerun skips finished stages,
refuses to skip one whose recipe or settings changed (delete its directory to redo it), and redoes one whose
input stage was redone since. An interrupted sft/grpo stage resumes from its latest
complete checkpoint (``train(cfg, resume=True)``); an interrupted eval resumes through its samples.jsonl; an
interrupted export is redone. At the end ``RUN/report.md`` (see ``posttrain.pipeline_report``) is written from the
stages' metrics files.

Nothing outside RUN is touched: a stage name is a plain folder name (``pipeline_config``), every deletion of a
stage folder goes through ``fileops.remove_tree(..., RUN)``, a second ``posttrain run`` into the same RUN is refused
by RUN's lock (``runs.RunLock``), and ``RUN/pipeline.yaml`` is written only when a stage starts or the pipeline
ends, so a rerun that is refused leaves the file that ran the finished stages.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain import recipes, runs
from posttrain.errors import UserError
from posttrain.fileops import remove_tree
from posttrain.pipeline_config import POLICY, TRAINING, StageConfig, parse_pipeline

DONE = "DONE"
STARTED = "STARTED"  # what an unfinished stage was started with (a mismatch starts it over)


@dataclass
class Stage:
    name: str
    command: str
    spec: dict           # as written in the file: what a finished eval or export stage's fingerprint covers
    dir: Path
    config: StageConfig  # the same, typed and with every default filled in


@dataclass
class Pipeline:
    path: Path
    run_dir: Path
    model: str | None
    stages: list[Stage] = field(default_factory=list)


def load_pipeline(path: str | Path, out: str | Path | None = None,
                  extra: dict[str, dict] | None = None) -> Pipeline:
    """Parse and check a pipeline file. ``extra`` maps a stage name to keys merged into its spec (``overrides``
    are appended to the file's); used by ``posttrain quickstart --fast``."""
    path = recipes.resolve(path, "pipeline")  # a file path, or a shipped name like pipelines/quickstart
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    cfg, written = parse_pipeline(data, path, extra)
    run_dir = Path(out or cfg.output_dir or f"runs/{path.stem}")
    pipe = Pipeline(path, run_dir, cfg.model)
    for i, (spec, stage) in enumerate(zip(written, cfg.stages)):
        if stage.command in TRAINING:
            stage.recipe = str(_find_recipe(path, stage.recipe, f"{path}: stages[{i}] ({stage.name})"))
        pipe.stages.append(Stage(stage.name, stage.command, spec, run_dir / stage.name, stage))
    return pipe


def _find_recipe(pipeline_path: Path, recipe: str, where: str) -> Path:
    """A recipe path as written, else relative to the pipeline file's folder or one of its parents (so a pipeline
    can name a recipe beside it from any working directory), else a shipped recipe's name (tiny/sft)."""
    p = Path(recipe)
    candidates = [p] if p.is_absolute() else [p, *(d / p for d in pipeline_path.resolve().parents)]
    for c in candidates:
        if c.is_file():
            return c
    shipped = recipes.find(recipe)
    if shipped is not None:
        return shipped
    raise UserError(f"{where}: recipe file {recipe} not found (looked in the working directory and above "
                    f"{pipeline_path.parent}); fix the path, or name a shipped recipe: "
                    f"{', '.join(recipes.names('recipe'))}")


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
    return runs.trained_output(run, f"delete {run} and run the pipeline again")


# --------------------------------------------------------------------------------------------------
# stages


def _trainer(command: str):
    """(recipe class, train function) of a training stage; imported on use (they load torch)."""
    if command == "sft":
        from posttrain.config import SFTRecipe
        from posttrain.sft import train
        return SFTRecipe, train
    if command == "grpo":
        from posttrain.grpo.config import GRPORecipe
        from posttrain.grpo.loop import train
        return GRPORecipe, train
    if command == "dpo":
        from posttrain.preference.dpo import train
        from posttrain.preference.dpo_config import DPORecipe
        return DPORecipe, train
    from posttrain.preference.config import RMRecipe
    from posttrain.preference.rm import train
    return RMRecipe, train


def _train_config(stage: Stage, pipe: Pipeline, prev: Path | None):
    """The stage's recipe with the pipeline's model, the previous policy stage's output (an adapter continues as
    ``init_adapter`` in grpo, dpo and rm; full weights as ``model.name``) and ``{run}`` in overrides replaced by
    the run directory (a grpo stage naming an rm stage's reward model: ``model: '{run}/rm'``)."""
    from posttrain.config import load_recipe

    overrides = [o.replace("{run}", str(pipe.run_dir)) for o in stage.config.overrides]
    head = [f"model.name={pipe.model}"] if pipe.model else []
    if prev is not None:
        kind, path = _trained_output(prev)
        if stage.command != "sft" and kind == "adapter":
            if not any(o.split("=", 1)[0].strip() == "init_adapter" for o in overrides):
                head.append(f"init_adapter={path}")
        else:  # a full fine-tune (or sft after sft): continue from its weights
            head = [f"model.name={path}"]
    cls, _ = _trainer(stage.command)
    return load_recipe(stage.config.recipe, head + overrides + [f"output_dir={stage.dir}"], cls)


def _run_train(stage: Stage, cfg) -> dict:
    from posttrain.checkpoint import checkpoints_dir, list_checkpoints

    _, train = _trainer(stage.command)
    if runs.final_output(stage.dir) is not None:  # killed after its final save, before DONE: training finished
        print(f"[posttrain] {stage.name}: training finished already ({runs.final_output(stage.dir)[1]})")
        return {"resumed": True}
    resume = bool(list_checkpoints(stage.dir))
    if not resume:  # only incomplete checkpoints: nothing to resume from
        remove_tree(checkpoints_dir(stage.dir), stage.dir)
    if resume:
        print(f"[posttrain] {stage.name}: resuming from {list_checkpoints(stage.dir)[-1]}")
    train(cfg, resume=resume)
    return {"resumed": resume}


def _eval_target(stage: Stage, pipe: Pipeline, prev: Path | None, first_model: str | None) -> tuple[str, str | None]:
    adapter = stage.config.adapter
    if prev is not None and adapter is None:
        kind, path = _trained_output(prev)
        if kind == "model":
            return str(path), None
        base, _ = runs.read_run_config(prev)
        return base.name, str(path)
    model = pipe.model or first_model
    if model is None:
        raise UserError(f"{pipe.path}: stage {stage.name} evaluates the base model but the pipeline names none: "
                        "add model: NAME at the top of the pipeline")
    return model, None if adapter in (None, "none") else str(adapter)


def _run_eval(stage: Stage, model_name: str, adapter: str | None) -> dict:
    from posttrain.evaluation import evaluate, load_benchmark
    from posttrain.evaluation.report import metrics_line

    settings = stage.config  # an EvalStage is the stage's EvalConfig
    bench = load_benchmark(settings.benchmark, **settings.benchmark_options())
    model, tok = runs.load_merged(model_name, adapter)
    model_id = model_name + (f" + {adapter}" if adapter else "")
    m = evaluate(model, tok, bench, settings, out_dir=stage.dir, model_id=model_id, progress=True)
    print(f"[posttrain] {stage.name}: " + metrics_line(m))
    del model
    return {"model": model_name, "adapter": adapter, "label": settings.label or stage.name}


def _run_export(stage: Stage, source: Path) -> dict:
    from posttrain.export import export

    c = stage.config
    out = stage.dir / c.format
    export(str(source), c.format, out, quant=c.quant, dtype=c.dtype, overwrite=True, verify=c.verify)
    return {"source": str(source), "output": str(out), "format": c.format}


# --------------------------------------------------------------------------------------------------
# the runner


def run_pipeline(path: str | Path, out: str | Path | None = None, extra: dict[str, dict] | None = None,
                 report: bool = True) -> Path:
    """Run (or continue) the pipeline; returns the run directory, which holds one folder per stage and
    report.md."""
    pipe = load_pipeline(path, out, extra)
    with runs.lock_run_dir(pipe.run_dir, "posttrain run"):
        _run_stages(pipe)
        if report:
            from posttrain.pipeline_report import write_report

            path_md = write_report(pipe)
            print(f"[posttrain] report: {path_md}")
    return pipe.run_dir


def _save_pipeline_file(pipe: Pipeline) -> None:
    """``RUN/pipeline.yaml``: the file that ran the stages. Written when a stage starts (or at the end), so a
    rerun that is refused leaves the file of the run that made the directory."""
    tmp = pipe.run_dir / "pipeline.yaml.tmp"
    tmp.write_text(pipe.path.read_text())
    tmp.replace(pipe.run_dir / "pipeline.yaml")


def _run_stages(pipe: Pipeline) -> None:
    print(f"[posttrain] pipeline {pipe.path} -> {pipe.run_dir} ({', '.join(s.name for s in pipe.stages)})")
    prev: Path | None = None        # the latest policy-training stage's run directory (not a reward model's)
    first_model: str | None = None  # the base model of the first training stage
    t_all = time.perf_counter()
    for k, stage in enumerate(pipe.stages, 1):
        head = f"[posttrain] stage {k}/{len(pipe.stages)} {stage.name} ({stage.command})"
        latest = prev
        if stage.config.start_from is not None:  # an earlier policy stage instead of the latest one
            prev = pipe.run_dir / stage.config.start_from
        cfg, target, source = None, None, None
        if stage.command in TRAINING:
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
        # what this stage consumed: the DONE stamps of the training stage before it and of every earlier stage its
        # overrides name through {run}/NAME (a reward model, sampled pairs): one of them redone -> redo this one
        upstream = read_done(prev) if prev is not None else None
        stamp = _fingerprint([upstream.get("fingerprint"), upstream.get("finished_at")]) if upstream else None
        referenced = _referenced_stages(stage, pipe, k)
        if referenced:
            stamp = _fingerprint([stamp] + [[d.get("fingerprint"), d.get("finished_at")] if (d := read_done(s))
                                            else None for s in referenced])
        inputs = ([prev] if prev is not None else []) + referenced
        done = read_done(stage.dir)
        if done is not None and done.get("fingerprint") != fp:
            raise UserError(f"stage {stage.name} in {stage.dir} was finished with a different recipe or settings; "
                            f"delete {stage.dir} to redo it (and the stages after it), or run into another --out")
        if done is not None and done.get("input") != stamp:
            names = " or ".join(s.name for s in inputs)
            print(f"{head}: its input stage {names} was redone since; redoing {stage.name}")
            remove_tree(stage.dir, pipe.run_dir)
            done = None
        if done is not None:
            print(f"{head}: done already, skipped")
        else:
            _save_pipeline_file(pipe)
            print(f"{head} -> {stage.dir}")
            started = stage.dir / STARTED
            begun = json.loads(started.read_text()) if started.is_file() else None
            if begun is not None and begun != {"fingerprint": fp, "input": stamp}:
                print(f"{head}: the unfinished run in {stage.dir} had other settings or input; starting it over")
                remove_tree(stage.dir, pipe.run_dir)
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
        prev = stage.dir if stage.command in POLICY else latest
    _save_pipeline_file(pipe)
    print(f"[posttrain] pipeline finished in {time.perf_counter() - t_all:.0f}s")


def _referenced_stages(stage: Stage, pipe: Pipeline, k: int) -> list[Path]:
    """The directories of the stages before the ``k``-th (1-based) that ``stage``'s overrides name as
    ``{run}/NAME`` (e.g. a grpo stage's reward model ``'{run}/rm'``)."""
    named = set(re.findall(r"\{run\}/([A-Za-z0-9_.-]+)", " ".join(getattr(stage.config, "overrides", None) or [])))
    return [s.dir for s in pipe.stages[:k - 1] if s.name in named]


def _first_train_model(pipe: Pipeline) -> str | None:
    """The model name of the first sft/grpo stage's recipe (for an eval of the base model before it)."""
    if pipe.model:
        return pipe.model
    for stage in pipe.stages:
        if stage.command in TRAINING:
            data = yaml.safe_load(Path(stage.config.recipe).read_text()) or {}
            name = (data.get("model") or {}).get("name")
            for o in stage.config.overrides:
                key, _, value = o.partition("=")
                if key.strip() == "model.name":
                    name = value.strip()
            return name
    return None
