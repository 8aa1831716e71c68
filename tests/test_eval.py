"""`rlhflab eval`: figures per model, win rate by a reward model, KL to a reference, bad options."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLES

from rlhflab.cli.main import main
from rlhflab.evals.evaluate import distinct_n, wilson, win_rate


def test_win_rate_counts_ties_half_and_has_an_interval():
    result = win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 1.0, 1.0])
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    low, high = result["ci95"]
    assert 0.0 <= low < 0.625 < high <= 1.0
    assert wilson(50, 100)[0] == pytest.approx(0.404, abs=1e-3)


def test_distinct_n():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 1) == pytest.approx(4 / 6)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)


def test_eval_compares_models_against_a_baseline(tiny_model, tmp_path, capsys):
    model = tiny_model("llama")
    rm = tmp_path / "rm"
    assert main(["rm", "--model", str(model), "--data", str(SAMPLES / "pairs.jsonl"), "--out", str(rm),
                 "--max-steps", "2", "--progress", "false"]) == 0
    out = tmp_path / "eval"                 # a directory: figures.json inside, the answers beside it
    code = main(["eval", "--model", f"a={model}", "--model", f"b={tiny_model('qwen2')}", "--prompts", str(SAMPLES / "prompts.jsonl"),
                 "--max-rows", "4", "--max-new-tokens", "6", "--judge", f"rm:{rm}", "--baseline", str(model),
                 "--reference", str(model), "--out", str(out)])
    assert code == 0
    figures = json.loads((out / "figures.json").read_text())["models"]
    assert set(figures) == {"a", "b"}
    assert figures["a"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)  # a is the reference itself
    assert "vs_baseline" in figures["b"] and "vs_baseline" not in figures["a"]  # a is the baseline
    for name in ("a", "b"):
        assert {"rm_score", "mean_chars", "distinct_2", "entropy"} <= set(figures[name])
    assert len((tmp_path / "eval" / "b.jsonl").read_text().splitlines()) == 4
    assert "KL-ref" in capsys.readouterr().out


def test_eval_needs_a_judge_for_a_baseline(tiny_model):
    from rlhflab.cli.main import parse
    from rlhflab.errors import UsageError

    with pytest.raises(UsageError, match="--baseline needs --reward-model"):
        parse("eval", ["--model", str(tiny_model("llama")), "--prompts", "p.jsonl", "--baseline", "x"])


@pytest.mark.parametrize("args,message", [
    (["--model", "a/sft,b/sft"], "two models are called 'sft'"),
    (["--model", "MODEL,/no/such/model"], "--model /no/such/model: no such directory"),
    (["--model", "MODEL", "--judge", "rm:/no/such/rm"], "--reward-model /no/such/rm: no such directory"),
    (["--model", "MODEL", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
])
def test_eval_checks_its_options_before_any_model_runs(args, message, tiny_model, tmp_path, cli):
    args = [a.replace("MODEL", str(tiny_model("llama"))) for a in args]
    result = cli("eval", *args, "--prompts", SAMPLES / "prompts.jsonl", "--out", tmp_path / "ev")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "ev").exists() and "eval:" not in result.stdout


def test_judge_names_a_bad_responses_file(tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [], "response": "x"}\n{"oops": 1}\n')
    for path, message in ((tmp_path / "none.jsonl", "no such file"), (bad, f"{bad}:2")):
        result = cli("judge", "--responses", path)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_eval_refuses_a_reference_with_another_vocabulary(tiny_model, tmp_path, cli):
    from conftest import sample_texts, tiny_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhflab.models.tokenizer import train_tokenizer

    train_tokenizer(sample_texts(), 420, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    AutoModelForCausalLM.from_config(tiny_config("llama", tok)).save_pretrained(str(tmp_path / "other"))
    tok.save_pretrained(str(tmp_path / "other"))
    result = cli("eval", "--model", tiny_model("llama"), "--reference", tmp_path / "other",
                 "--prompts", SAMPLES / "prompts.jsonl", "--max-rows", 2, "--max-new-tokens", 2)
    assert result.returncode == 2 and "same vocabulary" in result.stderr, result.stderr


def test_judge_refuses_prompts_from_outside_the_toy_world(tiny_model, cli):
    result = cli("judge", "--model", tiny_model("llama"), "--prompts", SAMPLES / "prompts.jsonl")
    assert result.returncode == 2 and "toy-world meta.family" in result.stderr, result.stderr


def test_eval_out_under_a_file_is_refused_before_generating(tiny_model, tmp_path, cli):
    (tmp_path / "afile").write_text("keep")
    result = cli("eval", "--model", tiny_model("llama"), "--prompts", SAMPLES / "prompts.jsonl",
                 "--max-rows", 1, "--max-new-tokens", 2, "--out", tmp_path / "afile" / "x.json")
    assert result.returncode == 2 and "a file stands where" in result.stderr and "eval:" not in result.stdout


def test_eval_refuses_a_reward_model_as_a_policy(sft_and_rm, tmp_path, cli):
    _, rm = sft_and_rm
    result = cli("eval", "--model", rm, "--prompts", SAMPLES / "prompts.jsonl", "--max-rows", 1)
    assert result.returncode == 2 and "give it as --reward-model DIR" in result.stderr, result.stderr
