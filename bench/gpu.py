"""The GPU check and the GPU section of the bench: every stage for a few steps on a ~0.5B-parameter
Llama-shaped model (bench fixture llama-500m: hidden 1152, 24 layers, vocab 4096) in bf16 on one
CUDA GPU, full fine-tuning and LoRA, plus sampling on the GPU. Reports tokens/s (pairs/s for DPO),
seconds per RL step, MFU (model FLOPs / the GPU's peak dense bf16 FLOPs) and peak GPU memory.

    python bench/gpu.py [--out results.json]

Each workload runs as its own `python -m rlhflab ...` process; a workload that fails is recorded
with the end of its error output and the others still run. Model FLOPs per trained token: 6 N
(full) or 4 N (LoRA: no weight gradients for the frozen base) plus 12 L d T for attention (L layers,
width d, T the mean sequence length), counting real tokens only, so padding is not credited. DPO
adds the reference model's forward pass (2 N per token). RL steps add generation (2 N per generated
token), the rollout passes of the policy, reference, reward model and critic (2 N per token each)
and the updates (6 N per token per epoch for policy and critic).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# Dense bf16 peak FLOP/s by device name (vendor data sheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12}
SFT_STEPS, DPO_STEPS, RL_STEPS, BATCH, NEW_TOKENS, MAX_LENGTH = 30, 20, 3, 16, 32, 256
PROMPT_TOKENS = 40  # toy-world prompts with the chat template: about 40 tokens


def peak_flops(name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def rlhflab(*argv: str) -> dict:
    """Run one stage on the GPU; its summary.json, or {"error": ...} with the end of its stderr."""
    out = Path(argv[argv.index("--out") + 1])
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    quiet = [] if argv[0] == "sample" else ["--progress", "false"]
    done = subprocess.run([sys.executable, "-m", "rlhflab", *argv, "--device", "cuda", "--dtype", "bf16", *quiet],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = round(time.perf_counter() - started, 1)
    print(f"{argv[0]} {' '.join(a for a in argv[1:] if a.startswith('--lora'))}: exit {done.returncode}, {wall} s",
          file=sys.stderr, flush=True)
    if done.returncode != 0:
        return {"error": done.stderr[-1500:], "wall_s": wall}
    summary = out / "summary.json"
    result = json.loads(summary.read_text()) if summary.is_file() else {}
    return {**result, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(BENCH))
    import fixtures

    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py: torch sees no CUDA device")
    paths = fixtures.build(["llama-500m"])
    world, model = paths["world"], paths["llama-500m"]
    config = json.loads((model / "config.json").read_text())
    attention = 12 * config["num_hidden_layers"] * config["hidden_size"]
    runs = fixtures.WORK / "gpu"
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)
    results: dict[str, dict] = {}

    def mfu(flops_per_s: float | None) -> float | None:
        return round(flops_per_s / peak, 4) if peak and flops_per_s else None

    train = ["--max-length", str(MAX_LENGTH), "--eval-fraction", "0", "--batch-size", str(BATCH)]
    for lora in (False, True):
        tag = "lora" if lora else "full"
        extra = ["--lora", "true"] if lora else []
        sft = rlhflab("sft", "--model", str(model), "--data", f"{world}/sft.jsonl", "--out", str(runs / f"sft-{tag}"),
                      "--max-steps", str(SFT_STEPS), "--lr", "2e-4", *train, *extra)
        if "tokens_per_s" in sft:
            n = sft.get("parameters") or sft.get("total_parameters")
            mean_len = sft["train_tokens"] / (SFT_STEPS * BATCH)
            per_token = (4 if lora else 6) * n + attention * mean_len if n else None
            sft["mfu"] = mfu(sft["tokens_per_s"] * per_token) if per_token else None
        results[f"sft ({tag})"] = sft
    # The toy world's conversations are short (about 37 tokens): at batch 16 a step is ~600 tokens and
    # kernel launches dominate; a larger batch shows what the GPU does with more work per step.
    big = rlhflab("sft", "--model", str(model), "--data", f"{world}/sft.jsonl", "--out", str(runs / "sft-big"),
                  "--max-steps", "10", "--lr", "2e-4", "--max-length", str(MAX_LENGTH), "--eval-fraction", "0",
                  "--batch-size", "256")
    if "tokens_per_s" in big:
        mean_len = big["train_tokens"] / (10 * 256)
        big["mfu"] = mfu(big["tokens_per_s"] * (6 * big["parameters"] + attention * mean_len))
    results["sft (full, batch 256)"] = big

    sft_dir = runs / "sft-full"
    for lora in (False, True):
        tag = "lora" if lora else "full"
        extra = ["--lora", "true"] if lora else []
        results[f"dpo ({tag})"] = rlhflab("dpo", "--model", str(sft_dir), "--data", f"{world}/prefs.jsonl",
                                           "--out", str(runs / f"dpo-{tag}"), "--max-steps", str(DPO_STEPS),
                                           "--max-length", str(MAX_LENGTH), "--eval-fraction", "0",
                                           "--batch-size", "8", *extra)
    results["rm (full)"] = rlhflab("rm", "--model", str(sft_dir), "--data", f"{world}/prefs.jsonl",
                                   "--out", str(runs / "rm"), "--max-steps", "10", *train)
    results["rm (lora)"] = rlhflab("rm", "--model", str(sft_dir), "--lora", "true", "--data", f"{world}/prefs.jsonl",
                                   "--out", str(runs / "rm-lora"), "--max-steps", "10", *train)
    rl = ["--prompts", f"{world}/prompts.jsonl", "--rollout-prompts", str(BATCH),
          "--max-new-tokens", str(NEW_TOKENS), "--min-new-tokens", str(NEW_TOKENS), "--max-steps", str(RL_STEPS),
          "--probe-every", "0", "--save-every", "0"]
    ppo = ["--estimator", "gae", "--mini-batch", "4", "--ppo-epochs", "4"]
    results["ppo gae (full)"] = rlhflab("ppo", *ppo, "--policy", str(sft_dir), "--reward", str(runs / "rm"),
                                        "--out", str(runs / "ppo-full"), *rl)
    results["ppo gae (lora)"] = rlhflab("ppo", *ppo, "--policy", str(sft_dir), "--lora", "true",
                                        "--reward", str(runs / "rm-lora"), "--out", str(runs / "ppo-lora"), *rl)
    results["grpo (lora)"] = rlhflab("ppo", "--estimator", "grpo", "--n-samples", "4", "--policy", str(sft_dir),
                                     "--lora", "true", "--reward", str(runs / "rm-lora"),
                                     "--out", str(runs / "grpo-lora"), *rl)
    for key in ("ppo gae (full)", "ppo gae (lora)", "grpo (lora)"):
        row, n = results[key], results["sft (full)"].get("parameters")
        if "seconds_per_step" in row and n:
            samples = BATCH * (4 if key.startswith("grpo") else 1)
            seq = samples * (PROMPT_TOKENS + NEW_TOKENS)
            epochs, critic = (1, 1) if key.startswith("grpo") else (4, 2)
            flops = (2 * n * samples * NEW_TOKENS + (2 + critic) * 2 * n * seq + epochs * critic * 6 * n * seq)
            row["generated_tokens_per_s"] = round(samples * NEW_TOKENS / row["seconds_per_step"], 1)
            row["mfu"] = mfu(flops / row["seconds_per_step"])
    started = time.perf_counter()
    sample = rlhflab("sample", "--model", str(sft_dir), "--prompts", f"{world}/prompts.jsonl", "--k", "4",
                     "--max-rows", "64", "--max-new-tokens", "64", "--out", str(runs / "samples.jsonl"))
    if "error" not in sample:
        rows = [json.loads(line) for line in (runs / "samples.jsonl").read_text().splitlines() if line.strip()]
        sample = {"prompts": len(rows), "wall_s": round(time.perf_counter() - started, 1)}
    results["sample (64 prompts x 4, 64 new tokens)"] = sample

    report = {"device": name, "torch": torch.__version__, "model": "llama-500m",
              "parameters": results["sft (full)"].get("parameters"), "peak_bf16_flops": peak,
              "workloads": results}
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
