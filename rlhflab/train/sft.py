"""Supervised fine-tuning (InstructGPT step 1): next-token loss on assistant turns only.

Departures from the usual trainer: the loss of an optimizer step is the sum of token losses over
all its micro-batches divided by the number of trained tokens in the whole step, so gradient
accumulation 8x1 equals 1x8 exactly (a plain mean per micro-batch does not); and the data order
is a seeded, resumable sequence, so resuming gives the same next loss as an uninterrupted run.
"""

from __future__ import annotations

import torch

from rlhflab.data.formats import load_records
from rlhflab.data.template import IGNORE_INDEX, encode_chat
from rlhflab.errors import UsageError
from rlhflab.models.heads import answer_selection, logits_at, padding_mask_for
from rlhflab.models.loading import count_parameters, fit_context, load_trainable, save_model
from rlhflab.train import skeleton


def encode_dataset(records, tokenizer, max_length: int) -> tuple[list[dict], dict]:
    """Token ids and labels per conversation; rows with nothing to train on are dropped and counted."""
    examples, truncated, empty = [], 0, 0
    for record in records:
        encoded = encode_chat(tokenizer, record.messages, max_length)
        truncated += encoded.truncated
        if encoded.n_trainable == 0:
            empty += 1
            continue
        examples.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    return examples, {"rows_truncated": truncated, "rows_without_answer_tokens": empty}


def collate(examples: list[dict], pad_id: int, device) -> dict:
    """Right-pad to the longest row: input_ids/labels/attention_mask, each (B, T)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def nll_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over labelled tokens (fp32) and their count; the LM head runs only there."""
    select, targets = answer_selection(batch["labels"], IGNORE_INDEX)
    logits = logits_at(model, select, input_ids=batch["input_ids"],
                       attention_mask=padding_mask_for(batch["attention_mask"]))
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, targets.numel()


@torch.no_grad()
def evaluate(model, examples: list[dict], pad_id: int, device, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        loss, n = nll_sum(model, collate(examples[start:start + batch_size], pad_id, device))
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def split_eval(records, config):
    """(train, held-out) conversations: --eval-data, or the skeleton's split of --data in file order."""
    if config.eval_data:
        eval_records, _ = load_records(config.eval_data, "sft", config.format, config.skip_bad_rows,
                                       0, config.hc3_answers, option="--eval-data", columns=config.columns)
        return records, eval_records
    return skeleton.held_out_split(records, config.eval_fraction, config.seed, keep_order=True)


def run(config) -> dict:
    # Load: inputs are checked before anything is written.
    if not config.data:
        raise UsageError("give --data (a file of conversations)")
    records, stats = load_records(config.data, "sft", config.format, config.skip_bad_rows,
                                  config.max_rows, config.hc3_answers, columns=config.columns)
    train_records, eval_records = split_eval(records, config)
    setup = skeleton.prepare_stage(config)
    loaded = load_trainable(config, setup.placement, config.model, fresh=config.init_config)
    model, tokenizer = loaded.model, loaded.tokenizer
    config.max_length = fit_context(model, config.max_length)
    train, encode_stats = encode_dataset(train_records, tokenizer, config.max_length)
    held_out, _ = encode_dataset(eval_records, tokenizer, config.max_length)
    if not train:
        raise UsageError(f"--data {config.data}: no row has assistant tokens within --max-length {config.max_length}")

    trained = train_next_token(config, setup, model, tokenizer, train, held_out)

    # Save (every process has trained the same model; the main one writes it).
    trained_model, weights = trained.pop("model"), trained.pop("weights")
    if setup.accelerator.is_main_process:
        save_model(trained_model, tokenizer, setup.out, loaded.base, state_dict=weights)
    summary = {
        "stage": "sft", **trained, "rows_read": stats.rows_read, "rows_used": stats.rows_used,
        "rows_skipped": stats.rows_skipped, "examples_train": len(train), "examples_eval": len(held_out),
        **encode_stats, **count_parameters(model), "lora": config.lora,
        "dtype": str(setup.placement.dtype).replace("torch.", ""),
    }
    return skeleton.finish(setup, summary)


def labelled_tokens(batch: dict) -> int:
    """Tokens whose next-token loss is trained (a label follows them)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def train_next_token(config, setup, model, tokenizer, train: list[dict], held_out: list[dict]) -> dict:
    """Build and run the skeleton's loop on next-token examples (input_ids + labels): SFT's and
    pretraining's. Returns the loop's figures and, under "model", the unwrapped trained model.
    """
    pad_id, device = tokenizer.pad_token_id, setup.accelerator.device
    order = skeleton.batch_order(config, [len(e["input_ids"]) for e in train])
    metrics = skeleton.start_outputs(setup, config)
    loop = skeleton.Loop(setup, config, model, skeleton.total_steps(config, len(train)), order, metrics,
                         unit="tokens", what="the training loss")

    def loss(model, batch: dict):
        loss_sum, _ = nll_sum(model, batch)
        return loss_sum, {"loss_sum": loss_sum.item(), "tokens": int(batch["attention_mask"].sum())}

    def held_out_loss(model) -> dict:
        return {"eval_loss": evaluate(model, held_out, pad_id, device, config.batch_size)}

    loop.run(skeleton.StageParts(
        batch=lambda rows: collate([train[i] for i in rows], pad_id, device),
        loss=loss,
        weight=labelled_tokens,   # summed losses over the step's labelled tokens: 8x1 equals 1x8
        merge=lambda figures, n_labels: {"loss": sum(f["loss_sum"] for f in figures) / max(n_labels, 1)},
        evaluate=held_out_loss if held_out else None,
    ))
    figures = loop.close()
    eval_loss = held_out_loss(loop.model)["eval_loss"] if held_out else None
    return {"model": loop.unwrapped(), "weights": loop.full_weights(), **figures,
            "final_loss": loop.row.get("loss", float("nan")),
            "eval_loss": eval_loss, "device": str(device)}
