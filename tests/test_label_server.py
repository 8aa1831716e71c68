"""`rlhflab label serve` on a real server (127.0.0.1, a free port), driven over HTTP as the page
and the simulated annotators drive it: security (who may read and change what, escaping, CSRF,
SQL injection strings), reliability (concurrent annotators, kill -9, retried submits), and the
simulated toy-world annotators' agreement as the admin statistics report it."""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlencode

import pytest
from conftest import ROOT, free_port, uvicorn_in_thread

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from rlhflab.cli.main import main
from rlhflab.feedback.label_commands import export_rows, statistics
from rlhflab.feedback.label_server import LabelServeConfig, create_app
from rlhflab.feedback.label_simulate import SimulatedAnnotator, call, run_annotators
from rlhflab.feedback.labeling import LabelDB
from rlhflab.world.preferences import build_preferences
from rlhflab.world.tasks import make_prompts

INJECTION = "Robert'); DROP TABLE labels; -- \" OR 1=1"
XSS = ['<script>document.title="pwned"</script>', '<img src=x onerror="document.title=\'pwned\'">']


@contextmanager
def labeling(db_path, **options):
    """The app on uvicorn in a thread, as `rlhflab label serve` runs it; yields (url, db)."""
    db = LabelDB(db_path)
    app = create_app(db, LabelServeConfig(db=str(db_path), **options))
    try:
        with uvicorn_in_thread(app) as url:
            yield url, db
    finally:
        db.close()


def make_db(path, tasks, overlap=3, gold_every=10, rules=("harmful", "wrong", "rude")) -> str:
    """A labeling database with `tasks` (prompt text, answers[, gold ranks]); returns the admin token."""
    db = LabelDB(path, create=True)
    db.write_settings({"overlap": overlap, "gold_every": gold_every, "secret": "test",
                       "rules": json.dumps(list(rules))})
    db.add_tasks([{"prompt": [{"role": "user", "content": t[0]}], "answers": t[1], "source": f"test:{i}",
                   "meta": {}, "gold": t[2] if len(t) > 2 else None} for i, t in enumerate(tasks)])
    token = db.add_annotator("admin", admin=True)
    db.close()
    return token


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, text) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def annotator(url: str, admin: str, name: str) -> str:
    return call(url, admin, "POST", "/api/admin/annotators", {"name": name})["token"]


def first_order(task: dict) -> list[list[str]]:
    return [[a["slot"]] for a in task["answers"]]


