"""RL stage: every estimator on tiny models, one base in LoRA mode, resume, monitors, seed 001's collapse."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from conftest import SAMPLES

from rlhflab.cli.main import main
from rlhflab.runs import read_metrics
from rlhflab.train.alarms import Alarm


def ppo(sft, rm, out, *extra) -> dict:
    code = main(["ppo", "--policy", str(sft), "--reward", str(rm), "--prompts", str(SAMPLES / "prompts.jsonl"),
                 "--out", str(out), "--max-new-tokens", "8", "--rollout-prompts", "4", "--mini-batch", "4",
                 "--progress", "false", "--probe-every", "2", *map(str, extra)])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("estimator,extra", [
    ("gae", ["--lora"]), ("gae", ["--no-lora"]), ("gae", ["--lora", "--critic", "separate"]),
    ("gae", ["--no-lora", "--critic", "separate"]), ("grpo", ["--lora", "--n-samples", "2"]),
    ("rloo", ["--lora", "--n-samples", "2"]), ("reinforce++", ["--lora"]),
    ("gae", ["--lora", "--gradient-checkpointing"]), ("gae", ["--no-lora", "--gradient-checkpointing"]),
])
def test_each_estimator_runs_and_logs_the_monitors(estimator, extra, sft_and_rm, tmp_path):
    sft, rm = sft_and_rm
    summary = ppo(sft, rm, tmp_path / "run", "--estimator", estimator, "--max-steps", 3, *extra)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward", "kl_k1", "kl_k3", "entropy", "response_len", "empty_rate", "repetition_rate", "clipfrac"):
        assert key in rows[0], key
    if estimator == "gae":
        assert "vf_loss" in rows[0] and "explained_variance" in rows[0]
    assert summary["steps"] == 3
    assert (tmp_path / "run" / "samples.jsonl").read_text().count("\n") > 0
    assert (tmp_path / "run" / ("adapter_config.json" if "--lora" in extra else "model.safetensors")).exists()


@pytest.mark.parametrize("like", ["gae", "grpo"])
def test_a_new_estimator_is_one_table_row(like, sft_and_rm, tmp_path, monkeypatch):
    """A row of losses.ESTIMATORS under a new name runs as the row it copies: the loop asks the
    row (critic, samples per prompt, where the KL goes), never the estimator's name."""
    from rlhflab import losses
    from rlhflab.cli.main import parse
    from rlhflab.errors import UsageError

    sft, rm = sft_and_rm
    row, critic_values = losses.ESTIMATORS[like], []

    def advantages(inputs):
        critic_values.append(inputs.values is not None)
        return row.advantages(inputs)

    monkeypatch.setitem(losses.ESTIMATORS, "toy", dataclasses.replace(row, advantages=advantages))
    base = ["--policy", str(sft), "--reward", str(rm), "--prompts", str(SAMPLES / "prompts.jsonl"), "--estimator", "toy"]
    samples = ["--n-samples", str(row.min_samples)]
    assert parse("ppo", base + samples).kl_in_loss == row.kl_in_loss
    if row.min_samples > 1:
        with pytest.raises(UsageError, match=f"--n-samples must be >= {row.min_samples}"):
            parse("ppo", base)
    summary = ppo(sft, rm, tmp_path / "run", "--estimator", "toy", "--max-steps", 1, "--lora", *samples)
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert critic_values == [row.critic]                    # the critic ran (or did not) for the row's sake
    assert ("vf_loss" in first) == row.critic
    assert summary["estimator"] == "toy" and summary["shared_prompt"] == (not row.critic and row.min_samples > 1)


def test_lora_mode_holds_one_base_and_starts_at_zero_kl(sft_and_rm, tmp_path, capsys):
    sft, rm = sft_and_rm
    summary = ppo(sft, rm, tmp_path / "run", "--lora", "--max-steps", 1, "--lora-dropout", 0.1)
    assert summary["base_weight_copies"] == 1
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["kl_k1"] == 0.0 and first["kl_k3"] == 0.0
    assert "--lora-dropout 0.1 has no effect" in capsys.readouterr().err   # said, not silently dropped


@pytest.mark.parametrize("extra", [["--lora"], ["--no-lora", "--critic", "separate"],
                                   ["--lora", "--estimator", "grpo", "--n-samples", "2"]])
