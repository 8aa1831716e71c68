"""The labeling database of `rlhflab label`: tasks, annotators, assignments, labels (the commands
that fill and export it are in label_commands.py, the web app in label_server.py).

One SQLite file in WAL mode; every write is one committed transaction, made before the server
answers, so a server killed at any moment keeps every label it acknowledged.

    meta         key -> value: overlap, gold_every, rules (JSON), guidelines (Markdown), secret
    tasks        id, prompt (JSON messages), answers (JSON strings), gold (JSON ranks or NULL),
                 source ("file:line"), meta (JSON; never shown to annotators)
    annotators   id, name, token_hash (sha256 of the token; the token itself is never stored), admin
    sessions     id_hash, annotator, csrf, created: the web page's sign-ins
    assignments  task, annotator, assigned (unix time), done: who was handed which task
    labels       id, task, annotator, submission (the client's id: a retried submit stores once),
                 ranks (JSON, one number per answer in the task's own order, 1 = best, equal =
                 tie), all_bad, flags (JSON answer index -> rule names), critiques (JSON answer
                 index -> text), seconds (time on the page), created, updated

Assignment: a task goes to `overlap` annotators (default 3). An annotator asking for work gets
their own unfinished task first, else, every `gold_every`-th label, a gold item (a task with a
known order, given to everyone, for quality control), else the task that is closest to its
`overlap` labels. A hand-out that is not labelled within the lease is given to someone else.
Answers are shown in an order shuffled per (task, annotator), with letters, never indices.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from rlhflab.errors import UsageError

DEFAULT_RULES = ("harmful", "wrong", "wrong language", "rude", "off-topic")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_ANSWERS = len(LETTERS)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, answers TEXT NOT NULL, gold TEXT,
    source TEXT NOT NULL, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE,
    admin INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id_hash TEXT PRIMARY KEY, annotator INTEGER NOT NULL REFERENCES annotators(id),
    csrf TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    task INTEGER NOT NULL REFERENCES tasks(id), annotator INTEGER NOT NULL REFERENCES annotators(id),
    assigned REAL NOT NULL, done INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (task, annotator));
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY, task INTEGER NOT NULL REFERENCES tasks(id),
    annotator INTEGER NOT NULL REFERENCES annotators(id), submission TEXT NOT NULL UNIQUE,
    ranks TEXT NOT NULL, all_bad INTEGER NOT NULL, flags TEXT NOT NULL, critiques TEXT NOT NULL,
    seconds REAL, created REAL NOT NULL, updated REAL NOT NULL, UNIQUE (task, annotator));
"""


class Refused(Exception):
    """A request the database refuses: (HTTP status, message)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return "lbl-" + secrets.token_urlsafe(24)


DEFAULT_GUIDELINES = """# How to rank

Read the prompt, then read every answer before you order them.

1. Put the **most helpful, correct and honest** answer first. An answer that is right but rude,
   or in another language than the prompt, is worse than a plain correct one.
2. Answers that are equally good (or equally bad) may be **tied**.
3. If no answer is acceptable, tick **all bad** (you may still order them).
4. Flag every rule an answer breaks; write a short critique when the reason is not obvious.
5. A harmful request should be politely refused: a refusal is then the best answer.

