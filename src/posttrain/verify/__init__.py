"""The answer-equivalence engine: extract a final answer from model output and decide whether it equals a
gold answer, without ever evaluating model output as code (policy and tolerance rule: docs/verifier.md).

Public API:

* ``verify(prediction, gold) -> Verdict`` and ``Verdict(equal, reason, pred_normalized, gold_normalized)``
* ``extract_answer(text, style="auto", ...)`` (``STYLES``: auto, boxed, tags, gsm8k, final_answer, dapo) and
  ``extract_with_rule`` -> ``Extracted(answer, rule)``: the same answer and the rule that found it
* ``VerifierPool``: worker processes with hard timeouts for the symbolic rung; ``default_pool()`` the shared one
* ``gold_parseable(gold)``: can this gold be compared at all

Layers, bottom up: ``extract``/``freetext``/``reading`` (completion -> answer text, by a named rule),
``normalize``/``latex_lex``/``latex_parse``/``names`` (text -> syntax tree), ``algebra``/``evaluate``/
``relations``/``compare`` (exact values and structure rules), ``verifier`` (the in-process ladder and the symbolic rung),
``symbolic`` (sympy; imported only in worker processes), ``pool``/``worker`` (the processes). ``verify()`` sits
here, above both ``verifier`` and ``pool``, because it needs both: the ladder first, the pool for what is left.
Importing this package is cheap (no sympy).
"""

from __future__ import annotations

from posttrain.verify.extract import (
    DEFAULT_TAGS,
    FREE_TEXT_RULES,
    STYLES,
    Extracted,
    extract_answer,
    extract_with_rule,
    last_boxed,
)
from posttrain.verify.pool import VerifierPool, default_pool
from posttrain.verify.verifier import DEFAULT_TIMEOUT, Verdict, gold_parseable, verify_fast


def verify(prediction: str, gold: str, *, timeout: float | None = None, pool: VerifierPool | None = None,
           rule: str | None = None) -> Verdict:
    """Is ``prediction`` the same answer as ``gold``? Never raises for any input strings.

    ``prediction`` is a completion (its final answer is read by the ``auto`` rules of ``extract_with_rule``
    and the rule is reported as ``Verdict.rule``) or, with ``rule``, an answer already extracted by that
    rule (the rewards and ``posttrain eval`` extract first, with their own style and tags).

    Ordinary answers are decided in-process; symbolic ones in ``pool`` (default: a shared
    ``VerifierPool``, started on first need) under a hard ``timeout`` in seconds (default: the pool's,
    2 s unless the pool was made with another).

    >>> verify(r"\\frac{1}{2}", "0.5").equal
    True
    >>> verify("x = 3", "3").reason
    'exact'
    """
    if not isinstance(prediction, str) or not isinstance(gold, str):
        prediction = "" if prediction is None else str(prediction)
        gold = "" if gold is None else str(gold)
    try:
        fast = verify_fast(prediction, gold, rule)
    except RecursionError:
        return Verdict(False, "too_large")
    except Exception:  # noqa: BLE001 - never raise for model output: let the worker decide (and report)
        fast = None
    if fast is not None:
        return fast
    if pool is None:
        pool = default_pool()
    return pool.verify(prediction, gold, timeout=timeout, rule=rule)


__all__ = ["DEFAULT_TAGS", "DEFAULT_TIMEOUT", "FREE_TEXT_RULES", "STYLES", "Extracted", "Verdict", "VerifierPool", "default_pool",
           "extract_answer", "extract_with_rule", "gold_parseable", "last_boxed", "verify"]
