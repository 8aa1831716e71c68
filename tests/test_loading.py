"""One model loader (models/loading.py: load_trainable) for every training stage: the same LoRA,
QLoRA and adapter rules in SFT, RM, DPO and the PPO policy; --qlora trains on a 4-bit base (on the
CPU too) or is refused by name; options a stage cannot honour are not offered by it."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from conftest import SAMPLES
from safetensors.torch import load_file

from rlhflab.cli.main import main, parse
from rlhflab.errors import UsageError
from rlhflab.models import loading
from rlhflab.rewards.model import build_reward_model
from rlhflab.runs import read_metrics
from rlhflab.train.dpo import PolicyAndReference
from rlhflab.train.roles import load_roles

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAVE_BNB, reason="--qlora needs the bitsandbytes package")
STAGES = ("sft", "rm", "dpo", "ppo")
CPU = loading.choose_placement("cpu", "fp32")


def stage_args(command: str, model, reward="judge") -> list[str]:
    """The fewest options that make `command` a complete stage, on `model` (PPO: rewarded by `reward`)."""
    source = ["--policy" if command in ("dpo", "ppo") else "--model", str(model)]
    inputs = {"sft": ["--data", SAMPLES / "sft_messages.jsonl"], "rm": ["--data", SAMPLES / "pairs.jsonl"],
              "dpo": ["--data", SAMPLES / "pairs.jsonl"],
              "ppo": ["--reward", reward, "--prompts", SAMPLES / "prompts.jsonl"]}[command]
    return [*source, *map(str, inputs)]


def stage_policy(command: str, model, *extra):
    """The model `command` trains, as its own loading code builds it (PPO: the roles' shared LM)."""
    config = parse(command, [*stage_args(command, model), *map(str, extra)])
    if command == "sft":
        return loading.load_trainable(config, CPU, config.model).model
    if command == "rm":
        return build_reward_model(config, CPU)[0].lm
    if command == "dpo":
        return PolicyAndReference(config, CPU).model
    return load_roles(config, CPU)[0].lm


def adapter_weights(model) -> dict[str, torch.Tensor]:
    """The trainable adapter "default", keyed as peft saves it."""
    return {name.replace(".default", ""): p.detach().clone() for name, p in model.named_parameters()
            if ".default." in name and "lora_" in name}


@pytest.fixture(scope="module")
def sft_adapter(tiny_model, tmp_path_factory):
    """An SFT LoRA adapter of rank 4 on the tiny llama."""
    out = tmp_path_factory.mktemp("loading") / "sft-adapter"
    assert main(["sft", "--model", str(tiny_model("llama")), "--data", str(SAMPLES / "sft_messages.jsonl"),
                 "--out", str(out), "--lora", "--lora-r", "4", "--max-steps", "3", "--lr", "1e-2",
                 "--progress", "false"]) == 0
    return out


@pytest.mark.parametrize("command", STAGES)
def test_lora_target_is_read_one_way_in_every_stage(command, tiny_model):
    torch.manual_seed(0)
    model = stage_policy(command, tiny_model("llama"), "--lora", "--lora-r", 4, "--lora-target", " q_proj, v_proj")
    config = model.peft_config["default"]
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.r == 4
    trained = {n for n, p in model.named_parameters() if p.requires_grad}   # PPO's critic adapter too
    assert trained and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trained), trained


@pytest.mark.parametrize("command", STAGES)
def test_lora_on_an_adapter_trains_that_adapter_on_in_every_stage(command, sft_adapter):
    # --lora-r 8 is not used: the adapter keeps its own rank (4) and weights, on its own base.
    model = stage_policy(command, sft_adapter, "--lora", "--lora-r", 8)
    assert model.peft_config["default"].r == 4
    saved = load_file(sft_adapter / "adapter_model.safetensors")
    loaded = adapter_weights(model)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved), "the adapter's weights were not the ones saved"
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n and "lora_" in n)