def test_gradient_checkpointing_recomputes_in_the_update(sft_and_rm, tmp_path, monkeypatch, extra):
    """The policy (and a separate critic) stay in eval mode in RL; --gradient-checkpointing must act there."""
    import torch.utils.checkpoint

    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    sft, rm = sft_and_rm
    ppo(sft, rm, tmp_path / "plain", "--max-steps", 1, *extra)
    assert not calls
    ppo(sft, rm, tmp_path / "run", "--max-steps", 1, "--gradient-checkpointing", *extra)
    layers = 2 * (2 if "separate" in extra else 1)   # the tiny model's layers, and the critic's own
    assert len(calls) >= layers


def test_full_mode_keeps_separate_models(sft_and_rm, tmp_path):
    sft, rm = sft_and_rm
    assert ppo(sft, rm, tmp_path / "run", "--no-lora", "--max-steps", 1)["base_weight_copies"] > 1


def test_resume_gives_the_same_next_step(sft_and_rm, tmp_path):
    sft, rm = sft_and_rm
    ppo(sft, rm, tmp_path / "a", "--lora", "--max-steps", 4)
    ppo(sft, rm, tmp_path / "b", "--lora", "--max-steps", 4, "--save-every", 2)
    ppo(sft, rm, tmp_path / "b", "--lora", "--max-steps", 4, "--resume", tmp_path / "b" / "checkpoints" / "step-2")
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    for key in ("reward", "kl_k1", "pg_loss", "response_len"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key


def test_alarm_fires_when_reward_rises_and_gold_falls():
    alarm = Alarm(window=3)
    messages = [alarm.update(reward=0.1 * i, gold=0.9 - 0.05 * i) for i in range(6)]
    assert messages[-1] and "reward rose" in messages[-1]
    calm = Alarm(window=3)
    assert not any(calm.update(reward=0.1 * i, gold=0.5 + 0.05 * i) for i in range(6))
    # step means that wobble by +-0.05 around a flat line: a 0.03 dip between windows is noise
    wobble = [0.50, 0.58, 0.47, 0.52, 0.44, 0.50]
    assert not any(Alarm(window=3).update(reward=0.1 * i, gold=g) for i, g in enumerate(wobble))
    # the same wobble around a line that falls by 0.2 between the windows is a real fall
    falling = [g - (0.2 if i >= 3 else 0.0) for i, g in enumerate(wobble)]
    loud = Alarm(window=3)
    assert [loud.update(reward=0.1 * i, gold=g) for i, g in enumerate(falling)][-1]


def test_the_gold_alarm_does_not_cry_wolf_on_a_long_noisy_run():
    """Eighty steps of a rising reward and a gold score that only wobbles (step means of a few dozen
    answers): checked every step, a two-standard-error rule fires on most such runs; this one must not."""
    rng = random.Random(0)
    for _ in range(10):
        alarm = Alarm(window=5)
        golds = [0.45 + 0.001 * i + rng.gauss(0, 0.035) for i in range(80)]
        assert not [m for i, g in enumerate(golds) if (m := alarm.update(reward=3.0 + 0.01 * i, gold=g))]
    # a real fall of 0.15 in the middle of the same noise is caught, once
    alarm, golds = Alarm(window=5), [0.5 + rng.gauss(0, 0.035) - (0.15 if i >= 40 else 0.0) for i in range(80)]
    messages = [m for i, g in enumerate(golds) if (m := alarm.update(reward=3.0 + 0.01 * i, gold=g))]
    assert len(messages) == 1 and "gold score fell" in messages[0]


def test_the_shrinking_answers_alarm():
    alarm = Alarm(window=2)
    lengths = [30, 34, 28, 25, 20, 15, 12, 10]
    messages = [alarm.update(reward=0.1 * i, gold=None, length=n) for i, n in enumerate(lengths)]
    fired = [m for m in messages if m]
    assert len(fired) == 1 and "answers shrank from 32.0 to 13.5 tokens" in fired[0] and messages[6] == fired[0]
    # the same shrinking with a falling reward is the policy's own business, not the reward model's
    falling = Alarm(window=2)
    assert not any(falling.update(reward=-0.1 * i, gold=None, length=n) for i, n in enumerate(lengths))


def test_bad_options_are_named(sft_and_rm, cli):
    sft, rm = sft_and_rm
    result = cli("ppo", "--policy", sft, "--reward", rm, "--prompts", SAMPLES / "prompts.jsonl", "--estimator", "grpo")
    assert result.returncode == 2 and "--n-samples must be >= 2" in result.stderr
    result = cli("ppo", "--policy", sft, "--reward", sft, "--prompts", SAMPLES / "prompts.jsonl", "--lora")
    assert result.returncode == 2 and "LoRA adapter on the same base" in result.stderr
    result = cli("ppo", "--policy", sft, "--reward", rm, "--prompts", SAMPLES / "prompts.jsonl", "--critic-init", "sft")
    assert result.returncode == 2 and "add --critic separate" in result.stderr   # not silently ignored

    from rlhflab.cli.main import parse

    base = ["--policy", str(sft), "--reward", str(rm), "--prompts", str(SAMPLES / "prompts.jsonl")]
    assert parse("ppo", [*base, "--critic", "separate", "--critic-init", "sft"]).critic_init == "sft"


def test_seed_001_collapse_to_empty_answers_and_the_eos_guard(tiny_model, tmp_path):
    """Seed 001: a reward model that scores empty answers highest drives PPO to empty, ever-shorter
    answers; suppressing EOS at the first position (--min-new-tokens 1) prevents it."""
    prompts = [json.loads(line) for line in (SAMPLES / "prompts.jsonl").read_text().splitlines()]
    questions = [p["prompt"] if isinstance(p["prompt"], str) else p["prompt"][-1]["content"] for p in prompts]
    answers = [json.loads(line)["messages"][-1]["content"]
               for line in (SAMPLES / "sft_messages.jsonl").read_text().splitlines()]
    short = ["ok", "好", "yes", "嗯", "sure", "是的"]
    # SFT: short answers, one in ten empty, so the policy sometimes stops at once (as seed 001's did).
    sft_rows = [{"messages": [{"role": "user", "content": q},
                              {"role": "assistant", "content": "" if i % 10 == 0 else short[i % len(short)]}]}
                for i, q in enumerate(questions)]
    # The broken reward model: the empty answer always chosen over any real one.
    pairs = [{"prompt": q, "chosen": "", "rejected": r} for i, q in enumerate(questions)
             for r in (short[i % len(short)], answers[i % len(answers)], answers[(i + 7) % len(answers)][:12])]
    for name, rows in (("sft.jsonl", sft_rows), ("pairs.jsonl", pairs)):
        (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    sft, rm = tmp_path / "sft", tmp_path / "rm"
    assert main(["sft", "--model", str(tiny_model("llama")), "--data", str(tmp_path / "sft.jsonl"), "--out", str(sft),
                 "--max-steps", "30", "--lr", "1e-2", "--progress", "false"]) == 0
    assert main(["rm", "--model", str(sft), "--lora", "--data", str(tmp_path / "pairs.jsonl"), "--out", str(rm),
                 "--max-steps", "40", "--lr", "1e-2", "--progress", "false"]) == 0
    runs = {}
    for guard in ("0", "1"):
        out = tmp_path / f"ppo-guard{guard}"
        ppo(sft, rm, out, "--lora", "--min-new-tokens", guard, "--max-steps", 20, "--lr", "1e-2", "--log-every", 1,
            "--estimator", "rloo", "--n-samples", 4, "--rollout-prompts", 8, "--mini-batch", 16,
            "--missing-eos-penalty", 10, "--probe-every", 0)
        runs[guard] = read_metrics(out / "metrics.jsonl")
        # the guard is saved with the policy, so that decoding it later keeps EOS away from the start too
        saved = json.loads((out / "generation_config.json").read_text()).get("min_new_tokens")
        assert saved == (1 if guard == "1" else None), saved

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    first, last = mean(runs["0"][:5], "empty_rate"), mean(runs["0"][-5:], "empty_rate")
    trace = [r["empty_rate"] for r in runs["0"]]
    assert last >= 0.2 and last > first, f"no drift to empty answers without the guard: empty rate {trace}"
    assert mean(runs["1"], "empty_rate") <= 0.05, [r["empty_rate"] for r in runs["1"]]
    assert mean(runs["0"][-5:], "response_len") < mean(runs["1"][-5:], "response_len")


@pytest.mark.parametrize("mode", ["--lora", "--no-lora"])
def test_the_gold_judge_as_reward(mode, sft_and_rm, tmp_path):
    """--reward judge: no reward model; each rollout's reward is the toy world's gold score."""
    from rlhflab.world import tasks

    sft, _ = sft_and_rm
    prompts = tmp_path / "world_prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in tasks.make_prompts("train", 8)),
                       encoding="utf-8")
    out = tmp_path / "run"
    assert main(["ppo", "--policy", str(sft), "--reward", "judge", "--prompts", str(prompts), "--out", str(out),
                 mode, "--max-new-tokens", "8", "--rollout-prompts", "4", "--mini-batch", "4", "--max-steps", "2",
                 "--probe-every", "1", "--progress", "false", "--log-every", "1"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2 and all(r["reward"] == pytest.approx(r["gold"], abs=1e-6) for r in rows), rows
    probes = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert probes and all(p["reward"] == pytest.approx(p["gold"], abs=1e-4) for p in probes)


def test_the_gold_judge_as_reward_needs_world_prompts(sft_and_rm, tmp_path, cli):
    sft, _ = sft_and_rm
    result = cli("ppo", "--policy", sft, "--reward", "judge", "--prompts", SAMPLES / "prompts.jsonl",
                 "--out", tmp_path / "run", "--max-steps", 1)
    assert result.returncode != 0 and "--reward judge" in result.stderr and "meta.family" in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


def test_shared_critic_is_a_value_head_on_the_policy(sft_and_rm, tmp_path):
    from rlhflab import config as cfg
    from rlhflab.models.loading import choose_placement
    from rlhflab.train.rl import RLConfig
    from rlhflab.train.roles import load_roles

    sft, rm = sft_and_rm
    config = cfg.build(RLConfig, {}, {"policy": str(sft), "reward": str(rm), "prompts": str(SAMPLES / "prompts.jsonl"),
                                      "lora": True, "critic": "shared"})
    roles, _, _ = load_roles(config, choose_placement("cpu", "fp32"))
    assert not any(".critic." in name for name, _ in roles.lm.named_parameters())
    assert roles.trainable_parameters("critic") == list(roles.value_head.parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    logprobs, _, values = roles.policy_and_values(ids, torch.ones_like(ids), prompt_len=2)
    plain, _ = roles.logprobs("policy", ids, torch.ones_like(ids), prompt_len=2)
    assert torch.allclose(logprobs, plain) and values.shape == (1, 3)


@pytest.mark.parametrize("option", ["--grad-accum", "--batch-size", "--epochs", "--eval-every", "--group-by-length"])
def test_training_options_ppo_does_not_use_are_refused(option, cli):
    """A step is --rollout-prompts rollouts in --mini-batch slices: these would silently do nothing."""
    result = cli("ppo", option, "2", "--policy", "p", "--reward", "r", "--prompts", "x")
    assert result.returncode == 2 and f"unknown option {option}" in result.stderr, result.stderr


def test_log_every_thins_the_metrics_file(sft_and_rm, tmp_path):
    sft, rm = sft_and_rm
    ppo(sft, rm, tmp_path / "ppo", "--max-steps", 3, "--log-every", 2, "--probe-every", 0)
    assert [r["step"] for r in read_metrics(tmp_path / "ppo" / "metrics.jsonl")] == [2, 3]


def test_judge_rm_gives_the_monitors_a_gold_score(sft_and_rm, tmp_path):
    """Off the toy world, a second reward model is the ground truth the alarm compares against."""
    sft, rm = sft_and_rm
    ppo(sft, rm, tmp_path / "ppo", "--max-steps", 2, "--judge-rm", rm, "--probe-every", 0)
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    assert len(rows) == 2 and all(abs(r["gold"] - r["reward"]) < 1e-4 for r in rows), rows


@pytest.mark.parametrize("finished", [True, False])
def test_rewards_are_read_where_the_reward_model_was_trained(finished, tiny_model):
    """The reward model trains on rendered conversations (rm.encode_pair_rows): PPO must score a
    rollout as the same tokens, the template's end of turn included, not stop at the stop token."""
    from transformers import AutoTokenizer

    from rlhflab.data.template import encode_chat, encode_prompt, stop_token_ids, turn_end_ids
    from rlhflab.infer.engine import Generation

    tok = AutoTokenizer.from_pretrained(str(tiny_model("llama")))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = "The capital of France is Paris."
    prompt = encode_prompt(tok, messages)
    rendered = encode_chat(tok, messages + [{"role": "assistant", "content": answer}], 512).input_ids
    response = rendered[len(prompt):len(rendered) - len(turn_end_ids(tok))]
    assert tok.decode(response) == answer and turn_end_ids(tok)[0] in stop_token_ids(tok)
    generated = response + ([turn_end_ids(tok)[0]] if finished else [])   # what the engine returns
    gen = Generation(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
                     torch.tensor([generated]), torch.ones(1, len(generated), dtype=torch.long),
                     torch.tensor([finished]), [answer])
    ids, mask = gen.rendered(turn_end_ids(tok), stop_token_ids(tok), tok.pad_token_id)
    assert ids[0].tolist() == rendered and bool(mask.all())
