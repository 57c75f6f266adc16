"""Worker for tests/integration/test_scale_out.py: two SFT steps and one rollout of a tiny LoRA model, sharded with
torch's FSDP2 (``fully_shard`` per decoder layer and at the root, as accelerate's TRANSFORMER_BASED_WRAP does) on
CPU processes over gloo, or unsharded in one process (``--plain``). Writes the adapter, grad norms and sampled
tokens to OUT (rank 0).

    torchrun --nproc_per_node 2 tests/integration/fsdp2_worker.py MODEL OUT
    python tests/integration/fsdp2_worker.py MODEL OUT --plain
"""

from __future__ import annotations

import json
import sys

import torch


def main(model_dir: str, out: str, plain: bool) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.config import LoraConfig
    from posttrain.distributed import GatheredRollouts, full_trainable_state, grad_norm, load_trainable_state
    from posttrain.losses import shift_labels
    from posttrain.models import apply_lora
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.hf import HFRolloutEngine
    from posttrain.sft import LossModule

    rank, world = 0, 1
    if not plain:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    module = LossModule(model, chunk_size=16)
    if not plain:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (4, 12), generator=g)
    labels = shift_labels(ids.clone())
    targets = int((labels != -100).sum())
    norms = []
    for _ in range(2):
        rows = range(rank * 4 // world, (rank + 1) * 4 // world)  # this process's half of the global batch
        x, y = ids[list(rows)], labels[list(rows)]
        # FSDP2 averages gradients over ranks, so each rank scales as sft.py does: loss * world / global targets
        loss = module(x, torch.ones_like(x), torch.arange(12).expand_as(x), y) * (world / targets)
        loss.backward()
        norms.append(grad_norm([p for p in model.parameters() if p.requires_grad], None))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    engine = HFRolloutEngine(model, tok, merge="inplace")
    if not plain:
        engine = GatheredRollouts(engine, module)
    def sample(r: int) -> list:
        # rank r's prompt; decode lengths differ between ranks (they must not need to decode in lockstep)
        prompt = [[100, 200, 300], [7, 8, 9, 10]][r]
        sp = SamplingParams(max_new_tokens=6 + 3 * r, seed=5, stop_token_ids=())
        return engine.generate([prompt], 2, sp, seeds=[r]).completion_ids.tolist()

    if plain:
        everyone = [sample(0), sample(1)]
    else:
        everyone = [None] * world
        dist.all_gather_object(everyone, sample(rank))
    state = full_trainable_state(model)  # a collective under FSDP2
    if not plain:
        load_trainable_state(model, state)  # whole tensors back into the shards: a no-op round trip
        again = full_trainable_state(model)
        assert all(torch.equal(again[k], state[k]) for k in state)
    if rank == 0:
        save_file(state, out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump({"norms": norms, "tokens": everyone, "world": world,
                       "sharded": any(hasattr(p, "device_mesh") for p in model.parameters())}, f)
    if not plain:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--plain" in sys.argv)
