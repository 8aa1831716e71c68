"""Reward model: last-token reading, both losses, save/load, hardening and the hacking audit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLES

from rlhflab.cli.main import main
from rlhflab.rewards.model import last_token_index
from rlhflab.runs import read_metrics


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(right).tolist() == [2, 3]
    assert last_token_index(left).tolist() == [3, 3]
    with pytest.raises(AssertionError, match="pad position"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def train_rm(model, out, data, *extra):
    code = main(["rm", "--model", str(model), "--data", str(data), "--out", str(out), "--lr", "5e-3",
                 "--log-every", "1", "--progress", "false", "--eval-fraction", "0", "--batch-size", "4", *map(str, extra)])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("loss", ["pairwise", "ranking"])
def test_accuracy_rises_with_each_loss(loss, tiny_model, tmp_path):
    data = SAMPLES / "rankings.jsonl"
    summary = train_rm(tiny_model("llama"), tmp_path / loss, data, "--loss", loss, "--max-steps", 40,
                       "--eval-data", data, "--eval-every", 2)
    evals = [r["eval_accuracy"] for r in read_metrics(tmp_path / loss / "metrics.jsonl") if "eval_accuracy" in r]
    assert summary["eval_accuracy"] > evals[0] + 0.1, evals
    assert summary["eval_accuracy"] >= 0.75


def test_lora_rm_round_trip_and_score_command(tiny_model, tmp_path, cli):
    from rlhflab.models.loading import choose_placement
    from rlhflab.rewards.model import load_reward_model, score_texts

    out = tmp_path / "rm"
    train_rm(tiny_model("qwen2"), out, SAMPLES / "pairs.jsonl", "--lora", "--max-steps", 5)
    assert (out / "adapter_config.json").exists() and (out / "score_head.safetensors").exists()
    model, tok = load_reward_model(str(out), choose_placement("cpu", "fp32"))
    convo = [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!"}]]
    again, _ = load_reward_model(str(out), choose_placement("cpu", "fp32"))
    assert score_texts(model, tok, convo) == score_texts(again, tok, convo)
    result = cli("rm", "score", "--model", out, "--data", SAMPLES / "pairs.jsonl", "--out", tmp_path / "s.jsonl")
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 80


def test_harden_adds_degenerate_rejected_answers(tiny_model):
    from transformers import AutoTokenizer

    from rlhflab.data.formats import load_records
    from rlhflab.train.rm import as_pairs, encode_pair_rows

    tok = AutoTokenizer.from_pretrained(str(tiny_model("llama")))
    records, _ = load_records(str(SAMPLES / "pairs.jsonl"), "preference")
    plain, _ = encode_pair_rows(records[:3], tok, 128, harden=False)
    hard, _ = encode_pair_rows(records[:3], tok, 128, harden=True)
    assert [len(bad) for _, _, bad in as_pairs(plain)] == [0, 0, 0]
    assert [len(bad) for _, _, bad in as_pairs(hard)] == [9, 9, 9], "each pair carries its prompt's degenerate answers"
    some, _ = encode_pair_rows(records[:3], tok, 128, harden=True, harden_kinds=3)
    assert [len(bad) for _, _, bad in as_pairs(some)] == [3, 3, 3]
    ranking = as_pairs([{"seqs": [[1], [2], [3], [4]], "n_real": 3}])
    assert ranking == [([1], [2], [[4]]), ([1], [3], []), ([2], [3], [])], "a ranking's first pair carries them"
    assert len({tuple(row["seqs"][-1]) for row in some}) == 3, "the kinds rotate over the prompts"
    only, _ = encode_pair_rows(records[:3], tok, 128, harden=True, harden_kinds=0, kinds=("empty", "ramble"))
    assert [len(bad) for _, _, bad in as_pairs(only)] == [2, 2, 2]
    assert all(a["seqs"][-2] == b["seqs"][2] for a, b in zip(only, hard)), "the empty answer, as --harden adds it"


def test_harden_only_names_unknown_kinds():
    from rlhflab.errors import UsageError
    from rlhflab.rewards.degenerate import KINDS
    from rlhflab.train.rm import harden_kinds_of

    assert harden_kinds_of("") == KINDS and harden_kinds_of(" empty, eos_only,empty") == ("empty", "eos_only")
    with pytest.raises(UsageError, match="'blank'"):
        harden_kinds_of("empty,blank")


@pytest.mark.parametrize("loss", ["ranking", "pairwise"])
def test_hardening_pairs_are_their_own_weighted_mean(loss):
    """loss = real comparisons' mean + harden_weight * mean over (best, degenerate) pairs."""
    from types import SimpleNamespace

    from rlhflab.losses import ranking_loss
    from rlhflab.train.rm import as_pairs, batch_loss

    scores = {(1,): 2.0, (2,): 0.5, (3,): 1.0, (4,): -1.0, (5,): 3.0}     # a sequence's score = a table lookup
    model = lambda ids, mask: torch.tensor([scores[tuple(row[:1].tolist())] for row in ids])  # noqa: E731
    rows = [{"seqs": [[1], [2], [3], [4], [5]], "n_real": 3, "gold": None}]   # [4], [5] are degenerate
    items = as_pairs(rows) if loss == "pairwise" else rows
    config = SimpleNamespace(loss=loss, margin=0.0, center_coef=0.0, harden_weight=0.3)
    total, metrics = batch_loss(model, items, config, 0, "cpu")

    real, _ = ranking_loss(torch.tensor([[2.0, 0.5, 1.0]]))                  # 3 real pairs, either way
    hard = -torch.nn.functional.logsigmoid(torch.tensor([2.0 - -1.0, 2.0 - 3.0])).mean()
    torch.testing.assert_close(total, real + 0.3 * hard)
    assert metrics["harden_accuracy"] == 0.5 and metrics["pairs"] == 5


