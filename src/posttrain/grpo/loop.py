"""GRPO: reinforcement learning from verifiable rewards, readable top to bottom: setup -> loop -> save.

Each step: take P prompts per process (each group whole on one process), sample G completions of each
(``posttrain.rollout``), score them with the reward functions, turn rewards into group-relative advantages,
and take ``num_iterations`` optimizer steps on the clipped surrogate. Per completion ``i`` of a group with
rewards ``r_1..r_G`` (weighted sum of the reward functions; a completion every function skipped is NaN):

    A_i     = (r_i - mean(r)) / (std(r) + 1e-4)             scale_rewards=group (batch: std of the batch;
                                                             none: no division); std is the unbiased one
    rho_i,t = exp(logp_theta(o_i,t) - logp_old(o_i,t))      logp at temperature T (logits / T), as sampled
    l_i,t   = -min(rho A_i, clip(rho, 1 - eps, 1 + eps_high) A_i) + beta * KL3_i,t
    KL3_i,t = exp(logp_ref - logp_theta) - (logp_ref - logp_theta) - 1     (Schulman's k3 estimator)
    loss    = aggregate(l, loss_type)   grpo: mean_i mean_t;  bnpo: token mean per micro-batch;
                                        dr_grpo: sum / (B * max_completion_length);  dapo: sum / tokens of the
                                        whole step (all micro-batches and processes)
              - entropy_coef * mean token entropy

Departures from the DeepSeekMath paper (GRPO), each TRL's choice too unless said otherwise:
- The KL is added to the per-token loss (inside the aggregation), not as a separate penalty on the reward;
  the reference is the base model with the LoRA adapters disabled (no second copy), or a frozen copy in full
  fine-tuning. ``beta`` defaults to 0 (DAPO, Dr. GRPO): no reference forward at all.
- Loss aggregation is selectable; the paper's is ``grpo``. The default is ``dapo`` (TRL's default).
- ``epsilon_high`` (DAPO clip-higher) may differ from ``epsilon``.
- Log-probabilities use the sampling temperature (logits / T). top-k/top-p/min-p filters are not part of
  the scored distribution (they only shape sampling), as in TRL.
- ``num_iterations`` > 1: the old log-probabilities are the first iteration's own log-probabilities
  (detached), taken before any update of this step, instead of a separate forward (TRL's); with LoRA
  dropout 0 they are identical. A step is one batch of rollouts: with num_iterations=k it makes k optimizer
  updates (TRL counts updates as steps); the schedule counts updates.
- Options from later work: ``mask_truncated_completions`` (DAPO overlong filtering), ``dynamic_sampling``
  (DAPO: drop groups whose rewards all agree, optionally drawing more prompts to refill the batch), an
  entropy bonus.
- Numerics: the decoder layers may run in bf16 (``compute_dtype``; autocast, float32 master weights), the
  head and log-softmax in float32: log-probabilities are never taken from bf16 logits (TRL's default rounds
  them to bf16 unless ``cast_lm_head_to_fp32``).
- Micro-batches hold whole groups, longest first (less padding, and a group's completions share one prompt
  forward), rather than shuffled completions; only ``bnpo`` (token mean per micro-batch) can notice.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from posttrain.fastpath import onednn as packed
from posttrain.fastpath.allocator import keep_freed_memory
from posttrain.fastpath.fused_lora import fused_lora
from posttrain.checkpoint import collect_rank_rng, load_checkpoint, save_checkpoint
from posttrain.config import save_recipe
from posttrain.errors import UserError
from posttrain.grpo.config import GRPORecipe, check_group_batch
from posttrain.grpo.data import (PromptStream, build_rewards, collect_groups, log_completions, prepare_prompts,
                                 reward_metrics)
from posttrain.grpo.losses import (aggregate_loss, clip_fractions, group_advantages, masked_mean, per_token_grpo_loss,
                                   selective_log_softmax, zero_std_groups)
from posttrain.grpo.losses import truncated_importance_weights
from posttrain.distributed import (GatheredRollouts, accelerator_kwargs, accumulation, backward, check_launch,
                                   finish_step, full_trainable_state, prepare, sharded_optimizer)
from posttrain.models import (autocast_to, decoder_and_head, float32_attention, load_model, load_starting_model,
                              resolve_compute_dtype, resolve_device)
from posttrain.optim import build_optimizer, build_scheduler
from posttrain.rollout import SamplingParams
from posttrain.rollout.hf import HFRolloutEngine, layers_in
from posttrain.sft import GracefulStop, peak_memory_mb, save_final
from posttrain.tracking import MetricsLogger

# ---------------------------------------------------------------------------------------------- model pieces


def load_policy(cfg: GRPORecipe, verbose: bool = True):
    """(model, tokenizer); with ``init_adapter`` the SFT adapter is continued or merged (see the config)."""
    return load_starting_model(cfg.model, cfg.lora, cfg.init_adapter, cfg.init_adapter_mode, verbose=verbose)


class PolicyLogps(torch.nn.Module):
    """The forward that training differentiates: token log-probabilities (and entropies) of the completion
    tokens only, the head applied in chunks. Wrapped whole by DDP so it sees every parameter use.

    With a shared-prompt batch (``pack_micro_batch(share_prompts=True)``) each distinct prompt of the micro-batch
    goes through the model once; its KV cache (with its autograd graph) is indexed out to the completions of its
    group, which are then run on top of it. The G completions of a group thus cost one prompt forward and
    backward instead of G; gradients still reach the prompt positions (LoRA acts there too)."""

    def __init__(self, model, temperature: float, chunk_size: int, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.model, self.temperature, self.chunk_size = model, temperature, chunk_size
        self.compute_dtype = compute_dtype

    def forward(self, batch: dict, entropy_grad: bool = False):
        decoder, head = decoder_and_head(self.model)
        device = batch["mask"].device
        with autocast_to(device.type, self.compute_dtype), float32_attention(device.type, self.compute_dtype):
            hidden = self._hidden(decoder, batch)
        # the head outside autocast, in its weight's dtype (float32 unless the model itself is 16-bit)
        return selective_log_softmax(hidden.to(head.weight.dtype), head.weight, batch["targets"],
                                     bias=getattr(head, "bias", None), temperature=self.temperature or 1.0,
                                     chunk_size=self.chunk_size, entropy=True, entropy_grad=entropy_grad,
                                     packed=packed.packed_weight(head))

    def _hidden(self, decoder, batch: dict) -> torch.Tensor:
        """Final hidden states at the positions that predict each completion token, flattened."""
        if "p_ids" in batch:
            from transformers import DynamicCache

            out = decoder(input_ids=batch["p_ids"], attention_mask=batch["p_attn"], position_ids=batch["p_pos"],
                          past_key_values=DynamicCache(config=self.model.config), use_cache=True)
            cache = out.past_key_values
            cache.batch_select_indices(batch["row_u"])
            last = out.last_hidden_state[:, -1][batch["row_u"]]  # predicts each completion's first token
            comp = decoder(input_ids=batch["c_ids"], attention_mask=batch["attn"], position_ids=batch["c_pos"],
                           past_key_values=cache, use_cache=True).last_hidden_state
            return torch.cat([last.unsqueeze(1), comp], dim=1)[batch["rows"], batch["cols"]]
        return decoder(input_ids=batch["ids"], attention_mask=batch["attn"],
                       use_cache=False).last_hidden_state[batch["rows"], batch["cols"]]


def pack_micro_batch(items: list[dict], pad_id: int, device, share_prompts: bool = False) -> dict:
    """Tensors for one micro-batch. Plain: rows ``prompt + completion`` right-padded, and the positions that
    predict completion tokens. Shared prompts: the distinct prompts left-padded, the completions right-padded
    after them, and for each completion token the (row, column) of the hidden state that predicts it in
    ``[last prompt state, completion states]``."""
    T = max(it["length"] for it in items)
    rows, cols, targets = [], [], []
    out = {}
    if share_prompts:
        uniq: dict[tuple, int] = {}
        row_u = [uniq.setdefault(tuple(it["prompt"]), len(uniq)) for it in items]
        prompts = list(uniq)
        Lp = max(len(p) for p in prompts)
        p_ids = torch.full((len(prompts), Lp), pad_id, dtype=torch.long)
        p_attn = torch.zeros((len(prompts), Lp), dtype=torch.long)
        for u, p in enumerate(prompts):
            p_ids[u, Lp - len(p):] = torch.tensor(p)
            p_attn[u, Lp - len(p):] = 1
        c_ids = torch.full((len(items), T), pad_id, dtype=torch.long)
        c_attn = torch.zeros((len(items), T), dtype=torch.long)
        for b, it in enumerate(items):
            c = it["completion"][:it["length"]]
            c_ids[b, :len(c)] = torch.tensor(c)
            c_attn[b, :len(c)] = 1
            rows += [b] * len(c)
            cols += range(len(c))
            targets += c
        p_len = p_attn.sum(-1)
        out.update(p_ids=p_ids, p_attn=p_attn, p_pos=(p_attn.cumsum(-1) - 1).clamp(min=0), c_ids=c_ids,
                   attn=torch.cat([p_attn[row_u], c_attn], dim=1), row_u=torch.tensor(row_u),
                   c_pos=p_len[row_u].unsqueeze(1) + torch.arange(T).unsqueeze(0))
    else:
        width = max(len(it["prompt"]) + it["length"] for it in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(items), width), dtype=torch.long)
        for b, it in enumerate(items):
            p, c = it["prompt"], it["completion"][:it["length"]]
            ids[b, :len(p) + len(c)] = torch.tensor(p + c)
            attn[b, :len(p) + len(c)] = 1
            rows += [b] * len(c)
            cols += range(len(p) - 1, len(p) - 1 + len(c))
            targets += c
        out.update(ids=ids, attn=attn)
    mask = torch.zeros((len(items), T))
    for b, it in enumerate(items):
        mask[b, :it["length"]] = it["mask"]
    if all(it.get("sample_logps") is not None for it in items):  # the rollout engine's log-probs (TIS)
        out["sample_logps"] = torch.zeros((len(items), T))
        for b, it in enumerate(items):
            out["sample_logps"][b, :it["length"]] = it["sample_logps"]
    out.update(rows=torch.tensor(rows), cols=torch.tensor(cols), targets=torch.tensor(targets), mask=mask,
               adv=torch.tensor([it["advantage"] for it in items]))
    return {k: v.to(device) for k, v in out.items()}


def unpad(flat: torch.Tensor, batch: dict) -> torch.Tensor:
    """(N_tokens,) -> (B, T) with zeros on padding."""
    out = flat.new_zeros(batch["mask"].shape)
    starts = torch.zeros(out.shape[0] + 1, dtype=torch.long, device=flat.device)
    lengths = torch.bincount(batch["rows"], minlength=out.shape[0])
    starts[1:] = lengths.cumsum(0)
    t = torch.arange(flat.shape[0], device=flat.device) - starts[batch["rows"]]
    out[batch["rows"], t] = flat
    return out


# ---------------------------------------------------------------------------------------------- training


def train(cfg: GRPORecipe, resume: bool = False, reward_funcs=None, rows: list[dict] | None = None) -> Path:
    """Run GRPO as the recipe says; ``reward_funcs`` (callables) and ``rows`` replace the recipe's (tests)."""
    from accelerate import Accelerator

    device = resolve_device(cfg.model.device)
    accelerator = Accelerator(cpu=not device.startswith("cuda"), **accelerator_kwargs(cfg.train.grad_accum))
    launch = check_launch(accelerator, variable_micro_batches=cfg.grpo.dynamic_sampling)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = str(accelerator.device) if world > 1 else device
    if device == "cpu":
        keep_freed_memory()  # steps reuse large freed blocks instead of faulting in fresh pages
    g, t = cfg.grpo, cfg.train
    run_dir = Path(cfg.output_dir)
    if not resume and is_main and (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another "
                        "output_dir")
    per_proc = check_group_batch(cfg)  # prompts per process and step
    torch.manual_seed(t.seed)
    random.seed(t.seed)

    # ---- setup: model, prompts, rewards, optimizer, rollout engine
    if cfg.model.backend == "unsloth":
        from posttrain.unsloth_backend import load_unsloth

        if cfg.init_adapter:
            raise UserError("init_adapter with model.backend=unsloth is not supported; use model.backend=hf")
        model, tok = load_unsloth(cfg.model, cfg.lora, max_seq_length=cfg.data.max_length, seed=t.seed,
                                  num_processes=world, verbose=is_main)
    else:
        model, tok = load_policy(cfg, verbose=is_main)
    prompts, pstats = prepare_prompts(cfg, tok, rows)
    rewards, reward_problems = build_rewards(cfg, tok, reward_funcs)
    if is_main:
        print(f"[posttrain] prompts: {pstats['prompts']} of {pstats['rows']} rows (dropped "
              f"{pstats['dropped_too_long']} over max_prompt_length={pstats['max_prompt_length']}"
              + (f", {pstats['dropped_non_numeric']} non-numeric answers" if "dropped_non_numeric" in pstats else "")
              + f"); completions up to {pstats['max_completion_length']} tokens; rewards: {', '.join(rewards.names)}")
        save_recipe(cfg, run_dir)
    max_completion = pstats["max_completion_length"]
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * max(1, len(prompts) // (per_proc * world)))
    is_peft = hasattr(model, "disable_adapter")
    ref_model = None
    if g.beta != 0 and not is_peft:  # full fine-tuning: a frozen copy is the reference
        ref_model, _ = load_model(cfg.model, None, for_training=False, verbose=False)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, total_steps * g.num_iterations)
    compute = resolve_compute_dtype(g.compute_dtype, model)
    if is_main:
        print(f"[posttrain] compute: decoder layers in {str(compute or next(model.parameters()).dtype)[6:]}, "
              f"head and log-softmax in {str(decoder_and_head(model)[1].weight.dtype)[6:]}")
    policy, optimizer, scheduler = prepare(accelerator, PolicyLogps(model, g.temperature, t.loss_chunk_size, compute),
                                           optimizer, scheduler)
    if g.rollout_backend == "vllm":
        from posttrain.rollout.vllm import build_training_engine

        engine = build_training_engine(cfg, model, tok, accelerator, run_dir, g.vllm.max_model_len or cfg.data.max_length,
                                       prepared=policy)
    else:
        engine = HFRolloutEngine(model, tok, merge=g.merge_lora, max_rows=g.rollout_max_rows, compute_dtype=compute)
        if sharded_optimizer(model):  # FSDP2 / ZeRO-3: decode with whole weights
            engine = GatheredRollouts(engine, policy)
    sampling = SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=max(g.top_k, 0), min_p=g.min_p,
                              max_new_tokens=max_completion, stop_token_ids=engine.default_stop_ids(),
                              stop_strings=tuple(g.stop_strings), ignore_eos=g.ignore_eos, seed=t.seed)
    share_prompts = g.share_prompt and not cfg.model.gradient_checkpointing  # checkpointing drops the KV cache
    packed_cache = getattr(engine, "packed_cache", {})  # frozen weights packed once per run, shared with the rollout

    start_step, cursor, total_tokens = 0, 0, 0
    if resume:
        state = load_checkpoint(run_dir, model, optimizer, scheduler, rank=rank)
        if state is None:
            raise UserError(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}")
        start_step, cursor, total_tokens = state["step"], state["cursor"], state.get("num_tokens", 0)
        if is_main:
            print(f"[posttrain] resumed from step {start_step}")
    stream = PromptStream(len(prompts), t.seed, cursor)
    logger = MetricsLogger(run_dir, t.report_to, total_steps, resume_step=start_step, enabled=is_main,
                           title="grpo", config=cfg.model_dump(mode="json"))
    stop = GracefulStop()
    warned_at = -10**9

    # ---- loop: rollout -> rewards -> advantages -> loss -> step
    for step in range(start_step, total_steps):
        t_step = time.perf_counter()
        col = collect_groups(engine, stream, prompts, rewards, reward_problems, tok, sampling, g, step, per_proc,
                             rank, world)
        groups = col["groups"]
        adv = batch_advantages(groups, g, rank, world)
        first = gather_all([x["rewards"] for x in col["first"]], world)
        frac_zero = float(zero_std_groups(torch.tensor([r for grp in first for r in grp], dtype=torch.float64),
                                          g.num_generations).float().mean()) if first else 1.0
        if is_main and frac_zero > g.zero_std_warning and step - warned_at >= 10:
            warned_at = step
            warn_zero_std(step, frac_zero, g)

        # completions into micro-batches: groups kept together (they share a prompt forward), longest first
        for it, a in zip((it for grp in groups for it in grp["items"]), adv.tolist()):
            it["advantage"] = a
        by_group = sorted((sorted(grp["items"], key=lambda it: -it["length"]) for grp in groups),
                          key=lambda its: -(len(its[0]["prompt"]) + its[0]["length"]))
        items = [it for its in by_group for it in its]
        dummy = not items
        if dummy:  # dynamic sampling left nothing here: one zero-weight micro-batch keeps DDP in step
            items = [dict(col["first"][0]["items"][0], advantage=0.0)]
        batches = [pack_micro_batch(items[i:i + t.batch_size], engine.pad_id, device, share_prompts)
                   for i in range(0, len(items), t.batch_size)]

        t_train = time.perf_counter()
        with frozen_weights(model, compute if launch in ("single", "ddp") else None, packed_cache):
            stats, grad_norm, lr = update_policy(policy, model, ref_model, batches, optimizer, scheduler, cfg,
                                                 accelerator, max_completion, dummy, step)
        t_train = time.perf_counter() - t_train
        if hasattr(engine, "push_weights"):  # vLLM: the next rollout loads the updated weights
            engine.push_weights()

        # ---- what users watch
        done = step + 1
        sums = torch.tensor([stats["loss"], col["seen_tokens"], col["gen_tokens"]], dtype=torch.float64, device=device)
        if world > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        total_tokens += int(sums[1])
        metrics = {"loss": float(sums[0]) / world, "grad_norm": grad_norm, "learning_rate": lr,
                   "epoch": stream.cursor / len(prompts)}
        metrics.update(reward_metrics(gather_all([(x["rewards"], x["per_reward"], x["lengths"], x["truncated"])
                                                  for x in col["first"]], world), rewards.names, frac_zero))
        metrics.update(reduce_policy_stats(stats, g, accelerator, world))
        metrics.update({"step_time": time.perf_counter() - t_step, "rollout_time": col["rollout_time"],
                        "reward_time": col["reward_time"], "train_time": t_train,
                        "tokens_per_s": float(sums[2]) / world / max(col["rollout_time"], 1e-9),
                        "num_tokens": total_tokens, "peak_memory_mb": peak_memory_mb(device)})
        if g.dynamic_sampling:
            metrics.update({"dynamic_sampling/dropped_groups": col["dropped"], "dynamic_sampling/rounds": col["rounds"]})
        if done % t.log_every == 0 or done == total_steps:
            logger.log(done, metrics)
        if is_main and g.log_completions_every and (done % g.log_completions_every == 0 or done == 1):
            log_completions(run_dir, done, col["first"], rewards.names, g.num_completions_to_print)
        interrupted = stop.requested and done < total_steps
        if interrupted or (t.save_every and done % t.save_every == 0 and done < total_steps):
            accelerator.wait_for_everyone()
            save_checkpoint(run_dir, done, model, optimizer, scheduler,
                            {"cursor": stream.cursor, "num_tokens": total_tokens}, keep=t.keep_checkpoints, rank=rank)
            accelerator.wait_for_everyone()
            if is_main:
                collect_rank_rng(run_dir, done, world)
        if interrupted:
            logger.close()
            raise UserError(f"interrupted after step {done}; checkpoint saved. Continue with --resume")

    # ---- save
    stop.restore()
    logger.close()
    accelerator.wait_for_everyone()
    out = run_dir
    state = full_trainable_state(model) if sharded_optimizer(model) else None  # a collective: every rank
    if is_main:
        out = save_final(accelerator.unwrap_model(policy).model, tok, run_dir, is_peft, state)
        print(f"[posttrain] saved {out}")
    return out