Keys: `1`-`9`, or a letter other than `t` and `x`, place that answer next; `t` ties the last
placed answer with the one above; `Backspace` takes the last one back; `x` toggles all bad; `Enter` submits.
"""


# ---------------------------------------------------------------------------------------------
# The database.


class LabelDB:
    """A thread-safe handle on a labeling database; each method is one transaction."""

    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UsageError(f"--db {path}: no such file (create it with `rlhflab label init`)")
        try:
            self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed transaction survives the process being killed.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=10000")
            if create:
                self.db.executescript(SCHEMA)
            elif not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'labels'").fetchone():
                raise UsageError(f"--db {path}: not a labeling database (made by `rlhflab label init`)")
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"--db {path}: not a usable SQLite file: {exc}") from None
        self.lock = threading.Lock()
        self.settings = dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _transaction(self, work):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return result

    def _read(self, sql: str, args=()) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # -- settings ---------------------------------------------------------------------------

    @property
    def overlap(self) -> int:
        return int(self.settings.get("overlap", 3))

    @property
    def gold_every(self) -> int:
        return int(self.settings.get("gold_every", 10))

    @property
    def rules(self) -> list[str]:
        return json.loads(self.settings.get("rules", json.dumps(DEFAULT_RULES)))

    @property
    def guidelines(self) -> str:
        return self.settings.get("guidelines", DEFAULT_GUIDELINES)

    def write_settings(self, values: dict) -> None:
        def work(db):
            for key, value in values.items():
                db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                           (key, str(value)))
        self._transaction(work)
        self.settings.update({k: str(v) for k, v in values.items()})

    # -- tasks and people --------------------------------------------------------------------

    def add_tasks(self, tasks: list[dict]) -> int:
        def work(db):
            for t in tasks:
                db.execute("INSERT INTO tasks (prompt, answers, gold, source, meta) VALUES (?, ?, ?, ?, ?)",
                           (json.dumps(t["prompt"], ensure_ascii=False), json.dumps(t["answers"], ensure_ascii=False),
                            json.dumps(t["gold"]) if t.get("gold") else None, t["source"],
                            json.dumps(t["meta"], ensure_ascii=False)))
        self._transaction(work)
        return len(tasks)

    def add_annotator(self, name: str, admin: bool = False) -> str:
        """Create an annotator; returns their token (shown once, stored only as a hash)."""
        name = name.strip()
        if not name or len(name) > 100:
            raise Refused(400, "name: give 1 to 100 characters")
        token = new_token()

        def work(db):
            if db.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                raise Refused(409, f"an annotator named {name!r} exists already")
            db.execute("INSERT INTO annotators (name, token_hash, admin, created) VALUES (?, ?, ?, ?)",
                       (name, token_hash(token), int(admin), time.time()))
        self._transaction(work)
        return token

    def who(self, token: str) -> dict | None:
        found = self._read("SELECT id, name, admin FROM annotators WHERE token_hash = ?", (token_hash(token),))
        return {"id": found[0][0], "name": found[0][1], "admin": bool(found[0][2])} if found else None

    def open_session(self, annotator: int) -> tuple[str, str]:
        """(session cookie value, its CSRF token) for a signed-in annotator."""
        session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._transaction(lambda db: db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)",
                                                (token_hash(session), annotator, csrf, time.time())))
        return session, csrf

    def session(self, session: str) -> tuple[dict, str] | None:
        found = self._read("SELECT a.id, a.name, a.admin, s.csrf FROM sessions s JOIN annotators a "
                           "ON a.id = s.annotator WHERE s.id_hash = ?", (token_hash(session),))
        if not found:
            return None
        person_id, name, admin, csrf = found[0]
        return {"id": person_id, "name": name, "admin": bool(admin)}, csrf

    def close_session(self, session: str) -> None:
        self._transaction(lambda db: db.execute("DELETE FROM sessions WHERE id_hash = ?", (token_hash(session),)))

    # -- handing out tasks -------------------------------------------------------------------

    def shown_order(self, task: int, annotator: int, k: int) -> list[int]:
        """The task's answer indices in the order this annotator sees them (slot A first)."""
        order = list(range(k))
        random.Random(f"{self.settings.get('secret', '')}:{task}:{annotator}").shuffle(order)
        return order

    def next_task(self, annotator: int, lease_s: float) -> int | None:
        """The task this annotator should label now (assigned to them), or None when none is left."""
        def work(db):
            mine = db.execute("SELECT task FROM assignments WHERE annotator = ? AND done = 0 ORDER BY assigned, task "
                              "LIMIT 1", (annotator,)).fetchone()
            if mine:
                return mine[0]
            cutoff = time.time() - lease_s
            task = None
            done = db.execute("SELECT COUNT(*) FROM labels WHERE annotator = ?", (annotator,)).fetchone()[0]
            if (done + 1) % self.gold_every == 0:
                task = self._unseen_gold(db, annotator)
            if task is None:
                found = db.execute(
                    "SELECT t.id, (SELECT COUNT(*) FROM assignments a WHERE a.task = t.id AND "
                    "(a.done = 1 OR a.assigned > ?)) AS n FROM tasks t WHERE t.gold IS NULL AND NOT EXISTS "
                    "(SELECT 1 FROM assignments a WHERE a.task = t.id AND a.annotator = ?) AND n < ? "
                    "ORDER BY n DESC, t.id LIMIT 1", (cutoff, annotator, self.overlap)).fetchone()
                task = found[0] if found else None
            if task is not None:
                db.execute("INSERT INTO assignments (task, annotator, assigned) VALUES (?, ?, ?) "
                           "ON CONFLICT(task, annotator) DO UPDATE SET assigned = excluded.assigned",
                           (task, annotator, time.time()))
            return task
        return self._transaction(work)

    @staticmethod
    def _unseen_gold(db, annotator: int) -> int | None:
        found = db.execute("SELECT id FROM tasks t WHERE gold IS NOT NULL AND NOT EXISTS (SELECT 1 FROM assignments a "
                           "WHERE a.task = t.id AND a.annotator = ?) ORDER BY id LIMIT 1", (annotator,)).fetchone()
        return found[0] if found else None

    def task_for(self, task: int, annotator: int, admin: bool = False) -> dict:
        """A task as its annotator sees it: shuffled answers by letter, and their own label, if any.
        Refused unless the task was handed to them (or they are an admin)."""
        rows = self._read("SELECT prompt, answers FROM tasks WHERE id = ?", (task,))
        if not rows:
            raise Refused(404, f"no task {task}")
        if not admin and not self._read("SELECT 1 FROM assignments WHERE task = ? AND annotator = ?",
                                        (task, annotator)):
            raise Refused(403, f"task {task} is not assigned to you")
        prompt, answers = json.loads(rows[0][0]), json.loads(rows[0][1])
        order = self.shown_order(task, annotator, len(answers))
        out = {"task": task, "prompt": prompt, "rules": self.rules,
               "answers": [{"slot": LETTERS[s], "text": answers[i]} for s, i in enumerate(order)], "label": None}
        own = self._read("SELECT ranks, all_bad, flags, critiques FROM labels WHERE task = ? AND annotator = ?",
                         (task, annotator))
        if own:
            ranks, all_bad, flags, critiques = json.loads(own[0][0]), own[0][1], json.loads(own[0][2]), \
                json.loads(own[0][3])
            out["label"] = {"ranks": {LETTERS[s]: ranks[i] for s, i in enumerate(order)}, "all_bad": bool(all_bad),
                            "flags": {LETTERS[order.index(int(i))]: f for i, f in flags.items()},
                            "critiques": {LETTERS[order.index(int(i))]: c for i, c in critiques.items()}}
        return out

    # -- storing labels ----------------------------------------------------------------------

    def submit(self, annotator: int, body: dict) -> dict:
        """Store (or replace) this annotator's label of a task from a request body (see
        parse_label); a body whose `submission` id was stored already is acknowledged again
        without a second write."""
        task, submission = body.get("task"), body.get("submission")
        if isinstance(task, bool) or not isinstance(task, int):
            raise Refused(400, "task: expected the task's id (an integer)")
        if not isinstance(submission, str) or not 1 <= len(submission) <= 100:
            raise Refused(400, "submission: expected an id of 1 to 100 characters, the same on a retry")
        rows = self._read("SELECT answers FROM tasks WHERE id = ?", (task,))
        if not rows:
            raise Refused(404, f"no task {task}")
        k = len(json.loads(rows[0][0]))
        label = parse_label(body, self.shown_order(task, annotator, k), self.rules)

        def work(db):
            seen = db.execute("SELECT id, annotator FROM labels WHERE submission = ?", (submission,)).fetchone()
            if seen:
                if seen[1] != annotator:
                    raise Refused(409, "submission: this id belongs to another annotator's label")
                return {"stored": True, "label": seen[0], "duplicate": True}
            mine = db.execute("SELECT 1 FROM assignments WHERE task = ? AND annotator = ?", (task, annotator))
            if not mine.fetchone():
                raise Refused(403, f"task {task} is not assigned to you")
            now = time.time()
            db.execute("INSERT INTO labels (task, annotator, submission, ranks, all_bad, flags, critiques, seconds, "
                       "created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(task, annotator) DO UPDATE "
                       "SET submission = excluded.submission, ranks = excluded.ranks, all_bad = excluded.all_bad, "
                       "flags = excluded.flags, critiques = excluded.critiques, seconds = excluded.seconds, "
                       "updated = excluded.updated",
                       (task, annotator, submission, json.dumps(label["ranks"]), int(label["all_bad"]),
                        json.dumps(label["flags"], ensure_ascii=False),
                        json.dumps(label["critiques"], ensure_ascii=False), label["seconds"], now, now))
            db.execute("UPDATE assignments SET done = 1 WHERE task = ? AND annotator = ?", (task, annotator))
            found = db.execute("SELECT id FROM labels WHERE task = ? AND annotator = ?", (task, annotator)).fetchone()
            return {"stored": True, "label": found[0], "duplicate": False}
        return self._transaction(work)

    def own_labels(self, annotator: int) -> list[dict]:
        rows = self._read("SELECT l.task, t.prompt, l.updated FROM labels l JOIN tasks t ON t.id = l.task "
                          "WHERE l.annotator = ? ORDER BY l.updated DESC", (annotator,))
        return [{"task": task, "prompt": json.loads(prompt), "updated": updated} for task, prompt, updated in rows]

    # -- reading it all back -----------------------------------------------------------------

    def everything(self) -> tuple[dict, dict, list[dict]]:
        """(tasks by id, annotators by id, labels), for statistics and export."""
        tasks = {row[0]: {"id": row[0], "prompt": json.loads(row[1]), "answers": json.loads(row[2]),
                          "gold": json.loads(row[3]) if row[3] else None, "source": row[4], "meta": json.loads(row[5])}
                 for row in self._read("SELECT id, prompt, answers, gold, source, meta FROM tasks")}
        people = {row[0]: {"id": row[0], "name": row[1], "admin": bool(row[2])}
                  for row in self._read("SELECT id, name, admin FROM annotators")}
        labels = [{"id": row[0], "task": row[1], "annotator": row[2], "ranks": json.loads(row[3]),
                   "all_bad": bool(row[4]), "flags": json.loads(row[5]), "critiques": json.loads(row[6]),
                   "seconds": row[7], "created": row[8], "updated": row[9]}
                  for row in self._read("SELECT id, task, annotator, ranks, all_bad, flags, critiques, seconds, "
                                        "created, updated FROM labels ORDER BY id")]
        return tasks, people, labels


