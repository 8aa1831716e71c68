"""`rlhflab label init`, `label add-annotator` and `label export`: task files in, labels out,
and the figures of the admin page.

Task files are read whole and checked before the database is created or changed, so a bad row
stops the import with its file and line and nothing is written. The export writes the formats the
training stages read: rankings (aggregated per task), pairs (every pair each label implies) and
rule flags (per answer, by majority of its annotators).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlhflab.config import opt
from rlhflab.data.formats import RowError, detect_format, iter_raw_rows, normalise
from rlhflab.errors import UsageError
from rlhflab.feedback import agreement as agr
from rlhflab.feedback.labeling import DEFAULT_GUIDELINES, DEFAULT_RULES, MAX_ANSWERS, LabelDB, Refused, new_token
from rlhflab.runs import atomic_write_jsonl, refuse_a_file

# ---------------------------------------------------------------------------------------------
# Reading task files (everything is checked before the database is touched).


def _gold_ranks(row: dict, where: str, k: int) -> list[int]:
    """Known order of a gold row (best first): strict, or with ties where its aligned `scores`
    (as `rlhflab rank --format rankings` writes them) are equal."""
    scores = row.get("scores")
    if scores is None:
        return list(range(1, k + 1))
    if (not isinstance(scores, list) or len(scores) != k
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
        raise UsageError(f"{where}: field 'scores' must be {k} numbers aligned with 'responses'")
    if any(a < b for a, b in zip(scores, scores[1:])):
        raise UsageError(f"{where}: 'responses' of a gold row must be best first ('scores' must not rise)")
    ranks, level = [], 0
    for i, s in enumerate(scores):
        level += i == 0 or s != scores[i - 1]
        ranks.append(level)
    return ranks


def read_tasks(path: str, option: str = "--tasks", gold: bool = False) -> tuple[list[dict], int]:
    """Tasks from `rlhflab sample` output, a rankings file, or a pairs file (a `serve export`
    prefs.jsonl: the pairs of one prompt become one task with all its distinct answers).
    Returns (tasks, rows skipped because fewer than two distinct answers were left)."""
    if not Path(path).exists():
        raise UsageError(f"{option} {path}: no such file")
    tasks: dict[str, dict] = {}
    skipped, fmt = 0, None
    for where, row in iter_raw_rows(path):
        try:
            if fmt is None:
                fmt = detect_format(row, "preference") if isinstance(row, dict) else "unknown"
                if fmt not in ("rankings", "pairs") or (gold and fmt != "rankings"):
                    fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                    hint = "; sample answers first with `rlhflab sample`" if fmt in ("prompts", "messages") else ""
                    need = "a rankings file, best first" if gold else \
                        "`rlhflab sample` output, rankings ({prompt, responses}) or pairs ({prompt, chosen, rejected})"
                    raise UsageError(f"{where}: {option} looks like {fmt!r} data (fields: {fields}); "
                                     f"expected {need}{hint}")
            record = normalise(row, fmt, "preference")[0]
        except RowError as exc:
            raise UsageError(f"{where}: {exc} ({option}, format {fmt})") from None
        if any(not isinstance(a, str) for a in record.responses):
            raise UsageError(f"{where}: answers must be strings")
        distinct = list(dict.fromkeys(record.responses))
        key = json.dumps(record.messages, ensure_ascii=False, sort_keys=True)
        meta = {k: v for k, v in record.meta.items() if k != "gold_scores"}
        if gold:
            if len(distinct) != len(record.responses):
                raise UsageError(f"{where}: a gold row must not repeat an answer")
            tasks[where] = {"prompt": record.messages, "answers": distinct, "source": where, "meta": meta,
                                 "gold": _gold_ranks(row, where, len(distinct))}
            continue
        if fmt == "pairs" and key in tasks:
            task = tasks[key]
            task["answers"] = list(dict.fromkeys(task["answers"] + distinct))
            continue
        if fmt == "rankings" and key in tasks:   # the same prompt twice: a task of its own
            key = f"{key}\n{where}"
        tasks[key] = {"prompt": record.messages, "answers": distinct, "source": where, "meta": meta, "gold": None}
    if fmt is None:
        raise UsageError(f"{option} {path}: no rows")
    out = []
    for task in tasks.values():
        if len(task["answers"]) > MAX_ANSWERS:
            raise UsageError(f"{task['source']}: {len(task['answers'])} answers; a task holds at most {MAX_ANSWERS}")
        if len(task["answers"]) < 2:
            skipped += 1
            continue
        out.append(task)
    return out, skipped


def read_guidelines(path: str) -> str:
    if not path:
        return DEFAULT_GUIDELINES
    if not Path(path).is_file():
        raise UsageError(f"--guidelines {path}: no such file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--guidelines {path}: not UTF-8 text (byte {exc.start})") from None


# ---------------------------------------------------------------------------------------------
# Statistics (the admin page) and export.


def group_by_task(labels: list[dict]) -> dict[int, list[dict]]:
    """Labels grouped by their task's id."""
    grouped: dict[int, list[dict]] = {}
    for label in labels:
        grouped.setdefault(label["task"], []).append(label)
    return grouped


