"""`rlhflab label`: the agreement statistics on hand-computed cases, importing task files (bad ones
refused with file:line before any database exists), assignment with overlap and gold items, and
the export read back by the loaders `rm` and `dpo` use."""

from __future__ import annotations

import json
import random
import sqlite3
from itertools import permutations

import pytest

from rlhflab.cli.main import main
from rlhflab.data.formats import load_records
from rlhflab.feedback import agreement as agr
from rlhflab.feedback.label_commands import export_rows, statistics
from rlhflab.feedback.labeling import LETTERS, LabelDB, Refused, parse_label
from rlhflab.rewards.rules import read_rule_rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def ranking(prompt: str, answers: list[str], **extra) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "responses": answers, **extra}


# ---------------------------------------------------------------------------------------------
# Statistics.


def test_positions_preferences_and_borda():
    assert agr.positions([1, 1, 2]) == [1.5, 1.5, 3.0]
    assert agr.positions([2, 1, 2, 3]) == [2.5, 1.0, 2.5, 4.0]
    assert agr.preference([2, 1, 2], 0, 1) == -1 and agr.preference([2, 1, 2], 0, 2) == 0
    assert agr.aggregate([[1, 2, 3], [1, 3, 2], [1, 1, 2]]) == pytest.approx([7 / 6, 13 / 6, 8 / 3])
    assert agr.order_from_scores([2.0, 1.0, 2.0]) == [1, 0, 2]
    # with a random source, ties come out in both orders across tasks, never always the import order
    orders = {tuple(agr.order_from_scores([1.0, 2.0, 2.0, 2.0], random.Random(n))) for n in range(40)}
    assert all(order[0] == 0 for order in orders) and len(orders) > 1
    assert sorted(agr.implied_pairs([2, 1, 2, 3])) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]


def test_task_agreement_and_agreement_with_references():
    # Two annotators, 3 answers: pairs (0,1) (0,2) (1,2); they agree on (0,2) and (1,2) only.
    assert agr.task_agreement([[1, 2, 3], [2, 1, 3]]) == pytest.approx(2 / 3)
    assert agr.task_agreement([[1, 2, 3]]) is None
    # Against gold [1, 1, 2]: only (0,2) and (1,2) are ordered; a tie does not agree.
    assert agr.agreement_with([1, 2, 3], [1, 1, 2]) == (2, 2)
    assert agr.agreement_with([1, 1, 1], [1, 2, 3]) == (0, 3)
    # Majority of the others: on (0,1) they split (no majority), on (0,2) and (1,2) both say above.
    assert agr.agreement_with_majority([2, 1, 3], [[1, 2, 3], [2, 1, 3]]) == (2, 2)
    assert agr.agreement_with_majority([3, 2, 1], [[1, 2, 3], [1, 2, 3]]) == (0, 3)


def _alpha_by_pairs(units):
    """Krippendorff's alpha from its definition as average disagreements (an independent route)."""
    units = [u for u in units if len(u) >= 2]
    values = [v for u in units for v in u]
    counts = {c: values.count(c) for c in sorted(set(values))}
    cats = sorted(counts)

    def delta(c, k):
        lo, hi = sorted((cats.index(c), cats.index(k)))
        return (sum(counts[g] for g in cats[lo:hi + 1]) - (counts[c] + counts[k]) / 2) ** 2

    n = len(values)
    observed = sum(delta(a, b) / (len(u) - 1) for u in units for a, b in permutations(u, 2)) / n
    expected = sum(delta(a, b) for a, b in permutations(values, 2)) / (n * (n - 1))
    return 1 - observed / expected


