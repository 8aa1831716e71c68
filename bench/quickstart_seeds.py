"""The quickstart over several seeds: does the default run show RLHF helping on every seed?

    .venv/bin/python bench/quickstart_seeds.py --seeds 0 1 2 3 4 [--jobs 2] [--out runs/seeds]
        [--threads 1] [-- extra quickstart options, e.g. --world habits]

Runs `rlhflab quickstart --seed S --out OUT/seed-S` for each seed (finished seeds are reused; an
interrupted one resumes), then prints one row per seed and the mean and spread (sample standard
deviation, min, max) of each figure, with the checks the default run is meant to pass:

    PPO >= SFT + 0.10 gold      PPO above best-of-n (same reward model)      DPO >= SFT + 0.10
    reward model >= 0.85 accuracy against the clean gold ranking          no PPO alarm
    PPO's and DPO's mean answer length and empty-answer rate within 20% of SFT's

Writes the table as JSON to OUT/seeds.json. `--jobs 2` runs two seeds at once (each with
--threads torch threads): on a 2-core machine, one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GAIN = 0.10
RM_ACCURACY = 0.85
DRIFT = 0.20


def run_seed(seed: int, out: Path, threads: int, extra: list[str]) -> subprocess.Popen | None:
    if (out / "results.json").is_file():
        return None
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "a")
    argv = [sys.executable, "-m", "rlhflab", "quickstart", "--seed", str(seed), "--out", str(out),
            "--progress", "false", *extra]
    print(" ".join(argv[2:]), flush=True)
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def within(value: float | None, reference: float | None, share: float) -> bool:
    if value is None or reference is None:
        return False
    if reference == 0:
        return value <= share
    return abs(value - reference) <= share * abs(reference)


def seed_row(results: dict) -> dict:
    models, stages = results["models"], results["stages"]
    best = next((name for name in models if name.startswith("best-of-")), None)
    sft = models["sft"]
    row = {"sft": sft["gold"], "ppo": models["ppo"]["gold"], "dpo": models["dpo"]["gold"],
           "best_of_n": models[best]["gold"] if best else None,
           "rm_gold_accuracy": stages["rm"].get("eval_gold_accuracy"),
           "ppo_alarms": len(stages["ppo"].get("alarms") or []),
           "wall_s": sum(s.get("wall_time_s", 0) for s in stages.values())}
    for name in ("ppo", "dpo"):
        row[f"{name}_chars_vs_sft"] = models[name]["mean_chars"] / sft["mean_chars"] if sft["mean_chars"] else None
        row[f"{name}_empty"] = models[name].get("empty")
    row["checks"] = {
        "ppo >= sft + 0.10": row["ppo"] >= row["sft"] + GAIN,
        "ppo > best-of-n": row["best_of_n"] is not None and row["ppo"] > row["best_of_n"],
        "dpo >= sft + 0.10": row["dpo"] >= row["sft"] + GAIN,
        "rm >= 0.85 vs gold": (row["rm_gold_accuracy"] or 0) >= RM_ACCURACY,
        "no ppo alarm": row["ppo_alarms"] == 0,
        "length within 20%": all(within(models[n]["mean_chars"], sft["mean_chars"], DRIFT) for n in ("ppo", "dpo")),
        "empty within 20%": all(within(models[n].get("empty"), sft.get("empty"), DRIFT) for n in ("ppo", "dpo")),
    }
    return row


def spread(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more quickstart options")
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra

    pending = list(args.seeds)
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            process = run_seed(seed, args.out / f"seed-{seed}", args.threads, extra)
            if process is not None:
                running[seed] = (process, time.perf_counter())
        for seed, (process, started) in list(running.items()):
            if process.poll() is not None:
                del running[seed]
                print(f"seed {seed}: exit {process.returncode} after {time.perf_counter() - started:.0f} s", flush=True)
                if process.returncode != 0:
                    failed.append(seed)
        time.sleep(2)

    rows = {}
    for seed in args.seeds:
        path = args.out / f"seed-{seed}" / "results.json"
        if path.is_file():
            rows[seed] = seed_row(json.loads(path.read_text(encoding="utf-8")))
    columns = ["sft", "ppo", "dpo", "best_of_n", "rm_gold_accuracy", "ppo_alarms", "ppo_chars_vs_sft",
               "dpo_chars_vs_sft", "wall_s"]
    print("seed " + " ".join(f"{c[:12]:>12}" for c in columns) + "  checks failed")
    for seed, row in rows.items():
        cells = " ".join(f"{row[c]:>12.3f}" if isinstance(row[c], float) else f"{row[c]!s:>12}" for c in columns)
        print(f"{seed:>4} {cells}  {', '.join(k for k, ok in row['checks'].items() if not ok) or 'none'}")
    summary = {c: spread([row[c] for row in rows.values()]) for c in columns}
    summary["ppo - sft"] = spread([row["ppo"] - row["sft"] for row in rows.values()])
    summary["dpo - sft"] = spread([row["dpo"] - row["sft"] for row in rows.values()])
    summary["ppo - best_of_n"] = spread([row["ppo"] - row["best_of_n"] for row in rows.values() if row["best_of_n"]])
    for name, text in summary.items():
        print(f"{name:>18}: {text}")
    checks = next(iter(rows.values()))["checks"] if rows else {}
    passed = {check: sum(row["checks"][check] for row in rows.values()) for check in checks}
    print("checks passed (of %d seeds): " % len(rows) + ", ".join(f"{k} {v}" for k, v in passed.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seeds.json").write_text(json.dumps({"seeds": rows, "summary": summary, "passed": passed,
                                                     "failed_runs": failed, "extra": extra}, indent=1))
    if failed:
        sys.exit(f"runs failed for seeds {failed}: see {args.out}/seed-N.log")


if __name__ == "__main__":
    main()
