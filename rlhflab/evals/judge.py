"""`rlhflab judge`: score answers with the toy world's gold judge."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rlhflab.data.formats import load_prompts
from rlhflab.errors import UsageError
from rlhflab.infer.engine import greedy_answers
from rlhflab.models.loading import choose_placement, load_causal_lm, load_tokenizer
from rlhflab.runs import atomic_write_jsonl
from rlhflab.world import format_table, judge_file
from rlhflab.world import judge as gold


def judge(config) -> int:
    """Score a file of responses, or generate with --model on --prompts and score those; with --out,
    the responses are written there with each one's score and facets."""

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

    placement = choose_placement(config.device, config.dtype)
    model = load_causal_lm(model_name, placement, config.trust_remote_code).eval()
    tokenizer = load_tokenizer(model_name, config.trust_remote_code)
    return greedy_answers(model, tokenizer, records, config.max_new_tokens, config.batch_size)