@contextmanager
def frozen_weights(model, compute, cache: dict):
    """How the weights that do not train compute during an update. On a CPU with oneDNN (single process or
    DDP): the decoder's frozen linears (a LoRA model's base) packed once per run in the compute dtype, and a
    frozen head packed in its own dtype (:mod:`posttrain.fastpath.onednn`; same values, 2-3x faster matmuls here).
    LoRA layers over a packed base train through one fused autograd node each (:mod:`posttrain.fastpath.fused_lora`).
    Elsewhere: frozen weights held as compute-dtype copies for the update (:func:`layers_in`)."""
    if not packed.available(next(model.parameters()).device):
        with layers_in(model, compute, frozen_only=True):
            yield
        return
    decoder, head = decoder_and_head(model)
    heads = packed.frozen_linears(head) if isinstance(head, torch.nn.Linear) else []
    with packed.packed_linears(packed.frozen_linears(decoder, exclude=(head,)), compute, cache=cache), \
            packed.packed_linears(heads, None, cache=cache), fused_lora(model):
        yield


def update_policy(policy, model, ref_model, batches: list[dict], optimizer, scheduler, cfg: GRPORecipe, accelerator,
                  max_completion: int, dummy: bool, step: int) -> tuple[dict, float, float]:
    """``num_iterations`` optimizer updates on one batch of rollouts (micro-batches with gradient accumulation).
    Returns (statistics, last grad norm, learning rate used)."""
    g, t, world = cfg.grpo, cfg.train, accelerator.num_processes
    device = batches[0]["mask"].device
    count = torch.tensor([sum(float(b["mask"].sum()) for b in batches)], dtype=torch.float64, device=device)
    if world > 1:
        count = accelerator.reduce(count, reduction="sum")
    num_items = max(float(count[0]), 1.0) / world  # dapo: tokens of the whole step; DDP averages over processes
    ref = [None] * len(batches)
    if g.beta != 0:
        with torch.no_grad():
            ref = [reference_logps(model, ref_model, policy, b) for b in batches]
    old = [None] * len(batches)
    stats = {"kl": [], "entropy": [], "clip": [], "loss": 0.0}
    for _ in range(g.num_iterations):
        loss_sum = 0.0
        for j, b in enumerate(batches):
            sync = j == len(batches) - 1
            with accumulation(accelerator, policy, sync):
                flat_lp, flat_ent = policy(b, entropy_grad=g.entropy_coef > 0)
                logps, ent = unpad(flat_lp, b), unpad(flat_ent, b)
                if old[j] is None:  # first iteration: the policy that sampled (see the module docstring)
                    old[j] = logps.detach()
                is_w = (truncated_importance_weights(old[j], b["sample_logps"], g.importance_sampling_cap, b["mask"])
                        if g.importance_sampling_cap and "sample_logps" in b else None)
                ptl, ratio, kl = per_token_grpo_loss(logps, old[j], b["adv"], ref_logps=ref[j], beta=g.beta,
                                                     epsilon_low=g.epsilon, epsilon_high=g.epsilon_high,
                                                     is_weights=is_w)
                loss = aggregate_loss(ptl, b["mask"], g.loss_type, max_completion_length=max_completion,
                                      num_items=num_items)
                if g.loss_type != "dapo":
                    loss = loss / len(batches)
                if g.entropy_coef:
                    loss = loss - g.entropy_coef * masked_mean(ent, b["mask"]) / len(batches)
                if dummy:
                    loss = loss * 0.0
                backward(accelerator, loss)
            loss_sum += float(loss.detach())
            if not dummy:
                n = float(b["mask"].sum())
                stats["entropy"].append((float((ent.detach() * b["mask"]).sum()), n))
                if kl is not None:
                    stats["kl"].append((float((kl.detach() * b["mask"]).sum()), n))
                stats["clip"].append((ratio.detach(), b["adv"], b["mask"]))
        if not math.isfinite(loss_sum):
            raise UserError(f"loss is {loss_sum} at step {step + 1}: training diverged. Lower train.lr "
                            f"(now {t.lr}), check the rewards, or resume from the last checkpoint")
        grad_norm, lr = finish_step(accelerator, model, optimizer, scheduler, t.max_grad_norm)
        stats["loss"] += loss_sum / g.num_iterations
    return stats, grad_norm, lr


