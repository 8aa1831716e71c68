"""The output head of a causal LM, run only at the positions a loss reads.

SFT and DPO read next-token log-probs only on answer tokens, RL only on response tokens; the
rest of the (B, T, V) logits are computed and thrown away. At vocabulary 4096 the head is a
sixth of a small model's matmul work, and far more at 150k. `logits_at` runs the model's own
forward (so DDP, FSDP and DeepSpeed wrappers, and any elementwise logit scaling or soft-capping
after the head, still apply) with a pre-hook on the head that keeps only the selected hidden
states: the model returns (N, V) logits for the N selected positions, in row-major order.
"""

from __future__ import annotations

import torch


def causal_lm(model):
    """The HF causal LM inside a peft wrapper (or the model itself)."""
    inner = getattr(model, "module", model)          # DDP / DeepSpeed wrappers
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def logits_at(model, select: torch.Tensor, return_hidden: bool = False, **forward_kwargs):
    """(N, V) logits at the N positions where the (B, T) bool `select` is True.

    `forward_kwargs` go to the model's forward (input_ids, attention_mask, ...); `select[b, t]`
    asks for the logits that predict token t + 1 of row b. With `return_hidden`, also the
    (B, T, H) hidden states the head would have read (a value head's input).
    """
    head = causal_lm(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(causal_lm(model)).__name__} has no output embeddings (LM head)")
    seen = []

    def keep_selected(module, args):
        hidden = args[0]
        if hidden.shape[:2] != select.shape:
            raise RuntimeError(f"LM head input {tuple(hidden.shape)} does not match the selection "
                               f"{tuple(select.shape)}: this model slices its hidden states before the head")
        seen.append(hidden)
        return (hidden[select],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(keep_selected)
    try:
        logits = model(**forward_kwargs).logits
    finally:
        handle.remove()
    logits = logits.reshape(-1, logits.shape[-1])
    return (logits, seen[0]) if return_hidden else logits


def answer_selection(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From (B, T) labels: the (B, T) positions whose next token is labelled, and those N targets."""
    targets = labels[:, 1:]
    labelled = targets != ignore_index
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labelled
    return select, targets[labelled]


def padding_mask_for(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask to give the model: None when every row is right-padded.

    Causal attention already keeps each real token from seeing the pads after it, so the outputs
    at real positions are the same without the mask, and attention can take its fused causal path
    (no (B, 1, T, T) mask built per layer; on a GPU, the flash kernel). Positions are unchanged:
    right padding numbers the real tokens 0..n-1 either way. Left-padded rows keep their mask.
    """
    if attention_mask.shape[1] < 2 or bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return None
    return attention_mask
