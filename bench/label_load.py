"""Load on `rlhflab label serve`: N simulated annotators at once, M labels each, nothing lost.

    .venv/bin/python bench/label_load.py [--annotators 20] [--tasks-each 50] [--out DIR]

Makes 400 toy-world tasks (overlap 3), starts `label serve` as its own process, runs the
annotators in threads against it over HTTP, then checks the database: every label the server
acknowledged is there, no task has more than 3 labels, no one labelled a task twice. Prints the
figures as JSON (labels, seconds, labels per second, the checks).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rlhflab.feedback.label_simulate import SimulateConfig, make_annotators, run_annotators
from rlhflab.world.preferences import build_preferences
from rlhflab.world.tasks import make_prompts

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--tasks-each", type=int, default=50)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="label-load-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = build_preferences(make_prompts("train", 400, seed="label-load"), seed=0, k=4)["rankings"]
    random.Random(0).shuffle(rows)
    tasks = out / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": r["prompt"], "responses": r["responses"]}, ensure_ascii=False)
                             + "\n" for r in rows), encoding="utf-8")
    db = out / "labels.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    cli = [sys.executable, "-m", "rlhflab.cli.main", "label"]
    admin = subprocess.run([*cli, "init", "--db", str(db), "--tasks", str(tasks)], check=True, text=True,
                           capture_output=True, cwd=ROOT).stdout.strip().splitlines()[-1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([*cli, "serve", "--db", str(db), "--port", str(port)], cwd=ROOT)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        annotators = make_annotators(SimulateConfig(url=url, admin_token=admin, annotators=args.annotators))
        start = time.perf_counter()
        errors = run_annotators(url, annotators, args.tasks_each)
        seconds = time.perf_counter() - start
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)
    connection = sqlite3.connect(db)
    stored = {r[0] for r in connection.execute("SELECT submission FROM labels")}
    most = connection.execute("SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM labels GROUP BY task)").fetchone()[0]
    twice = connection.execute("SELECT COUNT(*) FROM (SELECT 1 FROM labels GROUP BY task, annotator "
                               "HAVING COUNT(*) > 1)").fetchone()[0]
    connection.close()
    acknowledged = {s for a in annotators for s in a.acknowledged}
    result = {"annotators": args.annotators, "tasks_each": args.tasks_each, "labels": len(stored),
              "acknowledged": len(acknowledged), "missing": len(acknowledged - stored),
              "most_labels_on_a_task": most, "labelled_twice": twice, "errors": [str(e) for e in errors],
              "seconds": round(seconds, 2), "labels_per_s": round(len(stored) / seconds, 1)}
    print(json.dumps(result, indent=2))
    ok = (not errors and result["missing"] == 0 and len(stored) == args.annotators * args.tasks_each
          and most <= 3 and twice == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
