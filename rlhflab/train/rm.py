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
from dataclasses import dataclass

import torch

from rlhflab import losses
from rlhflab.config import DataOptions, ModelOptions, TrainOptions, opt
from rlhflab.data.template import encode_chat
from rlhflab.errors import UsageError
from rlhflab.rewards.degenerate import KINDS as DEGENERATE_KINDS
from rlhflab.rewards.degenerate import degenerate_answers
from rlhflab.rewards.model import build_reward_model, can_share_prompt, save_reward_model, score_groups
from rlhflab.train import rules_rm, skeleton


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
    harden_only: str = opt("", "--harden: use only these kinds of degenerate answer, comma-separated, from "
                               + ", ".join(DEGENERATE_KINDS) + " (default: all)")
    batch_size: int = opt(8, "pairs (pairwise) or prompts (ranking) per micro-batch, counted over all processes")
    lr: float = opt(1e-4, "peak learning rate")
    max_length: int = opt(256, "longest prompt + response in tokens (longer ones keep their end, "
                                           "where the score is read)")
    rules: bool = opt(False, "train a rule reward model instead: one violation head per rule, from --data rows "
                             "{prompt, response, rules: {name: 0 or 1}} (rules.jsonl); reports per-rule precision "
                             "and recall")
    share_prompt: bool = opt(True, "score the responses to one prompt in one row, the prompt computed once "
                                   "(checked at the start; models that cannot take a 4D attention mask fall back)")


def harden_kinds_of(only: str) -> tuple[str, ...]:
    """The degenerate kinds named in --harden-only (all of them when empty)."""
    names = tuple(dict.fromkeys(name.strip() for name in only.split(",") if name.strip()))
    unknown = [name for name in names if name not in DEGENERATE_KINDS]
    if unknown:
        raise UsageError(f"--harden-only: unknown kind {unknown[0]!r}; expected some of {', '.join(DEGENERATE_KINDS)}")
    return names or DEGENERATE_KINDS


def encode_pair_rows(records, tokenizer, max_length: int, harden: bool, harden_kinds: int = 0,
                     kinds: tuple[str, ...] = DEGENERATE_KINDS) -> tuple[list[dict], int]:
    """Each record -> {"seqs": [ids best first], "gold": [...] or None}; returns (rows, truncated).

    Hardening adds `harden_kinds` degenerate answers per prompt (0 = every kind), rotating through
    `kinds` so that each is used equally often over the data.
    """

    rows, truncated = [], 0
    for index, record in enumerate(records):
        responses = list(record.responses)
        if harden:
            bad = [text for kind, text in degenerate_answers(record.messages, tokenizer).items() if kind in kinds]
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
    if config.rules:
        return rules_rm.run(config)
    # Load.
    if not config.data:
        raise UsageError("give --data (preference pairs or rankings)")
    kinds = harden_kinds_of(config.harden_only)
    records, eval_records, stats = skeleton.load_preferences(config)
    setup = skeleton.prepare_stage(config)
    model, tokenizer, info = build_reward_model(config, setup.placement)
    # The LM head plays no part in a score: frozen, so that data-parallel processes wait for no gradient of it.
    lm_head, embeddings = model.lm.get_output_embeddings(), model.lm.get_input_embeddings()
    if lm_head is not None and lm_head.weight is not embeddings.weight:
        lm_head.requires_grad_(False)
    share = config.share_prompt and can_share_prompt(model, tokenizer.pad_token_id, next(model.parameters()).device,
                                                     len(tokenizer))
    if config.share_prompt and not share:
        print("note: this model does not score packed rows exactly as single ones (4D attention mask); "
              "each response runs with its own copy of the prompt", file=sys.stderr)
    train_rows, truncated = encode_pair_rows(records, tokenizer, config.max_length, config.harden,
                                               config.harden_kinds, kinds)
    eval_rows, _ = encode_pair_rows(eval_records, tokenizer, config.max_length, harden=False)
    items = as_pairs(train_rows) if config.loss == "pairwise" else train_rows

    # Build.
    lengths = [sum(map(len, item[:2])) + sum(map(len, item[2])) for item in items] if config.loss == "pairwise" else \
        [sum(map(len, item["seqs"])) for item in items]
    order = skeleton.batch_order(config, lengths)
    metrics_log = skeleton.start_outputs(setup, config)
    loop = skeleton.Loop(setup, config, model, skeleton.total_steps(config, len(items)), order, metrics_log,
                         unit="pairs", what="the reward-model loss")
    pad_id, device = tokenizer.pad_token_id, setup.accelerator.device

    # Loop.
    loop.run(skeleton.StageParts(
        batch=lambda rows: [items[i] for i in rows],
        loss=lambda model, batch: batch_loss(model, batch, config, pad_id, device, share),
        evaluate=(lambda model: evaluate(setup.accelerator.unwrap_model(model), eval_rows, pad_id, device, share=share))
        if eval_rows else None,
        postfix=lambda row: {"loss": f"{row['loss']:.4f}", "acc": f"{row['accuracy']:.2f}"},
    ))
    trained = loop.close()

    # Save.
    unwrapped = loop.unwrapped()
    figures = evaluate(unwrapped, eval_rows, pad_id, device, share=share) if eval_rows else {}
    if setup.accelerator.is_main_process:
        save_reward_model(unwrapped, tokenizer, setup.out, info)
    summary = {"stage": "rm", "loss_type": config.loss, **trained, "final_loss": loop.row.get("loss"),
               "final_train_accuracy": loop.row.get("accuracy"), **figures,
               "rows_read": stats.rows_read, "rows_used": stats.rows_used, "rows_skipped": stats.rows_skipped,
               "rows_without_preference": stats.rows_without_preference,
               "rows_truncated": truncated, "harden": config.harden, "lora": config.lora, "shared_prompt": share}
    return skeleton.finish(setup, summary)
