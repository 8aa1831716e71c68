"""Reward-model rows that share a prompt: the prompt runs once, every score stays the same."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS


def test_pack_groups_layout():
    from rlhflab.models.packing import common_prefix_length, pack_groups

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix_length([[1, 2], [1, 2]]) == 1          # each keeps a token of its own
    packed = pack_groups([[[1, 2, 3, 4], [1, 2, 5]], [[7, 8]]], pad_id=0, device="cpu", dtype=torch.float32)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert packed["read_at"].tolist() == [[0, 3], [0, 4], [1, 1]]
    assert packed["segments"] == [(0, 2, 4), (0, 4, 5), (1, 0, 2)]
    fixed = pack_groups([[[1, 2, 3, 4], [1, 2, 5]]], 0, "cpu", torch.float32, prefix_lengths=[1])
    assert fixed["input_ids"].tolist() == [[1, 2, 3, 4, 2, 5]] and fixed["segments"] == [(0, 1, 4), (0, 4, 6)]
    assert fixed["position_ids"].tolist() == [[0, 1, 2, 3, 1, 2]]
    with pytest.raises(ValueError, match="do not share"):
        pack_groups([[[1, 2, 3], [1, 4, 3]]], 0, "cpu", torch.float32, prefix_lengths=[2])
    allowed = packed["attention_mask"][:, 0] == 0                   # (rows, T, T)
    # the second answer's token (index 4) sees the prompt and itself, not the first answer
    assert allowed[0, 4].tolist() == [True, True, False, False, True]
    assert allowed[0, 3].tolist() == [True, True, True, True, False]
    assert allowed[1, 1].tolist() == [True, True, False, False, False]
    assert allowed[1, 3].tolist() == [False, False, False, True, False]   # a pad sees only itself


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_scores_equal_single_rows(arch, tiny_model):
    from transformers import AutoModelForCausalLM

    from rlhflab.rewards.model import RewardModel, can_share_prompt, score_groups

    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model(arch)))
    model = RewardModel(lm, lm.config.hidden_size).eval()
    pad, vocab = lm.config.pad_token_id, lm.config.vocab_size
    torch.manual_seed(0)
    prompts = [torch.randint(5, vocab, (n,)).tolist() for n in (7, 4)]
    groups = [[prompts[0] + torch.randint(5, vocab, (n,)).tolist() for n in (3, 6, 1, 4)],
              [prompts[1] + torch.randint(5, vocab, (n,)).tolist() for n in (2, 5)]]
    works = can_share_prompt(model, pad, "cpu", vocab)
    alone = score_groups(groups, model, pad, "cpu", share=False)
    if not works:
        # ALiBi models read positions from a 2D mask: the check must refuse them, and only them
        assert arch == "bloom"
        return
    shared = score_groups(groups, model, pad, "cpu", share=True)
    torch.testing.assert_close(shared, alone, rtol=1e-4, atol=1e-4)
    # gradients through the packed rows equal those through single rows
    grads = []
    for share in (True, False):
        model.zero_grad()
        score_groups(groups, model, pad, "cpu", share=share).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("loss", ["pairwise", "ranking"])
def test_rm_training_with_and_without_sharing_agrees(loss, tiny_model, tmp_path):
    from rlhflab.cli.main import main

    data = tmp_path / "rankings.jsonl"
    rows = []
    for i in range(24):
        prompt = [{"role": "user", "content": f"What is {i} plus {i + 1}?"}]
        rows.append({"prompt": prompt, "responses": [f"{i} plus {i + 1} is {2 * i + 1}.", f"It is {2 * i}.",
                                                     "I do not know, sorry about that."]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summaries = []
    for share in ("true", "false"):
        out = tmp_path / f"rm-{share}"
        assert main(["rm", "--model", str(tiny_model("llama")), "--data", str(data), "--out", str(out),
                     "--loss", loss, "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3", "--share-prompt", share,
                     "--progress", "false", "--eval-fraction", "0.25", "--seed", "0"]) == 0
        summaries.append(json.loads((out / "summary.json").read_text(encoding="utf-8")))
    assert summaries[0]["shared_prompt"] is True and summaries[1]["shared_prompt"] is False
    assert summaries[0]["final_loss"] == pytest.approx(summaries[1]["final_loss"], rel=1e-3)
    assert summaries[0]["eval_accuracy"] == summaries[1]["eval_accuracy"]


@pytest.mark.parametrize("arch", ARCHS)
def test_dpo_packed_pairs_equal_single_rows(arch, tiny_model):
    from transformers import AutoModelForCausalLM

    from rlhflab.data.template import IGNORE_INDEX
    from rlhflab.train.dpo import can_share_prompt, sequence_logps

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model(arch))).eval()
    pad, vocab = model.config.pad_token_id, model.config.vocab_size
    if not can_share_prompt(model, pad, "cpu", vocab):
        assert arch == "bloom"
        return
    torch.manual_seed(2)
    pairs = []
    for prompt_len, answers in ((9, (4, 1)), (3, (6, 6)), (5, (2, 7))):
        prompt = torch.randint(5, vocab, (prompt_len,)).tolist()
        rows = [prompt + torch.randint(5, vocab, (n,)).tolist() for n in answers]
        pairs.append({key: {"input_ids": row, "labels": [IGNORE_INDEX] * prompt_len + row[prompt_len:]}
                      for key, row in zip(("chosen", "rejected"), rows)})
    # answers that begin alike: the shared prompt must stop where the labels start
    pairs[1]["rejected"]["input_ids"][3] = pairs[1]["chosen"]["input_ids"][3]
    pairs[1]["rejected"]["labels"][3] = pairs[1]["chosen"]["labels"][3]
    alone = sequence_logps(model, pairs, pad, "cpu")
    packed = sequence_logps(model, pairs, pad, "cpu", packed=True)
    for a, b in zip(packed, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_dpo_training_with_and_without_packing_agrees(tiny_model, tmp_path):
    from conftest import SAMPLES

    from rlhflab.cli.main import main

    summaries = []
    for share in ("true", "false"):
        out = tmp_path / f"dpo-{share}"
        assert main(["dpo", "--policy", str(tiny_model("llama")), "--data", str(SAMPLES / "pairs.jsonl"),
                     "--out", str(out), "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3", "--lora",
                     "--share-prompt", share, "--progress", "false", "--seed", "0"]) == 0
        summaries.append(json.loads((out / "summary.json").read_text(encoding="utf-8")))
    assert summaries[0]["shared_prompt"] is True and summaries[1]["shared_prompt"] is False
    assert summaries[0]["final_loss"] == pytest.approx(summaries[1]["final_loss"], rel=1e-3)


def test_models_with_a_sliding_window_are_not_packed(tiny_model):
    from transformers import AutoModelForCausalLM

    from rlhflab.rewards.model import RewardModel, can_share_prompt

    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model("qwen2")))
    model = RewardModel(lm, lm.config.hidden_size)
    assert can_share_prompt(model, lm.config.pad_token_id, "cpu", lm.config.vocab_size)
    lm.config.use_sliding_window, lm.config.sliding_window = True, 4
    assert not can_share_prompt(model, lm.config.pad_token_id, "cpu", lm.config.vocab_size)


def test_score_texts_packs_answers_to_one_prompt(tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rlhflab.rewards.model as rm
    from rlhflab.rewards.model import score_texts

    path = tiny_model("llama")
    lm = AutoModelForCausalLM.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = rm.RewardModel(lm, lm.config.hidden_size).eval()
    conversations = []
    for question in ("What is 2 plus 3?", "Who made you?"):
        for answer in ("5.", "It is five, I think.", "rlhflab", ""):
            conversations.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    conversations.append([{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}])
    calls = []
    real = rm.score_groups
    def counting(groups, *args, **kwargs):
        calls.append([len(g) for g in groups])
        return real(groups, *args, **kwargs)

    monkeypatch.setattr(rm, "score_groups", counting)
    packed = score_texts(model, tokenizer, conversations)
    assert calls[-1] == [4, 4, 1]                                # answers to one prompt grouped
    monkeypatch.setattr(rm, "can_share_prompt", lambda *a, **k: False)
    alone = score_texts(model, tokenizer, conversations)
    assert packed == pytest.approx(alone, abs=1e-4)
