"""End-to-end evaluation of a tiny real Qwen3 (random weights, real Qwen vocabulary) on synthetic problems:
outputs, counts, resume after an interruption, format failures, stop strings, CLI comparison table."""

import json

import pytest

from posttrain.errors import UserError


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from posttrain.tiny import save_tiny_qwen3

    return save_tiny_qwen3(tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from posttrain.config import ModelConfig
    from posttrain.models import load_model

    return load_model(ModelConfig(name=str(tiny_dir)), None, for_training=False, verbose=False)


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_outputs_are_consistent(tiny, tmp_path):
    from posttrain.evaluation import EvalConfig, evaluate, load_benchmark

    model, tok = tiny
    bench = load_benchmark("synthetic", limit=4)
    m = evaluate(model, tok, bench, EvalConfig(max_new_tokens=8, batch_size=4), out_dir=tmp_path, progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["accuracy"] == m["accuracy"]
    for key in ("accuracy", "ci95", "format_rate", "truncation_rate", "n", "mean_completion_tokens", "pass_at_k"):
        assert key in saved
    rows = _rows(tmp_path / "samples.jsonl")
    assert saved["n"] == 4 and len(rows) == 4
    assert [r["id"] for r in rows] == [p.id for p in bench.problems]           # sorted back to benchmark order
    assert saved["correct"] == sum(r["verdict"] for r in rows)
    assert saved["format_rate"] == sum(r["format_ok"] for r in rows) / 4
    assert saved["truncation_rate"] == sum(r["truncated"] for r in rows) / 4
    assert saved["mean_completion_tokens"] == sum(r["completion_tokens"] for r in rows) / 4
    for r in rows:
        assert {"prompt", "completion", "extracted", "gold", "verdict", "reason"} <= set(r)
        assert r["prompt"].endswith("<|im_start|>assistant\n") and "\\boxed{}" in r["prompt"]
        assert 1 <= r["completion_tokens"] <= 8
        assert r["truncated"] == (r["finish"] == "length")
    assert {p.answer for p in bench.problems} == {r["gold"] for r in rows}
    assert "difficulty" in saved["by"]


def test_sampled_completions_do_not_depend_on_batching(tiny, tmp_path):
    """A sampled completion is keyed by its problem and sample index, not by its place in a batch: the batch
    size, and which problems share a batch, leave every completion the same; another seed changes them."""
    from posttrain.evaluation import EvalConfig, evaluate, load_benchmark

    model, tok = tiny
    bench = load_benchmark("synthetic", limit=4)
    texts = {}
    for name, batch, seed in (("b2", 2, 0), ("b8", 8, 0), ("seed1", 8, 1)):
        evaluate(model, tok, bench, EvalConfig(max_new_tokens=6, batch_size=batch, samples=2, temperature=1.0,
                                               seed=seed), out_dir=tmp_path / name, progress=False)
        texts[name] = {(r["id"], r["sample"]): r["completion"] for r in _rows(tmp_path / name / "samples.jsonl")}
    assert len(texts["b2"]) == 8 and texts["b2"] == texts["b8"]
    assert texts["seed1"] != texts["b8"]
    assert len(set(texts["b8"].values())) > 1   # the samples of a problem differ from each other


def test_interrupted_run_resumes_without_redoing_samples(tiny, tmp_path, monkeypatch):
    import posttrain.evaluation.runner as runner
    from posttrain.evaluation import EvalConfig, evaluate, load_benchmark

    model, tok = tiny
    bench = load_benchmark("synthetic", limit=4)
    settings = EvalConfig(prompt="reasoning", max_new_tokens=6, batch_size=2)
    real = runner.generate
    calls = []

    def interrupt_second_batch(model, tokenizer, prompts, **kw):
        calls.append(list(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(runner, "generate", interrupt_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tok, bench, settings, out_dir=tmp_path, progress=False)
    first = _rows(tmp_path / "samples.jsonl")
    assert len(first) == 2                                       # the first batch was saved as it finished
    assert not (tmp_path / "metrics.json").exists()
    with open(tmp_path / "samples.jsonl", "a") as f:           # a torn line from a crash mid-write
        f.write('{"id": "synthetic-x", "sam')

    calls.clear()
    m = evaluate(model, tok, bench, settings, out_dir=tmp_path, progress=False)
    done_prompts = {r["prompt"] for r in first}
    assert sum(len(c) for c in calls) == 2 and not done_prompts & {p for c in calls for p in c}
    rows = _rows(tmp_path / "samples.jsonl")
    assert m["n"] == 4 and len(rows) == 4
    kept = sorted((r for r in rows if r["id"] in {f["id"] for f in first}), key=lambda r: r["id"])
    assert kept == sorted(first, key=lambda r: r["id"])           # finished samples kept as they were

    with pytest.raises(UserError, match="other settings.*max_new_tokens"):
        evaluate(model, tok, bench, EvalConfig(prompt="reasoning", max_new_tokens=7), out_dir=tmp_path,
                 progress=False)


def test_unclosed_answer_is_a_format_failure_not_a_crash():
    from posttrain.evaluation.generation import Completion
    from posttrain.evaluation.metrics import summarize
    from posttrain.evaluation.prompts import get_style
    from posttrain.evaluation import EvalConfig
    from posttrain.evaluation.runner import _score
    from posttrain.evaluation.benchmarks import Problem
    from posttrain.verify import VerifierPool

    p = Problem("p1", "What is 40 + 2?", "42")
    cases = [
        ("reasoning", "40 + 2 = 42<end_working_out><SOLUTION>42", "length"),      # never closed
        ("reasoning", "40 + 2 = 42<end_working_out><SOLUTION>42</SOLUTION>", "stop"),
        ("boxed", "so the answer is \\boxed{42", "length"),                           # truncated box
        ("boxed", "so the answer is \\boxed{42}.", "eos"),
        ("chat", "I think it could be forty-two, or 42 maybe", "eos"),               # no answer a rule reads
        ("boxed", "so the answer is \\boxed{41}.", "eos"),                          # well formed, wrong
    ]
    with VerifierPool(workers=1) as pool:
        rows = []
        for i, (style, text, finish) in enumerate(cases):
            s = EvalConfig(prompt=style)
            row = _score(pool, get_style(style), s, [(p, 0, "prompt", Completion(text, 10, finish))])[0]
            row["id"] = f"case{i}"
            rows.append(row)
    assert [r["format_ok"] for r in rows] == [False, True, False, True, False, True]
    assert [r["verdict"] for r in rows] == [False, True, False, True, False, False]
    assert rows[0]["reason"] == "truncated" and rows[4]["reason"] == "no_answer"
    assert rows[5]["reason"] not in ("truncated", "no_answer") and rows[5]["normalized"] == "41"  # a wrong answer votes
    assert [r["rule"] for r in rows] == ["tags", "tags", "truncated_box", "box", "no_answer", "box"]
    m = summarize(rows)
    assert m["format_rate"] == pytest.approx(3 / 6) and m["truncation_rate"] == pytest.approx(2 / 6)
    with VerifierPool(workers=1) as pool:     # --last-number scores it but it stays a format failure
        row = _score(pool, get_style("chat"), EvalConfig(prompt="chat", last_number=True),
                     [(p, 0, "prompt", Completion("I think it could be forty-two, or 42 maybe", 10, "eos"))])[0]
    assert row["verdict"] is True and row["format_ok"] is False


def test_stop_string_ends_generation(tiny):
    """Seeded sampling (the random model's greedy output is blank lines): the same seed gives the same prefix,
    and a stop string taken from it ends generation right after it."""
    from posttrain.evaluation.generation import generate

    model, tok = tiny
    prompt = tok.apply_chat_template([{"role": "user", "content": "Count to ten."}], tokenize=False,
                                     add_generation_prompt=True)
    kw = {"max_new_tokens": 12, "temperature": 1.0, "seed": 0}
    free = generate(model, tok, [prompt], **kw)[0]
    assert free.finish == "length" and free.n_tokens == 12
    head = free.text[: len(free.text) // 2]
    stop = next(head[i:i + 2] for i in range(len(head) - 1) if not head[i:i + 2].isspace())
    cut = generate(model, tok, [prompt], stop=[stop], **kw)[0]
    assert cut.finish == "stop" and cut.text == free.text[: free.text.find(stop) + len(stop)]
    assert cut.n_tokens < 12


def test_prompt_styles(tiny):
    from posttrain.evaluation.prompts import build_prompt, get_style
    from posttrain.tiny import qwen_tokenizer

    _, tok = tiny
    r = build_prompt(tok, "What is 2 + 2?", get_style("reasoning"))
    assert r.startswith("You are given a problem.") and r.endswith("What is 2 + 2?<start_working_out>")
    base = qwen_tokenizer(base=True)
    with pytest.raises(UserError, match="--template"):
        build_prompt(base, "What is 2 + 2?", get_style("boxed"))
    c = build_prompt(base, "What is 2 + 2?", get_style("chat"), template="chatml")
    assert c == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


def test_cli_compares_models_in_one_table(tiny_dir, tmp_path, capsys):
    from posttrain.cli import main

    rc = main(["eval", "--model", str(tiny_dir), "--model", str(tiny_dir), "--label", "a", "--label", "b",
               "--benchmark", "synthetic", "--limit", "2", "--max-new-tokens", "4", "--out", str(tmp_path),
               "--no-progress"])
    assert rc == 0
    table = (tmp_path / "comparison.md").read_text()
    assert "| a | synthetic | 2 |" in table and "| b | synthetic | 2 |" in table
    for label in ("a", "b"):
        assert json.loads((tmp_path / label / "synthetic" / "metrics.json").read_text())["n"] == 2
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text(json.dumps({"question": "1+1?"}) + "\n")
    rc = main(["eval", "--model", str(tiny_dir), "--benchmark", str(bad), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing field 'answer'" in err and str(bad) in err


def test_adapter_is_merged_and_its_tokenizer_used(tiny, tiny_dir, tmp_path):
    import torch

    from posttrain.commands.eval_cmd import _pairs
    from posttrain.config import LoraConfig, ModelConfig
    from posttrain.models import load_model
    from posttrain.runs import load_merged

    model, tok = load_model(ModelConfig(name=str(tiny_dir)), LoraConfig(r=4, target_modules=["q_proj"]),
                            verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)                                    # a trained-looking adapter
    run = tmp_path / "run"
    model.save_pretrained(run / "adapter")
    tok.chat_template = "{{ 'ADAPTER TEMPLATE' }}"
    tok.save_pretrained(run / "adapter")

    base, _ = tiny
    merged, mtok = load_merged(str(tiny_dir), str(run))          # a run directory holding adapter/
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base.state_dict()[q], merged.state_dict()[q])
    assert "lora" not in " ".join(merged.state_dict())             # merged, plain weights
    assert mtok.chat_template == "{{ 'ADAPTER TEMPLATE' }}"
    with pytest.raises(UserError, match="adapter_config.json"):
        load_merged(str(tiny_dir), str(tmp_path))

    args = type("A", (), {"model": ["m"], "adapter": ["a1", "none"]})()
    assert _pairs(args) == [("m", "a1"), ("m", None)]
    args.model = ["m1", "m2", "m3"]
    with pytest.raises(UserError, match="one adapter per model"):
        _pairs(args)
