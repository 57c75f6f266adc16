"""Direct preference optimization (``posttrain dpo``), readable top to bottom: setup -> loop -> save.

Objective, per pair (prompt x, chosen y_c, rejected y_r), with ``log pi(y|x)`` the completion's log-probability
summed over its tokens (the prompt's tokens carry no loss):

    h_c = log pi(y_c|x) - log pi_ref(y_c|x),   h_r likewise
    sigmoid (DPO):  -(1-eps) logsig(beta (h_c - h_r)) - eps logsig(-beta (h_c - h_r))   (eps = label_smoothing)
    robust (rDPO):  ((1-eps) (-logsig(beta d)) + eps logsig(-beta d)) / (1 - 2 eps),   d = h_c - h_r
    ipo:            (h_c / |y_c| - h_r / |y_r| - 1 / (2 beta))^2
    simpo:          -(1-eps) logsig(z) - eps logsig(-z),  z = beta (log pi(y_c|x)/|y_c| - log pi(y_r|x)/|y_r|) - gamma
    loss            = the mean over the pairs of one optimizer step's whole global batch

(the math: :func:`posttrain.preference.losses.dpo_loss`, a pure function). Each micro-batch contributes its summed
per-pair loss divided by the global pair count, so micro-batches and processes do not change the gradient (DDP
averages, so each process scales by the number of processes).

The reference ``pi_ref`` is the starting model, never a second copy in memory: with a new LoRA adapter it is the
same model with the adapter disabled (PEFT's ``disable_adapter``), run under ``no_grad`` once per step over the
step's pairs; in full fine-tuning, and when continuing an ``init_adapter`` (disabling it would give the bare base,
not the starting model), its log-probabilities are computed once before the first step for every training and
validation pair and stored in the run directory (``reference_logps.safetensors``, with a fingerprint of the pairs),
so ``--resume`` reads them back instead of recomputing them from trained weights. ``simpo`` has no reference.

Each pair's shared beginning is computed once (:class:`~posttrain.preference.pair_batch.PairBatch`): the prompt plus the answers' common first
tokens run as one prefix per pair, whose key/value cache (in the autograd graph) the chosen and the rejected tail
then both attend to, as GRPO shares a group's prompt; the values are those of two whole sequences up to float
rounding, for fewer positions (on the tiny recipe's pairs, which differ only in their last line, 56% of them).
The head and log-softmax are applied in chunks, only at the positions that predict a completion token
(:func:`posttrain.losses.selective_log_softmax`), in float32. The logged ``tokens`` (and ``tokens_per_s``) count
the whole sequences, prompt included twice, as a plain batch would compute them and as TRL counts them;
``padding_pct`` is the padding's share of the positions actually computed. The frozen weights compute through
:func:`posttrain.fastpath.training`, as in SFT.

Metrics: TRL's names (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
``logps/chosen``, ``logps/rejected``), means over the step's pairs; on the validation split (``data.val_size``,
every ``train.eval_every`` steps and at the end) the same with a ``val_`` prefix (``val_loss``,
``val_rewards/accuracies``, ...; posttrain's ``val_`` where TRL writes ``eval_``).

Departures from TRL 1.16's DPOTrainer: ``label_smoothing`` with ``sigmoid`` is conservative DPO (TRL's DPOTrainer
before 1.0, its CPOTrainer now; TRL 1.16's DPOTrainer ignores it there, and its label-smoothed DPO is ``robust``,
offered too); ``simpo`` is TRL's CPOTrainer(loss_type=simpo, cpo_alpha=0); the data's per-pair ``margin`` is not
used (DPO has no margin term; ``posttrain rm`` uses it); pairs over ``data.max_length`` are dropped and counted
(TRL 1.16 truncates at collation); the head runs in float32 and the log-probs are never taken from bf16 logits.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from posttrain import fastpath
from posttrain.distributed import accumulation, backward, finish_step
from posttrain.errors import UserError
from posttrain.fileops import tensor_bytes, writing
from posttrain.losses import Head, module_head, selective_log_softmax
from posttrain.models import decoder_and_head, resolve_compute_dtype
from posttrain.optim import build_optimizer, build_scheduler
from posttrain.preference.data import (
    PreferencePair,
    load_pairs,
    pad_token_id,
    split_pairs,
)
from posttrain.preference.data import plan_steps
from posttrain.preference.dpo_config import DPORecipe
from posttrain.preference.pair_batch import PairBatch, pair_hidden
from posttrain.preference.losses import dpo_loss
from posttrain.runs import peak_memory_mb
from posttrain.session import TrainingSession
from posttrain.sft import plan_epoch

REFERENCE_FILE = "reference_logps.safetensors"
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")

# ---------------------------------------------------------------------------------------------- batches


class SequenceLogps(torch.nn.Module):
    """The forward that training differentiates: each row's completion log-probability, summed over its tokens.
    Wrapped whole by DDP so it sees every parameter use.

    Each pair's prefix (prompt + the answers' common beginning) runs once; its key/value cache, still in the
    autograd graph, is indexed out to the pair's two tails, which run on top of it (as GRPO shares a group's
    prompt). The same values as two whole sequences, up to float rounding, for about half the positions when
    the answers share most of their text."""

    def __init__(self, model, chunk_size: int, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.model, self.chunk_size, self.compute_dtype = model, chunk_size, compute_dtype

    def forward(self, batch: PairBatch, head: Head | None = None) -> torch.Tensor:
        """-> (2B,) summed log-probs. ``head``: the head as the fast path gives it; the model's own when None."""
        hidden = pair_hidden(self.model, batch, self.compute_dtype)
        head = head or module_head(decoder_and_head(self.model)[1])
        logps, _ = selective_log_softmax(hidden.index_select(0, batch.src), head,
                                         batch.targets, chunk_size=self.chunk_size)
        return logps.new_zeros(batch.tokens.shape[0]).index_add(0, batch.out, logps.index_select(0, batch.pick))