def test_krippendorff_alpha_hand_cases():
    assert agr.krippendorff_alpha([[1, 1], [2, 2], [3, 3]]) == pytest.approx(1.0)
    # o(1,2) = o(2,1) = 2, n1 = n2 = 2, delta = (4 - 2)^2 = 4: alpha = 1 - 3 * 16 / 32.
    assert agr.krippendorff_alpha([[1, 2], [2, 1]]) == pytest.approx(-0.5)
    assert agr.krippendorff_alpha([[1, 1]]) is None           # no variation to measure against
    units = [[1, 2, 1], [3, 3], [2, 2, 4], [4, 3, 4], [1.5, 1.5, 1]]
    assert agr.krippendorff_alpha(units) == pytest.approx(_alpha_by_pairs(units))
    # Three annotators ranking alike agree more than three ranking at random.
    same = agr.alpha_of_tasks([[[1, 2, 3, 4], [1, 2, 3, 4], [1, 3, 2, 4]]] * 5)
    mixed = agr.alpha_of_tasks([[[1, 2, 3, 4], [4, 3, 2, 1], [2, 4, 1, 3]]] * 5)
    assert same > 0.7 and mixed < 0


# ---------------------------------------------------------------------------------------------
# Import.


def test_bad_task_files_are_refused_with_file_and_line_before_the_db_exists(tmp_path, capsys):
    db = tmp_path / "labels.db"
    good = ranking("2+2?", ["4", "5"])
    cases = {
        "json.jsonl": ([good, "{not json"], ":2: not valid JSON"),
        "short.jsonl": ([good, good, {"prompt": "x", "responses": "one answer"}], ":3: field 'responses'"),
        "prompts.jsonl": ([{"prompt": "hi"}], ":1: --tasks looks like 'prompts' data"),
        "role.jsonl": ([{"prompt": [{"role": "robot", "content": "x"}], "responses": ["a", "b"]}], ":1: prompt[0].role"),
        "mixed.jsonl": ([good, {"prompt": "x", "chosen": "a", "rejected": "b"}], ":2: field 'responses'"),
    }
    for name, (rows, expected) in cases.items():
        path = write_jsonl(tmp_path / name, rows)
        assert main(["label", "init", "--db", str(db), "--tasks", path]) == 2
        err = capsys.readouterr().err
        assert f"{path}{expected}" in err, err
        assert not db.exists()
    gold = write_jsonl(tmp_path / "gold.jsonl", [ranking("q", ["a", "b"], scores=[0.1, 0.9])])
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [good])
    assert main(["label", "init", "--db", str(db), "--tasks", tasks, "--gold", gold]) == 2
    assert f"{gold}:1: 'responses' of a gold row must be best first" in capsys.readouterr().err
    assert not db.exists()

    # An existing database is not touched by a bad --append either.
    assert main(["label", "init", "--db", str(db), "--tasks", tasks]) == 0
    before = db.read_bytes()
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, good, "[1, 2]"])
    assert main(["label", "init", "--db", str(db), "--tasks", bad, "--append"]) == 2
    assert f"{bad}:3:" in capsys.readouterr().err
    assert db.read_bytes() == before
    assert main(["label", "init", "--db", str(db), "--tasks", tasks]) == 2
    assert "exists already" in capsys.readouterr().err


def test_import_sample_output_pairs_and_gold(tmp_path, capsys):
    sample = write_jsonl(tmp_path / "samples.jsonl", [
        ranking("What is 2+3?", ["5", "5", "6", "five"], meta={"family": "arithmetic", "model": "sft"}),
        ranking("Same answers", ["x", "x"]),                                  # nothing to rank: skipped
    ])
    pairs = write_jsonl(tmp_path / "prefs.jsonl", [            # `serve export`: pairs of one prompt form one task
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hello", "rejected": "go away"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": "hey", "rejected": "hello"},
    ])
    gold = write_jsonl(tmp_path / "gold.jsonl", [ranking("Capital of France?", ["Paris", "Lyon", "London"],
                                                         scores=[1.0, 0.2, 0.2])])
    db_path = tmp_path / "labels.db"
    assert main(["label", "init", "--db", str(db_path), "--tasks", sample, "--tasks", pairs, "--gold", gold,
                 "--rules", "made-up facts", "--overlap", "2"]) == 0
    out = capsys.readouterr()
    assert "2 tasks and 1 gold items" in out.err and "1 rows skipped" in out.err
    admin_token = out.out.strip().splitlines()[-1]
    db = LabelDB(db_path)
    tasks, people, _ = db.everything()
    answers = sorted(tuple(t["answers"]) for t in tasks.values())
    assert answers == [("5", "6", "five"), ("Paris", "Lyon", "London"), ("hello", "go away", "hey")]
    gold_task = next(t for t in tasks.values() if t["gold"])
    assert gold_task["gold"] == [1, 2, 2]
    assert db.rules[-1] == "made-up facts" and db.overlap == 2
    assert db.who(admin_token)["admin"] and list(people.values())[0]["name"] == "admin"
    # The token is stored only as a hash.
    raw = sqlite3.connect(db_path).execute("SELECT token_hash FROM annotators").fetchone()[0]
    assert admin_token not in raw and len(raw) == 64
    db.close()


