"""Pretraining and tokenizer training through the CLI, on the toy world's small corpus."""

from __future__ import annotations

import json

from conftest import SAMPLES
from transformers import AutoTokenizer


def test_world_tokenizer_pretrain_then_sft(cli, tmp_path):
    world, tok, base, sft = tmp_path / "world", tmp_path / "tok", tmp_path / "base", tmp_path / "sft"
    assert cli("world", "export", "--out", world, "--size", "small").returncode == 0
    result = cli("tokenizer", "train", "--corpus", f"{world / 'corpus.txt'},{world / 'sft.jsonl'}",
                 "--vocab-size", 500, "--out", tok)
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(str(tok))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.chat_template
    text = "法国的首都是巴黎。 12 + 7 = 19"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text

    result = cli("pretrain", "--preset", "tiny", "--tokenizer", tok, "--data", world / "corpus.txt", "--out", base,
                 "--max-length", 64, "--max-steps", 30, "--lr", "3e-3", "--progress", "false", "--log-every", 5)
    assert result.returncode == 0, result.stderr
    summary = json.loads((base / "summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (base / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5, losses
    assert summary["eval_perplexity"] and summary["eval_perplexity"] < len(tokenizer)
    assert len(summary["samples"]) >= 3 and all("continuation" in s for s in summary["samples"])

    result = cli("sft", "--model", base, "--data", world / "sft.jsonl", "--out", sft, "--max-steps", 5,
                 "--progress", "false")
    assert result.returncode == 0, result.stderr

    answers = tmp_path / "answers.jsonl"
    result = cli("judge", "--model", sft, "--prompts", world / "eval_prompts.jsonl", "--out", answers,
                 "--max-new-tokens", 8)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 50 and all({"messages", "response", "meta", "score", "facets"} <= set(r) for r in rows)
    assert not (sft / "judge_responses.jsonl").exists(), "nothing written into the model's directory"
    assert "score" in result.stdout and "language" in result.stdout
    again = cli("judge", "--responses", answers, "--out", tmp_path / "again.jsonl")
    assert again.returncode == 0 and again.stdout.split("score")[1].split()[0] == result.stdout.split("score")[1].split()[0]
    rescored = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rescored] == [r["score"] for r in rows]


def test_pretrain_needs_exactly_one_model_source(cli, tmp_path):
    result = cli("pretrain", "--data", tmp_path / "x.txt", "--out", tmp_path / "o")
    assert result.returncode == 2 and "exactly one of --model" in result.stderr


def test_max_length_past_the_models_positions_is_fitted(tiny_model, tmp_path, capsys):
    """GPT-2's learned position table ends at 256 here: --max-length 1024 would index past it."""
    from rlhflab.cli.main import main

    assert main(["pretrain", "--model", str(tiny_model("gpt2")), "--data", str(SAMPLES / "corpus.txt"),
                 "--max-length", "1024", "--max-steps", "1", "--batch-size", "1", "--out", str(tmp_path / "p"),
                 "--progress", "false"]) == 0
    assert "using 256" in capsys.readouterr().err