def step_micro_batches(pairs: list[PreferencePair], idx: list[int], batch_size: int, rank: int, world: int
                       ) -> list[list[int]]:
    """One step's pair indices, longest first, cut into micro-batches of ``batch_size``; this process takes every
    ``world``-th."""
    longest = sorted(idx, key=lambda i: -len(pairs[i].prompt_ids) - max(len(pairs[i].chosen_ids),
                                                                         len(pairs[i].rejected_ids)))
    chunks = [longest[k:k + batch_size] for k in range(0, len(longest), batch_size)]
    return chunks[rank::world]


def check_prompts(pairs: list[PreferencePair], source: str) -> None:
    """DPO scores each answer given its prompt: a pair without prompt tokens (an implicit prompt whose two sides
    share no beginning) leaves the first answer token with nothing to be predicted from."""
    bare = [p.row for p in pairs if not p.prompt_ids]
    if bare:
        raise UserError(f"{source} row {bare[0]} ({len(bare)} pairs in all) has no prompt tokens: its chosen and "
                        "rejected share no beginning, so DPO has nothing to condition the answers on. Give a prompt "
                        "column (data.columns.prompt), or drop those rows")


# ---------------------------------------------------------------------------------------------- the reference


class Reference:
    """The reference's summed log-probs of a micro-batch: ``none`` (simpo), ``adapter_off`` (the policy with its
    adapter disabled) or ``precomputed`` (a table per split, rows = pairs, columns = chosen, rejected)."""

    def __init__(self, mode: str, tables: dict[str, torch.Tensor] | None = None):
        self.mode, self.tables = mode, tables or {}
        self.step: tuple[str, dict[int, int], torch.Tensor] | None = None  # (split, pair -> row, rows x 2)

    @torch.no_grad()
    def prefetch(self, policy: SequenceLogps, head: Head, pairs: list[PreferencePair], idx: list[int], split: str,
                 pad_id: int, device) -> None:
        """``adapter_off``: the reference of a whole step's pairs in one forward before its micro-batches (larger
        matmuls than one forward per micro-batch: 6% of a step of the tiny recipe); :meth:`__call__` reads them
        until :meth:`clear`. The other modes need nothing."""
        if self.mode != "adapter_off" or not idx:
            return
        batch = PairBatch.build([pairs[i] for i in idx], pad_id).to(device)
        with policy.model.disable_adapter():
            both = policy(batch, head)
        self.step = split, {i: k for k, i in enumerate(idx)}, torch.stack(both.chunk(2), dim=1)

    def clear(self) -> None:
        self.step = None

    @torch.no_grad()
    def __call__(self, policy: SequenceLogps, batch: PairBatch, head: Head, split: str, idx: list[int]):
        if self.mode == "none":
            return None, None
        if self.mode == "precomputed":
            t = self.tables[split][idx].to(batch.prefix_ids.device)
            return t[:, 0], t[:, 1]
        if self.step is not None and self.step[0] == split and all(i in self.step[1] for i in idx):
            t = self.step[2][[self.step[1][i] for i in idx]]
            return t[:, 0], t[:, 1]
        with policy.model.disable_adapter():
            both = policy(batch, head)
        return both.chunk(2)


