"""--compile: the option reaches the model, a compiled run trains as an uncompiled one does, and a
model that cannot compile runs uncompiled with one note instead of stopping the run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLES

from rlhflab import config as cfg
from rlhflab.cli.main import main
from rlhflab.config import SFTConfig
from rlhflab.evals.evaluate import EvalConfig
from rlhflab.infer.chat import ChatConfig
from rlhflab.infer.engine import SamplingParams, generate
from rlhflab.models import compiled
from rlhflab.models.loading import choose_placement, load_causal_lm, load_tokenizer
from rlhflab.runs import read_metrics
from rlhflab.train.rl import RLConfig


def sft(model, out, *extra) -> tuple[dict, list[dict]]:
    assert main(["sft", "--model", str(model), "--data", str(SAMPLES / "sft_messages.jsonl"), "--out", str(out),
                 "--max-steps", "3", "--batch-size", "4", "--lr", "3e-3", "--log-every", "1", "--progress", "false",
                 *extra]) == 0
    return json.loads((out / "summary.json").read_text()), read_metrics(out / "metrics.jsonl")


def test_a_compiled_run_trains_as_an_uncompiled_one(tiny_model, tmp_path, capsys):
    plain, plain_rows = sft(tiny_model("llama"), tmp_path / "plain", "--compile", "false")
    built, built_rows = sft(tiny_model("llama"), tmp_path / "compiled", "--compile", "true")
    assert "note: --compile" not in capsys.readouterr().err
    assert plain["compiled"] is False and plain["compile_time_s"] == 0
    assert built["compiled"] is True and built["compile_time_s"] > 0
    # every step's loss, not only the last, and the held-out loss (a no-grad pass with a mask)
    assert [r["loss"] for r in built_rows] == pytest.approx([r["loss"] for r in plain_rows], rel=1e-4)
    assert built["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-4)
    assert (tmp_path / "compiled" / "model.safetensors").exists()   # parameter names as always


@pytest.fixture
def compile_fails(monkeypatch):
    """torch.compile that fails: when asked to compile ("compile") or at the first call ("call")."""

    def use(where: str):
        def failing_compile(fn, **kwargs):
            if where == "compile":
                raise RuntimeError("no C++ compiler found")

            def first_call(*args, **kw):
                raise RuntimeError("inductor: C++ compile error")
            return first_call

        monkeypatch.setattr(compiled.torch, "compile", failing_compile)
    return use


@pytest.mark.parametrize("where", ["compile", "call"])
def test_a_model_that_cannot_compile_runs_uncompiled_with_a_note(where, compile_fails, tiny_model, tmp_path, capsys):
    compile_fails(where)
    summary, rows = sft(tiny_model("llama"), tmp_path / "run", "--compile", "true")
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: --compile")]
    assert len(notes) == 1, err
    assert "the sft model (LlamaForCausalLM) runs uncompiled" in notes[0]
    assert ("no C++ compiler found" if where == "compile" else "C++ compile error") in notes[0]
    assert summary["compiled"] is False and summary["steps"] == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_lora_ppo_with_value_heads_falls_back_cleanly(compile_fails, sft_and_rm, tmp_path, capsys):
    compile_fails("call")
    policy, reward = sft_and_rm
    out = tmp_path / "ppo"
    assert main(["ppo", "--policy", str(policy), "--reward", str(reward), "--prompts", str(SAMPLES / "prompts.jsonl"),
                 "--out", str(out), "--lora", "--max-new-tokens", "6", "--rollout-prompts", "2", "--mini-batch", "2",
                 "--max-steps", "2", "--progress", "false", "--probe-every", "0", "--compile", "true"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: --compile")]
    assert len(notes) == 1 and "the policy" in notes[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["compiled"] is False and summary["steps"] == 2


def test_generation_after_a_failed_compile_answers_as_before(compile_fails, tiny_model):
    placement = choose_placement("cpu", "fp32")
    model = load_causal_lm(str(tiny_model("llama")), placement).eval()
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    params = SamplingParams(max_new_tokens=6, do_sample=False)
    prompts = [[5, 6, 7], [8, 9]]
    before = generate(model, tokenizer, prompts, params).response_ids
    compile_fails("call")
    state = compiled.compile_model(model, "true", compiled.GENERATE, "the model", train=False)
    assert not state.active and "C++ compile error" in state.reason
    assert all(block._compiled_call_impl is None for block in compiled.repeated_blocks(model)[0])
    assert torch.equal(generate(model, tokenizer, prompts, params).response_ids, before)


def test_the_option_is_in_every_training_stage_and_the_generating_commands(tmp_path):
    for config_class in (SFTConfig, RLConfig, EvalConfig, ChatConfig):
        assert "compile" in config_class.__dataclass_fields__, config_class
    path = tmp_path / "sft.yaml"
    path.write_text("compile: true\n")   # YAML's booleans read as the option's values
    assert cfg.build(SFTConfig, cfg.load_yaml(str(path)), {}, str(path)).compile == "true"
    with pytest.raises(cfg.UsageError, match="--compile"):
        cfg.build(SFTConfig, {}, {"compile": "sometimes"})
    cpu = torch.device("cpu")
    for stage in ("pretrain", "sft", "rm", "dpo", "ppo", compiled.GENERATE):
        assert compiled.wanted("auto", stage, cpu) == (stage in compiled.AUTO_STAGES)
        assert compiled.wanted("true", stage, cpu) and not compiled.wanted("false", stage, cpu)
    assert not compiled.wanted("auto", "sft", torch.device("cuda"))   # measured on the CPU only


def test_the_blocks_of_every_role_are_found(tiny_model):
    placement = choose_placement("cpu", "fp32")
    for arch in ("llama", "gpt2"):
        model = load_causal_lm(str(tiny_model(arch)), placement)
        blocks, bodies = compiled.repeated_blocks(torch.nn.ModuleDict({"policy": model, "critic": model}))
        assert len(blocks) == model.config.num_hidden_layers and len(bodies) == 1   # shared: once