# ---------------------------------------------------------------------------------------------
# Assignment, labels and export.


def make_db(tmp_path, n_tasks=4, overlap=2, gold=(), gold_every=10):
    db = LabelDB(tmp_path / "labels.db", create=True)
    db.write_settings({"overlap": overlap, "gold_every": gold_every, "secret": "s", "rules": json.dumps(["rude", "wrong"])})
    tasks = [{"prompt": [{"role": "user", "content": f"q{i}"}], "answers": [f"a{i}", f"b{i}", f"c{i}"],
              "source": f"f:{i}", "meta": {"i": i}} for i in range(n_tasks)]
    db.add_tasks(tasks + list(gold))
    return db


def label_by_text(db, person, task_id, tiers_of_texts, **extra):
    """Submit a label given as tiers of answer texts (as a person would see them)."""
    shown = db.task_for(task_id, person)
    slot = {a["text"]: a["slot"] for a in shown["answers"]}
    body = {"task": task_id, "submission": f"{person}-{task_id}-{extra.pop('tag', '')}",
            "order": [[slot[t] for t in tier] for tier in tiers_of_texts], **extra}
    return db.submit(person, body)


def test_overlap_gold_items_and_resubmission(tmp_path):
    gold = [{"prompt": [{"role": "user", "content": "g"}], "answers": ["best", "worst"], "source": "g:1",
             "meta": {}, "gold": [1, 2]}]
    db = make_db(tmp_path, n_tasks=3, overlap=2, gold=gold, gold_every=2)
    people = [db.who(db.add_annotator(name))["id"] for name in ("ann", "bob", "cy")]
    handed = {p: [] for p in people}
    for _ in range(3):
        for p in people:
            task = db.next_task(p, lease_s=600)
            if task is None:
                continue
            handed[p].append(task)
            assert db.next_task(p, lease_s=600) == task        # the same task until it is labelled
            shown = db.task_for(task, p)
            db.submit(p, {"task": task, "submission": f"{p}:{task}", "order": [[a["slot"]] for a in shown["answers"]]})
    tasks, _, labels = db.everything()
    per_task = {t: sum(lb["task"] == t for lb in labels) for t in tasks}
    regular = [t for t in tasks if not tasks[t]["gold"]]
    assert all(per_task[t] == 2 for t in regular)                      # overlap 2, not more
    gold_id = next(t for t in tasks if tasks[t]["gold"])
    assert all(p_tasks[1] == gold_id for p_tasks in handed.values())   # every 2nd task is the gold item
    assert all(len(set(v)) == len(v) for v in handed.values())
    # Answers are shuffled per annotator (with 3 annotators x 4 tasks, some orders differ).
    orders = {tuple(db.shown_order(t, p, 3)) for t in regular for p in people}
    assert len(orders) > 1
    # Changing one's label replaces it; a retried submission is stored once.
    p, t = people[0], handed[people[0]][0]
    answers = tasks[t]["answers"]
    first = label_by_text(db, p, t, [[answers[2]], [answers[0], answers[1]]], tag="x")
    again = label_by_text(db, p, t, [[answers[2]], [answers[0], answers[1]]], tag="x")
    assert again == {**first, "duplicate": True}
    assert [lb["ranks"] for lb in db.everything()[2] if lb["annotator"] == p and lb["task"] == t] == [[2, 2, 1]]
    with pytest.raises(Refused) as refused:
        label_by_text(db, people[0], regular[0] if regular[0] not in handed[p] else 999, [[answers[0]]])
    assert refused.value.status in (403, 404)
    db.close()


