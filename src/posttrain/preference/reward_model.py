"""Reward models: a causal LM with a scalar head that reads the last non-pad token.

The model is transformers' ``AutoModelForSequenceClassification`` with ``num_labels=1`` (``Qwen3ForSequence
Classification``, ``LlamaForSequenceClassification``, ...): its forward returns one logit per sequence, taken at
the rightmost token that is not ``config.pad_token_id``. Because attention is causal, that is the same score
whether the sequence is padded or not, and the same in training, in :func:`score_ids`, and for a user who loads the
saved model with plain transformers. ``posttrain rm`` saves it so: ``model/`` (full fine-tuning) loads with
``AutoModelForSequenceClassification.from_pretrained``; ``adapter/`` is a PEFT ``SEQ_CLS`` adapter that holds the
trained head too (``modules_to_save``), loaded with ``PeftModel.from_pretrained`` on the base loaded as a
sequence classifier.

Here: loading one (:func:`load_sequence_classifier` for training, :func:`load_reward_model` for scoring: a
``posttrain rm`` run directory, an adapter directory, a model directory or a hub id), scoring token sequences in
batches under ``inference_mode``, and :class:`RewardModelReward`, a reward model as a GRPO reward with TRL's
reward contract; and :class:`JudgeReward`, a generative judge (any causal LM asked a question about each
completion) for tasks without a checkable answer.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, BitsAndBytesConfig

from posttrain.config import ModelConfig
from posttrain.errors import UserError
from posttrain.models import (_drop_gguf_marker, load_error, load_tokenizer, resolve_attention, resolve_device,
                              resolve_dtype, resolve_source)
from posttrain.preference.data import pad_token_id
from posttrain.runs import Source, check_base_exists, resolve


def check_head(config, what: str) -> bool:
    """True when ``config`` is a sequence classifier with one label (a reward model), False when it is another
    architecture (a causal LM: a base to put a new head on); a classifier with several labels is a UserError."""
    if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
        return False
    if config.num_labels != 1:
        raise UserError(f"{what}: its head has {config.num_labels} labels ({config.id2label}); a reward model has one "
                        "scalar output (num_labels=1). Use a reward model, or train one with posttrain rm")
    return True


def _quantization(cfg: ModelConfig, dtype, device: str) -> dict:
    """from_pretrained's 4-bit NF4 arguments, as ``posttrain.models.load_model`` builds them (QLoRA)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("model.load_in_4bit=true needs bitsandbytes: pip install 'posttrain[gpu]' (it runs on CPU "
                        "too), or set model.load_in_4bit=false") from None
    compute = dtype if dtype != torch.float32 or device == "cpu" else torch.float32
    storage = dtype if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else torch.uint8
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage),
        "device_map": {"": device if device != "cuda" else torch.cuda.current_device()}}


def load_sequence_classifier(cfg: ModelConfig, *, verbose: bool = True):
    """(model, tokenizer): ``cfg``'s model with a one-label head (a new, randomly initialised ``score`` on a causal
    LM; the trained one of a reward model), on ``cfg.device``, in eval mode, ``config.pad_token_id`` set to the
    tokenizer's pad token (the head reads the last token that is not it)."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    source, gguf_file = resolve_source(cfg)
    t0 = time.perf_counter()
    tok = load_tokenizer(source, gguf_file, cfg.revision, cfg.trust_remote_code)
    kwargs: dict = {"dtype": dtype, "attn_implementation": resolve_attention(cfg.attn_implementation, device),
                    "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, "num_labels": 1}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        try:
            config = AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        except OSError as exc:
            raise load_error(exc, cfg.name) from None
        check_head(config, f"model.name={cfg.name!r}")
    if cfg.load_in_4bit:
        kwargs.update(_quantization(cfg, dtype, device))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise load_error(exc, cfg.name) from None
    except ValueError as exc:  # an architecture transformers has no sequence-classification class for
        raise UserError(f"model.name={cfg.name!r} cannot take a reward head: {str(exc).splitlines()[0]}") from None
    if gguf_file:
        _drop_gguf_marker(model)
    if not cfg.load_in_4bit:
        model.to(device)
    model.config.get_text_config().pad_token_id = model.config.pad_token_id = pad_token_id(tok)
    model.eval()
    if verbose:
        print(f"[posttrain] loaded {cfg.name} with a reward head ({source}) dtype={str(dtype).replace('torch.', '')} "
              f"device={device} in {time.perf_counter() - t0:.1f}s")
    return model, tok


def _reward_source(path: str, base: str | None) -> Source:
    """What ``path`` names (see :func:`posttrain.runs.resolve`), checked to be a reward model: a ``SEQ_CLS`` adapter,
    or a model whose config is a one-label sequence classifier."""
    src = resolve(path, base)
    check_base_exists(src)
    if src.adapter_dir is not None:
        task = json.loads((src.adapter_dir / "adapter_config.json").read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise UserError(f"{path}: the adapter {src.adapter_dir} is a {task} adapter, not a reward model's "
                            "(SEQ_CLS, with its head); give the run directory of posttrain rm")
        return src
    try:
        config = AutoConfig.from_pretrained(src.model.name, revision=src.model.revision,
                                            trust_remote_code=src.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise load_error(exc, src.model.name, "reward model") from None
    if not check_head(config, f"reward model {path}"):
        raise UserError(f"{path} is not a reward model: its config.json says {config.architectures}, not a "
                        "...ForSequenceClassification with one label. Give the run directory of posttrain rm, or a "
                        "reward model's directory or hub id")
    return src


def load_reward_model(path: str, *, base: str | None = None, device: str = "auto", dtype: str = "auto",
                      verbose: bool = True):
    """(model, tokenizer) of a reward model for scoring: a ``posttrain rm`` run directory, an adapter directory
    (its base from the run's config.yaml, ``base``, or the adapter), a model directory or a hub id."""
    src = _reward_source(path, base)
    cfg = src.model.model_copy(update={"device": device, "dtype": dtype})
    model, tok = load_sequence_classifier(cfg, verbose=verbose)
    if src.tokenizer_dir:
        tok = load_tokenizer(src.tokenizer_dir)
    if src.adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(src.adapter_dir))
        if not cfg.load_in_4bit:  # scoring only: fold LoRA in (no adapter branch per layer); a 4-bit base keeps it
            model = model.merge_and_unload()
    model.eval()
    model.config.pad_token_id = pad_token_id(tok, path)
    return model, tok


