"""bitsandbytes stays out of training processes that cannot need it, and comes back (by a restart)
when a model they name is quantized: the decision, the hiding, and the commands as a user runs them."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLES, run_cli

from rlhflab.models.bitsandbytes_gate import needs_bitsandbytes

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="the restart is for quantized models, which need bitsandbytes")


def model_dir(path, quantized: bool):
    path.mkdir(parents=True)
    config = {"model_type": "llama"}
    if quantized:
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (path / "config.json").write_text(json.dumps(config))
    return path


def adapter_dir(path, base):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    return path


def test_the_decision(tmp_path):
    plain = model_dir(tmp_path / "plain", quantized=False)
    quantized = model_dir(tmp_path / "quantized", quantized=True)
    assert not needs_bitsandbytes("sft", {"model": str(plain), "data": "x.jsonl", "out": "runs/sft"})
    assert needs_bitsandbytes("sft", {"model": str(quantized)})
    assert needs_bitsandbytes("sft", {"model": str(plain), "qlora": True})
    assert not needs_bitsandbytes("sft", {"model": str(plain), "qlora": False})
    # an adapter counts through its base; a name that is no local directory may be a quantized hub model
    assert needs_bitsandbytes("ppo", {"policy": str(adapter_dir(tmp_path / "on-quantized", quantized))})
    assert not needs_bitsandbytes("ppo", {"policy": str(adapter_dir(tmp_path / "on-plain", plain)),
                                          "reward": str(plain), "prompts": str(SAMPLES / "prompts.jsonl")})
    assert needs_bitsandbytes("ppo", {"policy": str(plain), "reward": "someone/some-model-4bit"})
    assert not needs_bitsandbytes("ppo", {"policy": str(plain), "reward": "judge"})
    # options nested in a pipeline's stages; commands outside the training stages are never gated
    assert needs_bitsandbytes("quickstart", {"stages": [{"sft": {"model": str(quantized)}}]})
    assert needs_bitsandbytes("serve", {"model": str(plain)})
    assert needs_bitsandbytes("quantize", {"model": str(plain)})


def peft_sees_bitsandbytes(*argv) -> bool:
    code = ("import sys; from rlhflab.models.bitsandbytes_gate import hide_bitsandbytes\n"
            f"hide_bitsandbytes({argv[0]!r}, {list(argv[1:])!r})\n"
            "import peft.import_utils as u; print(u.is_bnb_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1] == "True"


@needs_bnb
def test_hidden_from_peft_unless_asked_for():
    assert not peft_sees_bitsandbytes("sft", "--model", "m")
    assert peft_sees_bitsandbytes("sft", "--model", "m", "--qlora", "true")
    assert peft_sees_bitsandbytes("serve", "--model", "m")


def test_a_training_command_runs_without_it(tiny_model, tmp_path):
    """The command line hides it: after a whole SFT run the package was never imported."""
    out = tmp_path / "sft"
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('bitsandbytes:', sys.modules.get('bitsandbytes', 'absent')))\n"
            "from rlhflab.cli.main import main\n"
            f"sys.argv = ['rlhflab', 'sft', '--model', {str(tiny_model('llama'))!r}, '--data', "
            f"{str(SAMPLES / 'sft_messages.jsonl')!r}, '--out', {str(out)!r}, '--lora', 'true', '--max-steps', '1', "
            "'--batch-size', '2', '--progress', 'false']\n"
            "sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "bitsandbytes: None" in done.stdout, done.stdout   # hidden: None in sys.modules, never loaded
    assert (out / "adapter_model.safetensors").is_file()


@needs_bnb
def test_a_quantized_model_brings_it_back(tiny_model, tmp_path):
    quantized = tmp_path / "q4"
    done = run_cli("quantize", tiny_model("llama"), "--bits", "4", "--out", quantized)
    assert done.returncode == 0, done.stderr
    data = ["--data", SAMPLES / "sft_messages.jsonl", "--max-steps", "1", "--batch-size", "2", "--progress", "false"]
    # a LoRA adapter on the 4-bit directory: the command starts again with bitsandbytes and trains
    done = run_cli("sft", "--model", quantized, "--lora", "true", "--out", tmp_path / "lora", *data)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    # every weight of a 4-bit model cannot train: a clear error, no output
    done = run_cli("sft", "--model", quantized, "--out", tmp_path / "full", *data)
    assert done.returncode == 2 and "quantized, which cannot train in full" in done.stderr, done.stderr
    assert not (tmp_path / "full").exists()
