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
(all of it, for one micro-batch, in :func:`posttrain.grpo.losses.micro_batch_loss`, a pure function).

The records a step passes between its stages are typed (:mod:`posttrain.grpo.data`, :mod:`posttrain.grpo.batch`);
the weights that do not train compute through :func:`posttrain.fastpath.training`, which this module does not
look into.

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
import time
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache

from posttrain import fastpath
from posttrain.distributed import (GatheredRollouts, accumulation, backward, finish_step, gather_all,
                                   sharded_optimizer)
from posttrain.grpo.batch import MicroBatch, micro_batches, unpad
from posttrain.grpo.collect import build_rewards, collect_rollouts, combine_reward_metrics, log_completions
from posttrain.grpo.config import GRPORecipe, check_group_batch
from posttrain.grpo.data import PromptStream, StepRollouts, prepare_prompts
from posttrain.grpo.losses import Objective, clip_fractions, group_advantages, micro_batch_loss, zero_std_groups
from posttrain.losses import Head, module_head, selective_log_softmax
from posttrain.models import (autocast_to, decoder_and_head, load_model, resolve_compute_dtype, returned_cache,
                             with_cache)
from posttrain.optim import build_optimizer, build_scheduler
from posttrain.rewards.registry import reward_metrics
from posttrain.rollout import SamplingParams
from posttrain.rollout.hf import HFRolloutEngine
from posttrain.rollout.generate import GenerateRolloutEngine
from posttrain.runs import peak_memory_mb
from posttrain.session import TrainingSession

# ---------------------------------------------------------------------------------------------- the policy


class PolicyLogps(torch.nn.Module):
    """The forward that training differentiates: token log-probabilities (and entropies) of the completion
    tokens only, the head applied in chunks. Wrapped whole by DDP so it sees every parameter use.

    With a shared-prompt micro-batch each distinct prompt goes through the model once; its KV cache (with its
    autograd graph) is indexed out to the completions of its group, which are then run on top of it. The G
    completions of a group thus cost one prompt forward and backward instead of G; gradients still reach the
    prompt positions (LoRA acts there too)."""

    def __init__(self, model, temperature: float, chunk_size: int, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.model, self.temperature, self.chunk_size = model, temperature, chunk_size
        self.compute_dtype = compute_dtype

    def forward(self, batch: MicroBatch, head: Head | None = None, entropy_grad: bool = False):
        """-> flat (log-probs, entropies) of the completion tokens. ``head``: the language-model head as the
        fast path gives it (:func:`posttrain.fastpath.training`); the model's own head when None."""
        decoder, head_module = decoder_and_head(self.model)
        with autocast_to(batch.mask.device.type, self.compute_dtype):
            hidden = self._hidden(decoder, batch)
        # the head outside autocast, in its weight's dtype (float32 unless the model itself is 16-bit)
        return selective_log_softmax(hidden, head or module_head(head_module), batch.targets,
                                     temperature=self.temperature or 1.0, chunk_size=self.chunk_size, entropy=True,
                                     entropy_grad=entropy_grad)

    def _hidden(self, decoder, b: MicroBatch) -> torch.Tensor:
        """Final hidden states at the positions that predict each completion token, flattened."""
        if not b.shared_prompts:
            return decoder(input_ids=b.ids, attention_mask=b.attn, use_cache=False).last_hidden_state[b.rows, b.cols]
        out = decoder(input_ids=b.prompt_ids, attention_mask=b.prompt_attn, position_ids=b.prompt_pos,
                      **with_cache(decoder, DynamicCache(config=self.model.config)))
        cache = returned_cache(out)
        # index_select, not advanced indexing (DynamicCache.batch_select_indices): the backward of x[idx] with
        # repeated indices adds the G completions' gradients into their shared prompt with atomic float adds from
        # several CPU threads, in an order that changes from run to run (and with machine load), so two runs of
        # one seed drifted apart. index_select's backward (index_add_) adds in a fixed order.
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, b.prompt_of)
            layer.values = layer.values.index_select(0, b.prompt_of)
        last = out.last_hidden_state[:, -1].index_select(0, b.prompt_of)  # predicts each completion's first token
        comp = decoder(input_ids=b.completion_ids, attention_mask=b.attn, position_ids=b.completion_pos,
                       **with_cache(decoder, cache)).last_hidden_state
        return torch.cat([last.unsqueeze(1), comp], dim=1)[b.rows, b.cols]


# ---------------------------------------------------------------------------------------------- training


