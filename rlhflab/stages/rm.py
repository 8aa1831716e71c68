"""Reward modelling (InstructGPT step 2): a scalar score head on the last real token.

The model starts from the SFT model, as InstructGPT does. With --lora and an SFT adapter, the
reward adapter starts from the SFT adapter's weights on the same base, so PPO can later hold
policy, reference, critic and reward on ONE copy of the base. `--loss ranking` scores all K
responses of a prompt in one forward batch and uses every one of its K-choose-2 comparisons.

Saved: the HF model files or the peft adapter, plus `score_head.safetensors` and
`reward_config.json`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from rlhflab import losses, runs
from rlhflab.config import DataOptions, ModelOptions, TrainOptions, opt
from rlhflab.data.template import encode_chat
from rlhflab.errors import UsageError
from rlhflab.models.packing import pack_groups, packed_length, packing_agrees
from rlhflab.stages import common


@dataclass
class RMConfig(ModelOptions, DataOptions, TrainOptions):
    """Train a reward model on preference pairs or K-way rankings."""

    stage = "rm"
    loss: str = opt("pairwise", "pairwise (Bradley-Terry on pairs) or ranking (InstructGPT K-way, one batch per prompt)",
                    ("pairwise", "ranking"))
    margin: float = opt(0.0, "Bradley-Terry margin subtracted from r_chosen - r_rejected")
    center_coef: float = opt(0.0, "weight of the term that keeps scores near zero mean")
    harden: bool = opt(False, "add degenerate answers (empty, repeated, filler ...) as extra rejected responses")
    harden_weight: float = opt(1.0, "--harden: weight of the (best, degenerate) pairs' mean loss beside the real comparisons'")
    harden_kinds: int = opt(3, "--harden: degenerate answers added per prompt, rotating over all kinds (0 = all)")
    batch_size: int = opt(8, "pairs (pairwise) or prompts (ranking) per micro-batch")
    lr: float = opt(1e-4, "peak learning rate")
    max_length: int = opt(256, "longest prompt + response in tokens (longer ones keep their end, "
                                           "where the score is read)")
    share_prompt: bool = opt(True, "score the responses to one prompt in one row, the prompt computed once "
                                   "(checked at the start; models that cannot take a 4D attention mask fall back)")


class RewardModel(nn.Module):
    """Transformer body (from a causal LM, possibly LoRA-wrapped) + a linear score head."""

    def __init__(self, lm, hidden_size: int):
        super().__init__()
        self.lm = lm
        self.score_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.score_head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.score_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                read_at: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) scores read at the last real token of each row (left or right padding); or, for rows
        packed by `pack_groups` (a 4D mask, explicit positions), (N,) scores read at `read_at`."""
        from rlhflab.models.heads import padding_mask_for
        from rlhflab.stages.rl_roles import hidden_states

        if read_at is not None:
            hidden = hidden_states(self.lm, input_ids, attention_mask, position_ids)
            return self.score_head(hidden[read_at[:, 0], read_at[:, 1]].float()).squeeze(-1)
        hidden = hidden_states(self.lm, input_ids, padding_mask_for(attention_mask))   # (B, T, H)
        last = last_token_index(attention_mask)
        return self.score_head(hidden[torch.arange(hidden.shape[0]), last].float()).squeeze(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of the last real token; works for left and right padding, never a pad."""
    width = attention_mask.shape[1]
    last = width - 1 - attention_mask.long().flip(-1).argmax(-1)
    if not bool(attention_mask.gather(1, last[:, None]).all()):
        raise AssertionError("a row has no real token: the score would be read at a pad position")
    return last


def encode_pair_rows(records, tokenizer, max_length: int, harden: bool, harden_kinds: int = 0) -> tuple[list[dict], int]:
    """Each record -> {"seqs": [ids best first], "gold": [...] or None}; returns (rows, truncated).

    Hardening adds `harden_kinds` degenerate answers per prompt (0 = every kind), rotating through
    the kinds so that each is used equally often over the data.
    """
    from rlhflab.stages.rm_audit import degenerate_answers

    rows, truncated = [], 0
    for index, record in enumerate(records):
        responses = list(record.responses)
        if harden:
            bad = list(degenerate_answers(record.messages, tokenizer).values())
            if 0 < harden_kinds < len(bad):
                bad = [bad[(index * harden_kinds + j) % len(bad)] for j in range(harden_kinds)]
            responses += bad
        seqs = []
        for response in responses:
            enc = encode_chat(tokenizer, record.messages + [{"role": "assistant", "content": response}], max_length,
                              keep_end=True)
            truncated += enc.truncated
            seqs.append(enc.input_ids)
        gold = record.meta.get("gold_scores")
        rows.append({"seqs": seqs, "n_real": len(record.responses), "gold": gold})
    return rows, truncated


def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def as_pairs(rows: list[dict]) -> list[tuple[list[int], list[int], list[list[int]]]]:
    """Every (better, worse, degenerate answers) of every row: rankings expand to K-choose-2, and a
    row's degenerate answers ride with its first pair, so that hardening is mixed into every batch
    at the data's own rate (as items of their own, three or nine per real pair, they made up most
    of the training items, and batches grouped by length held nothing else)."""
    pairs = []
    for row in rows:
        seqs, n = row["seqs"], row["n_real"]
        real = [(seqs[i], seqs[j]) for i in range(n) for j in range(i + 1, n)]
        pairs += [(better, worse, seqs[n:] if index == 0 else []) for index, (better, worse) in enumerate(real)]
    return pairs


def length_chunks(lengths: list[int], waste: float = 0.15, most: int = 32) -> list[list[int]]:
    """Indices grouped by length so that padding adds at most `waste` to a chunk's real tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks, current, real = [], [], 0
    for i in order:
        longest = lengths[i]  # sorted: the newcomer is the longest
        if current and (longest * (len(current) + 1) > (1 + waste) * (real + longest) or len(current) == most):
            chunks.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    return chunks + [current] if current else chunks


