"""SFT end to end on tiny models: smoke runs per architecture, LoRA/full, merge, resume, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, ROOT, SAMPLES
from safetensors.torch import load_file

from rlhflab.cli.main import main
from rlhflab.runs import read_metrics

DATA = SAMPLES / "sft_messages.jsonl"


def sft(model: Path, out: Path, *extra) -> dict:
    code = main(["sft", "--model", str(model), "--data", str(DATA), "--out", str(out), "--lr", "3e-3",
                 "--log-every", "1", "--progress", "false", "--eval-fraction", "0", *map(str, extra)])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(out / "metrics.jsonl") if "loss" in row]


@pytest.mark.parametrize("arch", ARCHS)
def test_full_sft_changes_every_weight_and_lowers_loss(arch, tiny_model, tmp_path):
    model_dir = tiny_model(arch)
    summary = sft(model_dir, tmp_path / "out", "--max-steps", 15)
    before, after = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    unchanged = [k for k in after if k in before and torch.equal(before[k], after[k])]
    assert not unchanged, f"{arch}: parameters that did not change: {unchanged}"
    curve = losses(tmp_path / "out")
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.1, curve
    assert summary["tokens_per_s"] > 0 and summary["rows_used"] == 40 and summary["peak_rss_mib"] > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_sft_writes_an_adapter_that_peft_loads(arch, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    sft(tiny_model(arch), out, "--max-steps", 15, "--lora", "--lora-r", 4, "--lr", "1e-2")
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    curve = losses(out)
    assert curve[-1] < curve[0]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model(arch)))
    peft_model = PeftModel.from_pretrained(base, str(out))
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA B matrices still zero: nothing trained"


def test_hc3_lora_then_merge_gives_a_plain_model_that_generates(tiny_model, tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, merged = tmp_path / "sft", tmp_path / "merged"
    result = cli("sft", "--model", tiny_model("qwen2"), "--data", SAMPLES / "hc3_zh.jsonl", "--lora",
                 "--max-steps", 5, "--out", out, "--progress", "false")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["rows_used"] == 20
    result = cli("merge", "--adapter", out, "--out", merged)
    assert result.returncode == 0, result.stderr
    assert not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(merged))
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    ids = tokenizer("法国的首都", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5 or generated.shape[1] > ids["input_ids"].shape[1]


@pytest.mark.parametrize("lora", [False, True])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(lora, tiny_model, tmp_path):
    extra = ["--max-steps", 10, "--lora-dropout", 0.1, "--lora" if lora else "--no-lora"]
    sft(tiny_model("llama"), tmp_path / "a", *extra)
    sft(tiny_model("llama"), tmp_path / "b", *extra, "--save-every", 4)
    full = losses(tmp_path / "b")
    ckpt = tmp_path / "b" / "checkpoints" / "step-8"
    assert ckpt.exists()
    sft(tiny_model("llama"), tmp_path / "b", *extra, "--resume", ckpt)
    assert losses(tmp_path / "a") == full == losses(tmp_path / "b")
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11)), "resumed log must read like one run"


def test_grad_accumulation_matches_one_big_batch(tiny_model, tmp_path):
    common = ["--max-steps", 3, "--group-by-length", "false", "--max-grad-norm", 0]
    sft(tiny_model("llama"), tmp_path / "big", *common, "--batch-size", 8, "--grad-accum", 1)
    sft(tiny_model("llama"), tmp_path / "acc", *common, "--batch-size", 2, "--grad-accum", 4)
    big, acc = load_file(tmp_path / "big" / "model.safetensors"), load_file(tmp_path / "acc" / "model.safetensors")
    for key in big:
        torch.testing.assert_close(big[key], acc[key], atol=2e-5, rtol=1e-4)
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "acc"), rel=1e-5)


def test_killed_mid_training_keeps_a_usable_checkpoint_and_resumes(tiny_model, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "rlhflab.cli.main", "sft", "--model", str(tiny_model("llama")), "--data", str(DATA),
            "--out", str(out), "--max-steps", 100000, "--save-every", 5, "--progress", "false", "--lr", "1e-3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([str(a) for a in args], env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "checkpoints").glob("step-*"))) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "no checkpoint was written before the kill"
    assert not (out / "summary.json").exists()
    last = checkpoints[-1]
    assert (last / "trainer_state.json").exists() and (last / "model.safetensors").exists()
    step = json.loads((last / "trainer_state.json").read_text())["step"]
    code = main(["sft", "--model", str(tiny_model("llama")), "--data", str(DATA), "--out", str(out),
                 "--max-steps", str(step + 3), "--resume", "auto", "--progress", "false", "--lr", "1e-3"])
    assert code == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == step + 3


def test_non_finite_loss_stops_with_the_step_named(tiny_model, tmp_path, cli):
    result = cli("sft", "--model", tiny_model("llama"), "--data", DATA, "--out", tmp_path / "nan",
                 "--lr", "1e30", "--max-steps", 50, "--max-grad-norm", 0, "--progress", "false")
    assert result.returncode == 3, result.stderr
    assert "at step" in result.stderr and "not finite" not in result.stdout
    assert not (tmp_path / "nan" / "summary.json").exists()


def test_gradient_checkpointing_saves_fewer_activations_and_keeps_the_gradients(tiny_model):
    """--gradient-checkpointing keeps a fraction of the activations for backward; the gradients match."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhflab.models.loading import enable_gradient_checkpointing
    from rlhflab.train.sft import nll_sum

    torch.manual_seed(0)
    ids = torch.randint(5, 500, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def grads_and_saved_numel(checkpointed: bool):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model("llama"))).train()
        if checkpointed:
            assert enable_gradient_checkpointing(torch.nn.ModuleList([model])) == 1
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss, _ = nll_sum(model, batch)
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, sum(saved)

    plain, plain_saved = grads_and_saved_numel(False)
    checkpointed, checkpointed_saved = grads_and_saved_numel(True)
    assert checkpointed_saved < plain_saved / 2
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "opt", "bloom", "gpt_neox", "llama"])
def test_gradient_checkpointing_also_applies_in_eval_mode_and_leaves_generation_alone(tiny_model, arch):
    """RL keeps the policy in eval mode (no dropout): its gradient passes still recompute, with the
    same gradients, while no-grad passes and cached generation run exactly as without it."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhflab.models.loading import enable_gradient_checkpointing

    torch.manual_seed(0)
    ids = torch.randint(5, 500, (2, 12))

    def run(checkpointed: bool):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model(arch))).eval()
        if checkpointed:
            assert enable_gradient_checkpointing(model) == 1
        saved, calls = [], []
        for sub in model.modules():   # a recomputed layer calls its submodules again during backward
            if isinstance(sub, (torch.nn.Linear, torch.nn.LayerNorm)) or "Norm" in type(sub).__name__:
                sub.register_forward_hook(lambda *_: calls.append(1))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
        with torch.no_grad():
            generated = model.generate(ids[:, :4], max_new_tokens=6, do_sample=False, use_cache=True)
        assert not model.training
        return {n: p.grad for n, p in model.named_parameters()}, sum(saved), len(calls), generated

    plain, plain_saved, plain_calls, plain_generated = run(False)
    checkpointed, checkpointed_saved, checkpointed_calls, checkpointed_generated = run(True)
    assert checkpointed_calls > plain_calls and checkpointed_saved < plain_saved
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
    assert torch.equal(checkpointed_generated, plain_generated)


def test_gradient_checkpointing_leaves_frozen_models_alone(tiny_model):
    from transformers import AutoModelForCausalLM

    from rlhflab.models.loading import enable_gradient_checkpointing

    frozen = AutoModelForCausalLM.from_pretrained(str(tiny_model("gpt2"))).requires_grad_(False)
    assert enable_gradient_checkpointing(frozen) == 0 and not frozen.is_activation_checkpointing


def test_resuming_on_another_plan_warns(tiny_model, tmp_path, capsys):
    from rlhflab.cli.main import main

    args = ["sft", "--model", str(tiny_model("llama")), "--data", str(SAMPLES / "sft_messages.jsonl"),
            "--out", str(tmp_path / "sft"), "--save-every", "2", "--progress", "false", "--batch-size", "2"]
    assert main([*args, "--max-steps", "3"]) == 0
    (tmp_path / "sft" / "summary.json").unlink()
    capsys.readouterr()
    assert main([*args, "--max-steps", "6", "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "planned as {'max_steps': 3" in err and "'max_steps': 6" in err


def test_outputs_are_readable_as_the_umask_allows(tiny_model, tmp_path):
    """Weights and summaries written through temporary files (mkstemp: 0600) get open()'s mode."""
    from rlhflab.cli.main import main

    old = os.umask(0o022)
    try:
        assert main(["sft", "--model", str(tiny_model("llama")), "--data", str(SAMPLES / "sft_messages.jsonl"),
                     "--out", str(tmp_path / "sft"), "--max-steps", "2", "--save-every", "1",
                     "--progress", "false"]) == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
             for p in (tmp_path / "sft").rglob("*") if p.is_file()}
    assert "sft/model.safetensors" in modes and "sft/summary.json" in modes
    assert {name: oct(m) for name, m in modes.items() if m != 0o644} == {}


def test_checkpoints_are_readable_before_the_run_finishes(tmp_path):
    """A run that crashes after a checkpoint leaves that checkpoint as its output: it gets open()'s
    mode when written, not only when the run finishes."""
    import tempfile

    from rlhflab import runs

    def write(directory):
        handle, name = tempfile.mkstemp(dir=directory)   # 0600, as safetensors' writer leaves weights
        os.close(handle)
        os.replace(name, Path(directory) / "model.safetensors")

    old = os.umask(0o022)
    try:
        final = runs.save_checkpoint(tmp_path, 3, write, {}, keep=2)
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in final.iterdir()} == {
        "model.safetensors": "0o644", "trainer_state.json": "0o644"}
    assert oct(final.stat().st_mode & 0o777) == "0o755"
