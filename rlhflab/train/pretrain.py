"""Pretraining: next-token prediction on raw text, from scratch or continued.

Documents are tokenized, each followed by EOS as the document separator, concatenated and cut
into blocks of --max-length tokens (the tail shorter than a block is dropped). Every token is a
label: no chat template, no masks. The loop is SFT's (`train_next_token`), and a row of
--batch-size and of the held-out --eval-fraction is a block; the summary adds
held-out perplexity and a few greedy continuations so a person can see what the base model knows.
"""

from __future__ import annotations

import math

import torch

from rlhflab.data.formats import iter_raw_rows, parse_columns
from rlhflab.errors import UsageError
from rlhflab.models.loading import count_parameters, fit_context, load_trainable, save_model
from rlhflab.train import skeleton
from rlhflab.train.sft import train_next_token

SAMPLE_PROMPTS = ("The capital of", "法国的首都", "12 plus 7", "Hello")


def read_documents(source: str, text_field: str, skip_bad_rows: bool) -> tuple[list[str], dict]:
    docs, skipped = [], 0
    for where, row in iter_raw_rows(source):
        text = row.get(text_field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            if skip_bad_rows:
                skipped += 1
                continue
            found = "invalid JSON" if isinstance(row, Exception) else f"fields {sorted(row) if isinstance(row, dict) else type(row).__name__}"
            raise UsageError(f"{where}: expected a string field {text_field!r} ({found}); --text-field names another")
        if text.strip():
            docs.append(text)
    if not docs:
        raise UsageError(f"--data {source}: no text found")
    return docs, {"rows_read": len(docs) + skipped, "rows_used": len(docs), "rows_skipped": skipped}


def pack(docs: list[str], tokenizer, block: int) -> list[dict]:
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]
    return [{"input_ids": b, "labels": b} for b in blocks]


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 24) -> list[dict]:
    was_training = model.training
    model.eval()
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        samples.append({"prompt": prompt, "continuation": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
    model.train(was_training)
    return samples


def run(config) -> dict:
    # Load.
    if not config.data:
        raise UsageError("give --data (a .txt corpus, or .jsonl with a text field)")
    sources = sum(x is not None for x in (config.model, config.init_config, config.preset))
    if sources != 1:
        raise UsageError("give exactly one of --model (continue pretraining), --init-config or --preset (from scratch)")
    if config.lora and not config.model:
        raise UsageError("--lora needs --model (a saved base); from scratch every weight is trained")
    columns = parse_columns(config.columns)
    if set(columns) - {"text"}:
        raise UsageError(f"--columns {config.columns}: pretraining reads one field, text (e.g. --columns text=body)")
    docs, stats = read_documents(config.data, columns.get("text", config.text_field), config.skip_bad_rows)
    if config.tokenizer is None and config.model is None:
        raise UsageError("training from scratch needs --tokenizer (see `rlhflab tokenizer train`)")
    setup = skeleton.prepare_stage(config)
    loaded = load_trainable(config, setup.placement, config.model, fresh=config.preset or config.init_config)
    model, tokenizer = loaded.model, loaded.tokenizer
    config.max_length = fit_context(model, config.max_length)
    blocks = pack(docs, tokenizer, config.max_length)
    train, held_out = skeleton.held_out_split(blocks, config.eval_fraction, config.seed)
    if not train:
        raise UsageError(f"--data {config.data}: too little text for one block of --max-length {config.max_length} tokens")

    # Train (the shared next-token loop), then save.
    trained = train_next_token(config, setup, model, tokenizer, train, held_out)
    trained_model, weights = trained.pop("model"), trained.pop("weights")
    samples = greedy_samples(trained_model, tokenizer)
    if setup.accelerator.is_main_process:
        save_model(trained_model, tokenizer, setup.out, loaded.base, state_dict=weights)
    eval_loss = trained["eval_loss"]
    summary = {
        "stage": "pretrain", **trained, "eval_perplexity": math.exp(min(eval_loss, 50)) if eval_loss else None,
        **stats, "blocks_train": len(train), "blocks_eval": len(held_out), **count_parameters(trained_model),
        "samples": samples,
    }
    return skeleton.finish(setup, summary)