def sign_in(url: str, token: str) -> tuple[str, str]:
    """(cookie header value, CSRF token) of a browser-style sign-in."""
    status, headers, _ = raw(url, "POST", "/login", urlencode({"token": token}).encode(),
                             {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303 and "HttpOnly" in headers["set-cookie"] and "SameSite=strict" in headers["set-cookie"]
    cookie = headers["set-cookie"].split(";")[0]
    status, _, text = raw(url, "GET", "/rank", headers={"Cookie": cookie})
    assert status == 200
    csrf = text.split('<meta name="csrf" content="')[1].split('"')[0]
    return cookie, csrf


def test_people_see_and_change_only_their_own_work_and_text_is_never_markup(tmp_path):
    tasks = [(XSS[0], [XSS[1], "plain answer", INJECTION]), ("second", ["x", "y"]), ("third", ["p", "q"])]
    admin = make_db(tmp_path / "l.db", tasks, overlap=1, rules=("harmful", INJECTION))
    with labeling(tmp_path / "l.db") as (url, db):
        ann, bob = annotator(url, admin, "ann"), annotator(url, admin, INJECTION)
        task = call(url, ann, "GET", "/api/next")
        assert task["task"] == 1 and task["prompt"][0]["content"] == XSS[0]
        body = {"task": 1, "submission": INJECTION, "order": first_order(task),
                "flags": {task["answers"][0]["slot"]: [INJECTION]}, "critiques": {"A": INJECTION}}
        assert call(url, ann, "POST", "/api/label", body)["stored"]

        # Bob gets another task, and can neither read nor change ann's.
        assert call(url, bob, "GET", "/api/next")["task"] == 2
        for method, path, payload in [("GET", "/api/task/1", None),
                                      ("POST", "/api/label", {**body, "submission": "bob-1"}),
                                      ("POST", "/api/label", body),
                                      ("GET", "/api/admin/stats", None),
                                      ("POST", "/api/admin/annotators", {"name": "eve"})]:
            status, _, text = raw(url, method, path, json.dumps(payload).encode() if payload else None,
                                  {"Authorization": f"Bearer {bob}", "Content-Type": "application/json"})
            assert status in (403, 409), (path, status, text)
        assert call(url, bob, "GET", "/api/labels") == {"labels": []}
        for path in ("/admin", "/admin/task/1", "/rank?task=1"):
            status, _, text = raw(url, "GET", path, headers={"Authorization": f"Bearer {bob}"})
            assert status == 403 and "plain answer" not in text
        assert raw(url, "GET", "/api/next")[0] == 401 and raw(url, "GET", "/rank")[0] == 303
        assert raw(url, "GET", "/api/next", headers={"Authorization": "Bearer lbl-wrong"})[0] == 401

        # Ann's page and the admin's pages show the HTML as text.
        for token, path in [(ann, "/rank?task=1"), (admin, "/admin/task/1"), (admin, "/admin")]:
            status, headers, text = raw(url, "GET", path, headers={"Authorization": f"Bearer {token}"})
            assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
            assert "<script>document" not in text and "<img src=x" not in text
            if path != "/admin":
                assert "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt;" in text
                assert "&lt;img src=x onerror=" in text
        assert "Robert&#x27;); DROP TABLE" in raw(url, "GET", "/admin", headers={"Authorization": f"Bearer {admin}"})[2]

    # Every injection string was stored verbatim (and every table is still there).
    files = export_rows(LabelDB(tmp_path / "l.db"), with_annotators=True)
    flagged = [r for r in files["rules.jsonl"] if r["votes"][INJECTION]]
    assert len(flagged) == 1 and flagged[0]["response"] == task["answers"][0]["text"] and flagged[0]["rules"][INJECTION]
    assert any(INJECTION in r["critiques"] for r in files["rules.jsonl"])
    assert any(r["response"] == INJECTION for r in files["rules.jsonl"])
    connection = sqlite3.connect(tmp_path / "l.db")
    assert connection.execute("SELECT submission FROM labels").fetchall() == [(INJECTION,)]
    assert (INJECTION,) in connection.execute("SELECT name FROM annotators").fetchall()
    connection.close()


def test_cookie_requests_need_the_csrf_token_and_this_sites_origin(tmp_path):
    admin = make_db(tmp_path / "l.db", [("q", ["a", "b"])], overlap=1)
    with labeling(tmp_path / "l.db") as (url, db):
        ann = annotator(url, admin, "ann")
        cookie, csrf = sign_in(url, ann)
        task = call(url, ann, "GET", "/api/task/1")
        body = json.dumps({"task": 1, "submission": "s1", "order": first_order(task)}).encode()
        host = url.removeprefix("http://")
        json_type = {"Content-Type": "application/json", "Cookie": cookie}
        for extra in [{}, {"X-CSRF-Token": "guess"}, {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}]:
            status, _, text = raw(url, "POST", "/api/label", body, {**json_type, **extra})
            assert status == 403, text
        assert db.everything()[2] == []
        # A cross-site sign-in or sign-out form is refused too.
        assert raw(url, "POST", "/login", urlencode({"token": ann}).encode(),
                   {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"})[0] == 403
        assert raw(url, "POST", "/logout", b"", {"Cookie": cookie})[0] == 403
        status, _, _ = raw(url, "POST", "/api/label", body,
                           {**json_type, "X-CSRF-Token": csrf, "Origin": f"http://{host}"})
        assert status == 200 and len(db.everything()[2]) == 1
        assert raw(url, "POST", "/logout", urlencode({"csrf": csrf}).encode(),
                   {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})[0] == 303
        assert raw(url, "GET", "/api/next", headers={"Cookie": cookie})[0] == 401   # the session is gone


def test_concurrent_annotators_lose_nothing_and_a_retried_submit_stores_once(tmp_path):
    n_tasks, overlap, people, each = 20, 3, 20, 3
    admin = make_db(tmp_path / "l.db", [(f"q{i}", [f"a{i}", f"b{i}", f"c{i}", f"d{i}"]) for i in range(n_tasks)],
                    overlap=overlap)
    with labeling(tmp_path / "l.db") as (url, db):
        workers = [SimulatedAnnotator(f"w{i}", annotator(url, admin, f"w{i}"), 0.3, str(i))
                   for i in range(people)]

        def work(worker):   # these prompts are no toy-world task: rank in the shown order
            for _ in range(each):
                task = call(url, worker.token, "GET", "/api/next")
                worker.submit(url, {"task": task["task"], "submission": f"{worker.name}:{task['task']}",
                                    "order": first_order(task)})

        with ThreadPoolExecutor(people) as pool:
            list(pool.map(work, workers))
        _, _, labels = db.everything()
        assert len(labels) == people * each == n_tasks * overlap
        assert sorted(lb["task"] for lb in labels) == sorted(t for t in range(1, n_tasks + 1) for _ in range(overlap))
        assert len({lb["task"] for lb in labels if lb["annotator"] == labels[0]["annotator"]}) == each
        assert {s for w in workers for s in w.acknowledged} == \
            {r[0] for r in sqlite3.connect(tmp_path / "l.db").execute("SELECT submission FROM labels")}

        # A network retry sends the same body again, possibly at the same time: one label.
        extra = annotator(url, admin, "late")
        assert db.next_task(db.who(extra)["id"], 600) is None          # every task has its 3 labels
    admin2 = make_db(tmp_path / "m.db", [("q", ["a", "b", "c"])], overlap=1)
    with labeling(tmp_path / "m.db") as (url, db):
        ann = annotator(url, admin2, "ann")
        task = call(url, ann, "GET", "/api/next")
        body = {"task": task["task"], "submission": "retry-1", "order": first_order(task)}
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: call(url, ann, "POST", "/api/label", body), range(4)))
        assert all(a["stored"] for a in answers) and len({a["label"] for a in answers}) == 1
        assert sum(not a["duplicate"] for a in answers) == 1
        assert len(db.everything()[2]) == 1


def test_kill_9_keeps_every_acknowledged_label(tmp_path):
    admin = make_db(tmp_path / "l.db", [(f"q{i}", [f"a{i}", f"b{i}", f"c{i}"]) for i in range(200)], overlap=1)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "rlhflab.cli.main", "label", "serve", "--db",
                               str(tmp_path / "l.db"), "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                call(url, admin, "GET", "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, server.stderr.read().decode()
                time.sleep(0.1)
        workers = [SimulatedAnnotator(f"k{i}", annotator(url, admin, f"k{i}"), 0.3, str(i))
                   for i in range(4)]
        for w in workers:   # no retries: a submit the server did not answer is not acknowledged
            w.submit = (lambda w: lambda url, body, retries=0: SimulatedAnnotator.submit(w, url, body, retries))(w)
        results = {}
        runner = threading.Thread(target=lambda: results.update(errors=run_annotators(url, workers)))
        runner.start()
        while sum(len(w.acknowledged) for w in workers) < 20:
            assert runner.is_alive()
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)   # in the middle of submissions
        server.wait(10)
        runner.join(60)
    finally:
        if server.poll() is None:
            server.kill()
    acknowledged = {s for w in workers for s in w.acknowledged}
    assert len(acknowledged) >= 20 and results["errors"]          # the annotators saw the server go away
    connection = sqlite3.connect(tmp_path / "l.db")
    assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = {r[0] for r in connection.execute("SELECT submission FROM labels")}
    connection.close()
    assert acknowledged <= stored
    assert len(stored) < 200                                       # it was killed before the end


def world_tasks(tmp_path, n: int, n_gold: int) -> tuple[str, str]:
    """A tasks file and a gold file (ordered by the gold judge, ties by equal scores) of toy-world
    prompts with the demonstrator's candidates."""
    rows = build_preferences(make_prompts("train", n + n_gold, seed="label-test"), seed=1, k=4)["rankings"]
    tasks = [{"prompt": r["prompt"], "responses": r["responses"]} for r in rows[:n]]
    gold = []
    for r in rows[n:]:
        order = sorted(range(4), key=lambda i: -r["gold_scores"][i])
        gold.append({"prompt": r["prompt"], "responses": [r["responses"][i] for i in order],
                     "scores": [r["gold_scores"][i] for i in order]})
    paths = []
    for name, content in (("tasks.jsonl", tasks), ("gold.jsonl", gold)):
        (tmp_path / name).write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in content), "utf-8")
        paths.append(str(tmp_path / name))
    return paths[0], paths[1]