def fingerprint(splits: dict[str, list[PreferencePair]]) -> str:
    """sha256 of every pair's token ids, split by split: the stored reference belongs to exactly these pairs."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(name.encode())
        for p in splits[name]:
            h.update(repr((p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
    return h.hexdigest()


@torch.no_grad()
def sequence_logps(policy: SequenceLogps, head: Head, pairs: list[PreferencePair], batch_size: int, pad_id: int,
                   device) -> torch.Tensor:
    """(pairs, 2) summed log-probs of the chosen and rejected completions under ``policy`` as it is now."""
    was_training = policy.training
    policy.eval()
    out = []
    for k in range(0, len(pairs), batch_size):
        both = policy(PairBatch.build(pairs[k:k + batch_size], pad_id).to(device), head)
        out.append(torch.stack(both.chunk(2), dim=1).float().cpu())
    policy.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 2))


def precomputed_reference(run: TrainingSession, policy: SequenceLogps, head: Head, splits: dict, batch_size: int,
                          pad_id: int) -> dict[str, torch.Tensor]:
    """The starting model's log-probs of every pair: read from ``RUN/reference_logps.safetensors`` when it holds
    these pairs' (``--resume``), else computed now, before any update, and stored there."""
    path, fp = run.run_dir / REFERENCE_FILE, fingerprint(splits)
    if run.resume and path.is_file():
        with safe_open(str(path), "pt") as f:
            stored_fp = (f.metadata() or {}).get("fingerprint")
        if stored_fp == fp:
            tables = load_file(path)
            if run.is_main:
                print(f"[posttrain] reference log-probs: read from {path} (not recomputed)")
            return tables
        raise UserError(f"{path} holds the reference log-probs of other pairs than this run's data (the data or "
                        "the tokenizer changed since they were computed): resume with the run's data, or train a "
                        "new run (another output_dir)")
    if run.resume:
        raise UserError(f"--resume: {path} is missing, and the reference log-probs cannot be recomputed from a "
                        "trained checkpoint; start the run again without --resume (another output_dir)")
    t0 = time.perf_counter()
    tables = {name: sequence_logps(policy, head, pairs, batch_size, pad_id, run.device) for name, pairs in
              splits.items()}
    if run.is_main:
        tmp = path.with_suffix(".tmp")
        with writing(run.run_dir, REFERENCE_FILE) as w:
            w.need(tensor_bytes(tables))
            save_file(tables, str(tmp), metadata={"fingerprint": fp})
            tmp.replace(path)
        n = sum(len(p) for p in splits.values())
        print(f"[posttrain] reference log-probs of {n} pairs computed in {time.perf_counter() - t0:.1f}s, stored in "
              f"{path}")
    return tables


# ---------------------------------------------------------------------------------------------- one step


class PairLoss:
    """One micro-batch of pairs -> its per-pair loss and metrics (the recipe's ``dpo`` settings; the reference)."""

    def __init__(self, cfg: DPORecipe, reference: Reference, pad_id: int, device):
        self.d, self.reference, self.pad_id, self.device = cfg.dpo, reference, pad_id, device

    def __call__(self, policy, head: Head, pairs: list[PreferencePair], idx: list[int], split: str):
        """-> (per-pair loss (B,), per-pair metrics, the batch)."""
        batch = PairBatch.build([pairs[i] for i in idx], self.pad_id).to(self.device)
        module = getattr(policy, "module", policy)
        ref_c, ref_r = self.reference(module, batch, head, split, idx)
        chosen, rejected = policy(batch, head).chunk(2)
        n_c, n_r = batch.tokens.chunk(2)
        d = self.d
        loss, metrics = dpo_loss(chosen, rejected, ref_c, ref_r, beta=d.beta, loss_type=d.loss_type,
                                 label_smoothing=d.label_smoothing, simpo_gamma=d.simpo_gamma, chosen_tokens=n_c,
                                 rejected_tokens=n_r)
        return loss, metrics, batch


