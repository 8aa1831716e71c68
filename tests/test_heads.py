"""The LM head run only at the positions a loss reads gives the same numbers as the full head."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS


def _batch(vocab: int, pad_id: int):
    torch.manual_seed(1)
    ids = torch.randint(5, vocab, (3, 11))
    mask = torch.ones_like(ids)
    ids[2, 8:], mask[2, 8:] = pad_id, 0                              # a right-padded row
    labels = ids.clone()
    labels[:, :4] = -100                                             # the prompt
    labels[1, 6:] = -100                                             # an answer that ends early
    labels[mask == 0] = -100
    return ids, mask, labels


@pytest.mark.parametrize("arch", ARCHS)
def test_selected_logits_equal_the_full_heads(arch, tiny_model):
    from transformers import AutoModelForCausalLM

    from rlhflab.data.template import IGNORE_INDEX
    from rlhflab.models.heads import answer_selection, logits_at
    from rlhflab.train.dpo import sequence_logps
    from rlhflab.train.sft import nll_sum

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model(arch))).eval()
    ids, mask, labels = _batch(model.config.vocab_size, model.config.pad_token_id)
    full = model(input_ids=ids, attention_mask=mask).logits               # (B, T, V)

    select, targets = answer_selection(labels, IGNORE_INDEX)
    picked = logits_at(model, select, input_ids=ids, attention_mask=mask)
    assert picked.shape == (int(select.sum()), full.shape[-1])
    torch.testing.assert_close(picked, full[select])
    assert torch.equal(targets, labels[:, 1:][labels[:, 1:] != IGNORE_INDEX])

    # SFT's loss against the cross-entropy of the full logits.
    loss, n = nll_sum(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    expected = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, expected)

    # DPO's per-sequence log-probs: row 0 as chosen, row 1 as rejected.
    rows = [{"input_ids": ids[r, :int(mask[r].sum())].tolist(),
             "labels": labels[r, :int(mask[r].sum())].tolist()} for r in range(2)]
    chosen, rejected, n_chosen, n_rejected = sequence_logps(model, [{"chosen": rows[0], "rejected": rows[1]}],
                                                            model.config.pad_token_id, "cpu")
    token_logps = torch.log_softmax(full[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    answer = labels[:, 1:] != IGNORE_INDEX
    torch.testing.assert_close(chosen[0], (token_logps[0] * answer[0]).sum())
    torch.testing.assert_close(rejected[0], (token_logps[1] * answer[1]).sum())
    assert (int(n_chosen[0]), int(n_rejected[0])) == (int(answer[0].sum()), int(answer[1].sum()))


def test_response_logprobs_and_shared_values_read_the_head_input(tiny_model):
    """RL's response log-probs (selected head) equal the full head's; the hidden states are the head's input."""
    from transformers import AutoModelForCausalLM

    from rlhflab.models.heads import logits_at
    from rlhflab.train.roles import response_logprobs, response_selection

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model("llama"))).eval()
    torch.manual_seed(2)
    ids = torch.randint(5, model.config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    prompt_len = 4
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    expected = torch.log_softmax(out.logits[:, prompt_len - 1:-1], -1).gather(
        -1, ids[:, prompt_len:].unsqueeze(-1)).squeeze(-1)
    logprobs, entropy = response_logprobs(model, ids, mask, prompt_len, with_entropy=True)
    torch.testing.assert_close(logprobs, expected)
    assert entropy.shape == expected.shape and bool((entropy > 0).all())

    _, hidden = logits_at(model, response_selection(ids, prompt_len), return_hidden=True,
                          input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(hidden, out.hidden_states[-1])


def test_selected_head_through_a_lora_adapter_gets_gradients(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhflab.models.heads import logits_at

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model("qwen2"))),
                           LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    ids = torch.randint(5, model.config.vocab_size, (2, 7))
    select = torch.zeros_like(ids, dtype=torch.bool)
    select[:, 3:6] = True
    logits = logits_at(model, select, input_ids=ids, attention_mask=torch.ones_like(ids))
    assert logits.shape == (6, model.config.vocab_size)
    logits.logsumexp(-1).sum().backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_" in name]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padded_rows_need_no_padding_mask(arch, tiny_model):
    """Right padding: the real positions' logits are the same without the mask (causal attention)."""
    from transformers import AutoModelForCausalLM

    from rlhflab.models.heads import padding_mask_for

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model(arch))).eval()
    ids, mask, _ = _batch(model.config.vocab_size, model.config.pad_token_id)
    assert padding_mask_for(mask) is None
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert padding_mask_for(left) is left
    with_mask = model(input_ids=ids, attention_mask=mask).logits
    without = model(input_ids=ids, attention_mask=padding_mask_for(mask)).logits
    torch.testing.assert_close(without[mask.bool()], with_mask[mask.bool()])