def test_pairwise_hardening_rides_with_the_real_pairs(tiny_model, tmp_path):
    """Every logged step trains on real pairs, with the degenerate answers beside them: hardening no
    longer forms batches of its own (which, grouped by length, it did, and which crashed the logging)."""
    summary = train_rm(tiny_model("llama"), tmp_path / "rm", SAMPLES / "pairs.jsonl", "--loss", "pairwise",
                       "--harden", "--max-steps", 12)
    rows = read_metrics(tmp_path / "rm" / "metrics.jsonl")
    assert len(rows) == 12
    # each real pair brings its prompt's 3 degenerate answers (--harden-kinds 3), in every batch
    assert all(r["pairs"] % (1 + 3) == 0 and "accuracy" in r and "harden_accuracy" in r for r in rows), rows
    assert summary["train_pairs"] == sum(r["pairs"] for r in rows)


def test_audit_flags_a_reward_model_that_prefers_short_answers(tiny_model, tmp_path, cli):
    swapped = tmp_path / "short_wins.jsonl"
    rows = [json.loads(line) for line in (SAMPLES / "pairs.jsonl").read_text().splitlines()]
    swapped.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": "好", "rejected": r["chosen"]},
                                          ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "broken"
    train_rm(tiny_model("llama"), out, swapped, "--max-steps", 30)
    result = cli("rm", "audit", "--model", out, "--reference", SAMPLES / "pairs.jsonl", "--strict")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "HACKABLE" in result.stdout and "one_token" in result.stdout
    report = json.loads((out / "audit.json").read_text())
    assert report["hackable"] and report["kinds"]["filler"]["share"] > 0.05


