"""What every trainer shares around its loop, so a recipe module holds only its method:

- start: the accelerator and the launch check, this process's rank and device, the run directory: its lock (one
  writer per run directory; the main process holds it), the leftovers of a killed writer removed with a message,
  the guard (a run with checkpoints is continued only with ``--resume``, a finished run is not overwritten), and
  with ``--resume`` the recipe compared with the run's ``config.yaml`` (``resume``); seeds, the model
  (transformers or Unsloth, optionally from an SFT adapter), the resolved recipe saved in the run directory;
- :meth:`TrainingSession.begin`: resume from the newest intact checkpoint (with the thread count the run used,
  recorded in each checkpoint: ``threads``), the metrics logger, the graceful stop
  (Ctrl-C or SIGTERM finish the step, save a checkpoint and exit);
- :meth:`TrainingSession.end_step`: log, checkpoint every ``save_every`` steps or when stopped;
- :meth:`TrainingSession.finish`: the final save (the adapter or the whole model). When it fails (a full disk),
  the trained weights are kept in a checkpoint of the last step when one can be written, and the message says
  which checkpoint ``--resume`` continues from.

What only the main process decides (the lock, the checkpoint to resume from) it decides alone and broadcasts, and
a refusal is raised on every process, so no rank waits at a barrier for a main process that has stopped.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain import resume as resume_mod
from posttrain import threads
from posttrain.checkpoint import (checkpoints_dir, finish_checkpoint, leftovers, list_checkpoints, load_checkpoint,
                                  newest_intact, save_checkpoint, step_dirs)
from posttrain.config import save_recipe
from posttrain.distributed import accelerator_kwargs, check_launch, full_trainable_state, prepare, sharded_optimizer
from posttrain.errors import UserError
from posttrain.fastpath.allocator import keep_freed_memory
from posttrain.fileops import remove_tree
from posttrain.models import load_starting_model, resolve_device
from posttrain.runs import ADAPTER, MODEL, GracefulStop, final_output, lock_run_dir, save_final
from posttrain.tracking import MetricsLogger


class TrainingSession:
    """One training run of one process (see the module docstring). ``cfg`` is an SFT or GRPO recipe."""

    def __init__(self, cfg, resume: bool, title: str, *, variable_micro_batches: bool = False,
                 allow_changes: list[str] | tuple[str, ...] = ()):
        self.cfg, self.resume, self.title = cfg, resume, title
        device = resolve_device(cfg.model.device)
        self.accelerator = Accelerator(**accelerator_kwargs(cfg.train.grad_accum, device))
        self.launch = check_launch(self.accelerator, variable_micro_batches=variable_micro_batches,
                                   optimizer=cfg.train.optimizer)
        acc = self.accelerator
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        self.device = str(acc.device) if self.world > 1 else device
        if self.device == "cpu":
            keep_freed_memory()  # steps reuse large freed blocks instead of faulting in fresh pages
        self.run_dir = Path(cfg.output_dir)
        self.lock = None
        self._last: tuple | None = None  # (step, model, optimizer, scheduler, state) of the last end_step
        self.on_main(self._open_run_dir)
        try:
            self.changes = resume_mod.check_recipe(self.run_dir, cfg, allow_changes) if resume else []
        except UserError:
            self.release()
            raise
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.logger: MetricsLogger | None = None
        self.stop: GracefulStop | None = None

    def on_main(self, fn):
        """``fn()`` on the main process only, its result given to every process; a UserError it raises is raised
        on every process."""
        out = [None, None]
        if self.is_main:
            try:
                out[0] = fn()
            except UserError as exc:
                out[1] = str(exc)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(out)
        if out[1] is not None:
            raise UserError(out[1])
        return out[0]

    def _open_run_dir(self) -> None:
        """The main process: lock the run directory, remove what a killed writer left, refuse to overwrite."""
        run = self.run_dir
        self.lock = lock_run_dir(run, f"posttrain {self.title}")
        try:
            self._tidy_and_guard(run)
        except BaseException:
            self.release()
            raise

    def _tidy_and_guard(self, run: Path) -> None:
        for stale in leftovers(run) + [p for p in (run / f".tmp-{ADAPTER}", run / f".tmp-{MODEL}") if p.exists()]:
            print(f"[posttrain] removing {stale}: left unfinished by an earlier run that was stopped or failed",
                  flush=True)
            if stale.is_dir():
                remove_tree(stale, stale.parent)
            else:
                stale.unlink()
        if self.resume:
            return
        done = final_output(run)
        if done is not None:
            raise UserError(f"{run} holds a finished run ({done[1].name}/); choose another output_dir, or delete "
                            f"{run} to train it again")
        if step_dirs(run):
            raise UserError(f"{run} already holds checkpoints: pass --resume to continue it, or choose another "
                            "output_dir")

    def load_model(self):
        """(model, tokenizer) to train: Unsloth's loader with ``model.backend=unsloth``, else transformers',
        continuing or merging ``init_adapter`` when the recipe names one."""
        cfg = self.cfg
        if cfg.model.backend == "unsloth":
            from posttrain.unsloth_backend import load_unsloth  # an optional extra, CUDA only

            if cfg.init_adapter:
                raise UserError("init_adapter with model.backend=unsloth is not supported; use model.backend=hf")
            return load_unsloth(cfg.model, cfg.lora, max_seq_length=cfg.data.max_length, seed=cfg.train.seed,
                                num_processes=self.world, verbose=self.is_main)
        return load_starting_model(cfg.model, cfg.lora, cfg.init_adapter, cfg.init_adapter_mode, verbose=self.is_main)

    def save_recipe(self) -> None:
        """The resolved recipe as ``RUN/config.yaml``; when resuming, ``begin`` writes it once it knows the step
        the run continues from (config.yaml records accepted changes with that step)."""
        if self.is_main and not self.resume:
            save_recipe(self.cfg, self.run_dir)

    def prepare(self, module: torch.nn.Module, optimizer, scheduler):
        return prepare(self.accelerator, module, optimizer, scheduler, micro_batch=self.cfg.train.batch_size)

    def begin(self, model, optimizer, scheduler, total_steps: int) -> dict:
        """Resume (with ``--resume``), open the logger, install the graceful stop. -> the checkpoint's state
        (``step`` and what the recipe saved with it; ``{"step": 0}`` for a new run)."""
        state = {"step": 0}
        if self.resume:
            chosen = self.on_main(lambda: newest_intact(self.run_dir)) if self.world > 1 else None
            state = load_checkpoint(self.run_dir, model, optimizer, scheduler, rank=self.rank, path=chosen,
                                    verbose=self.is_main)
            if state is None:
                raise UserError(f"--resume: no checkpoint in {checkpoints_dir(self.run_dir)}; run without --resume "
                                "to start")
            threads_line = threads.apply_for_resume(state.get("threads"))  # the run's count: bit-identical steps
            if self.is_main:
                print(threads_line, flush=True)
                resume_mod.save_resumed_recipe(self.run_dir, self.cfg, self.changes, state["step"])
                accepted = "; ".join(f"{k}: {a} -> {b}" for k, a, b in self.changes)
                print(f"[posttrain] resumed from step {state['step']}" +
                      (f" with changed settings ({accepted}), recorded in config.yaml" if accepted else ""))
        self.total_steps = total_steps
        self.logger = MetricsLogger(self.run_dir, self.cfg.train.report_to, total_steps, resume_step=state["step"],
                                    enabled=self.is_main, title=self.title, config=self.cfg.model_dump(mode="json"))
        self.stop = GracefulStop()
        return state

    def end_step(self, done: int, metrics: dict, model, optimizer, scheduler, state: dict) -> None:
        """Log the step's metrics when due; save a checkpoint (with the recipe's ``state``) every ``save_every``
        steps, or now when a stop was requested, and then stop with a message saying how to continue."""
        t = self.cfg.train
        if done % t.log_every == 0 or done == self.total_steps:
            self.logger.log(done, metrics)
        interrupted = self.stop.requested and done < self.total_steps
        self._last = (done, model, optimizer, scheduler, state)
        if interrupted or (t.save_every and done % t.save_every == 0 and done < self.total_steps):
            self.checkpoint(done, model, optimizer, scheduler, state)
        if interrupted:
            self.logger.close()
            raise UserError(f"interrupted after step {done}; checkpoint saved. Continue with --resume")

    def finish(self, prepared: torch.nn.Module, model, tok, is_peft: bool) -> Path:
        """The final save of the trained weights (``prepared`` is the accelerator-wrapped module whose
        ``.model`` is saved). Every process calls it (gathering sharded weights is a collective)."""
        self.stop.restore()
        self.logger.close()
        self.accelerator.wait_for_everyone()
        state = full_trainable_state(model) if sharded_optimizer(model) else None  # a collective: every rank
        out = self.run_dir
        if self.is_main:
            try:
                out = save_final(self.accelerator.unwrap_model(prepared).model, tok, self.run_dir, is_peft, state)
            except Exception as exc:
                kept = self._keep_trained_weights(sharded=state is not None)
                if isinstance(exc, UserError):
                    raise UserError(f"{exc}. {kept}") from exc
                print(f"[posttrain] the final save failed: {kept}", flush=True)
                raise
            print(f"[posttrain] saved {out}")
        self.release()
        return out

    def checkpoint(self, done: int, model, optimizer, scheduler, state: dict) -> None:
        """Checkpoint ``step-{done}``: every rank writes its part, then the main process completes it."""
        self.accelerator.wait_for_everyone()
        state = {**state, "threads": torch.get_num_threads()}  # --resume continues with it (threads.resume_count)
        save_checkpoint(self.run_dir, done, model, optimizer, scheduler, state, rank=self.rank)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            finish_checkpoint(self.run_dir, done, self.world, keep=self.cfg.train.keep_checkpoints)

    def _keep_trained_weights(self, sharded: bool) -> str:
        """After a failed final save (main process): write a checkpoint of the last step when that is possible
        (one process, weights not sharded), and say which checkpoint ``--resume`` continues from."""
        last = self._last
        if last is not None and self.world == 1 and not sharded and last[0] == self.total_steps:
            if not list_checkpoints(self.run_dir) or list_checkpoints(self.run_dir)[-1].name != f"step-{last[0]}":
                try:
                    self.checkpoint(*last)
                except Exception as exc:  # noqa: BLE001 - reported; the original failure is what is raised
                    print(f"[posttrain] a checkpoint of step {last[0]} could not be written either: {exc}", flush=True)
        ckpts = list_checkpoints(self.run_dir)
        if not ckpts:
            return (f"No checkpoint holds the trained weights: the {self.total_steps} steps must be trained again "
                    "(train.save_every writes checkpoints as training goes)")
        step = int(ckpts[-1].name.split("-")[1])
        if step == self.total_steps:
            return (f"The trained weights are kept in {ckpts[-1]}: run the same command with --resume to write "
                    "the final save again")
        return (f"The newest checkpoint is {ckpts[-1]}: run the same command with --resume to redo steps "
                f"{step + 1}-{self.total_steps} (bit for bit) and save")

    def release(self) -> None:
        """Give up the run directory's lock (the end of the run; the kernel releases it if the process dies)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