def test_simulated_annotators_agree_with_gold_as_their_noise_says(tmp_path, capsys):
    tasks, gold = world_tasks(tmp_path, 24, 6)
    db_path = tmp_path / "l.db"
    assert main(["label", "init", "--db", str(db_path), "--tasks", tasks, "--gold", gold, "--gold-every", "3"]) == 0
    admin = capsys.readouterr().out.strip().splitlines()[-1]
    with labeling(db_path) as (url, db):
        assert main(["label", "simulate", "--url", url, "--admin-token", admin, "--annotators", "3",
                     "--out", str(tmp_path / "sim.json")]) == 0
        summary = json.loads((tmp_path / "sim.json").read_text())
        stats = call(url, admin, "GET", "/api/admin/stats")
    assert summary["labels"] == stats["labels"] > 24 * 3          # every task 3 times, and gold items
    assert stats["complete"] == 24 and stats["gold_agreement"] is not None
    # The noise levels differ, and the agreement each reached follows from their noise.
    temps = [a["temperature"] for a in summary["annotators"]]
    assert len(set(temps)) == 3
    assert abs(summary["measured_gold_agreement"] - summary["expected_gold_agreement"]) < 0.08
    # The admin page's agreement with the gold items is what each annotator's noise implies on them
    # (within 4 standard errors), and alpha says they agree beyond chance.
    expected, pairs = 0.0, 0
    for row in map(json.loads, open(gold, encoding="utf-8")):
        for t in temps:
            for i in range(4):
                for j in range(i + 1, 4):
                    if row["scores"][i] != row["scores"][j]:
                        expected += 1 / (1 + math.exp(-abs(row["scores"][i] - row["scores"][j]) / t))
                        pairs += 1
    expected /= pairs
    assert sum(a["gold_pairs"] for a in stats["annotators"]) == pairs
    assert abs(stats["gold_agreement"] - expected) < 4 * math.sqrt(expected * (1 - expected) / pairs)
    assert stats["alpha"] > 0.1
    assert sum(a["flags"] for a in stats["annotators"]) > 0
    assert statistics(LabelDB(db_path))["labels"] == stats["labels"]
