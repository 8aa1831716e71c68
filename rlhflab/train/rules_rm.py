"""`rlhflab rm --rules`: a rule reward model, one violation head per rule (rewards/rules.py).

The body starts from --model (the SFT model, as the preference reward model does); each head is a
logistic classifier of "this answer breaks rule r", trained with binary cross-entropy on the rows
that flag r (a row that leaves r unknown does not train r's head). Held-out figures per rule:
precision and recall at p = 0.5, the share of positives and the mean loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhflab.data.template import encode_chat
from rlhflab.errors import UsageError
from rlhflab.models.loading import load_trainable
from rlhflab.rewards.model import score_by_length
from rlhflab.rewards.rules import RuleModel, read_rule_rows, save_rule_model
from rlhflab.train import skeleton


def encode_rows(rows, names: list[str], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Each (prompt, response, flags) -> {"ids", "target": (N,) 0/1 or -1 for unknown}."""
    out, truncated = [], 0
    for prompt, response, flags in rows:
        enc = encode_chat(tokenizer, prompt + [{"role": "assistant", "content": response}], max_length, keep_end=True)
        truncated += enc.truncated
        target = [-1.0 if flags.get(name) is None else float(flags[name]) for name in names]
        out.append({"ids": enc.input_ids, "target": target})
    return out, truncated


def batch_loss(model, items: list[dict], pad_id: int, device):
    """Mean binary cross-entropy over the known (row, rule) flags of a micro-batch."""
    logits = score_by_length([item["ids"] for item in items], model, pad_id, device)      # (B, N)
    target = torch.tensor([item["target"] for item in items], device=device)              # (B, N), -1 unknown
    known = target >= 0
    if not known.any():
        return logits.sum() * 0.0, {"loss": 0.0, "accuracy": 0.0, "pairs": float(len(items))}
    loss = F.binary_cross_entropy_with_logits(logits.float()[known], target[known])
    accuracy = ((logits[known] > 0).float() == target[known]).float().mean().item()
    return loss, {"loss": loss.item(), "accuracy": accuracy, "pairs": float(len(items))}


@torch.no_grad()
def evaluate(model, rows: list[dict], names: list[str], pad_id: int, device) -> dict:
    """Per-rule precision / recall at p = 0.5 on held-out rows, and their mean accuracy."""
    model.eval()
    logits = score_by_length([r["ids"] for r in rows], model, pad_id, device).float().cpu()   # (N_rows, N_rules)
    model.train()
    target = torch.tensor([r["target"] for r in rows])
    out, correct, known_total = {"eval_rows": len(rows)}, 0, 0
    per_rule = {}
    for k, name in enumerate(names):
        known = target[:, k] >= 0
        truth, predicted = target[known, k] == 1, logits[known, k] > 0
        tp = int((truth & predicted).sum())
        per_rule[name] = {"n": int(known.sum()), "positives": int(truth.sum()), "predicted": int(predicted.sum()),
                          "precision": tp / int(predicted.sum()) if predicted.any() else None,
                          "recall": tp / int(truth.sum()) if truth.any() else None}
        correct += int((truth == predicted).sum())
        known_total += int(known.sum())
    out["eval_accuracy"] = correct / max(1, known_total)
    out["per_rule"] = per_rule
    return out


def run(config) -> dict:
    """Called by train/rm.py's run for `rlhflab rm --rules`."""
    # Load.
    if not config.data:
        raise UsageError("give --data (rules.jsonl: prompt, response and rule flags)")
    rows, names = read_rule_rows(config.data)
    if config.max_rows:
        rows = rows[:config.max_rows]
    if config.eval_data:
        eval_rows, eval_names = read_rule_rows(config.eval_data, "--eval-data")
        names += [n for n in eval_names if n not in names]
    else:
        rows, eval_rows = skeleton.held_out_split(rows, config.eval_fraction, config.seed)
    setup = skeleton.prepare_stage(config)
    loaded = load_trainable(config, setup.placement, config.model)
    lm = loaded.model
    hidden = (lm.get_base_model() if hasattr(lm, "get_base_model") else lm).config.hidden_size
    model = RuleModel(lm, hidden, names).to(setup.placement.device)
    tokenizer = loaded.tokenizer
    train_items, truncated = encode_rows(rows, names, tokenizer, config.max_length)
    eval_items, _ = encode_rows(eval_rows, names, tokenizer, config.max_length)

    # Build.
    order = skeleton.batch_order(config, [len(item["ids"]) for item in train_items])
    metrics_log = skeleton.start_outputs(setup, config)
    loop = skeleton.Loop(setup, config, model, skeleton.total_steps(config, len(train_items)), order, metrics_log,
                         unit="pairs", what="the rule-model loss")
    pad_id, device = tokenizer.pad_token_id, setup.accelerator.device

    def flat_eval(model) -> dict:
        figures = evaluate(setup.accelerator.unwrap_model(model), eval_items, names, pad_id, device)
        return {k: v for k, v in figures.items() if k != "per_rule"}

    # Loop.
    loop.run(skeleton.StageParts(
        batch=lambda indices: [train_items[i] for i in indices],
        loss=lambda model, batch: batch_loss(model, batch, pad_id, device),
        evaluate=flat_eval if eval_items else None,
        postfix=lambda row: {"loss": f"{row['loss']:.4f}", "acc": f"{row['accuracy']:.2f}"},
    ))
    trained = loop.close()

    # Save.
    unwrapped = loop.unwrapped()
    figures = evaluate(unwrapped, eval_items, names, pad_id, device) if eval_items else {}
    if setup.accelerator.is_main_process:
        save_rule_model(unwrapped, tokenizer, setup.out, {"base": loaded.base, "lora": bool(config.lora),
                                                          "hidden_size": hidden})
    summary = {"stage": "rm", "kind": "rules", "rules": names, **trained, "final_loss": loop.row.get("loss"),
               "final_train_accuracy": loop.row.get("accuracy"), **figures, "rows_used": len(rows),
               "rows_truncated": truncated, "lora": config.lora}
    for name, figure in figures.get("per_rule", {}).items():
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in figure.items())
        print(f"rule {name}: {shown}")
    return skeleton.finish(setup, summary)
