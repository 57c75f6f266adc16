"""Published reference numbers for the math benchmarks, with the settings they were measured under, and the marks
that say whether one of our evaluations is comparable with them (same protocol, same test set, all of it).

Sources (accuracy in %, greedy, one sample per problem):

- DeepSeekMath 7B: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models" (arXiv 2402.03300): Base with few-shot chain of thought (GSM8K 8-shot, MATH 4-shot), Instruct and RL
  with zero-shot chain of thought and the ``\\boxed{}`` instruction. Checked against the authors' harness output
  ``evaluation/evaluation_results.json`` (github.com/deepseek-ai/DeepSeek-Math, commit b8b0f8c), which holds the
  unrounded values: Base 0.6422 (1,319 problems) / 0.3618 (5,000), Instruct 0.8287 / 0.4682, RL 0.8825 / 0.517.
  Their MATH is the full 5,000-problem test set.
- Qwen3-4B-Base: Yang et al. 2025, "Qwen3 Technical Report" (arXiv 2505.09388), the table comparing Qwen3-4B-Base
  with open baselines; GSM8K and MATH are both 4-shot chain of thought there (its section on base-model
  evaluation). The report does not publish its exemplars, so our math-4shot is close (same shot count and
  chain-of-thought form) but not known to be identical, and no protocol of ours is 4-shot on GSM8K. The values
  were taken from the issue that asked for this table; the report's table itself was not available to check
  here.
- SmolLM2-135M-Instruct: its model card (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct), "GSM8K (5-shot)
  1.4", measured with lighteval and the chat template (huggingface/smollm ``text/evaluation/smollm2``:
  ``smollm2_instruct.txt`` runs ``custom|gsm8k|5|1``; README: ``--use_chat_template``). Our
  lighteval-gsm8k-5shot differs only in which five train rows are the exemplars.

A mark is shown when the comparison is not like for like: ``≠ protocol`` (another prompt, shot count or reading),
``≈ protocol`` (ours is the closest, theirs unpublished in full), ``≠ test set`` (e.g. MATH-500 against the full
MATH test set: MATH-500 is a 500-problem subset, and scores on it differ), ``subset`` (fewer problems than the
whole test set, e.g. ``--limit``).
"""

from __future__ import annotations

from dataclasses import dataclass

# test set -> (name in a table, problems)
TEST_SETS = {"gsm8k": ("GSM8K test", 1319), "math": ("MATH test", 5000), "math500": ("MATH-500", 500)}
FAMILY = {"gsm8k": "gsm8k", "math500": "math", "math": "math"}   # our benchmark -> the references that apply


@dataclass(frozen=True)
class Reference:
    model: str
    hub_id: str
    test_set: str             # a key of TEST_SETS
    accuracy: float           # percent
    protocol: str | None      # our protocol that reproduces the setting; None: none of ours does
    exact: bool               # the protocol is known to be the same (prompt text, shots, reading)
    setting: str              # theirs, in words
    source: str


_DSM = "DeepSeekMath (Shao et al. 2024, arXiv 2402.03300)"
_QWEN3 = "Qwen3 Technical Report (arXiv 2505.09388)"
REFERENCES: tuple[Reference, ...] = (
    Reference("DeepSeekMath-Base 7B", "deepseek-ai/deepseek-math-7b-base", "gsm8k", 64.2, "gsm8k-8shot", True,
              "8-shot CoT, greedy", _DSM),
    Reference("DeepSeekMath-Base 7B", "deepseek-ai/deepseek-math-7b-base", "math", 36.2, "math-4shot", True,
              "4-shot Minerva CoT, greedy", _DSM),
    Reference("DeepSeekMath-Instruct 7B", "deepseek-ai/deepseek-math-7b-instruct", "gsm8k", 82.9, "boxed-0shot",
              True, "zero-shot CoT, \\boxed{} instruction, greedy", _DSM),
    Reference("DeepSeekMath-Instruct 7B", "deepseek-ai/deepseek-math-7b-instruct", "math", 46.8, "boxed-0shot",
              True, "zero-shot CoT, \\boxed{} instruction, greedy", _DSM),
    Reference("DeepSeekMath-RL 7B", "deepseek-ai/deepseek-math-7b-rl", "gsm8k", 88.2, "boxed-0shot", True,
              "zero-shot CoT, \\boxed{} instruction, greedy", _DSM),
    Reference("DeepSeekMath-RL 7B", "deepseek-ai/deepseek-math-7b-rl", "math", 51.7, "boxed-0shot", True,
              "zero-shot CoT, \\boxed{} instruction, greedy", _DSM),
    Reference("Qwen3-4B-Base", "Qwen/Qwen3-4B-Base", "gsm8k", 87.79, None, False, "4-shot CoT", _QWEN3),
    Reference("Qwen3-4B-Base", "Qwen/Qwen3-4B-Base", "math", 54.10, "math-4shot", False,
              "4-shot CoT (exemplars unpublished)", _QWEN3),
    Reference("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "gsm8k", 1.4, "lighteval-gsm8k-5shot",
              False, "5-shot (random train rows), chat template, lighteval, 256 tokens", "SmolLM2-135M-Instruct "
              "model card"),
)


def references_for(benchmark: str) -> list[Reference]:
    """The published numbers that apply to our benchmark ``benchmark`` (gsm8k, math500, ...)."""
    family = FAMILY.get(benchmark)
    return [r for r in REFERENCES if FAMILY.get(r.test_set) == family] if family else []


def marks(ref: Reference, benchmark: str, n: int, protocol: str | None) -> list[str]:
    """Why an evaluation (our ``benchmark``, ``n`` problems, ``protocol`` or None for a prompt style) is not like
    for like with ``ref``; [] when it is."""
    out = []
    if protocol is None or protocol != ref.protocol:
        theirs = ref.protocol or ref.setting
        out.append(f"≠ protocol (ours {protocol or 'a prompt style'}, theirs {theirs})")
    elif not ref.exact:
        out.append(f"≈ protocol ({ref.setting})")
    ours = benchmark if benchmark in TEST_SETS else None
    if ours != ref.test_set:
        name = TEST_SETS[ours][0] if ours else benchmark
        out.append(f"≠ test set ({name} vs {TEST_SETS[ref.test_set][0]}, {TEST_SETS[ref.test_set][1]:,})")
    elif n < TEST_SETS[ours][1]:
        out.append(f"subset ({n:,} of {TEST_SETS[ours][1]:,})")
    return out


def reference_table(benchmark: str, n: int, protocol: str | None, model: str | None = None) -> str:
    """A Markdown table of the published numbers for ``benchmark``, each marked against our evaluation; "" when
    none applies. ``model`` (our model's id) marks the rows of the same model."""
    refs = references_for(benchmark)
    if not refs:
        return ""
    lines = ["| published model | accuracy % | test set | setting | source | like for like with ours? |",
             "|---|---:|---|---|---|---|"]
    for r in refs:
        same = " (same model)" if model and r.hub_id.lower() in model.lower() else ""
        why = marks(r, benchmark, n, protocol)
        lines.append(f"| {r.model}{same} | {r.accuracy:g} | {TEST_SETS[r.test_set][0]} | {r.setting} | {r.source} | "
                     f"{'; '.join(why) if why else 'yes'} |")
    return "\n".join(lines)
