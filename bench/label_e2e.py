"""The labeling loop end to end on the toy world, with simulated annotators over HTTP.

    .venv/bin/python bench/label_e2e.py RUN_DIR OUT_DIR [--prompts 300] [--annotators 3] [--steps 120]

RUN_DIR is a finished toy-world run (`rlhflab quickstart`: RUN_DIR/world and RUN_DIR/sft). Steps:
1. the first N prompts of the world's rankings.jsonl; K = 4 answers each sampled from the SFT model;
2. `label init` (with 20 gold items: other world prompts, ordered by the gold judge), `label serve`,
   `label simulate` (overlap 3), the admin statistics, `label export`;
3. reward models from the SFT model, same options, per seed, on: (a) the label export's
   rankings.jsonl, (b) the same SFT samples ranked once by the world's noisy annotator
   (`rlhflab rank --by annotators`, the labelling `world export` applies), (c) the world export's
   own rankings of the same N prompts (the demonstrator's candidates, one noisy annotator);
4. each evaluated against the clean gold order on two held-out sets: SFT samples of 300 other
   prompts (world rows 900-1199) ranked by the gold judge, and the world's own rankings (rows
   1200+, the demonstrator's candidates).
The labelling runs twice: with overlap 3 (every task ranked by 3 annotators, aggregated) and with
overlap 1 (each task ranked once, as `rank --by annotators` ranks it), to tell what the loop
through HTTP changes from what three opinions add.
Writes OUT_DIR/summary.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RLHFLAB = [sys.executable, "-m", "rlhflab.cli.main"]


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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--annotators", type=int, default=3, help="simulated annotators, and the overlap")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    run, out = Path(args.run_dir), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = rows(run / "world" / "rankings.jsonl")
    n = args.prompts
    write(out / "prompts.jsonl", [{"prompt": r["prompt"]} for r in world[:n]])
    write(out / "world_labels.jsonl", world[:n])
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

    labelled = {}
    for overlap in (args.annotators, 1):
        start = time.perf_counter()
        labelled[overlap] = label_by_simulation(out / f"overlap{overlap}", out, overlap, args.annotators)
        timings[f"label_overlap{overlap}_s"] = round(time.perf_counter() - start, 1)
    sh("rank", "--data", out / "samples.jsonl", "--by", "annotators", "--format", "rankings",
       "--out", out / "samples_one_annotator.jsonl")

    sources = {f"label_export_overlap{args.annotators}": out / f"overlap{args.annotators}" / "export" / "rankings.jsonl",
               "label_export_overlap1": out / "overlap1" / "export" / "rankings.jsonl",
               "rank_by_world_annotator_same_samples": out / "samples_one_annotator.jsonl",
               "world_export_rows_same_prompts": out / "world_labels.jsonl"}
    results = {}
    for name, data in sources.items():
        for seed in args.seeds:
            rm_dir = out / f"rm_{name}_seed{seed}"
            if not (rm_dir / "summary.json").exists():
                sh("rm", "--model", run / "sft", "--data", data, "--eval-data", out / "eval_world.jsonl",
                   "--loss", "ranking", "--max-steps", args.steps, "--batch-size", 8, "--lr", "1e-3",
                   "--seed", seed, "--out", rm_dir, "--device", "cpu")
            world_acc = json.loads((rm_dir / "summary.json").read_text())["eval_gold_accuracy"]
            sample_acc = gold_accuracy(rm_dir, out / "eval_samples_ranked.jsonl", out / f"scores_{name}_{seed}.jsonl")
            results.setdefault(name, []).append({"seed": seed, "sft_samples": round(sample_acc, 4),
                                                 "world": round(world_acc, 4)})
    for name, runs in results.items():
        results[name] = {"runs": runs, **{key: round(sum(r[key] for r in runs) / len(runs), 4)
                                          for key in ("sft_samples", "world")}}
    summary = {"prompts": n, "k": 4, "annotators": args.annotators, "timings": timings,
               "reward_models": results, "labelling": labelled}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def label_by_simulation(where: Path, out: Path, overlap: int, annotators: int) -> dict:
    """init, serve, simulate, admin statistics, export: returns the statistics and the simulation's."""
    where.mkdir(parents=True, exist_ok=True)
    db = where / "labels.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    admin = sh("label", "init", "--db", db, "--tasks", out / "samples.jsonl", "--gold", out / "gold.jsonl",
               "--overlap", overlap).strip().splitlines()[-1]
    port = free_port()
    server = subprocess.Popen([*RLHFLAB, "label", "serve", "--db", str(db), "--port", str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        sh("label", "simulate", "--url", url, "--admin-token", admin, "--annotators", annotators,
           "--out", where / "simulate.json")
        request = urllib.request.Request(url + "/api/admin/stats", headers={"Authorization": f"Bearer {admin}"})
        stats = json.loads(urllib.request.urlopen(request).read())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)
    sh("label", "export", "--db", db, "--out", where / "export")
    simulated = json.loads((where / "simulate.json").read_text())
    return {"admin": {k: stats[k] for k in ("labels", "complete", "alpha", "majority_agreement", "gold_agreement")},
            "admin_per_annotator_gold": {a["name"]: a["gold_agreement"] for a in stats["annotators"]},
            "simulated": simulated}


def gold_accuracy(rm_dir, data, scores_path) -> float:
    """Share of answer pairs with different gold scores that the reward model orders the same way."""
    sh("rm", "score", "--model", rm_dir, "--data", data, "--out", scores_path, "--device", "cpu")
    flat = [r["score"] for r in rows(scores_path)]
    right = total = start = 0
    for g in rows(data):
        values = flat[start:start + len(g["responses"])]
        start += len(g["responses"])
        for i in range(len(g["responses"])):
            for j in range(i + 1, len(g["responses"])):
                if g["gold_scores"][i] != g["gold_scores"][j]:
                    total += 1
                    right += (values[i] > values[j]) == (g["gold_scores"][i] > g["gold_scores"][j])
    return right / total


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