def train(cfg: GRPORecipe, resume: bool = False, reward_funcs=None, rows: list[dict] | None = None,
          allow_changes: list[str] | tuple[str, ...] = ()) -> Path:
    """Run GRPO as the recipe says; ``reward_funcs`` (callables) and ``rows`` replace the recipe's (tests)."""
    grpo, opt = cfg.grpo, cfg.train
    run = TrainingSession(cfg, resume, "grpo", variable_micro_batches=grpo.dynamic_sampling,
                          allow_changes=allow_changes)
    per_proc = check_group_batch(cfg)  # prompts per process and step
    model, tok = run.load_model()
    prompts, pstats = prepare_prompts(cfg, tok, rows)
    rewards = build_rewards(cfg, tok, reward_funcs)
    if run.is_main:
        print_prompt_stats(pstats, rewards.names)
    run.save_recipe()
    steps_per_epoch = max(1, len(prompts) // (per_proc * run.world))
    total_steps = opt.max_steps if opt.max_steps > 0 else math.ceil(opt.epochs * steps_per_epoch)
    updater = PolicyUpdate(cfg, run, model, total_steps, pstats["max_completion_length"])
    engine = build_engine(cfg, run, model, tok, updater)
    updater.cache = getattr(engine, "prepacked_cache", updater.cache)  # frozen weights packed once for both
    sampling = SamplingParams(temperature=grpo.temperature, top_p=grpo.top_p, top_k=max(grpo.top_k, 0),
                              min_p=grpo.min_p, max_new_tokens=pstats["max_completion_length"],
                              stop_token_ids=engine.default_stop_ids(), stop_strings=tuple(grpo.stop_strings),
                              ignore_eos=grpo.ignore_eos, seed=opt.seed)
    state = run.begin(model, updater.optimizer, updater.scheduler, total_steps)
    stream = PromptStream(len(prompts), opt.seed, state.get("cursor", 0))
    total_tokens, warned_at = state.get("num_tokens", 0), -10**9

    # ---- the loop: rollout -> rewards -> advantages -> loss -> step
    for step in range(state["step"], total_steps):
        t_step = time.perf_counter()
        rollouts = collect_rollouts(engine, stream, prompts, rewards, tok, sampling, cfg, step, per_proc, run.rank,
                                    run.world)
        rollouts = rollouts.with_advantages(batch_advantages(rollouts, grpo, run.rank, run.world))
        first_rewards = gather_all([grp.rewards for grp in rollouts.first], run.world)
        frac_zero = frac_zero_std(first_rewards, grpo.num_generations)
        if run.is_main and frac_zero > grpo.zero_std_warning and step - warned_at >= 10:
            warned_at = step
            warn_zero_std(step, frac_zero, grpo, first_rewards)
        batches, dummy = micro_batches(rollouts, opt.batch_size, engine.pad_id, run.device, updater.share_prompts)
        t_train = time.perf_counter()
        stats = updater.step(batches, dummy, step)
        t_train = time.perf_counter() - t_train
        if hasattr(engine, "push_weights"):  # vLLM: the next rollout loads the updated weights
            engine.push_weights()

        done = step + 1
        sums = run_sums(run, [stats.pop("loss"), rollouts.seen_tokens, rollouts.gen_tokens])
        total_tokens += int(sums[1])
        metrics = {"loss": sums[0] / run.world, **stats, "epoch": stream.cursor / len(prompts),
                   **step_reward_metrics(rollouts, run.world, frac_zero),
                   "step_time": time.perf_counter() - t_step, "rollout_time": rollouts.rollout_time,
                   "reward_time": rollouts.reward_time, "train_time": t_train,
                   "tokens_per_s": sums[2] / run.world / max(rollouts.rollout_time, 1e-9),
                   "num_tokens": total_tokens, "peak_memory_mb": peak_memory_mb(run.device)}
        if grpo.dynamic_sampling:
            metrics.update({"dynamic_sampling/dropped_groups": rollouts.dropped,
                            "dynamic_sampling/rounds": rollouts.rounds})
        if run.is_main and grpo.log_completions_every and (done % grpo.log_completions_every == 0 or done == 1):
            log_completions(run.run_dir, done, rollouts.first, rewards.names, grpo.num_completions_to_print)
        run.end_step(done, metrics, model, updater.optimizer, updater.scheduler,
                     {"cursor": stream.cursor, "num_tokens": total_tokens})
    if hasattr(engine, "close"):  # a colocated vLLM engine frees its memory before the final save
        engine.close()
    return run.finish(updater.policy, model, tok, updater.is_peft)


def print_prompt_stats(pstats: dict, reward_names: list[str]) -> None:
    print(f"[posttrain] prompts: {pstats['prompts']} of {pstats['rows']} rows (dropped "
          f"{pstats['dropped_too_long']} over max_prompt_length={pstats['max_prompt_length']}"
          + (f", {pstats['dropped_non_numeric']} non-numeric answers" if "dropped_non_numeric" in pstats else "")
          + f"); completions up to {pstats['max_completion_length']} tokens; rewards: {', '.join(reward_names)}")


def build_engine(cfg: GRPORecipe, run: TrainingSession, model, tok, updater: PolicyUpdate):
    """The rollout engine: vLLM (colocated or a server), or posttrain's transformers engine (whole weights
    gathered for decoding under FSDP2 / ZeRO-3)."""
    grpo = cfg.grpo
    if grpo.rollout_backend == "vllm":
        from posttrain.rollout.vllm import build_training_engine  # an optional extra

        return build_training_engine(cfg, model, tok, run.accelerator, run.run_dir,
                                     grpo.vllm.max_model_len or cfg.data.max_length, prepared=updater.policy)
    if cfg.model.backend == "unsloth":  # Unsloth's patched forward is driven only by its generate (rollout.generate)
        return GenerateRolloutEngine(model, tok, max_rows=grpo.rollout_max_rows)
    engine = HFRolloutEngine(model, tok, merge=grpo.merge_lora, max_rows=grpo.rollout_max_rows,
                             compute_dtype=updater.compute)
    return GatheredRollouts(engine, updater.policy) if sharded_optimizer(model) else engine


# ---------------------------------------------------------------------------------------------- the update


class PolicyUpdate:
    """The policy's side of a step: the reference, the optimizer and its schedule, and ``num_iterations``
    optimizer updates on one batch of rollouts (:meth:`step`)."""

    def __init__(self, cfg: GRPORecipe, run: TrainingSession, model, total_steps: int, max_completion: int):
        grpo, opt = cfg.grpo, cfg.train
        self.cfg, self.run, self.model = cfg, run, model
        self.is_peft = hasattr(model, "disable_adapter")
        self.ref_model = None
        if grpo.beta != 0 and not self.is_peft:  # full fine-tuning: a frozen copy is the reference
            self.ref_model, _ = load_model(cfg.model, None, for_training=False, verbose=False)
        self.compute = resolve_compute_dtype(grpo.compute_dtype, model)
        if run.is_main:
            print(f"[posttrain] compute: decoder layers in {str(self.compute or next(model.parameters()).dtype)[6:]}, "
                  f"head and log-softmax in {str(decoder_and_head(model)[1].weight.dtype)[6:]}")
        optimizer = build_optimizer(model, opt)
        scheduler = build_scheduler(optimizer, opt, total_steps * grpo.num_iterations)
        self.policy, self.optimizer, self.scheduler = run.prepare(
            PolicyLogps(model, grpo.temperature, opt.loss_chunk_size, self.compute), optimizer, scheduler)
        self.cache: dict = {}  # weights the fast path prepacked, reused while unchanged
        self.ref_cache: dict = {}
        self.share_prompts = grpo.share_prompt and not cfg.model.gradient_checkpointing  # checkpointing drops the cache
        self.share_prompts = self.share_prompts and cfg.model.backend != "unsloth"  # its forward takes no DynamicCache
        self.objective = Objective(loss_type=grpo.loss_type, beta=grpo.beta, epsilon_low=grpo.epsilon,
                                   epsilon_high=grpo.epsilon_high, entropy_coef=grpo.entropy_coef,
                                   importance_sampling_cap=grpo.importance_sampling_cap,
                                   max_completion_length=max_completion)

    def step(self, batches: list[MicroBatch], dummy: bool, step: int) -> dict:
        """The step's updates under the fast path's weights -> the step's statistics (TRL's names)."""
        copies = self.run.launch in ("single", "ddp")
        with fastpath.training(self.model, self.compute, cache=self.cache, copies=copies) as head:
            stats, grad_norm, lr = self._updates(batches, head, dummy, step)
        return {"loss": stats["loss"], "grad_norm": grad_norm, "learning_rate": lr,
                **reduce_policy_stats(stats, self.cfg.grpo, self.run.accelerator, self.run.world)}

    def _updates(self, batches: list[MicroBatch], head: Head, dummy: bool, step: int) -> tuple[dict, float, float]:
        grpo, acc, world = self.cfg.grpo, self.run.accelerator, self.run.world
        count = torch.tensor([sum(float(b.mask.sum()) for b in batches)], dtype=torch.float64, device=self.run.device)
        if world > 1:
            count = acc.reduce(count, reduction="sum")
        num_items = max(float(count[0]), 1.0) / world  # dapo: tokens of the whole step; DDP averages over processes
        ref = [None] * len(batches)
        if grpo.beta != 0:
            with torch.no_grad():
                ref = [self._reference_logps(b, head) for b in batches]
        old = [None] * len(batches)
        stats = {"kl": [], "entropy": [], "clip": [], "gap": [], "loss": 0.0}
        for _ in range(grpo.num_iterations):
            loss_sum = 0.0
            for j, b in enumerate(batches):
                with accumulation(acc, self.policy, j == len(batches) - 1):
                    flat_lp, flat_ent = self.policy(b, head, entropy_grad=grpo.entropy_coef > 0)
                    logps, ent = unpad(flat_lp, b), unpad(flat_ent, b)
                    if old[j] is None:  # first iteration: the policy that sampled (see the module docstring)
                        old[j] = logps.detach()
                        if b.sample_logps is not None and not dummy:  # |trainer - sampler| log-prob per token
                            stats["gap"].append((float(((old[j] - b.sample_logps).abs() * b.mask).sum()),
                                                 float(b.mask.sum())))
                    loss, ratio, kl = micro_batch_loss(self.objective, logps, old[j], b.advantages, b.mask, ent,
                                                       num_micro_batches=len(batches), num_items=num_items,
                                                       ref_logps=ref[j], sampler_logps=b.sample_logps)
                    if dummy:
                        loss = loss * 0.0
                    backward(acc, loss)
                loss_sum += float(loss.detach())
                if not dummy:
                    tokens = float(b.mask.sum())
                    stats["entropy"].append((float((ent.detach() * b.mask).sum()), tokens))
                    if kl is not None:
                        stats["kl"].append((float((kl.detach() * b.mask).sum()), tokens))
                    stats["clip"].append((ratio.detach(), b.advantages, b.mask))
            grad_norm, lr = finish_step(acc, self.model, self.optimizer, self.scheduler, self.cfg.train.max_grad_norm,
                                        loss=loss_sum, step=step + 1,
                                        advice=f"Lower train.lr (now {self.cfg.train.lr}), check the rewards")
            stats["loss"] += loss_sum / grpo.num_iterations
        return stats, grad_norm, lr

    @torch.no_grad()
    def _reference_logps(self, b: MicroBatch, head: Head) -> torch.Tensor:
        """Token log-probs under the reference: the base with adapters disabled, or the frozen copy. Under
        DeepSpeed the forward goes through the engine: ZeRO-3 gathers each layer's weights in its module hooks and
        the head's, which ``PolicyLogps`` reads without calling the head module, only while the engine's forward
        runs; the bare module would meet partitioned (empty) weights. Elsewhere the bare module (no DDP forward,
        whose buffer broadcast is a collective)."""
        module = getattr(self.policy, "module", self.policy)
        if self.ref_model is not None:
            ref_policy = PolicyLogps(self.ref_model, module.temperature, module.chunk_size, module.compute_dtype)
            with fastpath.training(self.ref_model, module.compute_dtype, cache=self.ref_cache) as ref_head:
                lp, _ = ref_policy(b, ref_head)
        else:
            forward = self.policy if self.run.launch == "deepspeed" else module
            with self.model.disable_adapter():
                lp, _ = forward(b, head)
        return unpad(lp, b)


# ---------------------------------------------------------------------------------------------- step pieces


def batch_advantages(rollouts: StepRollouts, grpo, rank: int, world: int) -> list[float]:
    """Advantages of this process's training samples, computed over every process's rewards
    (scale_rewards=batch needs the std of the whole batch)."""
    local = [s.reward for s in rollouts.samples()]
    everyone = gather_all([local], world)
    flat = torch.tensor([r for part in everyone for r in part], dtype=torch.float64)
    if not flat.numel():
        return []
    offset = sum(len(part) for part in everyone[:rank])
    advantages, _ = group_advantages(flat, grpo.num_generations, grpo.scale_rewards)
    return advantages[offset:offset + len(local)].float().tolist()


def frac_zero_std(group_rewards: list[list[float]], num_generations: int) -> float:
    """The fraction of groups whose rewards all agree (1.0 when there are none)."""
    if not group_rewards:
        return 1.0
    flat = torch.tensor([r for grp in group_rewards for r in grp], dtype=torch.float64)
    return float(zero_std_groups(flat, num_generations).float().mean())


def warn_zero_std(step: int, frac: float, grpo, group_rewards: list[list[float]]) -> None:
    """Say why a step carries little learning signal. Groups whose completions no reward scored (every reward
    returned None: NaN here) count as zero-std too, but their cause is the rewards, not the task's difficulty."""
    unscored = (sum(sum(not math.isnan(r) for r in grp) < 2 for grp in group_rewards) / len(group_rewards)
                if group_rewards else 1.0)
    what = ("the policy loss and its gradient are zero" if frac == 1.0 and grpo.beta == 0 and not grpo.dynamic_sampling
            else "they carry no learning signal")
    if unscored == frac:  # every such group is unscored
        warnings.warn(f"step {step + 1}: {unscored:.0%} of the groups got no reward at all: every reward function "
                      f"returned None (skip) for their completions; {what}. Check that the rewards can score these "
                      "completions (the gold answer column, the answer format) and that they return floats.",
                      stacklevel=2)
        return
    also = (f", and {unscored:.0%} got no reward at all (every reward function returned None)" if unscored else "")
    warnings.warn(f"step {step + 1}: {frac - unscored:.0%} of the groups got rewards that all agree{also} "
                  f"(frac_reward_zero_std={frac:.2f}); {what}. Try grpo.dynamic_sampling=true, a larger "
                  "grpo.num_generations, an easier dataset, or a reward with partial credit.", stacklevel=2)


def run_sums(run: TrainingSession, values: list[float]) -> list[float]:
    """Per-process numbers summed over every process."""
    sums = torch.tensor(values, dtype=torch.float64, device=run.device)
    if run.world > 1:
        sums = run.accelerator.reduce(sums, reduction="sum")
    return sums.tolist()


def step_reward_metrics(rollouts: StepRollouts, world: int, frac_zero: float) -> dict:
    """TRL's reward and completion metrics over the step's first round of rollouts of every process."""
    samples = gather_all([(s.reward, s.per_reward, s.length, s.truncated)
                          for grp in rollouts.first for s in grp.samples], world)
    names = list(samples[0][1]) if samples else []
    out = reward_metrics([r for r, *_ in samples], {nm: [p[nm] for _, p, *_ in samples] for nm in names})
    out["frac_reward_zero_std"] = frac_zero
    out.update(combine_reward_metrics(gather_all([rollouts.reward_fn_metrics], world), mean_states=True))
    lengths = [n for *_, n, _ in samples]
    term = [n for *_, n, tr in samples if not tr]
    out.update({"completions/mean_length": sum(lengths) / len(lengths), "completions/min_length": min(lengths),
                "completions/max_length": max(lengths),
                "completions/clipped_ratio": sum(tr for *_, tr in samples) / len(samples),
                "completions/mean_terminated_length": sum(term) / len(term) if term else 0.0,
                "completions/min_terminated_length": min(term) if term else 0,
                "completions/max_terminated_length": max(term) if term else 0})
    return out


def reduce_policy_stats(stats: dict, grpo, accelerator, world: int) -> dict:
    """Entropy, KL and clip fractions over every process's tokens of the step."""
    def total(pairs):
        s = torch.tensor([sum(p[0] for p in pairs), sum(p[1] for p in pairs)], dtype=torch.float64,
                         device=accelerator.device)
        if world > 1:
            s = accelerator.reduce(s, reduction="sum")
        return float(s[0] / s[1].clamp(min=1))

    out = {"entropy": total(stats["entropy"])}
    if grpo.rollout_backend == "vllm":  # a weight push that silently failed shows here first
        out["vllm/logprob_gap"] = total(stats["gap"])
    if grpo.beta != 0:
        out["kl"] = total(stats["kl"])
    if stats["clip"]:
        width = max(c[0].shape[1] for c in stats["clip"])
        pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
        ratio = torch.cat([pad(c[0]) for c in stats["clip"]])
        advantages = torch.cat([c[1] for c in stats["clip"]])
        mask = torch.cat([pad(c[2]) for c in stats["clip"]])
        fr = clip_fractions(ratio, advantages, mask, grpo.epsilon, grpo.epsilon_high)
        out.update({k: float(v) for k, v in fr.items()})
    return out
