"""The labeling loop end to end on the toy world, with simulated annotators over HTTP.

    .venv/bin/python bench/label_e2e.py RUN_DIR OUT_DIR [--prompts 300] [--annotators 3] [--steps 120]
        [--seeds 0 1 2] [--sources NAME ...]

RUN_DIR is a finished toy-world run (`rlhflab quickstart`: RUN_DIR/world and RUN_DIR/sft); it is
only read. Everything is written under OUT_DIR; what is there already (samples, label exports,
reward models) is reused, so a second call with another --steps adds reward models only.

Data: the first N rows of the world's rankings.jsonl are the training prompts. Two designs label
them through `label init` (with 20 gold items: other world prompts, ordered by the gold judge),
`label serve`, `label simulate` (the annotators' typical noise T is the world's own, from
RUN_DIR/world/manifest.json; each annotator's T is that times exp(u), u in [-0.5, 0.5]) and
`label export`:
  sft:   K = 4 answers per prompt sampled from the SFT model (what the labelling loop is for);
  world: the world export's own K candidates of those prompts (the demonstrator's answers), so
         that the label export and `world export`'s labels rank the very same answers (imported
         with their answers shuffled: the file lists them in the world annotator's order, and the
         export breaks ties in the annotators' mean positions by import order).
Each design is labelled with overlap 3 (every task by all 3 annotators, aggregated) and with
overlap 1 (each task once), once per seed (the annotators' noise is seeded by it; world_export's
labels are the world's one draw, so there only the reward model's seed changes).

Reward models (`rm --loss ranking --max-steps S --batch-size 8 --lr 1e-3` from the SFT model, one
per source and seed): sft_overlap3, sft_overlap1, world_overlap3, world_overlap1 (the label
exports' rankings.jsonl) and world_export (the world export's rankings of the same N prompts,
one noisy annotator each). Gold accuracy, the share of answer pairs with different gold scores
that the reward model orders as the gold judge does, on two held-out sets and on their pairs
pooled: SFT samples of 300 other prompts (world rows 900-1199, K = 4, seed 1) ranked by the gold
judge, and the world's own rankings of rows 1200+. The summary gives each source's figures per
seed, mean and sd, and its difference from world_export per seed (same seed), mean and sd.
Writes OUT_DIR/summary-steps{S}.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RLHFLAB = [sys.executable, "-m", "rlhflab.cli.main"]
SOURCES = ("sft_overlap3", "sft_overlap1", "world_overlap3", "world_overlap1", "world_export")
EVALS = ("sft_samples", "world", "pooled")


def sh(*args, **kw) -> str:
    print("+ rlhflab " + " ".join(str(a) for a in args), file=sys.stderr, flush=True)
    return subprocess.run([*RLHFLAB, *map(str, args)], check=True, text=True, stdout=subprocess.PIPE, cwd=ROOT,
                          **kw).stdout


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write(path, content) -> str:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content), encoding="utf-8")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mean_sd(values: list[float]) -> dict:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": round(m, 4), "sd": round(sd, 4)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--annotators", type=int, default=3, help="simulated annotators, and the overlap")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES,
                        help="reward models to train (world_export is always trained: the others are held to it)")
    args = parser.parse_args()
    run, out = Path(args.run_dir), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = rows(run / "world" / "rankings.jsonl")
    temperature = json.loads((run / "world" / "manifest.json").read_text())["preferences"]["temperature"]
    n = args.prompts
    write(out / "prompts.jsonl", [{"prompt": r["prompt"]} for r in world[:n]])
    write(out / "world_labels.jsonl", world[:n])
    # The same rows as label tasks, their answers shuffled: the file's order is the world annotator's,
    # and the export breaks ties in the annotators' mean positions by the order the tasks came in.
    shuffled = []
    for index, r in enumerate(world[:n]):
        order = list(range(len(r["responses"])))
        random.Random(f"world-task:{index}").shuffle(order)
        shuffled.append({**r, "responses": [r["responses"][i] for i in order],
                         "gold_scores": [r["gold_scores"][i] for i in order]})
    write(out / "world_tasks.jsonl", shuffled)
    write(out / "eval_world.jsonl", world[1200:])
    gold = []
    for r in world[n:n + 20]:
        order = sorted(range(len(r["responses"])), key=lambda i: -r["gold_scores"][i])
        gold.append({"prompt": r["prompt"], "responses": [r["responses"][i] for i in order],
                     "scores": [r["gold_scores"][i] for i in order]})
    write(out / "gold.jsonl", gold)
    write(out / "eval_prompts.jsonl", [{"prompt": r["prompt"]} for r in world[900:1200]])
    timings = {}

    start = time.perf_counter()
    if not (out / "samples.jsonl").exists():
        sh("sample", "--model", run / "sft", "--prompts", out / "prompts.jsonl", "--k", 4, "--out",
           out / "samples.jsonl", "--device", "cpu")
    if not (out / "eval_samples_ranked.jsonl").exists():
        sh("sample", "--model", run / "sft", "--prompts", out / "eval_prompts.jsonl", "--k", 4, "--seed", 1,
           "--out", out / "eval_samples.jsonl", "--device", "cpu")
        sh("rank", "--data", out / "eval_samples.jsonl", "--by", "judge", "--format", "rankings",
           "--out", out / "eval_samples_ranked.jsonl")
        write(out / "eval_samples_ranked.jsonl",   # the judge's scores are the gold the evaluation reads
              [{**r, "gold_scores": r["scores"]} for r in rows(out / "eval_samples_ranked.jsonl")])
    timings["sample_s"] = round(time.perf_counter() - start, 1)
    # One file to score: the SFT-sample set, then the world set.
    eval_rows = {"sft_samples": rows(out / "eval_samples_ranked.jsonl"), "world": rows(out / "eval_world.jsonl")}
    write(out / "eval_both.jsonl", eval_rows["sft_samples"] + eval_rows["world"])

    tasks = {"sft": out / "samples.jsonl", "world": out / "world_tasks.jsonl"}
    labelled, data = {}, {}
    for design, task_file in tasks.items():
        for overlap in (args.annotators, 1):
            name = f"{design}_overlap{overlap}"
            if name not in args.sources:
                continue
            for seed in args.seeds:
                where = out / f"label_{name}_sim{seed}"
                start = time.perf_counter()
                if not (where / "labelling.json").exists():
                    result = label_by_simulation(where, task_file, out / "gold.jsonl", overlap, args.annotators,
                                                 temperature, seed)
                    (where / "labelling.json").write_text(json.dumps(result, indent=2) + "\n")
                labelled.setdefault(name, {})[seed] = json.loads((where / "labelling.json").read_text())
                timings[f"label_{name}_sim{seed}_s"] = round(time.perf_counter() - start, 1)
                data[(name, seed)] = where / "export" / "rankings.jsonl"
    for seed in args.seeds:
        data[("world_export", seed)] = out / "world_labels.jsonl"

    results: dict[str, dict] = {}
    for (name, seed), path in data.items():
        rm_dir = out / f"rm_{name}_steps{args.steps}_seed{seed}"
        start = time.perf_counter()
        if not (rm_dir / "summary.json").exists():
            sh("rm", "--model", run / "sft", "--data", path, "--eval-data", out / "eval_world.jsonl",
               "--loss", "ranking", "--max-steps", args.steps, "--batch-size", 8, "--lr", "1e-3",
               "--seed", seed, "--out", rm_dir, "--device", "cpu")
        accuracy = gold_accuracy(rm_dir, out / "eval_both.jsonl", out / f"scores_{rm_dir.name}.jsonl", eval_rows)
        trained = json.loads((rm_dir / "summary.json").read_text())
        timings[f"rm_{name}_seed{seed}_s"] = round(time.perf_counter() - start, 1)
        results.setdefault(name, {"runs": []})["runs"].append(
            {"seed": seed, **{k: round(v, 4) for k, v in accuracy.items()},
             "rm_eval_gold_accuracy_world": round(trained["eval_gold_accuracy"], 4),
             "train_rows": trained["rows_used"]})
    for name, entry in results.items():
        for key in EVALS:
            entry[key] = mean_sd([r[key] for r in entry["runs"]])
        if name == "world_export":
            continue
        reference = {r["seed"]: r for r in results["world_export"]["runs"]}
        diffs = {key: [r[key] - reference[r["seed"]][key] for r in entry["runs"]] for key in EVALS}
        entry["minus_world_export"] = {key: {"per_seed": [round(d, 4) for d in diffs[key]], **mean_sd(diffs[key])}
                                       for key in EVALS}
    summary = {"prompts": n, "k": 4, "annotators": args.annotators, "steps": args.steps, "seeds": args.seeds,
               "world_annotator_temperature": round(temperature, 4), "timings": timings,
               "reward_models": results, "labelling": labelled}
    (out / f"summary-steps{args.steps}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def label_by_simulation(where: Path, task_file: Path, gold_file: Path, overlap: int, annotators: int,
                        temperature: float, seed: int) -> dict:
    """init, serve, simulate, admin statistics, export: returns the statistics and the simulation's."""
    where.mkdir(parents=True, exist_ok=True)
    db = where / "labels.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    admin = sh("label", "init", "--db", db, "--tasks", task_file, "--gold", gold_file,
               "--overlap", overlap, "--seed", seed).strip().splitlines()[-1]
    port = free_port()
    server = subprocess.Popen([*RLHFLAB, "label", "serve", "--db", str(db), "--port", str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        sh("label", "simulate", "--url", url, "--admin-token", admin, "--annotators", annotators,
           "--temperature", temperature, "--seed", seed, "--out", where / "simulate.json")
        request = urllib.request.Request(url + "/api/admin/stats", headers={"Authorization": f"Bearer {admin}"})
        stats = json.loads(urllib.request.urlopen(request).read())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)
    sh("label", "export", "--db", db, "--out", where / "export")
    simulated = json.loads((where / "simulate.json").read_text())
    # What each annotator's T implies on the gold items' untied pairs (the pairs the admin page's
    # gold agreement counts, when every annotator saw every gold item).
    gaps = [abs(a - b) for g in rows(gold_file) for i, a in enumerate(g["scores"]) for b in g["scores"][i + 1:]
            if a != b]
    per = {a["name"]: a for a in stats["annotators"]}
    implied = {a["name"]: {"T": a["temperature"], "gold_pairs": per[a["name"]]["gold_pairs"],
                           "admin_gold_agreement": per[a["name"]]["gold_agreement"],
                           "implied_on_gold_pairs": sum(1 / (1 + math.exp(-g / a["temperature"])) for g in gaps)
                           / len(gaps)} for a in simulated["annotators"]}
    weight = sum(v["gold_pairs"] for v in implied.values())
    return {"admin": {k: stats[k] for k in ("tasks", "labels", "complete", "alpha", "majority_agreement",
                                            "gold_agreement")},
            "gold_item_pairs": len(gaps),
            "implied_gold_agreement": sum(v["implied_on_gold_pairs"] * v["gold_pairs"] for v in implied.values())
            / weight if weight else None,
            "per_annotator": implied, "simulated": simulated,
            "exported_rankings": len(rows(where / "export" / "rankings.jsonl"))}


def gold_accuracy(rm_dir, data, scores_path, eval_rows: dict[str, list[dict]]) -> dict[str, float]:
    """Per evaluation set and pooled: share of answer pairs with different gold scores that the
    reward model orders the same way (a tie in the model's scores counts as wrong)."""
    if not Path(scores_path).exists():
        sh("rm", "score", "--model", rm_dir, "--data", data, "--out", scores_path, "--device", "cpu")
    flat = [r["score"] for r in rows(scores_path)]
    counts, start = {}, 0
    for name, group in eval_rows.items():
        right = total = 0
        for g in group:
            values = flat[start:start + len(g["responses"])]
            start += len(g["responses"])
            for i in range(len(g["responses"])):
                for j in range(i + 1, len(g["responses"])):
                    if g["gold_scores"][i] != g["gold_scores"][j]:
                        total += 1
                        right += (values[i] > values[j]) == (g["gold_scores"][i] > g["gold_scores"][j])
        counts[name] = (right, total)
    if start != len(flat):
        raise SystemExit(f"{scores_path}: {len(flat)} scores for {start} answers")
    out = {name: right / total for name, (right, total) in counts.items()}
    out["pooled"] = sum(r for r, _ in counts.values()) / sum(t for _, t in counts.values())
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
