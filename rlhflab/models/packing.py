"""Sequences that share a prompt, packed into one row so that the prompt runs once.

A group's shared prefix comes first, then each sequence's own tokens, which attend to the prefix
and to themselves only, at the positions they would have alone: with a 4D attention mask and
explicit position ids, every hidden state after the prefix equals the one the sequence would get
in a row of its own. The reward model scores the responses to one prompt this way, and RL runs
the n samples of one prompt (GRPO, RLOO) through the policy and the reference this way. Not
every model honours a 4D mask and explicit positions (ALiBi models such as BLOOM read positions
from a 2D mask; FlashAttention-2 kernels take no mask): callers check once and fall back. The
check runs on a few made-up tokens, too short to show a sliding attention window being ignored
by the custom mask, so models that declare one (Mistral, Qwen2 with use_sliding_window) are not
packed at all.
"""

from __future__ import annotations

from typing import Callable

import torch


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving each at least one token of its own."""
    shortest = min(len(s) for s in seqs)
    n = 0
    while n < shortest - 1 and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def packed_length(seqs: list[list[int]]) -> int:
    """Length of the row pack_groups makes of `seqs` (the longest common prefix once)."""
    p = common_prefix_length(seqs) if len(seqs) > 1 else 0
    return p + sum(len(s) - p for s in seqs)


def pack_groups(groups: list[list[list[int]]], pad_id: int, device, dtype,
                prefix_lengths: list[int] | None = None) -> dict:
    """Each group as one row (see the module docstring). `prefix_lengths` fixes each group's
    shared prefix (every sequence of the group must start with it); by default it is the longest
    common one. Returns the forward arguments (input_ids, the (rows, 1, T, T) additive
    attention_mask, position_ids), `read_at`: (N, 2) (row, column) of each sequence's last token,
    and `segments`: (row, start, end) of each sequence's own tokens, end exclusive.

    Pads attend to themselves only (a query with nothing to attend to gives NaN in the softmax)
    and are never read."""
    packed = []
    for number_of_group, seqs in enumerate(groups):
        if prefix_lengths is not None:
            p = prefix_lengths[number_of_group]
            if any(s[:p] != seqs[0][:p] or len(s) <= p for s in seqs):
                raise ValueError(f"group {number_of_group}: the sequences do not share their first {p} tokens")
        else:
            p = common_prefix_length(seqs) if len(seqs) > 1 else 0
        tokens, segment, positions, spans = list(seqs[0][:p]), [0] * p, list(range(p)), []
        for number, seq in enumerate(seqs, start=1):
            tail = seq[p:]
            spans.append((len(tokens), len(tokens) + len(tail)))
            tokens += tail
            segment += [number] * len(tail)
            positions += range(p, len(seq))
        packed.append((tokens, segment, positions, spans))
    width = max(len(row[0]) for row in packed)
    ids = torch.full((len(packed), width), pad_id, dtype=torch.long)
    seg = torch.full((len(packed), width), -1, dtype=torch.long)
    pos = torch.zeros((len(packed), width), dtype=torch.long)
    segments = []
    for r, (tokens, segment, positions, spans) in enumerate(packed):
        ids[r, :len(tokens)] = torch.tensor(tokens)
        seg[r, :len(segment)] = torch.tensor(segment)
        pos[r, :len(positions)] = torch.tensor(positions)
        segments += [(r, start, end) for start, end in spans]
    index = torch.arange(width)
    causal = index[None, :, None] >= index[None, None, :]                        # (1, T_q, T_k)
    q, k = seg[:, :, None], seg[:, None, :]
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool)[None] & (q < 0)               # pads see themselves
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    read = [(r, end - 1) for r, _, end in segments]
    return {"input_ids": ids.to(device), "attention_mask": mask[:, None].to(device),
            "position_ids": pos.to(device), "read_at": torch.tensor(read, dtype=torch.long).to(device),
            "segments": segments}


@torch.no_grad()
def packing_agrees(module: torch.nn.Module, packed: Callable[[], torch.Tensor], alone: Callable[[], torch.Tensor],
                   dtype: torch.dtype) -> bool:
    """Whether `packed()` gives what `alone()` gives (the same figures computed from packed rows
    and from single rows), in eval mode; any error counts as no. The tolerance is relative to
    the figures, loose enough for 16-bit weights."""
    if any(_sliding_window(getattr(sub, "config", None)) for sub in module.modules()):
        return False
    was_training = module.training
    module.eval()
    try:
        got, expected = packed(), alone()
    except Exception:  # noqa: BLE001 - whatever breaks, the caller falls back to single rows
        return False
    finally:
        module.train(was_training)
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    return bool(torch.isfinite(got).all()) and bool(((got - expected).abs() <= tolerance * (1 + expected.abs())).all())


def _sliding_window(config) -> bool:
    """Whether a model config declares a sliding attention window in use."""
    return bool(config is not None and getattr(config, "sliding_window", None)
                and getattr(config, "use_sliding_window", True))
