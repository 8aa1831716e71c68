"""Nothing lost, nothing silent: --out never replaces an input, one writer per directory, every
numeric option checked against its range, a non-finite gradient never reaches the weights or a
checkpoint, reruns over checkpoints choose explicitly, and a resumed PPO run sums up like an
uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLES

from rlhflab import config as cfg
from rlhflab.cli.main import COMMANDS, _load, main
from rlhflab.errors import NonFiniteError
from rlhflab.runs import LOCK_NAME

DATA = SAMPLES / "sft_messages.jsonl"
PAIRS = SAMPLES / "pairs.jsonl"
PROMPTS = SAMPLES / "prompts.jsonl"


def digest(path: Path) -> str:
    """One hash of a file or of every file under a directory (names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def inputs(tiny_model, tmp_path):
    """A model and data files of our own, so that the refusals can be checked to leave them as they were."""
    models = tmp_path / "models"
    model = models / "m"
    shutil.copytree(tiny_model("llama"), model)
    data = tmp_path / "data"
    data.mkdir()
    for name in ("sft_messages.jsonl", "pairs.jsonl", "prompts.jsonl", "rankings.jsonl"):
        shutil.copy(SAMPLES / name, data / name)
    return model, data


def refused(capsys, argv, *expected) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


# ---------------------------------------------------------------------------------------------
# 1. --out never overwrites an input.


@pytest.mark.parametrize("where", ["model", "inside-model", "above-model", "above-data", "file", "unrelated"])
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo-policy", "ppo-reward"])
def test_a_training_stage_never_writes_over_its_inputs(stage, where, inputs, tmp_path, capsys):
    model, data = inputs
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    out = {"model": model, "inside-model": model / "sub", "above-model": model.parent, "above-data": data,
           "file": tmp_path / "notes.txt", "unrelated": tmp_path / "busy"}[where]
    argv = {"sft": ["sft", "--model", model, "--data", data / "sft_messages.jsonl"],
            "rm": ["rm", "--model", model, "--data", data / "pairs.jsonl"],
            "dpo": ["dpo", "--policy", model, "--data", data / "pairs.jsonl"],
            "ppo-policy": ["ppo", "--policy", model, "--reward", tmp_path / "nowhere", "--prompts",
                           data / "prompts.jsonl"],
            "ppo-reward": ["ppo", "--policy", tmp_path / "nowhere", "--reward", model,
                           "--prompts", data / "prompts.jsonl"]}[stage]
    before = {p: digest(p) for p in (model, data, tmp_path / "notes.txt", tmp_path / "busy")}
    refused(capsys, [*argv, "--out", out, "--max-steps", 1], f"--out {out}")
    assert {p: digest(p) for p in before} == before
    assert not (model / "sub").exists()


def test_an_adapter_base_is_an_input_too(inputs, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model, data = inputs
    adapter = tmp_path / "adapter"
    lm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model)), LoraConfig(r=2, target_modules=["q_proj"]))
    lm.save_pretrained(str(adapter))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(model)}))
    before = digest(model)
    refused(capsys, ["sft", "--model", adapter, "--lora", "--data", data / "sft_messages.jsonl", "--out", model],
            "the base model of --model")
    assert digest(model) == before


@pytest.mark.parametrize("command", ["sample", "rank", "rm score", "judge", "eval"])
def test_file_outputs_never_replace_their_input_nor_go_into_a_model(command, inputs, tmp_path, capsys):
    model, data = inputs
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "response": "hello"}) + "\n")
    argv, target = {
        "sample": (["sample", "--model", model, "--prompts", data / "prompts.jsonl"], data / "prompts.jsonl"),
        "rank": (["rank", "--data", data / "rankings.jsonl"], data / "rankings.jsonl"),
        "rm score": (["rm", "score", "--model", model, "--data", data / "pairs.jsonl"], data / "pairs.jsonl"),
        "judge": (["judge", "--responses", responses], responses),
        "eval": (["eval", "--model", model, "--prompts", data / "prompts.jsonl"], model / "figures.json"),
    }[command]
    before = (digest(model), digest(data), digest(responses))
    refused(capsys, [*argv, "--out", target], f"--out {target}")
    assert (digest(model), digest(data), digest(responses)) == before