def test_missing_field_is_named(tmp_path, cli, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    result = cli("rm", "--model", tiny_model("llama"), "--data", bad, "--out", tmp_path / "o")
    assert result.returncode == 2 and f"{bad}:2" in result.stderr and "'rejected'" in result.stderr
    assert not (tmp_path / "o").exists()


def test_length_chunks_bound_the_padding_and_keep_every_index():
    from rlhflab.rewards.model import length_chunks

    lengths = [5, 50, 6, 48, 7, 200, 5, 51]
    chunks = length_chunks(lengths, waste=0.15)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for chunk in chunks:
        padded = max(lengths[i] for i in chunk) * len(chunk)
        assert padded <= 1.15 * sum(lengths[i] for i in chunk) or len(chunk) == 1
    assert length_chunks([10] * 40, most=32) == [list(range(32)), list(range(32, 40))]


def test_chunked_scores_equal_one_padded_batch(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from rlhflab.rewards.model import RewardModel, pad_right, score_by_length

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model("llama")))
    model = RewardModel(lm, lm.config.hidden_size).eval()
    seqs = [[5, 6, 7], [8] * 20, [9, 10], [11] * 7, [12] * 19]
    with torch.no_grad():
        ids, mask = pad_right(seqs, 0, "cpu")
        whole = model(ids, mask)
        chunked = score_by_length(seqs, model, 0, "cpu")
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_grad_accum_logs_the_whole_step(tiny_model, tmp_path):
    """--batch-size 2 --grad-accum 2 logs what --batch-size 4 does (it logged the last micro-batch)."""
    logged = {}
    for name, extra in (("one", []), ("two", ["--batch-size", 2, "--grad-accum", 2])):   # train_rm: batch 4
        train_rm(tiny_model("llama"), tmp_path / name, SAMPLES / "pairs.jsonl", "--max-steps", 1,
                 "--group-by-length", "false", *extra)
        logged[name] = read_metrics(tmp_path / name / "metrics.jsonl")[0]
    assert logged["two"]["pairs"] == logged["one"]["pairs"] == 4
    for key in ("loss", "accuracy", "margin"):
        assert logged["two"][key] == pytest.approx(logged["one"][key], abs=1e-5), key


def test_merging_a_lora_reward_model_keeps_its_score_head(tiny_model, tmp_path, cli):
    rm, merged = tmp_path / "rm", tmp_path / "merged"
    train_rm(tiny_model("llama"), rm, SAMPLES / "pairs.jsonl", "--lora", "--max-steps", 3)
    assert cli("merge", "--adapter", rm, "--out", merged).returncode == 0
    scores = {}
    for name, path in (("adapter", rm), ("merged", merged)):
        result = cli("rm", "score", "--model", path, "--data", SAMPLES / "pairs.jsonl", "--out", tmp_path / f"{name}.jsonl")
        assert result.returncode == 0, result.stderr
        scores[name] = [json.loads(line)["score"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert scores["merged"] == pytest.approx(scores["adapter"], abs=1e-4)


def test_eval_fraction_zero_holds_nothing_out(tiny_model, tmp_path):
    summary = train_rm(tiny_model("llama"), tmp_path / "rm", SAMPLES / "pairs.jsonl", "--max-steps", 1)
    assert "eval_pairs" not in summary and summary["rows_used"] == 40


@pytest.mark.parametrize("option,path,named", [("--model", "/no/such/model", "--model /no/such/model"),
                                               ("--model", SAMPLES / "pairs.jsonl", "a file; expected a model")])
def test_a_bad_model_path_is_named_by_its_option(option, path, named, tmp_path, cli):
    result = cli("rm", option, path, "--data", SAMPLES / "pairs.jsonl", "--out", tmp_path / "o")
    assert result.returncode == 2 and named in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_a_long_prompt_is_cut_from_its_start_so_the_answer_is_still_scored(tiny_model):
    """A reward model reads its score at the last token: truncating the end would give every answer
    to a long prompt the same score."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhflab.models.loading import load_tokenizer
    from rlhflab.rewards.model import RewardModel, score_texts

    tok = load_tokenizer(str(tiny_model("llama")))
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model("llama")))
    model = RewardModel(lm, lm.config.hidden_size).eval()
    prompt = [{"role": "user", "content": "Tell me a story " + "please " * 200}]
    good, bad = (prompt + [{"role": "assistant", "content": text}] for text in ("Once upon a time.", "No."))
    first, second = score_texts(model, tok, [good, bad], max_length=64)
    assert first != second
