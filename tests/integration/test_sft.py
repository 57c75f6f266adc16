"""SFT end to end on a tiny random Qwen3 (real Qwen vocabulary): equivalences, resume, what trains."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import load_recipe
from posttrain.errors import UserError
from posttrain.sft import train
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[2]


def chats(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        out.append({"messages": [
            {"role": "user", "content": f"What is {a} plus {b}?" + " Please answer." * (i % 3)},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}." + " Indeed." * (i % 4)},
            {"role": "user", "content": "Times two?"},
            {"role": "assistant", "content": f"{2 * (a + b)}."}]})
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chats(24))


def overrides_for(model, data, out, *overrides) -> list[str]:
    """A tiny SFT recipe, in float32 (the equalities these tests check, micro-batches against one batch, resumed
    against uninterrupted, hold exactly there; bf16 compute has its own test)."""
    return [f"model.name={model}", f"data.path={data}", f"output_dir={out}", "data.template=chatml",
            "data.max_length=128", "lora.r=4", "lora.alpha=8", "train.lr=5e-3", "train.warmup_steps=1",
            "train.max_grad_norm=null", "train.log_every=1", "train.compute_dtype=float32", *overrides]


def recipe(model, data, out, *overrides):
    return load_recipe(None, overrides_for(model, data, out, *overrides))


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def test_grad_accumulation_equals_one_big_batch(tiny_qwen3, data_file, tmp_path):
    runs = {}
    for bs, ga in [(4, 1), (2, 2), (1, 4)]:
        out = tmp_path / f"b{bs}a{ga}"
        train(recipe(tiny_qwen3, data_file, out, f"train.batch_size={bs}", f"train.grad_accum={ga}",
                     "train.max_steps=3"))
        runs[(bs, ga)] = adapter(out)
        losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
        runs[(bs, ga, "loss")] = losses
    assert_same(runs[(4, 1)], runs[(2, 2)], 1e-6)
    assert_same(runs[(4, 1)], runs[(1, 4)], 1e-6)
    assert runs[(4, 1, "loss")] == pytest.approx(runs[(1, 4, "loss")], rel=1e-5)
    # and training moved the adapter (lora_B starts at zero)
    assert any(v.abs().max() > 0 for k, v in runs[(4, 1)].items() if "lora_B" in k)


def test_packing_gives_the_same_loss_as_padding(tiny_qwen3, data_file, tmp_path):
    """Packed rows with restarting position ids attend within each example only: same first-step loss."""
    from transformers import AutoTokenizer

    from posttrain.data.tokenize import prepare_sft_data
    from posttrain.sft import pack_examples

    cfg = recipe(tiny_qwen3, data_file, tmp_path / "x")
    examples, _, _ = prepare_sft_data(cfg.data, AutoTokenizer.from_pretrained(tiny_qwen3))
    rows = len(pack_examples(examples, 128))
    assert rows < len(examples)
    losses = {}
    for packing, batch in ((False, len(examples)), (True, rows)):
        out = tmp_path / f"p{packing}"
        # one step over all 24 examples, so both see the same set of tokens
        train(recipe(tiny_qwen3, data_file, out, f"train.packing={packing}", f"train.batch_size={batch}",
                     "train.max_steps=1", "data.max_length=128"))
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        losses[packing] = row
    assert losses[True]["loss"] == pytest.approx(losses[False]["loss"], rel=1e-4)
    assert losses[True]["target_tokens"] == losses[False]["target_tokens"]


def test_lora_changes_only_adapter_parameters(tiny_qwen3, data_file, tmp_path):
    from posttrain.models import load_model

    cfg = recipe(tiny_qwen3, data_file, tmp_path / "run", "train.max_steps=2", "train.batch_size=4")
    before, _ = load_model(cfg.model, None, for_training=False, verbose=False)
    base_before = {k: v.clone() for k, v in before.state_dict().items()}
    train(cfg)
    from peft import PeftModel

    after = PeftModel.from_pretrained(before, str(tmp_path / "run" / "adapter"))
    base_after = after.get_base_model().state_dict()
    for k, v in base_before.items():
        key = k.replace(".weight", ".base_layer.weight") if k.replace(".weight", ".base_layer.weight") in base_after else k
        assert torch.equal(v, base_after[key]), k
    assert all(json.loads(l)["grad_norm"] > 0 for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())


def test_qlora_4bit_trains_only_the_adapter(tiny_qwen3, data_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    from posttrain.models import load_model

    cfg = recipe(tiny_qwen3, data_file, tmp_path / "q", "model.load_in_4bit=true", "train.max_steps=2",
                 "train.batch_size=4")
    model, _ = load_model(cfg.model, cfg.lora, verbose=False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any(p.__class__.__name__ == "Params4bit" for p in model.parameters())

    train(cfg)
    saved = adapter(tmp_path / "q")
    assert saved and all("lora_" in k for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    # the 4-bit base is frozen: reload and compare its packed weights
    model2, _ = load_model(cfg.model, cfg.lora, verbose=False)
    for n, p in model2.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_full_finetuning_writes_model_dir(tiny_qwen3, data_file, tmp_path):
    out = tmp_path / "full"
    train(recipe(tiny_qwen3, data_file, out, "lora=null", "train.max_steps=1", "train.lr=1e-3"))
    assert (out / "model" / "model.safetensors").is_file() and not (out / "adapter").exists()
    assert (out / "model" / "chat_template.jinja").is_file() or "chat_template" in (out / "model" / "tokenizer_config.json").read_text()


def run_cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "posttrain.cli", "sft", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_interrupted_run_resumes_bit_for_bit(tiny_qwen3, data_file, tmp_path):
    common = [f"model.name={tiny_qwen3}", f"data.path={data_file}", "data.template=chatml", "lora.r=4",
              "train.batch_size=2", "train.max_steps=12", "train.lr=5e-3", "lora.dropout=0.1", "train.save_every=100"]
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model: {name: x}\ndata: {path: x}\n")
    ref = run_cli([str(recipe_file), *common, f"output_dir={tmp_path / 'ref'}"])
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    proc = run_cli([str(recipe_file), *common, f"output_dir={tmp_path / 'cut'}"])
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2 and "checkpoint saved. Continue with --resume" in out, out
    ckpts = list((tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and 3 <= int(ckpts[0].name.split("-")[1]) < 12
    assert not (tmp_path / "cut" / "adapter").exists()
    resumed = run_cli([str(recipe_file), *common, f"output_dir={tmp_path / 'cut'}", "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    a, b = adapter(tmp_path / "ref"), adapter(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_bad_inputs_are_clear_errors(tiny_qwen3, data_file, tmp_path):
    with pytest.raises(UserError, match="flash_attention_2 is CUDA-only"):
        train(recipe(tiny_qwen3, data_file, tmp_path / "a", "model.attn_implementation=flash_attention_2"))
    with pytest.raises(UserError, match="float16 needs a CUDA device"):
        train(recipe(tiny_qwen3, data_file, tmp_path / "b", "model.dtype=float16"))
    with pytest.raises(UserError, match=r"(loss is|the gradient norm is) (nan|inf) at step \d: training diverged .*"
                                        "Lower train.lr"):
        train(recipe(tiny_qwen3, data_file, tmp_path / "c", "train.lr=1e30", "train.max_steps=6",
                     "train.save_every=1", "lora=null", "train.warmup_steps=0"))
    # checkpoints written before the divergence are complete; none for the NaN step
    for ck in (tmp_path / "c" / "checkpoints").glob("*"):
        assert ck.name.startswith("step-") and (ck / "state.json").is_file()
    with pytest.raises(UserError, match="already holds checkpoints: pass --resume"):
        train(recipe(tiny_qwen3, data_file, tmp_path / "c", "train.max_steps=1"))
    with pytest.raises(UserError, match="cannot fill one step of 64"):
        train(recipe(tiny_qwen3, data_file, tmp_path / "d", "train.batch_size=64"))


def test_4bit_without_bitsandbytes_names_the_fix(tiny_qwen3, data_file, tmp_path):
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "from posttrain.cli import main\n"
            f"sys.exit(main(['sft', 'tiny/sft', 'model.name={tiny_qwen3}', "
            f"'model.load_in_4bit=true', 'output_dir={tmp_path / 'x'}']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2
    assert "needs bitsandbytes: pip install 'posttrain[gpu]'" in res.stderr and "Traceback" not in res.stderr


def test_two_processes_equal_one_with_the_same_global_batch(tiny_qwen3, data_file, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo DDP), 2 x 2 per process, vs 1 process with 2 x 4."""
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model: {name: x}\ndata: {path: x}\n")
    args = ["train.batch_size=2", "train.max_steps=3", "train.max_grad_norm=0.5"]
    # accelerate's --cpu launcher runs one process; --multi_gpu starts torchrun, and on a machine without
    # CUDA the processes join a gloo process group on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "posttrain.cli", "sft", str(recipe_file),
           *overrides_for(tiny_qwen3, data_file, tmp_path / "ddp", *args, "train.grad_accum=2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    train(recipe(tiny_qwen3, data_file, tmp_path / "one", *args, "train.grad_accum=4"))
    rows = {k: [json.loads(l) for l in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in ("ddp", "one")}
    for key in ("loss", "grad_norm", "target_tokens"):
        assert [r[key] for r in rows["ddp"]] == pytest.approx([r[key] for r in rows["one"]], rel=1e-4), key
    # Weights agree to well within one Adam step (lr 5e-3): Adam divides by sqrt(v), so gradients that are
    # zero up to float rounding (summed in a different order by the all-reduce) may move by up to ~lr.
    a, b = adapter(tmp_path / "ddp"), adapter(tmp_path / "one")
    assert_same(a, b, 5e-3)
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diffs < 1e-6).float().mean() > 0.9


def test_local_dataset_folder_goes_through_the_hub_loader_and_tensorboard_logs(tiny_qwen3, tmp_path):
    """A dataset directory is loaded by datasets.load_dataset, the same code path as a hub id."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", chats(8))
    cfg = recipe(tiny_qwen3, folder, tmp_path / "run", "train.max_steps=2", "train.batch_size=2",
                 "train.report_to=[tensorboard]")
    from posttrain.data.loading import resolve_source

    assert resolve_source(cfg.data) == "hub"
    train(cfg)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]


def test_init_adapter_continues_a_saved_adapter(tiny_qwen3, data_file, tmp_path):
    """SFT can start from an earlier run's adapter (init_adapter): with lr 0 the saved weights come out unchanged,
    with lr > 0 they train on; a shape mismatch or a directory without an adapter is a clear error."""
    first = train(recipe(tiny_qwen3, data_file, tmp_path / "a", "train.max_steps=1", "train.scheduler=constant",
                         "train.warmup_steps=0"))
    start = adapter(tmp_path / "a")
    train(recipe(tiny_qwen3, data_file, tmp_path / "b", f"init_adapter={first}", "train.max_steps=1",
                 "train.scheduler=constant", "train.warmup_steps=1"))  # the first warmup step: lr 0
    assert_same(adapter(tmp_path / "b"), start, atol=0)                 # lr 0: the saved adapter, unchanged
    train(recipe(tiny_qwen3, data_file, tmp_path / "c", f"init_adapter={first}", "train.max_steps=1",
                 "train.scheduler=constant", "train.warmup_steps=0"))
    moved = adapter(tmp_path / "c")
    assert any(not torch.equal(moved[k], start[k]) for k in start)     # and it trains
    with pytest.raises(UserError, match="r=4.*r=8"):
        train(recipe(tiny_qwen3, data_file, tmp_path / "d", f"init_adapter={first}", "lora.r=8"))
    with pytest.raises(UserError, match="no adapter_config.json"):
        train(recipe(tiny_qwen3, data_file, tmp_path / "e", f"init_adapter={tmp_path}"))


def test_bf16_compute_is_close_to_float32_and_auto_follows_the_cpu(tiny_qwen3, data_file, tmp_path):
    """train.compute_dtype: auto is bfloat16 on a CPU with native bf16 (GRPO's rule) and float32 elsewhere,
    bit-identical to the one it picks; bfloat16 autocasts the decoder layers only, so the loss stays within bf16
    rounding of float32's and the trained adapter stays float32."""
    from posttrain.models import cpu_has_native_bf16

    runs = {}
    for name in ("float32", "auto", "bfloat16"):
        train(recipe(tiny_qwen3, data_file, tmp_path / name, "train.max_steps=2", f"train.compute_dtype={name}"))
        runs[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert runs["auto"] == runs["bfloat16" if cpu_has_native_bf16() else "float32"]
    assert runs["bfloat16"] != runs["float32"]
    for a, b in zip(runs["bfloat16"], runs["float32"]):
        assert abs(a / b - 1) < 0.02, (runs["bfloat16"], runs["float32"])
    assert all(v.dtype == torch.float32 for v in adapter(tmp_path / "bfloat16").values())
