"""bench/scaling.py: the fixture sizes, rows of exactly a cell's length, the step times read back
from rlhflab's metrics, the table and plots from given figures, and one short rlhflab run of a
cell (the TRL side is the bench's own business: it needs bench/.venv-trl)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

import fixtures
import scaling
from run import environment


@pytest.mark.parametrize("size", sorted(scaling.SIZES))
def test_each_size_has_about_its_nominal_parameters(size):
    name, nominal = scaling.SIZES[size]
    shape = fixtures.MODELS[name]
    counted = scaling.parameter_count(**shape)
    assert abs(counted - nominal) / nominal < 0.1, (size, counted)
    # the same model as fixtures.model_dir builds it, on the meta device (no memory)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=fixtures.VOCAB, tie_word_embeddings=False,
                                             num_key_value_heads=shape["num_attention_heads"], **shape))
    assert counted == sum(p.numel() for p in model.parameters())


def test_rows_per_step_keeps_the_tokens_of_a_step():
    assert scaling.rows_per_step("sft", 128, 1024) == 8
    assert scaling.rows_per_step("dpo", 128, 1024) == 4  # a pair is two sequences
    assert scaling.rows_per_step("sft", 1024, 1024) == 1
    assert scaling.rows_per_step("dpo", 1024, 1024) == 1  # never fewer than one row


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("length", [48, 160])
def test_rows_are_exactly_the_cells_length(tokenizer_dir, length):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    conversations = read_jsonl(SAMPLES / "sft_messages.jsonl")
    rows, tokens = scaling.sft_rows(tokenizer, conversations, length, 5)
    assert len(rows) == 5 and tokens == [length] * 5
    assert all(scaling.token_count(tokenizer, row["messages"]) == length for row in rows)
    assert all(row["messages"][-1]["role"] == "assistant" for row in rows)

    pairs = [{**p, "prompt": [{"role": "user", "content": p["prompt"]}]} for p in read_jsonl(SAMPLES / "pairs.jsonl")]
    rows, tokens = scaling.dpo_rows(tokenizer, conversations, pairs, length, 5)
    assert len(rows) == 5 and tokens == [2 * length] * 5
    for row in rows:
        assert row["prompt"][-1]["role"] == "user" and row["chosen"] != row["rejected"]
        for answer in (row["chosen"], row["rejected"]):
            assert scaling.token_count(tokenizer, row["prompt"] + [{"role": "assistant", "content": answer}]) == length


def test_step_times_read_back_from_rlhflab_metrics(tmp_path):
    times = [2.0, 0.5, 0.25, 0.75]
    ends = [sum(times[:k + 1]) for k in range(len(times))]
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": k + 1, "loss": 1.0, "tokens_per_s": (k + 1) * 100 / end}) + "\n"
        for k, end in enumerate(ends)))
    assert scaling.rlhflab_step_times(tmp_path, "sft", per_step=100) == pytest.approx(times)


def given_results() -> dict:
    def side(tokens_per_s, rss):
        return {"tokens_per_s": tokens_per_s, "peak_rss_mib": rss, "step_times": [1.0, 0.5]}

    return {
        "date": "2026-01-02T03:04:05", "command": ".venv/bin/python bench/scaling.py --sizes 6m", "sides": ["rlhflab", "trl"],
        "sizes": {"6m": {"fixture": "llama-6m", "params": 6_291_456}},
        "cells": [
            {"stage": "sft", "size": "6m", "length": 128, "batch": 8, "tokens_per_row": 128,
             "sides": {"rlhflab": side(3000.0, 600.0), "trl": side(1500.0, 800.0)}},
            {"stage": "sft", "size": "6m", "length": 512, "batch": 2, "tokens_per_row": 512,
             "sides": {"rlhflab": side(2500.0, 640.0), "trl": {"not_run": "stopped at the 600 s limit (--timeout)"}}},
            {"stage": "dpo", "size": "6m", "length": 128, "batch": 4, "tokens_per_row": 256,
             "sides": {"rlhflab": side(4000.0, 620.0), "trl": side(1000.0, 900.0)}},
        ],
    }


def test_table_and_plots_from_given_figures(tmp_path):
    written = scaling.write_outputs(given_results(), tmp_path)
    assert sorted(p.name for p in written) == ["scaling-memory.png", "scaling-throughput.png", "scaling.json",
                                               "scaling.md"]
    for name in ("scaling-memory.png", "scaling-throughput.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    table = (tmp_path / "scaling.md").read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith(("| SFT", "| DPO"))]
    assert len(rows) == 3
    assert rows[0][5:11] == ["3,000", "1,500", "2.00x", "600", "800", "0.75x"]
    assert rows[1][5:11] == ["2,500", "not run", "—", "640", "not run", "—"]
    assert rows[2][3:7] == ["4", "1,024", "4,000", "1,000"]
    assert "SFT 6m x 512, TRL 1.16: not run, stopped at the 600 s limit (--timeout)" in table
    assert json.loads((tmp_path / "scaling.json").read_text())["cells"][1]["sides"]["trl"]["not_run"]
    # --render redraws the same files from the raw figures
    again = tmp_path / "again"
    scaling.main(["--render", str(tmp_path / "scaling.json"), "--out", str(again)])
    assert (again / "scaling.md").read_text() == table and (again / "scaling-memory.png").is_file()


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_one_short_rlhflab_run_of_a_cell(tiny_model, tmp_path, stage):
    model = tiny_model("llama")
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    length, batch, steps = 64, 2, 1
    conversations = read_jsonl(SAMPLES / "sft_messages.jsonl")
    if stage == "sft":
        rows, tokens = scaling.sft_rows(tokenizer, conversations, length, (steps + 1) * batch)
    else:
        pairs = [{**p, "prompt": [{"role": "user", "content": p["prompt"]}]}
                 for p in read_jsonl(SAMPLES / "pairs.jsonl")]
        rows, tokens = scaling.dpo_rows(tokenizer, conversations, pairs, length, (steps + 1) * batch)
    data = scaling.write_rows(tmp_path / "rows.jsonl", rows)
    figures = scaling.run_side(stage, "rlhflab", model, data, batch, tokens[0], length, steps, tmp_path,
                               environment(1), timeout=300)
    assert "not_run" not in figures, figures
    assert figures["exit"] == 0 and len(figures["step_times"]) == steps + 1
    assert all(t > 0 for t in figures["step_times"])
    assert figures["tokens_per_s"] > 0 and figures["peak_rss_mib"] > 50
    summary = json.loads((tmp_path / "runs" / f"{stage}-{model.name}-{length}-rlhflab" / "summary.json").read_text())
    assert summary["steps"] == steps + 1