# ---------------------------------------------------------------------------------------------
# 2. One writer per --out.


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_stale_lock(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sft", "--model", str(tiny_model("llama")), "--data", str(DATA), "--out", str(out),
            "--progress", "false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "rlhflab.cli.main", *args, "--max-steps", "100000"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended before the second could meet it"
        refused(capsys, [*args, "--max-steps", "1"], "another rlhflab process is writing there now")
        assert first.poll() is None, "the refused run must not disturb the first"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / LOCK_NAME).exists()   # the file stays; the kernel dropped the lock with the process
    assert main([*args, "--max-steps", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


# ---------------------------------------------------------------------------------------------
# 7. A rerun over checkpoints chooses: --resume auto, or --resume never.


def test_a_rerun_over_checkpoints_must_choose_to_resume_or_start_again(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sft", "--model", str(tiny_model("llama")), "--data", str(DATA), "--out", str(out),
            "--progress", "false", "--save-every", "1", "--log-every", "1"]
    assert main([*args, "--max-steps", "3"]) == 0
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    refused(capsys, [*args, "--max-steps", "3"], "--resume auto", "--resume never")
    assert (out / "metrics.jsonl").read_text() == metrics, "a refused rerun leaves the run as it was"
    assert main([*args, "--max-steps", "2", "--resume", "never"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"], "the old run's checkpoints go"


# ---------------------------------------------------------------------------------------------
# 5. Every numeric option has a range, and values outside it are refused naming both.


def numeric_fields():
    for command, (path, _, _) in COMMANDS.items():
        cls = _load(path)
        types = cfg._resolved_types(cls)
        for f in cfg.fields_of(cls):
            if cfg._base_type(types[f.name]) in (int, float):
                yield command, cls, f


def test_every_numeric_option_declares_its_range():
    missing = sorted({f"{command} --{f.name}" for command, cls, f in numeric_fields()
                      if cfg.value_range(cls, f.name) is None and not f.metadata.get("choices")})
    assert not missing, f"numeric options without a range in config.RANGES or opt(range=...): {missing}"


def bad_values(valid: cfg.Range, is_int: bool) -> list[str]:
    values = ["nan", "inf", "-inf"] if not is_int else []
    if valid.low != -math.inf:
        values.append(str(valid.low if valid.low_open else (valid.low - 1 if is_int else valid.low - 0.5)))
    if valid.high != math.inf:
        values.append(str(valid.high if valid.high_open else (valid.high + 1 if is_int else valid.high + 0.5)))
    return values


def test_every_numeric_option_outside_its_range_is_refused_naming_it_and_the_range(capsys):
    checked = 0
    for command, cls, f in numeric_fields():
        valid = cfg.value_range(cls, f.name)
        if valid is None:
            continue
        is_int = cfg._base_type(cfg._resolved_types(cls)[f.name]) is int
        flag = "--" + f.name.replace("_", "-")
        for value in bad_values(valid, is_int):
            assert main([*command.split(), flag, value]) == 2, (command, flag, value)
            err = capsys.readouterr().err
            assert f"{flag}: must be" in err and str(valid) in err and "Traceback" not in err, (command, flag, err)
            checked += 1
    assert checked > 150


@pytest.mark.parametrize("argv", [
    ["sft", "--lr", "nan"], ["sft", "--epochs", "inf"], ["sft", "--seed", "-1"], ["sft", "--lora-dropout", "1.5"],
    ["rm", "--margin", "nan"], ["rm", "--harden-weight", "-1"], ["rm", "--harden-kinds", "-2"],
    ["dpo", "--label-smoothing", "-0.5"], ["dpo", "--rpo-alpha", "-1"], ["ppo", "--temperature", "-1"],
    ["ppo", "--top-p", "0"], ["ppo", "--top-p", "1.5"], ["ppo", "--kl-coef", "-1"], ["ppo", "--clip-eps", "-1"],
    ["ppo", "--lam", "2"], ["ppo", "--gamma", "-1"], ["ppo", "--max-nonfinite", "0"],
])
def test_the_reported_numbers_are_refused(argv, capsys):
    refused(capsys, argv, f"{argv[-2]}: must be")


# ---------------------------------------------------------------------------------------------
# 6. A non-finite gradient never reaches the weights or a checkpoint.


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))


def test_a_nan_gradient_is_never_applied_nor_checkpointed(tmp_path):
    from safetensors.torch import load_file

    from rlhflab.config import SFTConfig
    from rlhflab.runs import release_outputs
    from rlhflab.train import skeleton

    config = SFTConfig(out=str(tmp_path / "run"), max_steps=4, save_every=1, log_every=1, progress=False,
                       device="cpu", lr=0.1, keep_checkpoints=5)
    setup = skeleton.prepare_stage(config)
    try:
        metrics = skeleton.start_outputs(setup, config)
        order = skeleton.BatchOrder([1] * 4, 1, 0, False)
        loop = skeleton.Loop(setup, config, Tiny(), 4, order, metrics, unit="tokens", what="the loss")

        def loss(model, batch):
            if loop.step < 2:
                value = (model.weight ** 2).sum()
            else:   # finite value, NaN gradient: d sqrt(x)/dx at 0 is inf, times 0
                value = torch.sqrt((model.weight * 0).sum())
            return value, {"loss": value.item(), "tokens": 1}

        with pytest.raises(NonFiniteError, match="gradient norm is nan at step 3.*last good checkpoint is .*step-2"):
            loop.run(skeleton.StageParts(batch=lambda rows: rows, loss=loss))
        weights = loop.unwrapped().weight.detach().clone()
        assert torch.isfinite(weights).all() and loop.unwrapped().weight.grad is None
        saved = load_file(setup.out / "checkpoints" / "step-2" / "model.safetensors")["weight"]
        assert torch.equal(saved, weights), "the step that failed changed nothing"
        assert sorted(p.name for p in (setup.out / "checkpoints").iterdir()) == ["step-1", "step-2"]

        with torch.no_grad():   # and a model that holds NaN anyway is never written as a checkpoint
            loop.unwrapped().weight[0] = math.nan
        with pytest.raises(NonFiniteError, match="no checkpoint written"):
            skeleton.save_checkpoint(setup, config, 3, order)
        assert not (setup.out / "checkpoints" / "step-3").exists()
    finally:
        release_outputs()


# ---------------------------------------------------------------------------------------------
# 7. PPO's summary after kill -9 and resume equals the uninterrupted run's.


def test_ppo_summary_after_kill_and_resume_equals_the_uninterrupted_one(sft_and_rm, tmp_path):
    sft, rm = sft_and_rm
    args = ["ppo", "--policy", str(sft), "--reward", str(rm), "--prompts", str(PROMPTS), "--max-new-tokens", "6",
            "--rollout-prompts", "4", "--mini-batch", "4", "--ppo-epochs", "1", "--progress", "false",
            "--probe-every", "0", "--max-steps", "10", "--lora", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhflab.cli.main", *args, "--out", str(out), "--save-every", "3",
                             "--keep-checkpoints", "5"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "step-6").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Resume from step 6 (a run that finished before the kill is cut back to that state).
    (out / "summary.json").unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints" / "step-9", ignore_errors=True)
    assert main([*args, "--out", str(out), "--save-every", "3", "--keep-checkpoints", "5", "--resume", "auto"]) == 0
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    cut = json.loads((out / "summary.json").read_text())
    finals = sorted(k for k in whole if k.startswith("final_"))
    assert finals and sorted(k for k in cut if k.startswith("final_")) == finals
    for key in finals:
        assert cut[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
    assert cut["alarms"] == whole["alarms"] and cut["steps"] == whole["steps"] == 10
