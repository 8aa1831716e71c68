"""Small commands that are not training stages: tokenizer training, world export, the gold judge."""

from __future__ import annotations

from pathlib import Path

from rlhflab.errors import UsageError


def tokenizer_train(config) -> int:
    """`rlhflab tokenizer train --corpus a.txt[,b.jsonl] --vocab-size N --out DIR`."""
    from rlhflab.data.formats import iter_raw_rows
    from rlhflab.models.tokenizer import train_tokenizer

    if not config.corpus or not config.out:
        raise UsageError("give --corpus (text files) and --out (the tokenizer directory)")
    from rlhflab.runs import refuse_a_file

    refuse_a_file(config.out)
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
    """`rlhflab world export --out DIR [--seed S] [--size small|default] [--habit-rate H]`."""
    from rlhflab.world import export

    if not config.out:
        raise UsageError("give --out (the directory to write the world's files into)")
    from rlhflab.runs import refuse_a_file

    refuse_a_file(config.out)
    if not 0.0 <= config.habit_rate <= 1.0:
        raise UsageError(f"--habit-rate must be between 0 and 1, got {config.habit_rate}")
    result = export(config.out, seed=config.seed, size=config.size, habit_rate=config.habit_rate)
    for name, info in result.items():
        print(f"{name}: {info}")
    return 0


def load_prompts(path: str) -> list:
    from rlhflab.data.formats import load_records

    records, _ = load_records(path, "prompts", option="--prompts")
    return records


def judge(config) -> int:
    """Score a file of responses, or generate with --model on --prompts and score those; with --out,
    the responses are written there with each one's score and facets."""
    import tempfile

    from rlhflab.runs import atomic_write_jsonl
    from rlhflab.world import format_table, judge_file

    if bool(config.responses) == bool(config.model):
        raise UsageError("give either --responses FILE, or --model M with --prompts P")
    if config.responses:
        if not Path(config.responses).is_file():
            raise UsageError(f"--responses {config.responses}: no such file")
        try:
            result = judge_file(config.responses)
        except ValueError as exc:
            raise UsageError(f"--responses {exc}") from None
        if not result["n"]:
            raise UsageError(f"--responses {config.responses}: no responses in it")
    else:
        if not config.prompts:
            raise UsageError("--model needs --prompts (e.g. eval_prompts.jsonl from `rlhflab world export`)")
        records = load_prompts(config.prompts)
        if not all(r.meta.get("family") for r in records):
            raise UsageError(f"--prompts {config.prompts}: prompts without a toy-world meta.family; the judge "
                             "knows only the toy world's tasks (export them with `rlhflab world export`)")
        rows = generate_answers(config.model, records, config)
        with tempfile.TemporaryDirectory() as tmp:   # never into the model's directory
            atomic_write_jsonl(Path(tmp) / "responses.jsonl", rows)
            result = judge_file(str(Path(tmp) / "responses.jsonl"))
    if config.out:
        atomic_write_jsonl(config.out, scored_rows(config.responses, rows if config.model else None))
        print(f"scored responses written to {config.out}")
    print(format_table(result))
    return 0


def scored_rows(path: str | None, rows: list[dict] | None) -> list[dict]:
    """Each {messages, response, meta} row with the gold judge's score and facets added."""
    import json

    from rlhflab.world import judge as gold

    if rows is None:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    out = []
    for row in rows:
        result = gold(row["messages"], row["response"], row.get("meta"))
        out.append({**row, "score": result.score, "facets": result.facets})
    return out


def generate_answers(model_name: str, records: list, config) -> list[dict]:
    """Greedy answers of a model (or adapter) to prompt records, as {messages, response, meta} rows."""
    from rlhflab.models.loading import choose_placement, load_causal_lm, load_tokenizer

    placement = choose_placement(config.device, config.dtype)
    model = load_causal_lm(model_name, placement, config.trust_remote_code).eval()
    tokenizer = load_tokenizer(model_name, config.trust_remote_code)
    return greedy_answers(model, tokenizer, records, config.max_new_tokens, config.batch_size)


def greedy_answers(model, tokenizer, records: list, max_new_tokens: int, batch_size: int) -> list[dict]:
    from rlhflab.data.template import stop_token_ids
    from rlhflab.engine import SamplingParams, generate_text

    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False,
                            stop_token_ids=tuple(stop_token_ids(tokenizer)))
    out = generate_text(model, tokenizer, [r.messages for r in records], params, batch_size=batch_size)
    return [{"messages": r.messages, "response": text, "meta": r.meta} for r, text in zip(records, out.texts)]
