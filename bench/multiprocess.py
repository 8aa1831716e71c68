"""SFT throughput with 1 and with N data-parallel processes on this machine (torchrun, gloo on
CPUs; NCCL on GPUs), same model, data, global batch and steps. Prints a markdown table and the
figures as JSON; the final losses must agree (the N-process run trains as one process does).

    .venv/bin/python bench/multiprocess.py                 # llama-6m, 1 vs 2 processes, 3 repeats
    .venv/bin/python bench/multiprocess.py --processes 4 --steps 40 --repeats 5

On a CPU the processes share the machine's cores: each runs one torch thread (OMP_NUM_THREADS=1),
so 2 processes on 2 cores can at best double the single-threaded rate, minus the gradient
all-reduce and the per-step gather of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fixtures  # noqa: E402


def run(processes: int, model: Path, data: Path, out: Path, steps: int, batch: int) -> dict:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "rlhflab", "sft", "--model", str(model), "--data", str(data),
               "--out", str(out), "--max-steps", str(steps), "--batch-size", str(batch), "--lr", "1e-3",
               "--progress", "false", "--resume", "never"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-6m", help="a bench fixture model (fixtures.MODELS)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16, help="global: counted over all processes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, data = fixtures.model_dir(args.model), fixtures.world_data() / "sft.jsonl"
    figures: dict[int, list[dict]] = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):   # alternate, so that drift on a shared machine hits both
            for n in figures:
                figures[n].append(run(n, model, data, Path(tmp) / f"{n}-{repeat}", args.steps, args.batch_size))
    single = statistics.median(s["tokens_per_s"] for s in figures[1])
    print(f"| processes | tokens/s (median of {args.repeats}) | vs 1 process | train s | wall s | final loss |")
    print("|---|---|---|---|---|---|")
    for n, runs in figures.items():
        rate = statistics.median(s["tokens_per_s"] for s in runs)
        print(f"| {n} | {rate:,.0f} | {rate / single:.2f}x | {statistics.median(s['train_time_s'] for s in runs):.2f} "
              f"| {statistics.median(s['wall_time_s'] for s in runs):.2f} | {runs[0]['final_loss']:.5f} |")
    losses = {n: runs[0]["final_loss"] for n, runs in figures.items()}
    print(json.dumps({"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                      "tokens_per_s": {n: [s["tokens_per_s"] for s in runs] for n, runs in figures.items()},
                      "final_loss": losses}))
    if abs(losses[1] - losses[args.processes]) > 1e-3:
        raise SystemExit(f"the final losses differ: {losses}")


if __name__ == "__main__":
    main()
