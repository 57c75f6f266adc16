"""posttrain.runs on a tiny real Qwen3: what a user may name (run dir with adapter/ or model/, adapter dir, merged
model dir) resolves to the right base, adapter and tokenizer, and loads to the same weights; folders that are none
of them are errors that say what was expected; the final save and the graceful stop behave."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import yaml

from posttrain import runs
from posttrain.config import LoraConfig, ModelConfig
from posttrain.errors import UserError
from posttrain.models import load_model

TEMPLATE = "{{ 'TRAINED TEMPLATE' }}"


@pytest.fixture(scope="module")
def trained(tiny_qwen3, tmp_path_factory):
    """A LoRA run as sft/grpo leave it (config.yaml + adapter/ via save_final) and a full fine-tune run (model/)."""
    root = tmp_path_factory.mktemp("runs")
    model, tok = load_model(ModelConfig(name=str(tiny_qwen3)), LoraConfig(r=4, target_modules=["q_proj"]),
                            verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter
    tok.chat_template = TEMPLATE
    lora_run = root / "lora"
    lora_run.mkdir()
    cfg = {"model": {"name": str(tiny_qwen3), "dtype": "float32"}, "lora": {"r": 4, "target_modules": ["q_proj"]}}
    (lora_run / runs.CONFIG).write_text(yaml.safe_dump(cfg))
    adapter = runs.save_final(model, tok, lora_run, is_peft=True)

    full, ftok = load_model(ModelConfig(name=str(tiny_qwen3)), None, for_training=False, verbose=False)
    full_run = root / "full"
    full_run.mkdir()
    (full_run / runs.CONFIG).write_text(yaml.safe_dump({"model": {"name": str(tiny_qwen3)}}))
    runs.save_final(full, ftok, full_run, is_peft=False)
    return {"base": tiny_qwen3, "lora_run": lora_run, "adapter": adapter, "full_run": full_run}


def test_save_final_writes_one_complete_folder(trained):
    run = trained["lora_run"]
    assert trained["adapter"] == run / "adapter" and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / ".tmp-adapter").exists() and not (run / "model").exists()
    assert runs.final_output(run) == ("adapter", run / "adapter")
    assert runs.final_output(trained["full_run"]) == ("model", trained["full_run"] / "model")


def test_run_dir_adapter_dir_and_model_dir_resolve_to_what_they_hold(trained, tmp_path):
    base, run, adapter = str(trained["base"]), trained["lora_run"], trained["adapter"]
    src = runs.resolve(str(run))  # a run directory: the base comes from its config.yaml
    assert src.adapter_dir == adapter and src.model.name == base and src.model.dtype == "float32"
    assert src.lora.r == 4 and src.tokenizer_dir == str(adapter) and "config.yaml" in src.base_from
    assert runs.resolve(str(adapter)).model.name == base  # an adapter inside a run: the run's config.yaml too

    loose = tmp_path / "loose"  # an adapter outside a run: adapter_config.json names the base
    loose.mkdir()
    for f in adapter.iterdir():
        (loose / f.name).write_bytes(f.read_bytes())
    src = runs.resolve(str(loose))
    assert src.model.name == base and "base_model_name_or_path" in src.base_from and src.lora is None
    assert runs.resolve(str(loose), base="other/base").model.name == "other/base"  # --base wins

    src = runs.resolve(str(trained["full_run"]))  # a full fine-tune's run: its model/ is the model
    assert src.adapter_dir is None and src.model.name == str(trained["full_run"] / "model")
    src = runs.resolve(str(trained["full_run"] / "model"))  # a merged / model directory
    assert src.adapter_dir is None and src.model.name == str(trained["full_run"] / "model")
    assert runs.resolve("org/some-model").model.name == "org/some-model"  # a hub id is passed through


def test_folders_that_are_nothing_loadable_say_what_was_expected(trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"neither a run directory \(config.yaml \+ adapter/ or model/\), an adapter "
                                        r"directory \(adapter_config.json\) nor a model directory \(config.json\)"):
        runs.resolve(str(empty))
    unfinished = tmp_path / "unfinished"  # config.yaml written, training killed before the final save
    (unfinished / "checkpoints" / "step-2").mkdir(parents=True)
    (unfinished / "config.yaml").write_text(yaml.safe_dump({"model": {"name": str(trained["base"])}}))
    (unfinished / "adapter").mkdir()  # an empty folder is not a saved adapter
    with pytest.raises(UserError, match="neither adapter/ nor model/: training did not finish; finish it with "
                                        r"posttrain sft\|grpo RECIPE --resume"):
        runs.resolve(str(unfinished))
    with pytest.raises(UserError, match="training did not finish; delete it and rerun"):
        runs.trained_output(unfinished, "delete it and rerun")
    with pytest.raises(UserError, match=r"--adapter .*empty: no adapter_config.json there or in .*empty/adapter"):
        runs.find_adapter(str(empty))
    (unfinished / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match=r"unfinished/config.yaml is not valid YAML"):
        runs.read_run_config(unfinished)
    (unfinished / "config.yaml").write_text("train: {lr: 1.0e-4}\n")
    with pytest.raises(UserError, match=r"config.yaml has no model: section; is .*unfinished a posttrain run"):
        runs.read_run_config(unfinished)
    (unfinished / "config.yaml").write_text("model: {name: m, load_in_4bit: maybe}\n")
    with pytest.raises(UserError, match=r"config.yaml: invalid model:/lora: section"):
        runs.read_run_config(unfinished)


def test_every_way_of_naming_the_adapter_loads_the_same_model(trained):
    run, adapter, base = trained["lora_run"], trained["adapter"], str(trained["base"])
    peft_model, tok = runs.load(runs.resolve(str(run)), verbose=False)
    assert tok.chat_template == TEMPLATE  # the tokenizer saved with the adapter, not the base one
    ids = torch.tensor([tok("2 + 3 = 5, and 7 * 6 = 42.")["input_ids"]])
    with torch.no_grad():
        ref = peft_model(ids).logits
    bare, _ = load_model(ModelConfig(name=base), None, for_training=False, verbose=False)
    with torch.no_grad():
        assert not torch.allclose(bare(ids).logits, ref, atol=1e-3)  # the adapter changes the model
    for model_name, adapter_arg in ((base, str(run)), (base, str(adapter))):  # eval: run dir or adapter dir
        merged, mtok = runs.load_merged(model_name, adapter_arg)
        assert mtok.chat_template == TEMPLATE and "lora" not in " ".join(merged.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, ref, atol=1e-4, rtol=1e-4)
    for adapter_arg in (str(adapter), str(run)):  # chat/generate MODEL --adapter A, A an adapter or a run dir
        on_base, _ = runs.load(runs.resolve(base, adapter=adapter_arg), verbose=False)
        with torch.no_grad():
            torch.testing.assert_close(on_base(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_graceful_stop_finishes_the_step_then_a_second_signal_aborts():
    before = signal.getsignal(signal.SIGINT)
    stop = runs.GracefulStop()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested  # the first Ctrl-C only asks
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before
