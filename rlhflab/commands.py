"""Small commands that are not training stages: tokenizer training, world export, the gold judge."""

from __future__ import annotations

import json
from pathlib import Path

from rlhflab.errors import UsageError


def tokenizer_train(config) -> int:
    """`rlhflab tokenizer train --corpus a.txt[,b.jsonl] --vocab-size N --out DIR`."""
    from rlhflab.data.formats import iter_raw_rows
    from rlhflab.models.tokenizer import train_tokenizer

    if not config.corpus or not config.out:
        raise UsageError("give --corpus (text files) and --out (the tokenizer directory)")
    if config.vocab_size < 300:
        raise UsageError(f"--vocab-size: at least 300 (256 bytes + special tokens + merges), got {config.vocab_size}")
    texts = []
    for source in config.corpus.split(","):
        for where, row in iter_raw_rows(source.strip()):
            if isinstance(row, dict) and isinstance(row.get(config.text_field), str):
                texts.append(row[config.text_field])
            elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                texts += [m.get("content", "") for m in row["messages"] if isinstance(m, dict)]
            else:
                raise UsageError(f"{where}: no {config.text_field!r} text field (or messages) to learn from")
    if not texts:
        raise UsageError(f"--corpus {config.corpus}: no text found")
    tokenizer = train_tokenizer(texts + ["user", "assistant", "system"], config.vocab_size, config.out)
    print(f"tokenizer with {len(tokenizer)} tokens written to {config.out}")
    return 0


def world_export(config) -> int:
    """`rlhflab world export --out DIR [--seed S] [--size small|default]`."""
    from rlhflab.world import export

    if not config.out:
        raise UsageError("give --out (the directory to write the world's files into)")
    result = export(config.out, seed=config.seed, size=config.size)
    for name, info in result.items():
        print(f"{name}: {info}")
    return 0


def load_prompts(path: str) -> list:
    from rlhflab.data.formats import load_records

    records, _ = load_records(path, "prompts", option="--prompts")
    return records


def judge(config) -> int:
    """Score a file of responses, or generate with --model on --prompts and score those."""
    from rlhflab.world import format_table, judge_file

    if bool(config.responses) == bool(config.model):
        raise UsageError("give either --responses FILE, or --model M with --prompts P")
    if config.responses:
        result = judge_file(config.responses)
    else:
        if not config.prompts:
            raise UsageError("--model needs --prompts (e.g. eval_prompts.jsonl from `rlhflab world export`)")
        rows = generate_answers(config.model, load_prompts(config.prompts), config)
        out = Path(config.out) if config.out else Path(config.model) / "judge_responses.jsonl"
        from rlhflab.runs import atomic_write_text

        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        result = judge_file(str(out))
        print(f"responses written to {out}")
    print(format_table(result))
    return 0


def generate_answers(model_name: str, records: list, config) -> list[dict]:
    """Greedy answers of a model (or adapter) to prompt records, as {messages, response, meta} rows."""
    import torch

    from rlhflab.data.template import encode_prompt, stop_token_ids
    from rlhflab.models.loading import choose_placement, load_causal_lm, load_tokenizer
    from rlhflab.stages.common import progress

    placement = choose_placement(config.device, config.dtype)
    model = load_causal_lm(model_name, placement, config.trust_remote_code).eval()
    tokenizer = load_tokenizer(model_name, config.trust_remote_code)
    stops, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    rows = []
    bar = progress(len(records), 0, "generate", True)
    for start in range(0, len(records), config.batch_size):
        chunk = records[start:start + config.batch_size]
        prompts = [encode_prompt(tokenizer, r.messages) for r in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=placement.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=placement.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=config.max_new_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=pad)
        for record, tokens in zip(chunk, out[:, width:].tolist()):
            cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
            rows.append({"messages": record.messages, "response": tokenizer.decode(tokens[:cut], skip_special_tokens=True),
                         "meta": record.meta})
        bar.update(len(chunk))
    bar.close()
    return rows
