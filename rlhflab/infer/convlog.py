"""The conversation log of `rlhflab serve --log-db FILE`, and `rlhflab serve export`.

One SQLite file in WAL mode. Each answered request is one row of `exchanges`, committed before
its answer is sent (so a server killed at any moment keeps every conversation it answered); the
chat page's votes are rows of `feedback`. What is stored:

    exchanges  id, conversation (the page's conversation id, or NULL for other API clients),
               created (unix time), model, settings (JSON: temperature, top_p, max_tokens, stop,
               n, seed), messages (JSON: the request's conversation), answers (JSON: one text per
               choice), finish_reasons (JSON), prompt_tokens, completion_tokens
    feedback   id, created, exchange, kind ("rating": choice, value +1/-1; "compare": the
               exchange and choice that were better and those that were worse)

Nothing else (no IP address, no API key, no headers). Export turns it into the files the stages
read: `prompts.jsonl` ({"messages": [...]} a line, each distinct prompt once) for `ppo --prompts`
and `sample`, and `prefs.jsonl` (the `pairs` format, {"prompt", "chosen", "rejected"}) from the
page's "which answer is better" choices, for `rm` and `dpo`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rlhflab.config import opt
from rlhflab.errors import UsageError
from rlhflab.runs import atomic_write_jsonl

SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    id TEXT PRIMARY KEY,
    conversation TEXT,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    settings TEXT NOT NULL,
    messages TEXT NOT NULL,
    answers TEXT NOT NULL,
    finish_reasons TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    kind TEXT NOT NULL,
    exchange TEXT NOT NULL,
    choice INTEGER NOT NULL,
    value INTEGER,
    other_exchange TEXT,
    other_choice INTEGER
);
"""


class ConversationLog:
    """A thread-safe handle on the log file; every write is its own committed transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed transaction survives the process being killed (only a
            # power cut may lose the last ones), at a fraction of FULL's cost.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"--log-db {path}: not a usable SQLite file: {exc}") from None
        self.lock = threading.Lock()

    def add_exchange(self, exchange_id: str, conversation: str | None, model: str, settings: dict,
                     messages: list[dict], answers: list[str], finish_reasons: list[str], prompt_tokens: int,
                     completion_tokens: int) -> None:
        row = (exchange_id, conversation, time.time(), model, json.dumps(settings, ensure_ascii=False),
               json.dumps(messages, ensure_ascii=False), json.dumps(answers, ensure_ascii=False),
               json.dumps(finish_reasons), prompt_tokens, completion_tokens)
        with self.lock:
            self.db.execute("INSERT INTO exchanges VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def has_exchange(self, exchange_id: str, choice: int) -> bool:
        with self.lock:
            found = self.db.execute("SELECT answers FROM exchanges WHERE id = ?", (exchange_id,)).fetchone()
        return found is not None and 0 <= choice < len(json.loads(found[0]))

    def add_rating(self, exchange_id: str, choice: int, value: int) -> None:
        with self.lock:
            self.db.execute("INSERT INTO feedback (created, kind, exchange, choice, value) VALUES (?, 'rating', ?, ?, ?)",
                            (time.time(), exchange_id, choice, value))

    def add_comparison(self, better: tuple[str, int], worse: tuple[str, int]) -> None:
        with self.lock:
            self.db.execute("INSERT INTO feedback (created, kind, exchange, choice, other_exchange, other_choice) "
                            "VALUES (?, 'compare', ?, ?, ?, ?)", (time.time(), *better, *worse))

    def close(self) -> None:
        with self.lock:
            self.db.close()


# ---------------------------------------------------------------------------------------------
# `rlhflab serve export`.


@dataclass
class ServeExportConfig:
    """Write a serving log's prompts and the chat page's preference choices as training files."""

    stage = "serve export"
    db: str = opt("", "the SQLite file written by `rlhflab serve --log-db`")
    out: str = opt("", "directory for prompts.jsonl and prefs.jsonl")

    def check(self) -> None:
        if not self.db:
            raise UsageError("--db: give the log file written by `rlhflab serve --log-db FILE`")
        if not self.out:
            raise UsageError("--out: give a directory for prompts.jsonl and prefs.jsonl")


def read_log(db_path: str | Path) -> tuple[list[dict], list[dict]]:
    """(prompts, pairs) from a log file, oldest first."""
    path = Path(db_path)
    if not path.is_file():
        raise UsageError(f"--db {db_path}: no such file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        exchanges = {row[0]: (json.loads(row[1]), json.loads(row[2]))
                     for row in db.execute("SELECT id, messages, answers FROM exchanges ORDER BY created")}
        comparisons = db.execute("SELECT exchange, choice, other_exchange, other_choice FROM feedback "
                                 "WHERE kind = 'compare' ORDER BY id").fetchall()
        db.close()
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"--db {db_path}: not a conversation log: {exc}") from None

    prompts, seen = [], set()
    for messages, _ in exchanges.values():
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            prompts.append({"messages": messages})

    pairs = []
    for better_id, better_choice, worse_id, worse_choice in comparisons:
        if better_id not in exchanges or worse_id not in exchanges:
            continue
        (prompt, better_answers), (other_prompt, worse_answers) = exchanges[better_id], exchanges[worse_id]
        # Two answers are comparable only as answers to the same conversation.
        if prompt != other_prompt or better_choice >= len(better_answers) or worse_choice >= len(worse_answers):
            continue
        chosen, rejected = better_answers[better_choice], worse_answers[worse_choice]
        if chosen != rejected:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return prompts, pairs


def export_command(config: ServeExportConfig) -> int:
    prompts, pairs = read_log(config.db)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "prompts.jsonl", prompts)
    atomic_write_jsonl(out / "prefs.jsonl", pairs)
    print(f"{len(prompts)} prompts -> {out / 'prompts.jsonl'}\n{len(pairs)} preference pairs -> {out / 'prefs.jsonl'}")
    return 0