def metric_sums(loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """[loss sum, each metric's sum, pairs] of one micro-batch (summed over processes, divided at the end)."""
    return torch.stack([loss.detach().double().sum(), *(metrics[k].double().sum() for k in METRICS),
                        torch.tensor(float(loss.shape[0]), dtype=torch.float64, device=loss.device)])


def means(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    n = max(float(sums[-1]), 1.0)
    return {f"{prefix}loss": float(sums[0]) / n, **{f"{prefix}{k}": float(v) / n for k, v in zip(METRICS, sums[1:-1])}}


@torch.no_grad()
def evaluate(policy, head: Head, loss_fn: PairLoss, val: list[PreferencePair], batch_size: int, accelerator
             ) -> dict[str, float]:
    """The validation pairs' loss and metrics (``val_`` prefix); each process scores every world-th batch."""
    policy.eval()
    sums = torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=loss_fn.device)
    order = list(range(len(val)))
    for k in range(accelerator.process_index * batch_size, len(val), batch_size * accelerator.num_processes):
        loss, metrics, _ = loss_fn(policy, head, val, order[k:k + batch_size], "val")
        sums += metric_sums(loss, metrics)
    policy.train()
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    return means(sums, "val_")


# ---------------------------------------------------------------------------------------------- training


def train(cfg: DPORecipe, resume: bool = False, allow_changes: list[str] | tuple[str, ...] = (),
          rows: list[dict] | None = None) -> Path:
    """Run DPO as the recipe says; ``rows`` replace the recipe's data rows (tests)."""
    t = cfg.train
    run = TrainingSession(cfg, resume, "dpo", allow_changes=allow_changes)
    model, tok = run.load_model()
    data = load_pairs(cfg.data, tok, rows=rows)
    check_prompts(data.pairs, cfg.data.path)
    train_set, val_set = split_pairs(data.pairs, cfg.data.val_size, cfg.data.seed) if cfg.data.val_size else (
        data.pairs, [])
    if run.is_main:
        print(f"[posttrain] data: {data.summary()}; {len(train_set)} training, {len(val_set)} validation pairs")
    run.save_recipe()
    global_batch, steps_per_epoch, total_steps = plan_steps(len(train_set), t, run.world)

    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t, total_steps)
    compute = resolve_compute_dtype(t.compute_dtype, model)
    policy, optimizer, scheduler = run.prepare(SequenceLogps(model, t.loss_chunk_size, compute), optimizer, scheduler)
    pad_id, device, mode = pad_token_id(tok), run.device, cfg.resolved_reference()
    prepacked: dict = {}  # frozen weights the fast path prepacked once for the run
    copies = run.launch in ("single", "ddp")
    tables = None
    if mode == "precomputed":  # before begin(): the weights are still the starting model's
        with fastpath.training(model, compute, cache=prepacked, copies=copies, hold=True,
                               recompute_attention=True) as head:
            tables = precomputed_reference(run, getattr(policy, "module", policy), head,
                                           {"train": train_set, "val": val_set}, t.batch_size * 2, pad_id)
    if run.is_main:
        print(f"[posttrain] dpo: loss {cfg.dpo.loss_type}, beta {cfg.dpo.beta}, reference {mode}")
    loss_fn = PairLoss(cfg, Reference(mode, tables), pad_id, device)
    start_step = run.begin(model, optimizer, scheduler, total_steps)["step"]
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in train_set]
    plans: dict[int, list[list[int]]] = {}

    for step in range(start_step, total_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans = {epoch: plan_epoch(lengths, global_batch, t.seed, epoch, t.group_by_length)}
        batches = step_micro_batches(train_set, plans[epoch][index], t.batch_size, run.rank, run.world)
        t0 = time.perf_counter()
        sums = torch.zeros(len(METRICS) + 2, dtype=torch.float64, device=device)
        tokens = torch.zeros(3, dtype=torch.float64, device=device)  # PairBatch.counts
        with fastpath.training(model, compute, cache=prepacked, copies=copies, hold=True,
                               recompute_attention=True) as head:
            loss_fn.reference.prefetch(getattr(policy, "module", policy), head, train_set,
                                       [i for idx in batches for i in idx], "train", pad_id, device)
            for j, idx in enumerate(batches):
                with accumulation(run.accelerator, policy, j == len(batches) - 1):
                    loss, metrics, batch = loss_fn(policy, head, train_set, idx, "train")
                    backward(run.accelerator, loss.sum() * (run.world / global_batch))
                sums += metric_sums(loss, metrics)
                tokens += batch.counts
            loss_fn.reference.clear()
            if run.world > 1:
                sums, tokens = run.accelerator.reduce(sums, reduction="sum"), run.accelerator.reduce(tokens, "sum")
            grad_norm, lr = finish_step(run.accelerator, model, optimizer, scheduler, t.max_grad_norm,
                                        loss=float(sums[0]) / global_batch, step=step + 1,
                                        advice=f"Lower train.lr (now {t.lr}) or dpo.beta, check the data")
            dt = time.perf_counter() - t0
            done = step + 1
            metrics = {**means(sums), "grad_norm": grad_norm, "learning_rate": lr, "epoch": step / steps_per_epoch,
                       "tokens": int(tokens[0]), "tokens_per_s": float(tokens[0]) / dt,
                       "padding_pct": 100 * (1 - float(tokens[1]) / float(tokens[2])), "step_time": dt,
                       "peak_memory_mb": peak_memory_mb(device)}
            if val_set and t.eval_every and (done % t.eval_every == 0 or done == total_steps):
                metrics.update(evaluate(policy, head, loss_fn, val_set, t.batch_size, run.accelerator))
        run.end_step(done, metrics, model, optimizer, scheduler, {"epoch": epoch, "index": index + 1})
    return run.finish(policy, model, tok, hasattr(model, "peft_config"))
