"""Supervised fine-tuning (InstructGPT step 1): next-token loss on assistant turns only.

Departures from the usual trainer: the loss of an optimizer step is the sum of token losses over
all its micro-batches divided by the number of trained tokens in the whole step, so gradient
accumulation 8x1 equals 1x8 exactly (a plain mean per micro-batch does not); and the data order
is a seeded, resumable sequence, so resuming gives the same next loss as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import time

import torch

from rlhflab import runs
from rlhflab.data.formats import load_records
from rlhflab.data.template import IGNORE_INDEX, encode_chat
from rlhflab.errors import UsageError
from rlhflab.models.heads import answer_selection, logits_at, padding_mask_for
from rlhflab.models.loading import count_parameters, load_for_training, save_model
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
    if config.eval_data:
        eval_records, _ = load_records(config.eval_data, "sft", config.format, config.skip_bad_rows,
                                       0, config.hc3_answers, option="--eval-data")
        return records, eval_records
    n_eval = int(len(records) * config.eval_fraction)
    if n_eval == 0:
        return records, []
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed)).tolist()
    held = set(order[:n_eval])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def run(config) -> dict:
    # Load: inputs are checked before anything is written.
    if not config.data:
        raise UsageError("give --data (a file of conversations)")
    records, stats = load_records(config.data, "sft", config.format, config.skip_bad_rows,
                                  config.max_rows, config.hc3_answers)
    train_records, eval_records = split_eval(records, config)
    setup = skeleton.prepare_stage(config)
    model, tokenizer, base_name = load_for_training(config, setup.placement)
    train, encode_stats = encode_dataset(train_records, tokenizer, config.max_length)
    held_out, _ = encode_dataset(eval_records, tokenizer, config.max_length)
    if not train:
        raise UsageError(f"--data {config.data}: no row has assistant tokens within --max-length {config.max_length}")

    trained = train_next_token(config, setup, model, tokenizer, train, held_out)

    # Save.
    if setup.accelerator.is_main_process:
        save_model(trained.pop("model"), tokenizer, setup.out, base_name)
    summary = {
        "stage": "sft", **trained, "rows_read": stats.rows_read, "rows_used": stats.rows_used,
        "rows_skipped": stats.rows_skipped, "examples_train": len(train), "examples_eval": len(held_out),
        **encode_stats, **count_parameters(model), "lora": config.lora,
        "dtype": str(setup.placement.dtype).replace("torch.", ""),
    }
    return skeleton.finish(setup, summary)


def train_next_token(config, setup, model, tokenizer, train: list[dict], held_out: list[dict]) -> dict:
    """The next-token training loop shared by SFT and pretraining (examples: input_ids + labels).

    Returns the loop's figures and, under "model", the unwrapped trained model.
    """
    steps = skeleton.total_steps(config, len(train))
    optimizer = skeleton.make_optimizer(model, config)
    scheduler = skeleton.make_scheduler(optimizer, config, steps)
    accelerator = setup.accelerator
    skeleton.checkpoint_activations(model, config)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if config.lora:
        skeleton.checkpoint_trainable_only(accelerator)
    order = skeleton.BatchOrder([len(e["input_ids"]) for e in train], config.batch_size * accelerator.num_processes,
                              config.seed, config.group_by_length)
    metrics = skeleton.start_outputs(setup, config)
    step = skeleton.restore_checkpoint(setup, order, strict=not config.lora) if setup.resume_from else 0
    tokens = setup.state.get("tokens", 0)
    last_checkpoint = setup.resume_from
    pad_id, device = tokenizer.pad_token_id, accelerator.device

    # Loop.
    model.train()
    timer, train_time = runs.Timer(), 0.0
    loss_value = float("nan")
    bar = skeleton.progress(steps, step, config.stage, config.progress and accelerator.is_main_process)
    while step < steps:
        started = time.perf_counter()
        micro = [collate([train[i] for i in skeleton.shard(order.next(), accelerator)], pad_id, device)
                 for _ in range(config.grad_accum)]
        n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        step_loss = 0.0
        for i, batch in enumerate(micro):
            sync = i == len(micro) - 1
            with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                loss_sum, _ = nll_sum(model, batch)
                skeleton.check_finite(loss_sum, "the training loss", step + 1, last_checkpoint)
                accelerator.backward(loss_sum / max(n_labels, 1))
            step_loss += loss_sum.item()
            tokens += int(batch["attention_mask"].sum())
        grad_norm = skeleton.optimizer_step(accelerator, model.parameters(), optimizer, scheduler, config.max_grad_norm)
        step += 1
        train_time += time.perf_counter() - started
        loss_value = step_loss / max(n_labels, 1)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if step % config.log_every == 0 or step == steps:
            row = {"loss": loss_value, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens / max(train_time, 1e-9),
                   "epoch": order.epoch + order.index / max(1, len(order._batches))}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            metrics.log(step, row)
        if config.eval_every and step % config.eval_every == 0 and held_out:
            metrics.log(step, {"eval_loss": evaluate(model, held_out, pad_id, device, config.batch_size)})
        if config.save_every and step % config.save_every == 0 and step < steps:
            last_checkpoint = skeleton.save_checkpoint(setup, config, step, order, {"tokens": tokens})
    bar.close()

    eval_loss = evaluate(model, held_out, pad_id, device, config.batch_size) if held_out else None
    return {"model": accelerator.unwrap_model(model), "steps": step, "final_loss": loss_value,
            "eval_loss": eval_loss, "tokens_per_s": tokens / max(train_time, 1e-9), "train_tokens": tokens,
            "wall_time_s": timer.elapsed, "train_time_s": train_time, "device": str(device)}