def score_by_length(seqs: list[list[int]], model, pad_id: int, device, most: int = 32) -> torch.Tensor:
    """(N,) scores in input order, computed in chunks of similar length.

    One padded batch pads every answer to the longest (a hardening ramble is many times a normal
    answer, and even plain preference pairs waste ~50% on padding); chunks of similar length cut
    the padded tokens, and the time, with the same result.
    """
    chunks = length_chunks([len(s) for s in seqs], most=most)
    parts = []
    for chunk in chunks:
        ids, mask = pad_right([seqs[i] for i in chunk], pad_id, device)
        parts.append(model(ids, mask))
    order = [i for chunk in chunks for i in chunk]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(device)]


def score_groups(groups: list[list[list[int]]], model, pad_id: int, device, share: bool,
                 most: int | None = None) -> torch.Tensor:
    """(N,) scores of every sequence of every group, in order. With `share`, each group (the
    responses to one prompt) is one packed row whose prompt runs once: a pair of toy-world
    answers is ~28% fewer tokens, a ranking of four ~45%. Without, as score_by_length. `most`:
    rows per forward pass (default 16 packed rows, or score_by_length's)."""
    if not share:
        flat = [s for g in groups for s in g]
        return score_by_length(flat, model, pad_id, device) if most is None else \
            score_by_length(flat, model, pad_id, device, most=most)
    dtype = next(model.parameters()).dtype
    lengths = [packed_length(g) for g in groups]
    per_group: list[torch.Tensor | None] = [None] * len(groups)
    for chunk in length_chunks(lengths, most=most or 16):
        packed = pack_groups([groups[i] for i in chunk], pad_id, device, dtype)
        scores = model(packed["input_ids"], packed["attention_mask"], packed["position_ids"], packed["read_at"])
        for i, part in zip(chunk, scores.split([len(groups[i]) for i in chunk])):
            per_group[i] = part
    return torch.cat(per_group)


def sharing_matches(model, pad_id: int, device, vocab_size: int) -> bool:
    """Whether this model scores packed rows as it scores sequences one by one: checked once on a
    small made-up group, since not every architecture honours a 4D mask and explicit positions
    (ALiBi models, FlashAttention-2 kernels)."""
    ids = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, max(vocab_size, 4), (6,), generator=ids).tolist()
    tails = [torch.randint(3, max(vocab_size, 4), (n,), generator=ids).tolist() for n in (3, 5, 2)]
    groups = [[prompt + t for t in tails], [prompt[:4] + t for t in tails[:2]]]
    return packing_agrees(model, lambda: score_groups(groups, model, pad_id, device, share=True),
                          lambda: score_groups(groups, model, pad_id, device, share=False),
                          next(model.parameters()).dtype)