# ---------------------------------------------------------------------------------------------- step pieces


def gather_all(values: list, world: int) -> list:
    """This process's list -> every process's items, in rank order."""
    if world == 1:
        return list(values)
    from accelerate.utils import gather_object

    return [x for part in gather_object([list(values)]) for x in part]


def batch_advantages(groups: list[dict], g, rank: int, world: int) -> torch.Tensor:
    """Advantages of this process's completions, computed over every process's rewards (scale_rewards=batch
    needs the std of the whole batch)."""
    from accelerate.utils import gather_object

    local = [r for grp in groups for r in grp["rewards"]]
    everyone = gather_object([local]) if world > 1 else [local]
    flat = torch.tensor([r for part in everyone for r in part], dtype=torch.float64)
    if not flat.numel():
        return flat.float()
    offset = sum(len(part) for part in everyone[:rank])
    adv, _ = group_advantages(flat, g.num_generations, g.scale_rewards)
    return adv[offset:offset + len(local)].float()


def warn_zero_std(step: int, frac: float, g) -> None:
    what = ("the policy loss and its gradient are zero" if frac == 1.0 and g.beta == 0 and not g.dynamic_sampling
            else "they carry no learning signal")
    warnings.warn(f"step {step + 1}: {frac:.0%} of the groups got rewards that all agree "
                  f"(frac_reward_zero_std={frac:.2f}); {what}. Try grpo.dynamic_sampling=true, a larger "
                  "grpo.num_generations, an easier dataset, or a reward with partial credit.", stacklevel=2)


