"""What every trainer shares around its loop, so a recipe module holds only its method:

- start: the accelerator and the launch check, this process's rank and device, the run-directory guard
  (a run with checkpoints is continued only with ``--resume``), seeds, the model (transformers or Unsloth,
  optionally from an SFT adapter), the resolved recipe saved in the run directory;
- :meth:`TrainingSession.begin`: resume from the last checkpoint, the metrics logger, the graceful stop
  (Ctrl-C or SIGTERM finish the step, save a checkpoint and exit);
- :meth:`TrainingSession.end_step`: log, checkpoint every ``save_every`` steps or when stopped;
- :meth:`TrainingSession.finish`: the final save (the adapter or the whole model).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from accelerate import Accelerator

from posttrain.checkpoint import collect_rank_rng, load_checkpoint, save_checkpoint
from posttrain.config import save_recipe
from posttrain.distributed import accelerator_kwargs, check_launch, full_trainable_state, prepare, sharded_optimizer
from posttrain.errors import UserError
from posttrain.fastpath.allocator import keep_freed_memory
from posttrain.models import load_starting_model, resolve_device
from posttrain.runs import GracefulStop, save_final
from posttrain.tracking import MetricsLogger


class TrainingSession:
    """One training run of one process (see the module docstring). ``cfg`` is an SFT or GRPO recipe."""

    def __init__(self, cfg, resume: bool, title: str, *, variable_micro_batches: bool = False):
        self.cfg, self.resume, self.title = cfg, resume, title
        device = resolve_device(cfg.model.device)
        self.accelerator = Accelerator(cpu=not device.startswith("cuda"), **accelerator_kwargs(cfg.train.grad_accum))
        self.launch = check_launch(self.accelerator, variable_micro_batches=variable_micro_batches)
        acc = self.accelerator
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        self.device = str(acc.device) if self.world > 1 else device
        if self.device == "cpu":
            keep_freed_memory()  # steps reuse large freed blocks instead of faulting in fresh pages
        self.run_dir = Path(cfg.output_dir)
        checkpoints = self.run_dir / "checkpoints"
        if not resume and self.is_main and checkpoints.exists() and any(checkpoints.iterdir()):
            raise UserError(f"{self.run_dir} already holds checkpoints: pass --resume to continue it, or choose "
                            "another output_dir")
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.logger: MetricsLogger | None = None
        self.stop: GracefulStop | None = None

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
        if self.is_main:
            save_recipe(self.cfg, self.run_dir)

    def prepare(self, module: torch.nn.Module, optimizer, scheduler):
        return prepare(self.accelerator, module, optimizer, scheduler)

    def begin(self, model, optimizer, scheduler, total_steps: int) -> dict:
        """Resume (with ``--resume``), open the logger, install the graceful stop. -> the checkpoint's state
        (``step`` and what the recipe saved with it; ``{"step": 0}`` for a new run)."""
        state = {"step": 0}
        if self.resume:
            state = load_checkpoint(self.run_dir, model, optimizer, scheduler, rank=self.rank)
            if state is None:
                raise UserError(f"--resume: no complete checkpoint in {self.run_dir / 'checkpoints'}")
            if self.is_main:
                print(f"[posttrain] resumed from step {state['step']}")
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
        if interrupted or (t.save_every and done % t.save_every == 0 and done < self.total_steps):
            self.accelerator.wait_for_everyone()
            save_checkpoint(self.run_dir, done, model, optimizer, scheduler, state, keep=t.keep_checkpoints,
                            rank=self.rank)
            self.accelerator.wait_for_everyone()
            if self.is_main:
                collect_rank_rng(self.run_dir, done, self.world)
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
            out = save_final(self.accelerator.unwrap_model(prepared).model, tok, self.run_dir, is_peft, state)
            print(f"[posttrain] saved {out}")
        return out