def batch_loss(model, items, config, pad_id, device, share: bool = False):
    """Loss and metrics of one micro-batch (pairs, or rows for the ranking loss).

    Hardening pairs (the best answer over a degenerate one) form their own mean, added with weight
    --harden-weight: mixed into the ranking they would outnumber the real comparisons (15 of 21
    pairs with K = 4 and three degenerate answers) and teach little but "longer is better".
    """
    if config.loss == "pairwise":
        flat = score_groups([[better, worse, *bad] for better, worse, bad in items], model, pad_id, device, share)
        sizes = [2 + len(bad) for _, _, bad in items]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        first = torch.tensor(starts, device=device)
        loss, metrics = losses.bradley_terry_loss(flat[first], flat[first + 1], margin=config.margin or None,
                                                  center_coef=config.center_coef)
        best = [start for start, size in zip(starts, sizes) for _ in range(size - 2)]
        bad = [start + 2 + j for start, size in zip(starts, sizes) for j in range(size - 2)]
        return _add_hardening(loss, {**metrics, "pairs": float(len(items))}, flat[best], flat[bad],
                              config.harden_weight)
    # Ranking: all K responses of each prompt in one forward batch, real ones ranked, degenerate ones last.
    width = max(len(r["seqs"]) for r in items)
    flat = score_groups([r["seqs"] for r in items], model, pad_id, device, share)
    scores = torch.zeros(len(items), width, device=device)
    real = torch.zeros(len(items), width, dtype=torch.bool, device=device)
    bad = torch.zeros_like(real)
    start = 0
    for i, r in enumerate(items):
        k, n = len(r["seqs"]), r["n_real"]
        scores[i, :k], real[i, :n], bad[i, n:k] = flat[start:start + k], True, True
        start += k
    loss, metrics = losses.ranking_loss(scores, real)
    if config.center_coef:
        loss = loss + config.center_coef * (flat ** 2).mean()
    best = scores[:, :1].expand_as(scores)
    return _add_hardening(loss, metrics, best[bad], scores[bad], config.harden_weight)


def _add_hardening(loss, metrics: dict, best: torch.Tensor, bad: torch.Tensor, weight: float):
    if best.numel() == 0:
        return loss, metrics
    hard_loss = -torch.nn.functional.logsigmoid(best.float() - bad.float()).mean()
    metrics = {**metrics, "harden_loss": hard_loss.item(), "harden_accuracy": (best > bad).float().mean().item(),
               "pairs": metrics.get("pairs", 0.0) + best.numel()}
    total = weight * hard_loss if loss is None else loss + weight * hard_loss
    return total, {**metrics, "loss": total.item()}


@torch.no_grad()
def evaluate(model, rows, pad_id, device, batch_size: int = 16, share: bool = False) -> dict:
    """Pairwise accuracy against the labels, against the clean gold order (toy world), mean margin, ECE."""
    model.eval()
    correct = gold_correct = gold_total = 0
    margins, probs, labels = [], [], []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        flat = score_groups([r["seqs"][:r["n_real"]] for r in chunk], model, pad_id, device, share).tolist()
        offset = 0
        for r in chunk:
            n = r["n_real"]
            s = flat[offset:offset + n]
            offset += n
            for i in range(n):
                for j in range(i + 1, n):
                    gap = s[i] - s[j]
                    margins.append(gap)
                    correct += gap > 0
                    probs.append(1 / (1 + math.exp(-gap)))
                    labels.append(1.0)
                    if r["gold"] and r["gold"][i] != r["gold"][j]:
                        gold_total += 1
                        gold_correct += (gap > 0) == (r["gold"][i] > r["gold"][j])
    model.train()
    out = {"eval_accuracy": correct / max(len(margins), 1), "eval_margin": sum(margins) / max(len(margins), 1),
           "eval_ece": losses.expected_calibration_error(torch.tensor(probs), torch.tensor(labels)),
           "eval_pairs": len(margins)}
    if gold_total:
        out["eval_gold_accuracy"] = gold_correct / gold_total
    return out


