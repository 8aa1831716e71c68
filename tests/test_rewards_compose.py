"""Rewards made of parts (rm, rules, python, judge) for PPO and best-of-n, Python reward functions'
named errors, and the rule reward model (rm --rules, rm score)."""

from __future__ import annotations

import json
import math
import re

import pytest

from rlhflab.cli.main import main
from rlhflab.data.formats import load_prompts
from rlhflab.errors import UsageError
from rlhflab.evals.evaluate import EvalConfig, best_of_n
from rlhflab.feedback.preferences import sample_responses
from rlhflab.models.loading import choose_placement, load_causal_lm, load_tokenizer
from rlhflab.rewards import compose
from rlhflab.runs import read_metrics

REWARDS = '''
def shorter(prompts, completions, **kwargs):
    return [1.0 / (1 + len(c[0]["content"])) for c in completions]

def english_only(prompts, completions, lang, **kwargs):
    return [None if l == "zh" else 0.25 for l in lang]

def too_few(prompts, completions, **kwargs):
    return [1.0]

def not_a_number(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

def explodes(prompts, completions, **kwargs):
    return {}["missing"]
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    assert main(["world", "export", "--out", str(out), "--size", "small", "--habit-rate", "0.6", "--rankings", "100"]) == 0
    return out


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fn") / "rewards.py"
    path.write_text(REWARDS, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rule_model(tiny_model, world, tmp_path_factory):
    out = tmp_path_factory.mktemp("rules") / "rm"
    assert main(["rm", "--rules", "--model", str(tiny_model("llama")), "--data", str(world / "rules.jsonl"),
                 "--out", str(out), "--max-steps", "6", "--batch-size", "16", "--lr", "3e-3",
                 "--eval-fraction", "0.2", "--progress", "false"]) == 0
    return out


def ppo(policy, world, out, *rewards, extra=()):
    args = ["ppo", "--policy", str(policy), "--prompts", str(world / "prompts.jsonl"), "--out", str(out),
            "--max-new-tokens", "8", "--rollout-prompts", "4", "--mini-batch", "4", "--max-steps", "2",
            "--progress", "false", "--probe-every", "0", *map(str, extra)]
    for reward in rewards:
        args += ["--reward", str(reward)]
    return main(args)


def test_parse_specs_reads_weights_and_plain_directories():
    specs = compose.parse_specs("rm:runs/rm:0.5,rules:runs/r,python:f.py:fn:2,python:f.py:fn,judge:0.1,runs/x")
    assert [(s.kind, s.target, s.weight) for s in specs] == [
        ("rm", "runs/rm", 0.5), ("rules", "runs/r", 1.0), ("python", "f.py:fn", 2.0), ("python", "f.py:fn", 1.0),
        ("judge", "", 0.1), ("rm", "runs/x", 1.0)]
    assert not compose.is_composed("runs/rm") and not compose.is_composed("judge")
    assert compose.is_composed("runs/rm,judge") and compose.is_composed("judge:2")
    for bad, named in (("python:f.py", "python:FILE:FUNCTION"), ("rm:", "rm:DIR"), ("judge:x", "judge:WEIGHT"),
                       ("rm:d:inf", "finite")):
        with pytest.raises(UsageError, match=named):
            compose.parse_specs(bad)


@pytest.mark.parametrize("source,function,named", [
    ("def broken(:\n", "broken", "syntax error in .*, line 1"),
    ("def other(prompts, completions, **kw):\n    return []\n", "missing",
     "has no function 'missing' \\(it defines: other\\)"),
    ("raise RuntimeError('no')\n", "f", "importing .* failed: RuntimeError: no \\(line 1\\)"),
])
def test_a_reward_file_that_cannot_load_is_named_before_any_model_loads(source, function, named, world, tmp_path,
                                                                        capsys):
    path = tmp_path / "bad.py"
    path.write_text(source, encoding="utf-8")
    with pytest.raises(compose.RewardFunctionError, match=named):
        compose.load_function(f"{path}:{function}")
    # The policy does not exist either: the reward file is checked first.
    assert main(["ppo", "--policy", str(tmp_path / "no-policy"), "--prompts", str(world / "prompts.jsonl"),
                 "--reward", f"python:{path}:{function}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.search(named, err) and f"python:{path}:{function}" in err and "no-policy" not in err


@pytest.mark.parametrize("function,named", [
    ("too_few", "returned 1 values for 4 completions"),
    ("not_a_number", "value 0 is nan \\(not finite\\)"),
    ("explodes", "raised KeyError: 'missing' \\(line 15\\)"),
])
def test_a_bad_reward_value_stops_ppo_with_its_name_before_any_update(function, named, sft_and_rm, world,
                                                                      rewards_file, tmp_path, capsys):
    sft, _ = sft_and_rm
    assert ppo(sft, world, tmp_path / "run", f"python:{rewards_file}:{function}") == 2
    err = capsys.readouterr().err
    assert f"python:{rewards_file}:{function}" in err
    assert re.search(named, err), err
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not metrics.exists() or not metrics.read_text()    # no step was logged: none was taken


def test_composed_rewards_log_each_part_and_their_weighted_sum(sft_and_rm, world, rewards_file, rule_model,
                                                               tmp_path):
    sft, rm = sft_and_rm
    code = ppo(sft, world, tmp_path / "run", f"rm:{rm}:0.5", f"python:{rewards_file}:shorter:2",
               f"python:{rewards_file}:english_only", "judge:0.3", f"rules:{rule_model}:0.7",
               extra=["--estimator", "rloo", "--n-samples", "2"])
    assert code == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2
    for row in rows:
        for part in ("rm", "shorter", "english_only", "judge", "rules"):
            assert f"reward/{part}" in row, part
        skipped = row.get("reward/english_only_skipped", 0.0)
        expected = (0.5 * row["reward/rm"] + 2 * row["reward/shorter"] + 0.25 * (1 - skipped) + 0.3 * row["reward/judge"]
                    + 0.7 * row["reward/rules"])
        assert row["reward"] == pytest.approx(expected, abs=1e-4)
        assert row["reward/judge"] == pytest.approx(row["gold"], abs=1e-5)   # the same judge, the same answers
        assert row["reward/rules"] <= 0


def test_the_rules_part_is_the_log_probability_of_keeping_every_rule():
    assert compose.rules_log_probability({"harmful": 0.0, "rude": 0.0}) == 0.0
    assert compose.rules_log_probability({"harmful": 0.5, "rude": 0.5}) == pytest.approx(2 * math.log(0.5))
    # a break the rule model is sure of costs far more than 1 (what minus the probability would cap it at),
    # and a certain one is floored, not -inf
    assert compose.rules_log_probability({"harmful": 0.98}) == pytest.approx(math.log(0.02))
    assert compose.rules_log_probability({"harmful": 1.0}) == pytest.approx(math.log(compose.RULE_FLOOR))
    assert compose.rules_log_probability({"harmful": 0.99, "rude": 0.01}) < compose.rules_log_probability(
        {"harmful": 0.9, "rude": 0.01}) < -1


def test_the_rule_penalty_is_a_hard_cut(sft_and_rm, world, rule_model, tmp_path):
    sft, _ = sft_and_rm
    assert ppo(sft, world, tmp_path / "run", f"rules:{rule_model}", extra=["--rule-penalty", "5",
                                                                         "--rule-threshold", "0.0"]) == 0
    for row in read_metrics(tmp_path / "run" / "metrics.jsonl"):
        assert row["reward/rule_penalty_rate"] == 1.0
        assert row["reward"] == pytest.approx(row["reward/rules"] - 5, abs=1e-4)


def test_the_rule_penalty_needs_a_rules_part(tmp_path, capsys):
    assert main(["ppo", "--policy", "p", "--prompts", "x", "--reward", "judge", "--rule-penalty", "1"]) == 2
    assert "--rule-penalty needs a rules:DIR part" in capsys.readouterr().err


def test_the_rule_model_reports_per_rule_precision_and_recall(rule_model, world, tmp_path, capsys):
    summary = json.loads((rule_model / "summary.json").read_text())
    assert summary["rules"] == ["harmful", "wrong_language", "rude", "repetitive"]
    for name, figures in summary["per_rule"].items():
        assert {"precision", "recall", "positives", "predicted", "n"} <= set(figures), name
        assert figures["n"] == summary["eval_rows"]
    assert 0 <= summary["eval_accuracy"] <= 1
    out = tmp_path / "scored.jsonl"
    assert main(["rm", "score", "--model", str(rule_model), "--data", str(world / "rules.jsonl"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = len((world / "rules.jsonl").read_text(encoding="utf-8").splitlines())
    assert f"scored {rows} responses with 4 rule heads" in printed
    assert "wrong_language" in printed and "recall" in printed
    row = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert set(row["rules"]) == {"harmful", "wrong_language", "rude", "repetitive"}
    assert all(0 < p < 1 for p in row["rules"].values())


def test_a_bad_rules_row_is_named(tiny_model, tmp_path, capsys):
    data = tmp_path / "rules.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello", "rules": {"rude": 0}}\n'
                    '{"prompt": "hi", "response": "go away", "rules": {"rude": 2}}\n', encoding="utf-8")
    assert main(["rm", "--rules", "--model", str(tiny_model("llama")), "--data", str(data),
                 "--out", str(tmp_path / "rm")]) == 2
    assert f"{data}:2: rules.rude must be 0, 1" in capsys.readouterr().err


def test_best_of_n_takes_composed_rewards(sft_and_rm, world, rewards_file, tmp_path):
    sft, rm = sft_and_rm
    records = load_prompts(str(world / "eval_prompts.jsonl"))[:3]
    config = EvalConfig(max_new_tokens=8, batch_size=8, device="cpu", dtype="fp32")
    # The reward model weighted 0: best-of-n keeps the shortest of each prompt's samples.
    best_of_n(str(sft), f"python:{rewards_file}:shorter,rm:{rm}:0", records, 3, config, answers_dir=tmp_path)
    chosen = [json.loads(line)["response"] for line in (tmp_path / "best-of-3.jsonl").read_text().splitlines()]
    model = load_causal_lm(str(sft), choose_placement("cpu", "fp32")).eval()
    samples = sample_responses(model, load_tokenizer(str(sft)), records, 3, 8, 1.0, 1.0, config.seed, 8)
    assert [len(c) for c in chosen] == [min(len(t) for t in row["responses"]) for row in samples]


def test_a_lora_rule_model_round_trips(tiny_model, world, tmp_path, capsys):
    out = tmp_path / "rules"
    assert main(["rm", "--rules", "--lora", "--model", str(tiny_model("llama")), "--data", str(world / "rules.jsonl"),
                 "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--progress", "false"]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "rule_head.safetensors").is_file()
    assert main(["rm", "score", "--model", str(out), "--data", str(world / "rules.jsonl")]) == 0
    assert "with 4 rule heads" in capsys.readouterr().out
