"""Worker for tests/integration/test_accelerate_cpu.py: posttrain's command line under ``accelerate launch`` with
accelerate's FSDP2 on CPU processes (gloo), and a record of what ``accelerator.prepare`` made of posttrain's wrapper.

accelerate 1.x turns FSDP on only for GPU-type setups: on CPU it keeps ``DistributedType.MULTI_CPU`` and ignores the
FSDP plugin (posttrain refuses that launch). torch's FSDP2 itself runs on CPU over gloo, so this worker sets up
accelerate's CPU state, then switches it to FSDP with the plugin that ``accelerate launch`` configured from the
shipped accelerate/fsdp2_8gpu.yaml (its FSDP_* variables): everything after that, accelerate's ``prepare`` (auto
wrap, ``fully_shard``, the rank-0 broadcast of cpu_ram_efficient_loading, re-pointing the optimizer) and
posttrain's loop, is the real code a GPU launch runs.

With ``--deepspeed`` nothing is switched: posttrain itself runs DeepSpeed on CPU (its CPU accelerator over gloo).

    accelerate launch --config_file CFG tests/integration/accelerate_cpu_worker.py OUT.json [--deepspeed] -- ARGS

ARGS are posttrain's command line (``sft RECIPE key=value ...``). Rank 0 writes OUT.json: the FSDP units
(qualified names and classes) of each prepared module, and whether posttrain found the weights sharded.
"""

from __future__ import annotations

import json
import sys


def use_fsdp_on_cpu() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    Accelerator(cpu=True)  # MULTI_CPU: the gloo process group of the launched processes
    # every later Accelerator copies PartialState's shared fields into AcceleratorState's: switch both
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set


def _units(prepared) -> list:
    """[qualified name, class, reshards after forward] of each FSDP unit of ``prepared``."""
    from torch.distributed.fsdp import FSDPModule

    from posttrain.distributed import _reshards_after_forward

    return [[name, type(m).__name__, _reshards_after_forward(m)] for name, m in prepared.named_modules()
            if isinstance(m, FSDPModule)]


def record_prepare(records: list) -> None:
    """Wrap posttrain's session-level ``prepare`` and ``finish`` to record what accelerate prepared (the real
    functions run): the FSDP units after preparation and again at the end of training (after the rollouts)."""
    from posttrain import distributed, session

    real_prepare, real_finish = session.prepare, session.TrainingSession.finish

    def prepare(accelerator, module, optimizer, scheduler, **kw):
        wrapper = type(module).__name__
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        out = real_prepare(accelerator, module, optimizer, scheduler, **kw)
        prepared = out[0]
        ds = getattr(accelerator.state, "deepspeed_plugin", None)
        records.append({
            "wrapper": wrapper,
            "kind": distributed.launch_kind(accelerator),
            "units": _units(prepared),
            "transformer_cls_names_to_wrap": list(plugin.transformer_cls_names_to_wrap or []) if plugin else None,
            "micro_batch": ds.deepspeed_config.get("train_micro_batch_size_per_gpu") if ds else None,
            "zero_stage": ds.zero_stage if ds else None,
            "sharded_inner": distributed.sharded_optimizer(getattr(prepared, "module", prepared).model),
            "sharded_prepared": distributed.sharded_optimizer(prepared),
            "optimizer": type(out[1]).__name__,
        })
        return out

    def finish(self, prepared, *args, **kw):
        records[-1]["units_at_finish"] = _units(prepared)
        return real_finish(self, prepared, *args, **kw)

    session.prepare = prepare
    session.TrainingSession.finish = finish


def main() -> int:
    out, rest = sys.argv[1], sys.argv[2:]
    split = rest.index("--")
    flags, argv = rest[:split], rest[split + 1:]
    if "--deepspeed" not in flags:
        use_fsdp_on_cpu()
    records: list = []
    record_prepare(records)
    from posttrain.cli import main as cli

    status = cli(argv)
    from accelerate import PartialState

    if PartialState().is_main_process:
        with open(out, "w") as f:
            json.dump({"status": status, "prepared": records}, f)
    return status


if __name__ == "__main__":
    sys.exit(main())