def run(config: RMConfig) -> dict:
    from rlhflab.stages.rm_model import build_reward_model, save_reward_model

    # Load.
    if not config.data:
        raise UsageError("give --data (preference pairs or rankings)")
    records, eval_records, stats = common.load_preferences(config)
    setup = common.prepare_stage(config)
    model, tokenizer, info = build_reward_model(config, setup.placement)
    share = config.share_prompt and sharing_matches(model, tokenizer.pad_token_id, next(model.parameters()).device,
                                                    len(tokenizer))
    if config.share_prompt and not share:
        print("note: this model does not score packed rows exactly as single ones (4D attention mask); "
              "each response runs with its own copy of the prompt", file=sys.stderr)
    train_rows, truncated = encode_pair_rows(records, tokenizer, config.max_length, config.harden,
                                               config.harden_kinds)
    eval_rows, _ = encode_pair_rows(eval_records, tokenizer, config.max_length, harden=False)
    items = as_pairs(train_rows) if config.loss == "pairwise" else train_rows

    # Build.
    steps = common.total_steps(config, len(items))
    optimizer = common.make_optimizer(model, config)
    scheduler = common.make_scheduler(optimizer, config, steps)
    accelerator = setup.accelerator
    common.checkpoint_activations(model, config)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if config.lora:
        common.checkpoint_trainable_only(accelerator)
    lengths = [sum(map(len, item[:2])) + sum(map(len, item[2])) for item in items] if config.loss == "pairwise" else \
        [sum(map(len, item["seqs"])) for item in items]
    order = common.BatchOrder(lengths, config.batch_size, config.seed, config.group_by_length)
    metrics_log = common.start_outputs(setup, config)
    step = common.restore_checkpoint(setup, order, strict=not config.lora) if setup.resume_from else 0
    pad_id, device = tokenizer.pad_token_id, accelerator.device

    # Loop.
    timer, train_time, seen_pairs = runs.Timer(), 0.0, 0
    model.train()
    bar = common.progress(steps, step, "rm", config.progress and accelerator.is_main_process)
    last_checkpoint, row = setup.resume_from, {}
    while step < steps:
        started = time.perf_counter()
        micro_rows = []
        for _ in range(config.grad_accum):
            batch = [items[i] for i in common.shard(order.next(), accelerator)]
            loss, micro = batch_loss(model, batch, config, pad_id, device, share)
            common.check_finite(loss, "the reward-model loss", step + 1, last_checkpoint)
            accelerator.backward(loss / config.grad_accum)
            seen_pairs += int(micro["pairs"])
            micro_rows.append(micro)
        row = common.merge_micro_rows(micro_rows)
        common.optimizer_step(accelerator, model.parameters(), optimizer, scheduler, config.max_grad_norm)
        step += 1
        train_time += time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}")
        if step % config.log_every == 0 or step == steps:
            metrics_log.log(step, {**row, "lr": scheduler.get_last_lr()[0], "pairs_per_s": seen_pairs / train_time})
        if config.eval_every and step % config.eval_every == 0 and eval_rows:
            metrics_log.log(step, evaluate(accelerator.unwrap_model(model), eval_rows, pad_id, device, share=share))
        if config.save_every and step % config.save_every == 0 and step < steps:
            last_checkpoint = common.save_checkpoint(setup, config, step, order)
    bar.close()

    # Save.
    unwrapped = accelerator.unwrap_model(model)
    figures = evaluate(unwrapped, eval_rows, pad_id, device, share=share) if eval_rows else {}
    if accelerator.is_main_process:
        save_reward_model(unwrapped, tokenizer, setup.out, info)
    summary = {"stage": "rm", "loss_type": config.loss, "steps": step, "final_loss": row.get("loss"),
               "final_train_accuracy": row.get("accuracy"), **figures, "pairs_per_s": seen_pairs / max(train_time, 1e-9),
               "train_pairs": seen_pairs, "train_time_s": train_time, "wall_time_s": timer.elapsed,
               "rows_read": stats.rows_read, "rows_used": stats.rows_used, "rows_skipped": stats.rows_skipped,
               "rows_truncated": truncated, "harden": config.harden, "lora": config.lora, "shared_prompt": share}
    return common.finish(setup, summary)
