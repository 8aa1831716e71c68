"""Replay PPO's reward-vs-gold and empty-answer alarms over finished runs' metrics.

    .venv/bin/python bench/alarm_replay.py runs/seeds/seed-*/ppo

The alarms only watch (they change nothing in training), so running today's alarm over a run's
logged reward, gold score and empty-answer share gives exactly the alarms a rerun would raise.
Prints, per run, the alarms it recorded and those the current rule raises.

    .venv/bin/python bench/alarm_replay.py --simulate

instead measures the reward-vs-gold alarm on simulated runs: how often it fires when the gold score
only wobbles (false alarms) and how often it catches a fall of a given size in mid-run.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rlhflab.train.alarms import Alarm


def replay(run: Path, window: int) -> list[tuple[int, str]]:
    alarm, raised = Alarm(window), []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "reward" not in row:
            continue
        message = alarm.update(row["reward"], row.get("gold"), row.get("empty_rate"), row.get("response_len"))
        if message:
            raised.append((row["step"], message))
    return raised


def simulate(window: int, steps: int = 80, runs: int = 500, noise: float = 0.035) -> None:
    """Runs whose reward rises steadily while the step's gold score wobbles with `noise` (the spread
    of a mean of a few dozen sampled answers), with and without a fall of the gold score in mid-run."""

    rng = random.Random(0)
    for fall in (0.0, 0.06, 0.08, 0.10, 0.12, 0.15):
        fired = 0
        for _ in range(runs):
            alarm = Alarm(window)
            golds = [0.5 + rng.gauss(0, noise) - (fall if i >= steps // 2 else 0.0) for i in range(steps)]
            fired += any(alarm.update(3.0 + 0.01 * i, g) for i, g in enumerate(golds))
        what = "no fall (false alarms)" if fall == 0 else f"a fall of {fall:.2f} in mid-run"
        print(f"{what}: the alarm fires on {fired / runs:.1%} of {runs} runs of {steps} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="PPO run directories (with metrics.jsonl)")
    parser.add_argument("--simulate", action="store_true", help="measure the alarm on simulated runs instead")
    parser.add_argument("--window", type=int, default=5, help="as ppo --alarm-window")
    args = parser.parse_args()
    if args.simulate:
        simulate(args.window)
        return
    if not args.runs:
        parser.error("give PPO run directories, or --simulate")
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
