"""`rlhflab judge`: score answers with the toy world's gold judge."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rlhflab.data.formats import is_message_list, load_prompts
from rlhflab.errors import UsageError
from rlhflab.infer.engine import greedy_answers
from rlhflab.models.loading import choose_placement, load_causal_lm, load_tokenizer
from rlhflab.runs import atomic_write_jsonl, input_paths, refuse_a_directory, refuse_overwriting_inputs, text_lines
from rlhflab.world import format_table, judge_file
from rlhflab.world import judge as gold


def judge(config) -> int:
    """Score a file of responses, or generate with --model on --prompts and score those; with --out,
    the responses are written there with each one's score and facets."""

    if bool(config.responses) == bool(config.model):
        raise UsageError("give either --responses FILE, or --model M with --prompts P")
    if config.out:   # before any work: never over an input, nor into the model's directory
        refuse_a_directory(config.out)
        refuse_overwriting_inputs(config.out, input_paths(config), directory=False)
    if config.responses:
        if not Path(config.responses).is_file():
            raise UsageError(f"--responses {config.responses}: no such file")
        rows = read_responses(config.responses)
        with tempfile.TemporaryDirectory() as tmp:   # the rows as checked (UTF-8, a byte-order mark dropped)
            atomic_write_jsonl(Path(tmp) / "responses.jsonl", rows)
            result = {**judge_file(str(Path(tmp) / "responses.jsonl")), "path": config.responses}
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
        atomic_write_jsonl(config.out, scored_rows(rows))
        print(f"scored responses written to {config.out}")
    print(format_table(result))
    return 0


def read_responses(path: str) -> list[dict]:
    """The {messages, response, meta?} rows of a JSONL file, each checked; errors name file and line."""
    rows = []
    for number, line in text_lines(path):
        if not line.strip():
            continue
        where = f"--responses {path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object with 'messages' and 'response'")
        if not is_message_list(row.get("messages")):
            raise UsageError(f"{where}: field 'messages' must be a list of {{\"role\", \"content\"}} objects with "
                             "string values")
        if not isinstance(row.get("response"), str):
            raise UsageError(f"{where}: field 'response' must be a string, got {type(row.get('response')).__name__}")
        if row.get("meta") is not None and not isinstance(row["meta"], dict):
            raise UsageError(f"{where}: field 'meta' must be an object")
        rows.append(row)
    if not rows:
        raise UsageError(f"--responses {path}: no responses in it")
    return rows


def scored_rows(rows: list[dict]) -> list[dict]:
    """Each {messages, response, meta} row with the gold judge's score and facets added."""

    out = []
    for row in rows:
        result = gold(row["messages"], row["response"], row.get("meta"))
        out.append({**row, "score": result.score, "facets": result.facets})
    return out


def generate_answers(model_name: str, records: list, config) -> list[dict]:
    """Greedy answers of a model (or adapter) to prompt records, as {messages, response, meta} rows."""

    placement = choose_placement(config.device, config.dtype)
    model = load_causal_lm(model_name, placement, config.trust_remote_code).eval()
    tokenizer = load_tokenizer(model_name, config.trust_remote_code)
    return greedy_answers(model, tokenizer, records, config.max_new_tokens, config.batch_size)
