"""GRPO/RLOO samples of one prompt run packed (the prompt once): the same log-probs, the same run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS, SAMPLES

from rlhflab.cli.main import main
from rlhflab.runs import read_metrics


def _rollout(vocab: int):
    """Two prompts (the second left-padded), three samples each, responses of 5 tokens."""
    torch.manual_seed(3)
    rows, masks = [], []
    for real in (7, 4):
        prompt = torch.cat([torch.zeros(7 - real, dtype=torch.long), torch.randint(5, vocab, (real,))])
        for _ in range(3):
            rows.append(torch.cat([prompt, torch.randint(5, vocab, (5,))]))
            masks.append(torch.cat([torch.zeros(7 - real), torch.ones(real + 5)]).long())
    return torch.stack(rows), torch.stack(masks), 7


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logprobs_equal_single_rows(arch, tiny_model):
    from transformers import AutoModelForCausalLM

    from rlhflab.train.roles import Roles, packed_response_logprobs, response_logprobs

    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model(arch))).eval()
    roles = Roles(lm, None, None, lora=False, reference_adapter=None, reward_adapter=None, critic_adapter=None)
    works = roles.can_share_prompt(lm.config.vocab_size)
    if not works:
        assert arch == "bloom"   # ALiBi reads positions from a 2D mask: the check must refuse it, and only it
        return
    ids, mask, prompt_len = _rollout(lm.config.vocab_size)
    alone, entropy_alone = response_logprobs(lm, ids, mask, prompt_len, with_entropy=True)
    packed, entropy_packed = packed_response_logprobs(lm, ids, mask, prompt_len, group=3, with_entropy=True)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy_packed, entropy_alone, rtol=1e-4, atol=1e-4)
    # rows that are not samples of one prompt are refused, not silently mixed up
    with pytest.raises(ValueError, match="not samples of one prompt"):
        packed_response_logprobs(lm, ids, mask, prompt_len, group=2)


def test_grpo_with_and_without_packing(sft_and_rm, tmp_path):
    sft, rm = sft_and_rm
    runs = {}
    for share in ("true", "false"):
        out = tmp_path / f"grpo-{share}"
        assert main(["ppo", "--policy", str(sft), "--reward", str(rm), "--prompts", str(SAMPLES / "prompts.jsonl"),
                     "--out", str(out), "--estimator", "grpo", "--n-samples", "2", "--rollout-prompts", "3",
                     "--mini-batch", "2", "--max-new-tokens", "8", "--max-steps", "2", "--lora",
                     "--share-prompt", share, "--progress", "false", "--probe-every", "0"]) == 0
        runs[share] = (json.loads((out / "summary.json").read_text()), read_metrics(out / "metrics.jsonl"))
    assert runs["true"][0]["shared_prompt"] is True and runs["false"][0]["shared_prompt"] is False
    first = {share: rows[0] for share, (_, rows) in runs.items()}
    assert first["true"]["kl_k1"] == 0.0                        # policy = reference at step 1, packed or not
    for key in ("reward", "entropy", "response_len"):
        assert first["true"][key] == pytest.approx(first["false"][key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_no_row_needs_is_skipped_with_the_same_logprobs(arch, tiny_model):
    """A mini-batch whose prompts are all shorter than the rollout's longest drops the columns that
    are padding in every row: the same log-probs, values and entropy, from a shorter pass."""
    from transformers import AutoModelForCausalLM

    from rlhflab.models.forward import hidden_states, trim_left_padding
    from rlhflab.train.roles import Roles, _value_head, response_logprobs

    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model(arch))).eval()
    ids, mask, prompt_len = _rollout(lm.config.vocab_size)
    ids, mask = ids[3:], mask[3:]                      # the left-padded prompt's samples only: 3 columns to spare
    trimmed_ids, trimmed_mask, trimmed_len = trim_left_padding(lm, ids, mask, prompt_len)
    if arch == "bloom":   # no position ids to keep the tokens' positions with: left as it is
        assert trimmed_ids is ids and trimmed_len == prompt_len
    else:
        assert trimmed_ids.shape[1] == ids.shape[1] - 3 and trimmed_len == prompt_len - 3
        assert bool(trimmed_mask[:, 0].all())
    torch.manual_seed(0)
    roles = Roles(lm, _value_head(lm.config.hidden_size, None, ids.device), None, lora=False, reference_adapter=None,
                  reward_adapter=None, critic_adapter=None, shared_critic=True)
    whole, entropy_whole = response_logprobs(lm, ids, mask, prompt_len, with_entropy=True)   # untrimmed
    logprobs, entropy = roles.logprobs("policy", ids, mask, prompt_len, with_entropy=True)
    torch.testing.assert_close(logprobs, whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(entropy, entropy_whole, rtol=1e-4, atol=1e-5)
    shared_logprobs, _, values = roles.policy_and_values(ids, mask, prompt_len)
    torch.testing.assert_close(shared_logprobs, whole, rtol=1e-4, atol=1e-5)
    expected = roles.value_head(hidden_states(lm, ids, mask)[:, prompt_len - 1:-1])
    torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-5)
