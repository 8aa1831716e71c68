"""Forward passes shared by the stages: response log-probs (plain or with a group's prompt packed
once), the body's hidden states, and running a model with one of its LoRA adapters active.

Dimensions: B rows, P prompt tokens (left-padded), R response tokens (right-padded), T = P + R.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from rlhflab.losses import entropy_from_logits, gather_logprobs
from rlhflab.models.heads import causal_lm, logits_at
from rlhflab.models.packing import pack_groups


@contextlib.contextmanager
def active_adapter(model, name: str | None):
    """Run `model` with adapter `name` active (None = all adapters off), restoring the previous state."""

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:
        if name is None:
            m._disable_adapters = True
        else:
            m._active_adapter, m._disable_adapters = [name], False
    try:
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


def response_selection(input_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """(B, T) bool: the positions whose logits predict a response token."""
    select = torch.zeros_like(input_ids, dtype=torch.bool)
    select[:, prompt_len - 1:-1] = True
    return select


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token, counting real tokens only: left padding starts a row at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def takes_position_ids(module) -> bool:
    """Whether the module's forward accepts position_ids (left-padded rows then keep their positions)."""
    return "position_ids" in inspect.signature(module.forward).parameters


def trim_left_padding(lm, input_ids, attention_mask, prompt_len: int):
    """(input_ids, attention_mask, prompt_len) without the leading columns that are padding in every
    row: a mini-batch's longest prompt is often shorter than the rollout's, to whose length all rows
    were left-padded. Each real token keeps its position (counted from the mask), so the log-probs
    are those of the whole rows, for less work. Rows stay as they are for a model that takes no
    position ids (its positions would shift) and where no column can go."""
    if attention_mask is None or not takes_position_ids(lm):
        return input_ids, attention_mask, prompt_len
    real = attention_mask[:, : prompt_len - 1].any(0)   # the last prompt column always stays
    cut = int(real.long().argmax()) if bool(real.any()) else prompt_len - 1
    if cut == 0:
        return input_ids, attention_mask, prompt_len
    return input_ids[:, cut:], attention_mask[:, cut:], prompt_len - cut


def _forward_kwargs(lm, input_ids, attention_mask) -> dict:
    """Forward arguments; with attention_mask None (right padding, see heads.padding_mask_for) no positions."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if attention_mask is not None and takes_position_ids(lm):
        kwargs["position_ids"] = position_ids(attention_mask)
    return kwargs


def response_logprobs(model, input_ids, attention_mask, prompt_len: int, with_entropy: bool = False):
    """(B, R) log p(response token | prefix) in fp32, and optionally the (B, R) entropy."""
    lm = causal_lm(model)
    select = response_selection(input_ids, prompt_len)
    logits = logits_at(model, select, **_forward_kwargs(lm, input_ids, attention_mask))
    targets = input_ids[:, prompt_len:]
    logits = logits.view(*targets.shape, -1)                                                 # (B, R, V)
    logprobs = gather_logprobs(logits, targets)
    return (logprobs, entropy_from_logits(logits)) if with_entropy else (logprobs, None)


def pack_rollout(input_ids, attention_mask, prompt_len: int, group: int, dtype) -> tuple[dict, torch.Tensor]:
    """Rollout rows that come in whole groups of `group` samples of one prompt (GRPO, RLOO), as
    packed rows (models/packing.py): the prompt once, then each sample's last prompt token and
    response at their own positions. Returns the forward arguments and the (rows, T) selection of
    the positions that predict response tokens, in the rows' order."""
    groups, prefixes = [], []
    for start in range(0, input_ids.shape[0], group):
        rows = input_ids[start:start + group, :prompt_len]
        if not bool((rows == rows[:1]).all()):
            raise ValueError(f"rollout rows {start}..{start + group - 1} are not samples of one prompt")
        prompt = rows[0][attention_mask[start, :prompt_len].bool()].tolist()
        groups.append([prompt + input_ids[b, prompt_len:].tolist() for b in range(start, start + group)])
        prefixes.append(len(prompt) - 1)
    packed = pack_groups(groups, 0, input_ids.device, dtype, prefix_lengths=prefixes)
    select = torch.zeros(packed["input_ids"].shape, dtype=torch.bool, device=input_ids.device)
    for row, start, end in packed["segments"]:
        select[row, start:end - 1] = True
    return packed, select


def packed_response_logprobs(model, input_ids, attention_mask, prompt_len: int, group: int,
                             with_entropy: bool = False):
    """response_logprobs for rows in groups of samples of one prompt, the prompt run once per group."""
    lm = causal_lm(model)
    packed, select = pack_rollout(input_ids, attention_mask, prompt_len, group, lm.dtype)
    logits = logits_at(model, select, input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"])
    targets = input_ids[:, prompt_len:]
    logits = logits.view(*targets.shape, -1)                                                 # (B, R, V)
    logprobs = gather_logprobs(logits, targets)
    return (logprobs, entropy_from_logits(logits)) if with_entropy else (logprobs, None)


def hidden_states(model, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """(B, T, H) last hidden states of the transformer body (no LM head). Explicit `position_ids`
    go with a 4D attention mask (rows packed by models/packing.py)."""
    lm = causal_lm(model)
    body = lm.base_model
    if position_ids is None:
        kwargs = _forward_kwargs(body, input_ids, attention_mask)
    elif takes_position_ids(body):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    else:
        raise ValueError(f"{type(body).__name__} takes no position_ids: packed rows cannot keep their positions")
    out = body(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