@torch.inference_mode()
def score_ids(model, sequences: list[list[int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """The reward of each token sequence, in float32, ``batch_size`` sequences per forward (sorted by length, so
    a batch holds little padding; the score does not depend on the batching)."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = [0.0] * len(sequences)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = pad_right([sequences[i] for i in idx], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for i, v in zip(idx, logits[:, 0].float().tolist()):
            out[i] = v
    return out


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``sequences`` padded on the right with ``pad_id``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def render(tok, prompt, completion, what: str) -> str:
    """The text a reward model scores: a conversation (message-list prompt) rendered with the reward model's own
    chat template, as its training pairs were; a text prompt + completion with the EOS token appended, as its text
    pairs were (TRL's GRPO omits that EOS; our reward models were trained with it)."""
    if isinstance(prompt, str) and not isinstance(completion, list):
        text = prompt + str(completion)
        eos = tok.eos_token or ""
        return text if text.endswith(eos) else text + eos
    if not tok.chat_template:
        raise UserError(f"{what}: its tokenizer has no chat template, so it cannot render a conversation; train it "
                        "with a chat template (data.template=chatml) or give text prompts")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages += completion if isinstance(completion, list) else [{"role": "assistant", "content": str(completion)}]
    return tok.apply_chat_template(messages, tokenize=False)


class RunningStats:
    """Running mean and variance over every value seen (Chan et al.'s parallel update, in float64)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: list[float]) -> None:
        if not values:
            return
        n = len(values)
        mean = math.fsum(values) / n
        m2 = math.fsum((v - mean) ** 2 for v in values)
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else 0.0


class RewardModelReward:
    """A reward model as a reward function (TRL's contract: ``(prompts, completions, **columns) -> list[float]``).

    In a GRPO recipe: ``rewards: [{name: reward_model, model: runs/rm, weight: 1.0, normalize: true, device: cpu,
    batch_size: 8}]``, freely mixed with the verifier rewards. ``model``: a ``posttrain rm`` run directory, an
    adapter or model directory, or a hub id; ``base``: the base of an adapter when it is not recorded. Scores are
    computed in batches of ``batch_size`` under ``inference_mode`` on ``device``. ``normalize``: each score becomes
    ``(score - mean) / (std + 1e-6)`` with the running mean and std of every score this reward has returned so far
    (this batch included), which puts it on the scale of 0/1 verifier rewards whatever the head's offset; with
    several processes each keeps its own statistics. A NaN or infinite score is returned as it is (and not counted
    in the statistics), so the strict ``RewardSet`` of training stops the run naming this reward."""

    bounded = True  # scoring cannot hang: no grpo.reward_timeout around it (a large model on a CPU may be slow)

    def __init__(self, model: str, device: str = "auto", batch_size: int = 8, normalize: bool = False,
                 dtype: str = "auto", base: str | None = None, name: str = "reward_model"):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"reward {name!r}: batch_size={batch_size!r}; give a whole number >= 1")
        self.__name__ = name
        self.path, self.batch_size, self.normalize = str(model), batch_size, bool(normalize)
        self.model, self.tok = load_reward_model(self.path, base=base, device=device, dtype=dtype)
        self.pad_id = pad_token_id(self.tok, self.path)
        self.stats = RunningStats()
        self.seconds = 0.0

    def __call__(self, prompts, completions, **columns) -> list[float]:
        t0 = time.perf_counter()
        if isinstance(prompts, (str, dict)) or len(prompts) != len(completions):
            prompts = [prompts] * len(completions)  # one prompt for every completion (a single-sample call)
        what = f"reward {self.__name__!r} ({self.path})"
        ids = [self.tok(render(self.tok, p, c, what), add_special_tokens=False)["input_ids"]
               for p, c in zip(prompts, completions)]
        scores = score_ids(self.model, ids, self.pad_id, self.batch_size)
        if self.normalize and all(math.isfinite(s) for s in scores):
            self.stats.update(scores)
            scores = [(s - self.stats.mean) / (self.stats.std + 1e-6) for s in scores]
        self.seconds += time.perf_counter() - t0
        return scores

    def metrics(self) -> dict[str, float]:
        """Seconds spent scoring since the last call, and the running statistics when normalizing."""
        out, self.seconds = {"seconds": self.seconds}, 0.0
        if self.normalize:
            out.update({"running_mean": self.stats.mean, "running_std": self.stats.std})
        return out



JUDGE_QUESTION = "Is the answer below correct and helpful?"
JUDGE_FORMAT = {"yes_no": "Reply with Yes or No only.", "digits": "Reply with one digit from 0 (worst) to 9 (best) only."}


class JudgeReward:
    """A causal LM as judge: ``{name: judge, model: ..., question: ..., scale: yes_no | digits}``.

    Each prompt and completion is put to the judge as one user turn (``question``, the prompt, the answer, the
    reply format), rendered with the judge's chat template and its generation prompt, and read from one forward:
    ``yes_no``: P(Yes) / (P(Yes) + P(No)) of the first answer token; ``digits``: the expected digit / 9 under the
    first token's distribution restricted to 0-9 (a 1-10 scale is not used because "10" is two tokens in the digit-
    splitting vocabularies of Qwen, Llama and SmolLM). Rewards are in [0, 1]; batches of ``batch_size``, left-
    padded so that every row's last position is its answer position, under ``inference_mode`` on ``device``.
    ``model``: anything ``posttrain.runs.resolve`` takes (a run directory, adapter, model directory, hub id)."""

    bounded = True

    def __init__(self, model: str, question: str = JUDGE_QUESTION, scale: str = "yes_no", device: str = "auto",
                 batch_size: int = 8, dtype: str = "auto", base: str | None = None, name: str = "judge"):
        from posttrain.runs import load

        if scale not in JUDGE_FORMAT:
            raise UserError(f"reward {name!r}: scale={scale!r}; use one of {', '.join(JUDGE_FORMAT)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"reward {name!r}: batch_size={batch_size!r}; give a whole number >= 1")
        self.__name__, self.question, self.scale, self.batch_size = name, question, scale, batch_size
        src = resolve(str(model), base)
        check_base_exists(src)
        self.model, self.tok = load(src, device=device, dtype=dtype)
        words = ["Yes", "No"] if scale == "yes_no" else [str(d) for d in range(10)]
        self.ids = [self.tok(w, add_special_tokens=False)["input_ids"] for w in words]
        if any(len(i) != 1 for i in self.ids) or not self.tok.chat_template:
            raise UserError(f"reward {name!r}: the judge {model} needs a chat template and single tokens for "
                            f"{', '.join(words)}; choose another judge model or scale")
        self.ids = [i[0] for i in self.ids]

    def _text(self, prompt, completion) -> str:
        asked = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt if m["role"] != "system")
        answer = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
        turn = f"{self.question}\n\nQuestion:\n{asked}\n\nAnswer:\n{answer}\n\n{JUDGE_FORMAT[self.scale]}"
        return self.tok.apply_chat_template([{"role": "user", "content": turn}], tokenize=False,
                                            add_generation_prompt=True)

    @torch.inference_mode()
    def __call__(self, prompts, completions, **columns) -> list[float]:
        if isinstance(prompts, (str, dict)) or len(prompts) != len(completions):
            prompts = [prompts] * len(completions)
        seqs = [self.tok(self._text(p, c), add_special_tokens=False)["input_ids"] for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        out = []
        for s in range(0, len(seqs), self.batch_size):
            chunk = seqs[s:s + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[self.tok.pad_token_id] * (width - len(q)) + q for q in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in chunk], device=device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                logits_to_keep=1).logits[:, -1]  # the head on the last position only
            probs = torch.softmax(logits.float()[:, self.ids], dim=-1)
            if self.scale == "yes_no":
                out += probs[:, 0].tolist()
            else:
                out += (probs @ torch.arange(10.0, device=device) / 9).tolist()
        return out