def parse_label(body: dict, shown: list[int], rules: list[str]) -> dict:
    """A submitted label in the task's own answer order. `order` lists tiers best first, each a
    list of letters (a tie within a tier); with `all_bad` it may be empty (all tied)."""
    k = len(shown)
    slots = {LETTERS[s]: i for s, i in enumerate(shown)}
    order, all_bad = body.get("order", []), body.get("all_bad", False)
    if not isinstance(all_bad, bool):
        raise Refused(400, "all_bad: expected true or false")
    if not isinstance(order, list) or not all(isinstance(t, list) and t and all(isinstance(s, str) for s in t)
                                              for t in order):
        raise Refused(400, "order: expected tiers best first, each a non-empty list of answer letters")
    placed = [s for tier in order for s in tier]
    if placed or not all_bad:
        if sorted(placed) != sorted(slots):
            raise Refused(400, f"order: place every answer ({', '.join(sorted(slots))}) exactly once"
                               + ("" if all_bad else ", or mark all bad"))
    ranks = [1] * k
    for level, tier in enumerate(order, 1):
        for s in tier:
            ranks[slots[s]] = level
    flags, critiques = body.get("flags") or {}, body.get("critiques") or {}
    if not isinstance(flags, dict) or not isinstance(critiques, dict):
        raise Refused(400, "flags and critiques: expected objects keyed by answer letter")
    out_flags, out_critiques = {}, {}
    for s, names in flags.items():
        if s not in slots or not isinstance(names, list) or not all(n in rules for n in names):
            raise Refused(400, f"flags.{s}: expected a letter of an answer and a list of rules from: "
                               f"{', '.join(rules)}")
        if names:
            out_flags[str(slots[s])] = sorted(set(names))
    for s, text in critiques.items():
        if s not in slots or not isinstance(text, str) or len(text) > 5000:
            raise Refused(400, f"critiques.{s}: expected a letter of an answer and a text of at most 5000 characters")
        if text.strip():
            out_critiques[str(slots[s])] = text
    seconds = body.get("seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0):
        raise Refused(400, "seconds: expected a non-negative number")
    return {"ranks": ranks, "all_bad": all_bad, "flags": out_flags, "critiques": out_critiques,
            "seconds": float(seconds) if seconds is not None else None}