@torch.no_grad()
def reference_logps(model, ref_model, policy, b: dict) -> torch.Tensor:
    """Token log-probs under the reference: the base with adapters disabled, or the frozen copy."""
    module = getattr(policy, "module", policy)
    if ref_model is not None:
        ref_policy = PolicyLogps(ref_model, module.temperature, module.chunk_size, module.compute_dtype)
        lp, _ = ref_policy(b)
    else:
        with model.disable_adapter():
            lp, _ = module(b)
    return unpad(lp, b)


def reduce_policy_stats(stats: dict, g, accelerator, world: int) -> dict:
    def total(pairs):
        s = torch.tensor([sum(p[0] for p in pairs), sum(p[1] for p in pairs)], dtype=torch.float64,
                         device=accelerator.device)
        if world > 1:
            s = accelerator.reduce(s, reduction="sum")
        return float(s[0] / s[1].clamp(min=1))

    out = {"entropy": total(stats["entropy"])}
    if g.beta != 0:
        out["kl"] = total(stats["kl"])
    if stats["clip"]:
        T = max(c[0].shape[1] for c in stats["clip"])
        pad = lambda x: torch.nn.functional.pad(x, (0, T - x.shape[1]))  # noqa: E731
        ratio = torch.cat([pad(c[0]) for c in stats["clip"]])
        adv = torch.cat([c[1] for c in stats["clip"]])
        mask = torch.cat([pad(c[2]) for c in stats["clip"]])
        fr = clip_fractions(ratio, adv, mask, g.epsilon, g.epsilon_high)
        out.update({k: float(v) for k, v in fr.items()})
    return out


