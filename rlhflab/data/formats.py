"""Reading user data in the common formats and normalising it to one internal record.

Sources: .jsonl, .json (a list of objects), .parquet, a `datasets.save_to_disk` directory, or a
hub dataset name (needs the `datasets` package and a reachable hub).

Formats (auto-detected from the first row's fields, or given with --format):
    messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
    alpaca             {"instruction": str, "input": str (optional), "output": str}
    prompt_completion  {"prompt": str, "completion": str}, or both message lists (TRL conversational)
    hc3                {"question": str, "human_answers": [str], "chatgpt_answers": [str]}
    pairs              {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages};
                       without prompt, chosen/rejected are whole conversations (messages, or Anthropic
                       HH "\n\nHuman: ...\n\nAssistant: ..." transcripts); a transcript prompt (rm-static)
                       becomes its turns
    rankings           {"prompt": str | messages, "responses": [str, ...] best first}
    prompts            {"prompt": str} or {"messages": [... ending with a user turn]}
    text               {"text": str} (or a .txt file: documents separated by blank lines)

Everything becomes a `Record`: the conversation (for preference data and prompts: the prompt,
ending with a user turn), the candidate responses best-first, and free-form `meta`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rlhflab.errors import UsageError
from rlhflab.runs import read_text, text_lines

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}

# What each stage accepts.
FORMAT_KINDS = {
    "sft": ("messages", "sharegpt", "alpaca", "prompt_completion", "hc3"),
    "preference": ("pairs", "rankings"),
    "prompts": ("prompts", "messages", "sharegpt", "alpaca", "prompt_completion", "hc3", "pairs", "rankings"),
    "text": ("text",),
}


@dataclass
class Record:
    messages: list[dict]                        # conversation, or the prompt for preference/RL data
    responses: list[str] = field(default_factory=list)  # preference data: best first
    meta: dict = field(default_factory=dict)
    source: str = ""                            # "file:line", for error messages


@dataclass
class LoadStats:
    rows_read: int = 0
    rows_used: int = 0
    rows_skipped: int = 0
    rows_without_preference: int = 0   # preference rows whose responses are all the same text: dropped
    first_errors: list[str] = field(default_factory=list)


class RowError(ValueError):
    """A row that does not fit its format; the message names the field."""


# ---------------------------------------------------------------------------------------------
# Raw rows from files.


def iter_raw_rows(source: str) -> Iterator[tuple[str, object]]:
    """Yield (where, row) with where = 'file:line' (JSONL) or 'file row N'."""
    path = Path(source)
    if path.is_dir():
        yield from _iter_saved_dataset(path)
        return
    if not path.exists():
        if source.count("/") == 1 and not source.startswith((".", "/")) and path.suffix == "":
            yield from _iter_hub_dataset(source)
            return
        raise UsageError(f"data file not found: {source}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":   # UTF-8, a byte-order mark accepted; other encodings are named with file and line
        for number, line in text_lines(path):
            if not line.strip():
                continue
            try:
                yield f"{source}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{source}:{number}", RowError(f"not valid JSON ({exc.msg} at column {exc.colno})")
    elif suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UsageError(f"{source}: expected a JSON list of rows, got {type(data).__name__}")
        for number, row in enumerate(data):
            yield f"{source} row {number}", row
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UsageError(f"{source}: reading .parquet needs the pyarrow package: pip install pyarrow") from None
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:   # pyarrow's ArrowInvalid is a ValueError
            raise UsageError(f"{source}: not a readable .parquet file ({exc})") from None
        for number, row in enumerate(table.to_pylist()):
            yield f"{source} row {number}", row
    elif suffix == ".txt":
        text = read_text(path)
        for number, doc in enumerate(d for d in text.split("\n\n") if d.strip()):
            yield f"{source} document {number}", {"text": doc.strip()}
    else:
        raise UsageError(f"{source}: unsupported file type {suffix!r} (use .jsonl, .json, .parquet or .txt)")


def _iter_saved_dataset(path: Path):
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{path} looks like a saved dataset directory: install `datasets` to read it") from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - the library raises many kinds
        raise UsageError(f"{path}: not a datasets.save_to_disk directory ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else data[next(iter(data))]
    for number, row in enumerate(data):
        yield f"{path} row {number}", row


def _iter_hub_dataset(name: str):
    try:
        import datasets
    except ImportError:
        raise UsageError(f"data {name!r} is not a local file; install `datasets` to load it from the hub") from None
    try:
        data = datasets.load_dataset(name, split="train")
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"data {name!r}: not a local file, and loading it from the hub failed: {exc}") from None
    for number, row in enumerate(data):
        yield f"{name} row {number}", row


# ---------------------------------------------------------------------------------------------
# Format detection and normalisation.


def detect_format(row: dict, kind: str) -> str:
    keys = set(row) if isinstance(row, dict) else set()
    # Preference sets often carry the chosen conversation again as `messages` (UltraFeedback
    # binarized): they are pairs, unless SFT is what reads them.
    if {"chosen", "rejected"} <= keys and not (kind == "sft" and "messages" in keys):
        return "pairs"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "responses" in keys:
        return "rankings"
    if "question" in keys and ("chatgpt_answers" in keys or "human_answers" in keys):
        return "hc3"
    if "instruction" in keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompts"
    if "text" in keys:
        return "text"
    return "unknown"


def _string(row: dict, name: str, optional: bool = False) -> str:
    if name not in row or row[name] is None:
        if optional:
            return ""
        raise RowError(f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, str):
        raise RowError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def is_message_list(value) -> bool:
    """Whether `value` is a list (maybe empty) of {"role": str, "content": str} objects: the shape
    that readers taking conversations as they are (without normalise's rules) accept."""
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _messages(value, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field {name!r} must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"{name}[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"{name}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RowError(f"{name}[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _prompt(row: dict) -> list[dict]:
    """A prompt given as a string, a "Human: ... Assistant:" transcript, or a message list (ending
    with a user turn)."""
    if "prompt" not in row:
        raise RowError("missing field 'prompt'")
    value = row["prompt"]
    if isinstance(value, str) and is_transcript(value):
        messages = parse_transcript(value, "prompt")
        while messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
            messages = messages[:-1]   # the open "Assistant:" the answer is meant to follow
        if not messages or messages[-1]["role"] != "user":
            raise RowError("field 'prompt' is a Human/Assistant transcript that does not end with a Human turn")
        return messages
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages = _messages(value, "prompt")
    if messages[-1]["role"] != "user":
        raise RowError("field 'prompt' must end with a user message")
    return messages


def _answer(row: dict, name: str) -> str:
    """A response given as a string, as a whole "Human: ... Assistant: ..." transcript, or as
    messages whose last one is the assistant's."""
    if name not in row:
        raise RowError(f"missing field {name!r}")
    value = row[name]
    if isinstance(value, str) and "prompt" not in row and is_transcript(value):
        value = parse_transcript(value, name)
    if isinstance(value, str):
        # rm-static and HH answers follow "Assistant:" with a space, which belongs to the separator.
        return value.strip() if _transcript_prompt(row) else value
    messages = _messages(value, name)
    if messages[-1]["role"] != "assistant":
        raise RowError(f"field {name!r} must end with an assistant message")
    return messages[-1]["content"]


# Anthropic's Human/Assistant transcripts (HH-RLHF, and rm-static's prompts): "\n\nHuman: ...\n\nAssistant: ...".
TRANSCRIPT_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}


def is_transcript(text: str) -> bool:
    return text.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in text


def _transcript_prompt(row: dict) -> bool:
    return isinstance(row.get("prompt"), str) and is_transcript(row["prompt"])


def parse_transcript(text: str, name: str) -> list[dict]:
    """A "Human: ... Assistant: ..." transcript as messages (the last may be an empty assistant turn)."""
    pieces = TRANSCRIPT_TURN.split(text.lstrip("\n"))   # ["", "Human", text, "Assistant", text, ...]
    if pieces[0].strip():
        raise RowError(f"field {name!r}: text before the first 'Human:' turn")
    return [{"role": TRANSCRIPT_ROLES[speaker], "content": content.strip()}
            for speaker, content in zip(pieces[1::2], pieces[2::2])]


def normalise(row, fmt: str, kind: str, hc3_answers: str = "chatgpt") -> list[Record]:
    """One raw row -> zero or more Records of the given kind. Raises RowError naming the field."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    if fmt == "messages":
        messages = _messages(row.get("messages"), "messages")
        return [_for_kind(messages, kind, meta)]
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise RowError("field 'conversations' must be a non-empty list")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
                raise RowError(f"conversations[{i}].from must be one of {', '.join(SHAREGPT_ROLES)}")
            if not isinstance(turn.get("value"), str):
                raise RowError(f"conversations[{i}].value must be a string")
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        if isinstance(row.get("system"), str) and row["system"]:
            messages.insert(0, {"role": "system", "content": row["system"]})
        return [_for_kind(messages, kind, meta)]
    if fmt == "alpaca":
        instruction, extra = _string(row, "instruction"), _string(row, "input", optional=True)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _string(row, "output")}]
        return [_for_kind(messages, kind, meta)]
    if fmt == "prompt_completion":
        # Strings, or TRL's conversational layout: both fields lists of messages.
        completion = row.get("completion")
        if isinstance(completion, list):
            messages = _prompt(row) + _messages(completion, "completion")
        else:
            messages = [{"role": "user", "content": _string(row, "prompt")},
                        {"role": "assistant", "content": _string(row, "completion")}]
        return [_for_kind(messages, kind, meta)]
    if fmt == "hc3":
        question = _string(row, "question")
        keys = {"chatgpt": ["chatgpt_answers"], "human": ["human_answers"],
                "both": ["chatgpt_answers", "human_answers"]}[hc3_answers]
        answers = []
        for key in keys:
            value = row.get(key)
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise RowError(f"field {key!r} must be a list of strings")
            answers += [a for a in value if a.strip()]
        if kind == "prompts":
            return [Record([{"role": "user", "content": question}], meta=meta)]
        return [Record([{"role": "user", "content": question}, {"role": "assistant", "content": a}], meta=meta)
                for a in answers]
    if fmt == "pairs":
        prompt = _pair_prompt(row)
        if kind == "prompts":
            return [Record(prompt, meta=meta)]
        chosen, rejected = _answer(row, "chosen"), _answer(row, "rejected")
        if "chosen_gold" in row and "rejected_gold" in row:   # toy-world pairs: the clean judge's scores
            meta = {**meta, "gold_scores": [row["chosen_gold"], row["rejected_gold"]]}
        return [Record(prompt, [chosen, rejected], meta=meta)]
    if fmt == "rankings":
        prompt = _prompt(row)
        responses = row.get("responses")
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise RowError("field 'responses' must be a list of strings (best first)")
        if kind == "prompts":
            return [Record(prompt, meta=meta)]
        if len(responses) < 2:
            raise RowError(f"field 'responses' needs at least 2 responses, got {len(responses)}")
        if "gold_scores" in row:
            meta = {**meta, "gold_scores": row["gold_scores"]}
        return [Record(prompt, list(responses), meta=meta)]
    if fmt == "prompts":
        return [Record(_prompt(row), meta=meta)]
    if fmt == "text":
        return [Record([], meta={"text": _string(row, "text")})]
    raise RowError(f"cannot tell the format from the fields {sorted(row)}; pass --format")


def _pair_prompt(row: dict) -> list[dict]:
    if "prompt" in row:
        return _prompt(row)
    # Anthropic-HH style: chosen/rejected hold the whole conversation; the prompt is all but the last turn.
    chosen = row.get("chosen")
    chosen = parse_transcript(chosen, "chosen") if isinstance(chosen, str) and is_transcript(chosen) else \
        _messages(chosen, "chosen")
    if len(chosen) < 2:
        raise RowError("missing field 'prompt' (and 'chosen' holds no conversation to take it from)")
    return chosen[:-1]


def _for_kind(messages: list[dict], kind: str, meta: dict) -> Record:
    if kind == "prompts":
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise RowError("a prompt must end with a user message")
        return Record(messages, meta=meta)
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("the conversation has no assistant message to train on")
    return Record(messages, meta=meta)


def parse_columns(spec: str | None) -> dict[str, str]:
    """--columns "prompt=question,chosen=good" -> {"prompt": "question", "chosen": "good"}."""
    mapping: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, column = (x.strip() for x in part.partition("="))
        if not sep or not name or not column:
            raise UsageError(f"--columns {spec!r}: expected FIELD=COLUMN pairs separated by commas, "
                             "e.g. prompt=question,chosen=good,rejected=bad")
        mapping[name] = column
    return mapping


def rename_columns(row, mapping: dict[str, str]):
    """The row with each mapped column under rlhflab's field name (the --columns option)."""
    if not mapping or not isinstance(row, dict):
        return row
    missing = [column for column in mapping.values() if column not in row]
    if missing:
        raise RowError(f"no column {missing[0]!r} (named by --columns); the row has {sorted(row)}")
    renamed = {k: v for k, v in row.items() if k not in mapping.values() and k not in mapping}
    return {**renamed, **{name: row[column] for name, column in mapping.items()}}


def load_records(source: str, kind: str, fmt: str = "auto", skip_bad_rows: bool | None = None,
                 max_rows: int = 0, hc3_answers: str = "chatgpt", option: str = "--data",
                 columns: str | None = None) -> tuple[list[Record], LoadStats]:
    """Read and normalise a whole data source. Bad rows raise, or with `skip_bad_rows` are skipped
    and counted; None means the command has no --skip-bad-rows for this file (so no hint of it).
    `columns` (--columns) renames a dataset's columns to the fields its format names."""
    stats = LoadStats()
    records: list[Record] = []
    chosen_fmt = None if fmt == "auto" else fmt
    mapping = parse_columns(columns)
    for where, row in iter_raw_rows(source):
        if max_rows and stats.rows_used >= max_rows:
            break
        stats.rows_read += 1
        try:
            row = rename_columns(row, mapping)
            if chosen_fmt is None:
                chosen_fmt = detect_format(row, kind) if isinstance(row, dict) else "unknown"
                if chosen_fmt not in FORMAT_KINDS[kind]:
                    allowed = ", ".join(FORMAT_KINDS[kind])
                    raise UsageError(
                        f"{where}: {option} looks like {chosen_fmt!r} data (fields: "
                        f"{sorted(row) if isinstance(row, dict) else type(row).__name__}); "
                        f"this stage needs one of: {allowed}"
                    )
            made = normalise(row, chosen_fmt, kind, hc3_answers)
        except RowError as exc:
            if not skip_bad_rows:
                hint = "; --skip-bad-rows skips such rows" if skip_bad_rows is not None else ""
                raise UsageError(f"{where}: {exc} (format {chosen_fmt}{hint})") from None
            stats.rows_skipped += 1
            if len(stats.first_errors) < 5:
                stats.first_errors.append(f"{where}: {exc}")
            continue
        if kind == "preference" and made and all(len(set(record.responses)) < 2 for record in made):
            stats.rows_without_preference += 1   # chosen == rejected, or a ranking of one answer repeated
            continue
        for record in made:
            record.source = where
        records.extend(made)
        stats.rows_used += 1
    if stats.rows_without_preference:
        print(f"note: {option} {source}: {stats.rows_without_preference} rows whose responses are all the same "
              "text carry no preference and were dropped", file=sys.stderr)
    if not records:
        raise UsageError(f"{option} {source}: no usable rows (read {stats.rows_read}, skipped {stats.rows_skipped}"
                         + (f", {stats.rows_without_preference} with identical responses" if stats.rows_without_preference
                            else "") + ")")
    return records, stats


def load_prompts(path: str) -> list:
    records, _ = load_records(path, "prompts", option="--prompts")
    return records