def test_sft_trains_on_from_an_adapter_and_records_its_base(sft_adapter, tiny_model, tmp_path):
    out = tmp_path / "sft-again"
    assert main(["sft", "--model", str(sft_adapter), "--data", str(SAMPLES / "sft_messages.jsonl"),
                 "--out", str(out), "--lora", "--max-steps", "3", "--lr", "1e-2", "--progress", "false"]) == 0
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(tiny_model("llama").resolve())
    before, after = load_file(sft_adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_full_fine_tuning_of_an_adapter_merges_it_first(sft_adapter):
    config = parse("sft", stage_args("sft", sft_adapter))
    model = loading.load_trainable(config, CPU, config.model).model
    assert not hasattr(model, "peft_config") and all(p.requires_grad for p in model.parameters())


def test_a_fresh_model_takes_no_adapter_and_not_both_sources(tiny_model, tokenizer_dir):
    fresh = ["--init-config", "tiny", "--tokenizer", str(tokenizer_dir), "--data", str(SAMPLES / "sft_messages.jsonl")]
    config = parse("sft", [*fresh, "--lora"])
    with pytest.raises(UsageError, match="--lora needs a saved base model"):
        loading.load_trainable(config, CPU, config.model, fresh=config.init_config)
    config = parse("sft", [*fresh, "--model", str(tiny_model("llama"))])
    with pytest.raises(UsageError, match="give --model .* or --init-config .*, not both"):
        loading.load_trainable(config, CPU, config.model, fresh=config.init_config)


@pytest.mark.parametrize("command", ["sft", "pretrain", "rm", "dpo", "ppo"])
def test_qlora_without_lora_is_refused_by_name(command, tiny_model):
    with pytest.raises(UsageError, match="--qlora trains a LoRA adapter on a 4-bit base: give --lora"):
        parse(command, ["--qlora", "--model", str(tiny_model("llama"))])


def test_a_bad_lora_target_is_refused_by_name():
    with pytest.raises(UsageError, match="--lora-target 'q_proj,,v_proj': expected all-linear or comma-separated"):
        parse("sft", ["--lora-target", "q_proj,,v_proj"])


@pytest.mark.parametrize("command", ["rm", "dpo", "ppo"])
def test_init_config_is_offered_only_by_stages_that_build_a_fresh_model(command):
    with pytest.raises(UsageError, match="unknown option --init-config"):
        parse(command, ["--init-config", "tiny"])


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "ppo"])
def test_qlora_without_bitsandbytes_is_refused_by_name(command, sft_and_rm, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)   # `import bitsandbytes` now raises ImportError
    sft, rm = sft_and_rm
    out = tmp_path / "out"
    code = main([command, *stage_args(command, sft, rm), "--lora", "--qlora", "--out", str(out),
                 "--max-steps", "1", "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 2 and "--qlora" in err and "bitsandbytes package, which is not installed" in err, err
    assert not out.exists()


@needs_bnb
@pytest.mark.parametrize("command", STAGES)
def test_qlora_holds_the_base_in_4bit_in_every_stage(command, tiny_model):
    from bitsandbytes.nn import Linear4bit

    model = stage_policy(command, tiny_model("llama"), "--lora", "--qlora")
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert quantized and not any(p.requires_grad for m in quantized for p in m.parameters(recurse=False))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]   # PPO's critic adapter too
    assert trained and all("lora_" in n for n in trained) and any(".default." in n for n in trained)


@needs_bnb
@pytest.mark.parametrize("command", ["rm", "dpo", "ppo"])
def test_qlora_trains_an_adapter_on_a_4bit_base(command, sft_and_rm, tmp_path, monkeypatch):
    from bitsandbytes.nn import Linear4bit

    quantized = []
    load = loading.load_causal_lm

    def recording(*args, **kwargs):
        model = load(*args, **kwargs)
        quantized.append(sum(isinstance(m, Linear4bit) for m in model.modules()))
        return model

    monkeypatch.setattr(loading, "load_causal_lm", recording)
    sft, rm = sft_and_rm
    out = tmp_path / command
    args = {"rm": ["--model", sft, "--data", SAMPLES / "pairs.jsonl"],
            "dpo": ["--policy", sft, "--data", SAMPLES / "pairs.jsonl"],
            "ppo": ["--policy", sft, "--reward", rm, "--prompts", SAMPLES / "prompts.jsonl", "--rollout-prompts", 4,
                    "--mini-batch", 4, "--max-new-tokens", 8]}[command]
    assert main([command, *map(str, args), "--lora", "--qlora", "--out", str(out), "--max-steps", "2",
                 "--lr", "1e-2", "--progress", "false"]) == 0
    assert quantized and quantized[0] > 0, "the trained model's base was not loaded in 4-bit"
    trained = load_file(out / "adapter_model.safetensors")
    lora_b = [t for k, t in trained.items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B matrices still zero: nothing trained"


@needs_bnb
def test_qlora_resumes_exactly(tiny_model, tmp_path):
    def sft(out, *extra):
        assert main(["sft", "--model", str(tiny_model("llama")), "--data", str(SAMPLES / "sft_messages.jsonl"),
                     "--out", str(out), "--lora", "--qlora", "--lora-dropout", "0.1", "--max-steps", "6",
                     "--lr", "1e-2", "--log-every", "1", "--eval-fraction", "0", "--progress", "false",
                     *map(str, extra)]) == 0
        return [row["loss"] for row in read_metrics(out / "metrics.jsonl") if "loss" in row]

    whole = sft(tmp_path / "a")
    sft(tmp_path / "b", "--save-every", 3)
    assert sft(tmp_path / "b", "--resume", tmp_path / "b" / "checkpoints" / "step-3") == whole
