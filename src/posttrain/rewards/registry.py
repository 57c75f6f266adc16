"""Reward lookup (built-ins, presets, custom functions), weighted sums, metrics and failure handling.

Specs: a built-in name (``math_accuracy``, ``format_exact``, ``format_approx``, ``answer_tiers``,
``number_match``, ``boxed_format``, ``think_format``, ``soft_overlong``), a preset (``unsloth_math`` =
the four Unsloth functions), a custom function ``package.module:function`` or ``path/to/file.py:function``,
or a dict ``{"name": <any of those>, "weight": 2.0, <keyword arguments for the built-in>}``. Custom
functions keep TRL's contract, so TRL's own ``trl.rewards.accuracy_reward`` works unchanged.
A reward model trained by ``posttrain rm`` (or any one-label sequence classifier) is the learned reward
``{"name": "reward_model", "model": RUN, "weight": ..., "normalize": true, "device": ..., "batch_size": ...}``
(:class:`posttrain.preference.reward_model.RewardModelReward`); a causal LM asked about each completion is
``{"name": "judge", "model": ..., "scale": "yes_no"}`` (``JudgeReward``).

``RewardSet`` calls every function on a batch and returns the weighted total per sample (the sum over the
functions that did not return None; None when all did), the per-function values and metrics named like
TRL's (``reward``, ``reward_std``, ``rewards/<name>/mean``, ``rewards/<name>/std``) plus
``rewards/<name>/failures``. A function that raises is retried sample by sample; a sample that still
raises gets None, is counted, and the first traceback of each function is logged once. When more than
``max_failure_fraction`` of a batch fails for one function, ``RewardFailureError`` stops the run.

Each call of a custom function (not the built-ins, whose verifier pool bounds every comparison already) is
limited to ``timeout`` seconds (``grpo.reward_timeout``, :mod:`posttrain.rewards.deadline`): a hung reward stops
the run with :class:`~posttrain.rewards.deadline.TimeLimitError` naming it. Under ``strict``, rewards so large that
the group statistics overflow in float64 (1e308 is finite, its square is not; the std would be infinite and
every advantage 0) stop the run naming the function instead of silently training nothing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import logging
import math
import statistics
import sys
import traceback
from pathlib import Path

from posttrain.errors import UserError
from posttrain.rewards.deadline import TimeLimitError, call_with_deadline
from posttrain.rewards.functions import BoxedFormat, MathAccuracy, SoftOverlong, ThinkFormat, nan_to_none
from posttrain.rewards.unsloth import PRESET, AnswerTiers, FormatApprox, FormatExact, NumberMatch

log = logging.getLogger("posttrain.rewards")

BUILTINS = {
    "math_accuracy": MathAccuracy,
    "format_exact": FormatExact,
    "format_approx": FormatApprox,
    "answer_tiers": AnswerTiers,
    "number_match": NumberMatch,
    "boxed_format": BoxedFormat,
    "think_format": ThinkFormat,
    "soft_overlong": SoftOverlong,
}
PRESETS = {"unsloth_math": PRESET}
BUILTIN_TYPES = tuple({*BUILTINS.values(), *PRESET})  # bounded in time already: no deadline around them
# learned rewards, {"name": "reward_model", "model": RUN, ...}: imported on use (they load torch and transformers)
LEARNED = ("reward_model", "judge")


class RewardFailureError(UserError):
    """Too many samples of a batch failed in one reward function."""


class RewardContractError(UserError):
    """A reward function broke its contract (a wrong number of values, NaN or infinity) under ``strict``."""


def _std(values: list[float]) -> float:
    """The unbiased standard deviation (TRL's), 0 with fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean(values: list[float]) -> float:
    """The mean; infinite or NaN (not an exception) when the values overflow."""
    try:
        return statistics.fmean(values) if values else float("nan")
    except (OverflowError, ValueError):
        return math.inf if all(v > 0 for v in values) else float("nan")


def reward_metrics(total: list[float | None], per_reward: dict[str, list[float | None]]) -> dict[str, float]:
    """TRL's reward metrics over a batch: ``reward``, ``reward_std`` and ``rewards/<name>/mean|std`` (None and
    NaN values left out; NaN means when nothing is left)."""
    def present(values):
        return [v for v in values if v is not None and not math.isnan(v)]

    def std(values):
        return _std(values) if all(math.isfinite(v) for v in values) else float("nan")

    out = {}
    for name, values in per_reward.items():
        vals = present(values)
        out[f"rewards/{name}/mean"] = _mean(vals)
        out[f"rewards/{name}/std"] = std(vals)
    vals = present(total)
    out["reward"] = _mean(vals)
    out["reward_std"] = std(vals)
    return out


def spread_finite(values: list[float | None]) -> bool:
    """Whether the mean and the summed squared deviations of ``values`` (None left out) are finite in float64, as
    the group advantages compute them: rewards of 1e308 are finite, their spread is not."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    try:
        mean = math.fsum(vals) / max(len(vals), 1)
        return math.isfinite(math.fsum((v - mean) ** 2 for v in vals))
    except (OverflowError, ValueError):
        return False


_MARKER_KEYS = ("reasoning_start", "reasoning_end", "solution_start", "solution_end")


def _params(cls) -> list[str]:
    """Keyword arguments a built-in accepts (marker names for the Unsloth functions)."""
    if cls.__init__ is object.__init__:
        return []
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    if "marker_overrides" in names:
        names = [p for p in names if p != "marker_overrides"] + list(_MARKER_KEYS)
    return names


def _build(cls, kwargs, shared, where):
    allowed = _params(cls)
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise UserError(f"{where}: unknown argument {unknown[0]!r}; it accepts: {', '.join(allowed) or 'no arguments'}")
    kw = {k: v for k, v in shared.items() if v is not None and k in allowed}
    kw.update(kwargs)
    try:
        return cls(**kw)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: bad arguments: {exc}") from None


def load_custom(spec: str):
    """``package.module:function`` or ``path/to/file.py:function`` -> the function."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UserError(f"reward {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise UserError(f"reward {spec!r}: file {str(path)!r} not found (paths are relative to the working directory)")
        name = "posttrain_user_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(name)
        if module is None:
            mspec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[name] = module
            try:
                mspec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise UserError(f"reward {spec!r}: importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UserError(f"reward {spec!r}: cannot import module {target!r} ({exc}); is it installed or on PYTHONPATH?") from exc
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise UserError(f"reward {spec!r}: {target!r} has no callable {attr!r}")
    return fn


def _resolve(spec, shared) -> list[tuple[object, float]]:
    """One spec -> [(callable, weight)] (a preset gives several)."""
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None) or spec.pop("func", None)
        weight = float(spec.pop("weight", 1.0))
        kwargs = spec
    elif isinstance(spec, str):
        name, weight, kwargs = spec, 1.0, {}
    elif callable(spec):
        return [(spec, 1.0)]
    else:
        raise UserError(f"reward spec {spec!r}: expected a name, 'module:function', or a mapping with 'name'")
    if not isinstance(name, str) or not name:
        raise UserError(f"reward spec {spec!r}: missing 'name'")
    if name in BUILTINS:
        return [(_build(BUILTINS[name], kwargs, shared, f"reward {name!r}"), weight)]
    if name in LEARNED:
        from posttrain.preference.reward_model import JudgeReward, RewardModelReward

        cls = RewardModelReward if name == "reward_model" else JudgeReward
        return [(_build(cls, kwargs, shared, f"reward {name!r}"), weight)]
    if name in PRESETS:
        return [(_build(cls, kwargs, shared, f"preset {name!r}"), weight) for cls in PRESETS[name]]
    if ":" in name:
        fn = load_custom(name)
        if kwargs:
            fn = functools.update_wrapper(functools.partial(fn, **kwargs), fn)
        return [(fn, weight)]
    valid = ", ".join(sorted(BUILTINS) + sorted(PRESETS) + list(LEARNED))
    raise UserError(f"unknown reward {name!r}; built-ins: {valid}; or a custom 'package.module:function' / 'file.py:function'")


def get_reward_funcs(names_or_specs, *, prompt_suffix=None, pool=None, markers=None) -> list:
    """Reward callables (each with ``__name__``) for a list of specs; presets expand in place.

    ``prompt_suffix``: what the chat template's generation prompt appends (see
    ``functions.generation_suffix``); format rewards prepend it. ``pool``: the ``VerifierPool`` for
    ``math_accuracy``. ``markers``: ``config.ReasoningMarkers`` for the Unsloth preset.
    """
    shared = {"prompt_suffix": prompt_suffix, "pool": pool, "markers": markers}
    return [fn for spec in _as_list(names_or_specs) for fn, _ in _resolve(spec, shared)]


def resolve_rewards(names_or_specs, *, prompt_suffix=None, pool=None, markers=None) -> list[tuple[object, float]]:
    """Like ``get_reward_funcs`` but keeps each function's weight: ``[(callable, weight), ...]``."""
    shared = {"prompt_suffix": prompt_suffix, "pool": pool, "markers": markers}
    return [pair for spec in _as_list(names_or_specs) for pair in _resolve(spec, shared)]


def _as_list(specs):
    if isinstance(specs, (str, dict)) or callable(specs):
        return [specs]
    return list(specs)


class RewardSet:
    """Reward functions with weights: ``total, per_reward, metrics = rs(prompts, completions, **columns)``.

    The one place rewards are validated. A function that raises is retried per sample (see the module
    docstring). A function that returns the wrong number of values, NaN or infinity: by default its values
    count as failures; with ``strict`` (training, where a quiet NaN would poison every advantage of its group)
    it stops the run with :class:`RewardContractError` naming the function."""

    def __init__(self, funcs, weights=None, *, max_failure_fraction: float = 0.5, strict: bool = False,
                 timeout: float | None = None):
        funcs = list(funcs)
        weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise UserError(f"{len(weights)} reward weights for {len(funcs)} reward functions")
        if not 0 <= max_failure_fraction <= 1:
            raise UserError(f"max_failure_fraction must be between 0 and 1, got {max_failure_fraction}")
        self.funcs, self.weights = funcs, weights
        self.max_failure_fraction = max_failure_fraction
        self.strict = strict
        self.limits = [None if isinstance(f, BUILTIN_TYPES) or getattr(f, "bounded", False) else timeout
                       for f in funcs]  # seconds per call
        self.names = []
        for f in funcs:
            base = getattr(f, "__name__", None) or type(f).__name__
            name, k = base, 2
            while name in self.names:
                name, k = f"{base}_{k}", k + 1
            self.names.append(name)
        self.failures = {n: 0 for n in self.names}
        self._logged: set[str] = set()
        self._first_error: dict[str, str] = {}

    @classmethod
    def from_specs(cls, specs, *, prompt_suffix=None, pool=None, markers=None, max_failure_fraction=0.5,
                   weights=None, strict: bool = False, timeout: float | None = None):
        """``weights`` (one per function after presets expand) replace the specs' own."""
        pairs = resolve_rewards(specs, prompt_suffix=prompt_suffix, pool=pool, markers=markers)
        if weights is not None and len(weights) != len(pairs):
            raise UserError(f"{len(weights)} reward weights for {len(pairs)} reward functions "
                            f"{[getattr(f, '__name__', type(f).__name__) for f, _ in pairs]}; give one weight per "
                            "function (presets expand: unsloth_math is 4)")
        return cls([f for f, _ in pairs], weights or [w for _, w in pairs],
                   max_failure_fraction=max_failure_fraction, strict=strict, timeout=timeout)

    def __call__(self, prompts, completions, **columns):
        n = len(completions)
        per_reward: dict[str, list] = {}
        metrics: dict[str, float] = {}
        for name, fn, limit in zip(self.names, self.funcs, self.limits):
            values, failed = self._call_one(name, fn, prompts, completions, columns, n, limit)
            per_reward[name] = values
            self.failures[name] += failed
            metrics[f"rewards/{name}/failures"] = failed
            for key, val in (fn.metrics() if hasattr(fn, "metrics") and callable(fn.metrics) else {}).items():
                metrics[f"rewards/{name}/{key}"] = val
            if n and failed > self.max_failure_fraction * n:
                raise RewardFailureError(
                    f"reward {name!r} failed on {failed} of {n} samples in one batch (limit "
                    f"{self.max_failure_fraction:.0%}); first error: {self._first_error.get(name, '?')}. "
                    f"Fix the reward function (its traceback is in the log) or raise "
                    f"grpo.reward_max_failure_fraction (now {self.max_failure_fraction})."
                )
        total = [self._weighted_sum(per_reward, i) for i in range(n)]
        if self.strict and not spread_finite(total):
            self._overflow_error(per_reward)
        metrics.update(reward_metrics(total, per_reward))
        return total, per_reward, metrics

    def _weighted_sum(self, per_reward: dict[str, list], i: int) -> float | None:
        parts = [w * per_reward[nm][i] for nm, w in zip(self.names, self.weights) if per_reward[nm][i] is not None]
        if not parts:
            return None
        try:
            return math.fsum(parts)
        except (OverflowError, ValueError):  # beyond float64: the spread check names the reward
            return math.inf

    def _overflow_error(self, per_reward: dict[str, list]) -> None:
        """Name the reward whose size overflows the statistics: one whose own weighted spread overflows, else
        the one with the largest weighted value."""
        weighted = {nm: [w * v for v in per_reward[nm] if v is not None] for nm, w in zip(self.names, self.weights)}
        name = next((nm for nm in self.names if not spread_finite(weighted[nm])), None) or max(
            self.names, key=lambda nm: max((abs(v) for v in weighted[nm]), default=0.0))
        big = max((v for v in per_reward[name] if v is not None), key=abs)
        raise RewardContractError(
            f"reward {name!r} returned {big:g} (weight {self.weights[self.names.index(name)]:g}): rewards this large "
            "overflow the group statistics (the reward std is infinite, so every advantage would be 0 and nothing "
            "would train); return rewards of moderate size (say within +-1e6) or give it a smaller weight")

    def _log_failure(self, name, exc):
        if name not in self._logged:
            self._logged.add(name)
            self._first_error[name] = f"{type(exc).__name__}: {exc}"
            log.error("reward %r raised (this traceback is logged once; failing samples get None):\n%s",
                      name, "".join(traceback.format_exception(exc)))

    def _invoke(self, name, fn, limit, **kwargs):
        """``fn(**kwargs)``, stopped after ``limit`` seconds (None: no limit)."""
        message = (f"reward {name!r} did not return within {limit:g} s (grpo.reward_timeout); the run stops here. "
                   "Make it faster (or bound its own slow calls), or raise grpo.reward_timeout (null: no limit)"
                   if limit is not None else "")
        return call_with_deadline(lambda: fn(**kwargs), limit, message)

    def _call_one(self, name, fn, prompts, completions, columns, n, limit=None):
        try:
            values = self._check(name, self._invoke(name, fn, limit, prompts=prompts, completions=completions,
                                                    **columns), n)
            return values, 0
        except (RewardContractError, TimeLimitError):
            raise
        except Exception as exc:  # noqa: BLE001 - a reward bug must not kill the run: retry per sample
            self._log_failure(name, exc)
        values, failed = [], 0
        for i in range(n):
            sub = {k: (v[i : i + 1] if isinstance(v, (list, tuple)) and len(v) == n else v) for k, v in columns.items()}
            p = prompts[i : i + 1] if isinstance(prompts, (list, tuple)) and len(prompts) == n else prompts
            try:
                values.append(self._check(name, self._invoke(name, fn, limit, prompts=p,
                                                             completions=completions[i : i + 1], **sub), 1)[0])
            except (RewardContractError, TimeLimitError):
                raise
            except Exception as exc:  # noqa: BLE001
                self._log_failure(name, exc)
                values.append(None)
                failed += 1
        return values, failed

    def _check(self, name, values, n):
        if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise TypeError(f"reward {name!r} returned {type(values).__name__}, expected a list of floats")
        values = list(values)
        if len(values) != n:
            if self.strict:
                raise RewardContractError(f"reward {name!r} returned {len(values)} values for {n} completions; it "
                                          "must return one float (or None to skip) per completion")
            raise ValueError(f"reward {name!r} returned {len(values)} values for {n} completions")
        if self.strict:
            bad = [v for v in values if isinstance(v, (int, float)) and not math.isfinite(v)]
            if bad:
                raise RewardContractError(f"reward {name!r} returned {bad[0]} (non-finite); return a finite float, "
                                          "or None to skip a completion")
        out = []
        for v in values:
            if v is not None and not isinstance(v, (int, float)):
                if hasattr(v, "item"):  # a tensor or numpy scalar
                    v = v.item()
                else:
                    raise TypeError(f"reward {name!r} returned a {type(v).__name__}, expected float or None")
            out.append(nan_to_none(float(v)) if v is not None else None)
        return out