def test_export_aggregates_and_writes_the_formats_rm_and_dpo_read(tmp_path):
    db = make_db(tmp_path, n_tasks=1, overlap=3)
    people = [db.who(db.add_annotator(n))["id"] for n in ("ann", "bob", "cy")]
    for p in people:
        assert db.next_task(p, 600) == 1
    label_by_text(db, people[0], 1, [["a0"], ["b0"], ["c0"]], flags={}, critiques={})
    label_by_text(db, people[1], 1, [["a0"], ["c0"], ["b0"]])
    shown = db.task_for(1, people[2])
    slot = {a["text"]: a["slot"] for a in shown["answers"]}
    db.submit(people[2], {"task": 1, "submission": "s3", "order": [[slot["b0"], slot["a0"]], [slot["c0"]]],
                          "flags": {slot["c0"]: ["rude"]}, "critiques": {slot["c0"]: "'; DROP TABLE labels; --"}})
    files = export_rows(db, with_annotators=True)
    (row,) = files["rankings.jsonl"]
    # Mean positions: a0 (1+1+1.5)/3, b0 (2+3+1.5)/3, c0 (3+2+3)/3.
    assert row["responses"] == ["a0", "b0", "c0"]
    assert row["mean_positions"] == pytest.approx([1.1667, 2.1667, 2.6667], abs=1e-4)
    assert row["meta"]["annotators"] == 3 and row["meta"]["i"] == 0
    assert row["meta"]["agreement"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)   # pairs of labels: 1-2, 1-3, 2-3
    prefs = files["prefs.jsonl"]
    assert len(prefs) == 3 + 3 + 2
    assert {p["meta"]["annotator"] for p in prefs} == {"ann", "bob", "cy"}
    rules = {r["response"]: r for r in files["rules.jsonl"]}
    assert rules["c0"]["votes"] == {"rude": 1, "wrong": 0} and rules["c0"]["rules"] == {"rude": False, "wrong": False}
    assert rules["c0"]["critiques"] == ["'; DROP TABLE labels; --"]
    stats = statistics(db)
    assert stats["labels"] == 3 and stats["complete"] == 1 and stats["progress"] == 1.0
    assert stats["disputed"][0]["task"] == 1
    db.close()

    out = tmp_path / "export"
    assert main(["label", "export", "--db", str(tmp_path / "labels.db"), "--out", str(out)]) == 0
    records, _ = load_records(str(out / "rankings.jsonl"), "preference", option="--data")
    assert records[0].responses == ["a0", "b0", "c0"]
    pairs, _ = load_records(str(out / "prefs.jsonl"), "preference", option="--data")
    assert len(pairs) == 8 and all(len(p.responses) == 2 for p in pairs)
    # the rule flags are what `rlhflab rm --rules` reads
    flags, names = read_rule_rows(str(out / "rules.jsonl"))
    assert names == ["rude", "wrong"] and len(flags) == 3
    assert all(rules_of == {"rude": 0, "wrong": 0} for _, _, rules_of in flags)


def test_label_bodies_are_checked():
    shown = [2, 0, 1]     # slot A is answer 2, B answer 0, C answer 1
    assert parse_label({"order": [["B"], ["A", "C"]]}, shown, ["rude"])["ranks"] == [1, 2, 2]
    assert parse_label({"order": [], "all_bad": True}, shown, ["rude"])["ranks"] == [1, 1, 1]
    for body, message in [({"order": [["A"], ["B"]]}, "place every answer"),
                          ({"order": [["A", "A", "B", "C"]]}, "exactly once"),
                          ({"order": [["A"], ["B"], ["D"]]}, "place every answer"),
                          ({"order": "ABC"}, "tiers best first"),
                          ({"order": [["A"], ["B"], ["C"]], "flags": {"A": ["unknown"]}}, "rules from: rude"),
                          ({"order": [["A"], ["B"], ["C"]], "all_bad": "yes"}, "all_bad")]:
        with pytest.raises(Refused, match=message):
            parse_label(body, shown, ["rude"])
    assert LETTERS[:3] == "ABC"
