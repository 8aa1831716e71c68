"""Replay PPO's reward-vs-gold and empty-answer alarms over finished runs' metrics.

    .venv/bin/python bench/alarm_replay.py runs/seeds/seed-*/ppo

The alarms only watch (they change nothing in training), so running today's alarm over a run's
logged reward, gold score and empty-answer share gives exactly the alarms a rerun would raise.
Prints, per run, the alarms it recorded and those the current rule raises.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlhflab.train.alarms import Alarm


def replay(run: Path, window: int) -> list[tuple[int, str]]:
    alarm, raised = Alarm(window), []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "reward" not in row:
            continue
        message = alarm.update(row["reward"], row.get("gold"), row.get("empty_rate"))
        if message:
            raised.append((row["step"], message))
    return raised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="PPO run directories (with metrics.jsonl)")
    parser.add_argument("--window", type=int, default=5, help="as ppo --alarm-window")
    args = parser.parse_args()
    for run in args.runs:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        if summary.get("config", {}).get("log_every", 1) not in (1, None):
            print(f"{run}: logged every {summary['config']['log_every']} steps; the replay needs every step")
            continue
        now = replay(run, args.window)
        print(f"{run}: recorded {len(summary.get('alarms') or [])}, current rule {len(now)}")
        for step, message in now:
            print(f"    step {step}: {message}")


if __name__ == "__main__":
    main()