def statistics(db: LabelDB) -> dict:
    """Progress, per-annotator throughput and agreement, alpha and the most disputed tasks."""
    tasks, people, labels = db.everything()
    by_task = group_by_task(labels)
    regular = [t for t in tasks.values() if t["gold"] is None]
    complete = sum(len(by_task.get(t["id"], [])) >= db.overlap for t in regular)
    per_person = []
    for person in people.values():
        mine = [lb for lb in labels if lb["annotator"] == person["id"]]
        maj = [0, 0]
        gold = [0, 0]
        for lb in mine:
            task = tasks[lb["task"]]
            if task["gold"]:
                a, c = agr.agreement_with(lb["ranks"], task["gold"])
                gold[0] += a
                gold[1] += c
            else:
                others = [o["ranks"] for o in by_task[lb["task"]] if o["annotator"] != person["id"]]
                a, c = agr.agreement_with_majority(lb["ranks"], others)
                maj[0] += a
                maj[1] += c
        span = (max(lb["created"] for lb in mine) - min(lb["created"] for lb in mine)) if len(mine) > 1 else 0
        seconds = sorted(lb["seconds"] for lb in mine if lb["seconds"] is not None)
        per_person.append({
            "name": person["name"], "admin": person["admin"], "labels": len(mine),
            "per_hour": round(3600 * (len(mine) - 1) / span, 1) if span > 0 else None,
            "median_seconds": seconds[len(seconds) // 2] if seconds else None,
            "majority_agreement": maj[0] / maj[1] if maj[1] else None, "majority_pairs": maj[1],
            "gold_agreement": gold[0] / gold[1] if gold[1] else None, "gold_pairs": gold[1],
            "flags": sum(len(f) for lb in mine for f in lb["flags"].values()),
        })
    disputed = []
    for task_id, task_labels in by_task.items():
        value = agr.task_agreement([lb["ranks"] for lb in task_labels])
        if value is not None and tasks[task_id]["gold"] is None:
            disputed.append({"task": task_id, "agreement": value, "labels": len(task_labels),
                             "prompt": tasks[task_id]["prompt"][-1]["content"]})
    disputed.sort(key=lambda d: (d["agreement"], d["task"]))
    total_pairs = [sum(p[k] for p in per_person) for k in ("majority_pairs", "gold_pairs")]
    return {
        "tasks": len(regular), "gold_tasks": len(tasks) - len(regular), "overlap": db.overlap,
        "labels": len(labels), "complete": complete,
        "progress": sum(min(len(by_task.get(t["id"], [])), db.overlap) for t in regular)
        / max(1, len(regular) * db.overlap),
        "alpha": agr.alpha_of_tasks([[lb["ranks"] for lb in by_task[t["id"]]] for t in regular if t["id"] in by_task]),
        "majority_agreement": (sum((p["majority_agreement"] or 0) * p["majority_pairs"] for p in per_person)
                               / total_pairs[0]) if total_pairs[0] else None,
        "gold_agreement": (sum((p["gold_agreement"] or 0) * p["gold_pairs"] for p in per_person)
                           / total_pairs[1]) if total_pairs[1] else None,
        "annotators": per_person, "disputed": disputed[:20],
    }


def export_rows(db: LabelDB, with_annotators: bool = False, min_annotators: int = 1,
                include_gold: bool = False) -> dict[str, list[dict]]:
    """rankings (aggregated per task), prefs (every implied pair of every label), rules (flags
    per answer, aggregated over its annotators)."""
    tasks, people, labels = db.everything()
    by_task = group_by_task(labels)
    rankings, prefs, rules_rows = [], [], []
    names = db.rules
    for task_id in sorted(by_task):
        task, task_labels = tasks[task_id], by_task[task_id]
        if (task["gold"] and not include_gold) or len(task_labels) < min_annotators:
            continue
        all_ranks = [lb["ranks"] for lb in task_labels]
        mean = agr.aggregate(all_ranks)
        order = agr.order_from_scores(mean, random.Random(f"ties:{task_id}"))
        meta = {**task["meta"], "task": task_id, "annotators": len(task_labels),
                "agreement": agr.task_agreement(all_ranks), "all_bad": sum(lb["all_bad"] for lb in task_labels)}
        if len(set(mean)) > 1:   # a task every annotator left all tied has no order to learn
            rankings.append({"prompt": task["prompt"], "responses": [task["answers"][i] for i in order],
                             "mean_positions": [round(mean[i], 4) for i in order], "meta": meta})
        for lb in task_labels:
            for better, worse in agr.implied_pairs(lb["ranks"]):
                pair_meta = {"task": task_id}
                if with_annotators:
                    pair_meta["annotator"] = people[lb["annotator"]]["name"]
                prefs.append({"prompt": task["prompt"], "chosen": task["answers"][better],
                              "rejected": task["answers"][worse], "meta": pair_meta})
        for i, answer in enumerate(task["answers"]):
            votes = {name: sum(name in lb["flags"].get(str(i), []) for lb in task_labels) for name in names}
            row = {"prompt": task["prompt"], "response": answer,
                   "rules": {name: votes[name] * 2 > len(task_labels) for name in names},
                   "votes": votes, "annotators": len(task_labels),
                   "critiques": [lb["critiques"][str(i)] for lb in task_labels if str(i) in lb["critiques"]],
                   "meta": {"task": task_id}}
            rules_rows.append(row)
    return {"rankings.jsonl": rankings, "prefs.jsonl": prefs, "rules.jsonl": rules_rows}


# ---------------------------------------------------------------------------------------------
# Commands.


@dataclass
class LabelInitConfig:
    """Create a labeling database from task files (nothing is written if any row is bad)."""

    stage = "label init"
    db: str = opt("", "the SQLite file to create")
    tasks: str = opt("", "tasks: `rlhflab sample` output, a rankings file or a pairs file (`serve export`'s "
                         "prefs.jsonl); give it several times for several files", repeatable=True)
    gold: str = opt("", "gold items: a rankings file with a known order (best first; equal 'scores' are ties), "
                        "given to every annotator for quality control")
    overlap: int = opt(3, "annotators per task")
    gold_every: int = opt(10, "every Nth task an annotator gets is a gold item, while unseen ones are left")
    rules: str = opt("", "project rules answers can be flagged for, besides the built-in ones", repeatable=True)
    guidelines: str = opt("", "a Markdown file shown as the guidelines page (empty: built-in guidelines)")
    append: bool = opt(False, "add the tasks to an existing database instead of creating one")
    seed: int = opt(0, "seed of the order of the tasks (they are shuffled once at import)")

    def check(self) -> None:
        if not self.db:
            raise UsageError("--db: give the database file to create")
        if not self.tasks and not self.gold:
            raise UsageError("--tasks: give a file of tasks (see --help)")
        if self.gold_every < 2:
            raise UsageError(f"--gold-every: must be at least 2, got {self.gold_every}")


def init_command(config: LabelInitConfig) -> int:
    db_path = Path(config.db)
    if db_path.is_dir():
        raise UsageError(f"--db {db_path}: a directory; expected the path of a file")
    if db_path.exists() and not config.append:
        raise UsageError(f"--db {db_path}: exists already (--append adds tasks to it)")
    if config.append and not db_path.exists():
        raise UsageError(f"--db {db_path}: no such file to --append to")
    tasks, skipped = [], 0
    for path in filter(None, (p.strip() for p in config.tasks.split(","))):
        read, dropped = read_tasks(path)
        tasks += read
        skipped += dropped
    random.Random(f"tasks:{config.seed}").shuffle(tasks)
    gold = read_tasks(config.gold, "--gold", gold=True)[0] if config.gold else []
    extra = [r.strip() for r in config.rules.split(",") if r.strip()]
    rules = list(dict.fromkeys([*DEFAULT_RULES, *extra]))
    guidelines = read_guidelines(config.guidelines)
    if not tasks and not gold:
        raise UsageError("no task has two distinct answers to rank")
    # Everything is read and checked: only now is the database created or changed.
    db = LabelDB(db_path, create=not config.append)
    try:
        admin_token = None
        if not config.append:
            db.write_settings({"overlap": config.overlap, "gold_every": config.gold_every, "secret": new_token(),
                               "rules": json.dumps(rules, ensure_ascii=False), "guidelines": guidelines,
                               "created": time.time()})
            admin_token = db.add_annotator("admin", admin=True)
        elif config.rules or config.guidelines:
            db.write_settings({**({"rules": json.dumps(rules, ensure_ascii=False)} if config.rules else {}),
                               **({"guidelines": guidelines} if config.guidelines else {})})
        db.add_tasks(tasks + gold)
    finally:
        db.close()
    note = f" ({skipped} rows skipped: fewer than two distinct answers)" if skipped else ""
    print(f"{len(tasks)} tasks and {len(gold)} gold items in {db_path}{note}", file=sys.stderr)
    if admin_token:
        print(f"admin token (shown once; `rlhflab label add-annotator NAME` makes annotators):\n{admin_token}")
    return 0


@dataclass
class AddAnnotatorConfig:
    """Create an annotator and print their sign-in token (shown once)."""

    stage = "label add-annotator"
    name: str = opt("", "the annotator's name (shown on the admin page)")
    db: str = opt("", "the labeling database")
    admin: bool = opt(False, "the token sees everything: the admin page and every label")

    def check(self) -> None:
        if not self.name:
            raise UsageError("give a name: `rlhflab label add-annotator NAME --db FILE`")
        if not self.db:
            raise UsageError("--db: give the labeling database")


def add_annotator_command(config: AddAnnotatorConfig) -> int:
    db = LabelDB(config.db)
    try:
        token = db.add_annotator(config.name, config.admin)
    except Refused as exc:
        raise UsageError(exc.message) from None
    finally:
        db.close()
    print(token)
    return 0


@dataclass
class LabelExportConfig:
    """Write the labels as rankings.jsonl, prefs.jsonl and rules.jsonl."""

    stage = "label export"
    db: str = opt("", "the labeling database")
    out: str = opt("", "directory to write rankings.jsonl, prefs.jsonl and rules.jsonl to")
    with_annotators: bool = opt(False, "tag every pair in prefs.jsonl with its annotator's name")
    min_annotators: int = opt(1, "leave out tasks with fewer labels than this")
    include_gold: bool = opt(False, "export the gold items' labels too")

    def check(self) -> None:
        if not self.db:
            raise UsageError("--db: give the labeling database")
        if not self.out:
            raise UsageError("--out: give a directory")


def export_command(config: LabelExportConfig) -> int:
    refuse_a_file(config.out)
    db = LabelDB(config.db)
    try:
        files = export_rows(db, config.with_annotators, config.min_annotators, config.include_gold)
    finally:
        db.close()
    out = Path(config.out)
    for name, rows in files.items():
        atomic_write_jsonl(out / name, rows)
        print(f"{len(rows):6d} rows -> {out / name}")
    return 0
