"""The GPU section of the bench: rlhflab SFT and a PPO step on a ~0.5B-parameter Llama-shaped model
(bench fixture llama-500m: hidden 1152, 24 layers, vocab 4096) in bf16 on one CUDA GPU, reporting
tokens/s, MFU (model FLOPs / the GPU's peak dense bf16 FLOPs) and peak GPU memory.

Run by bench/run.py when torch sees CUDA; prints one JSON line. Model FLOPs per trained token:
6 N (N = parameters) + 12 L d T (attention scores; L layers, width d, T the mean sequence length),
counting real tokens only, so padding is not credited. For the PPO step, the FLOPs of generation,
the four rollout passes (policy, reference, reward, critic) and the updates of policy and critic
are added up from the same formula (2 N per token forward, 6 N forward + backward).
Written without a GPU at hand: not yet run on one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RLHFLAB = Path(sys.executable).parent / "rlhflab"

# Dense bf16 peak FLOP/s by device name (vendor data sheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12}
SFT_STEPS, PPO_STEPS, BATCH, NEW_TOKENS = 30, 3, 16, 32


def peak_flops(name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16.items() if key in name), None)


def rlhflab(*argv: str) -> dict:
    out = Path(argv[argv.index("--out") + 1])
    subprocess.run([str(RLHFLAB), *argv, "--device", "cuda", "--dtype", "bf16", "--progress", "false"], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    import torch

    sys.path.insert(0, str(BENCH))
    import fixtures

    paths = fixtures.build(["llama-500m"])
    world, model = paths["world"], paths["llama-500m"]
    config = json.loads((model / "config.json").read_text())
    layers, width = config["num_hidden_layers"], config["hidden_size"]
    runs = fixtures.WORK / "gpu"
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name)

    sft = rlhflab("sft", "--model", str(model), "--data", f"{world}/sft.jsonl", "--out", str(runs / "sft"),
                  "--max-steps", str(SFT_STEPS), "--batch-size", str(BATCH), "--max-length", "256", "--lr", "2e-4",
                  "--eval-fraction", "0")
    n = sft["parameters"]
    mean_len = sft["train_tokens"] / (SFT_STEPS * BATCH)
    sft_flops = sft["tokens_per_s"] * (6 * n + 12 * layers * width * mean_len)

    rm = rlhflab("rm", "--model", str(runs / "sft"), "--data", f"{world}/prefs.jsonl", "--out", str(runs / "rm"),
                 "--max-steps", "10", "--batch-size", str(BATCH), "--max-length", "256", "--eval-fraction", "0")
    ppo = rlhflab("ppo", "--estimator", "gae", "--policy", str(runs / "sft"), "--reward", str(runs / "rm"),
                  "--prompts", f"{world}/prompts.jsonl", "--out", str(runs / "ppo"), "--rollout-prompts", str(BATCH),
                  "--mini-batch", "4", "--ppo-epochs", "4", "--max-new-tokens", str(NEW_TOKENS),
                  "--min-new-tokens", str(NEW_TOKENS), "--max-steps", str(PPO_STEPS), "--probe-every", "0")
    prompt_len = 40  # toy-world prompts with the chat template: about 40 tokens
    seq = BATCH * (prompt_len + NEW_TOKENS)
    ppo_flops_per_step = (2 * n * BATCH * NEW_TOKENS          # generation (KV cache: one token at a time)
                          + 4 * 2 * n * seq                   # rollout passes: policy, reference, reward, critic
                          + 4 * 2 * 6 * n * seq)              # 4 epochs, policy and critic, forward + backward
    ppo_tokens_per_s = BATCH * NEW_TOKENS / ppo["seconds_per_step"]
    print(json.dumps({
        "device": name, "model": "llama-500m", "parameters": n, "peak_bf16_flops": peak,
        "workloads": {
            "sft": {"tokens_per_s": sft["tokens_per_s"], "mfu": sft_flops / peak if peak else None,
                    "peak_cuda_mib": sft.get("peak_cuda_mib")},
            "ppo step (16 prompts x 32 tokens, 4 epochs, mini-batch 4)": {
                "tokens_per_s": ppo_tokens_per_s, "seconds_per_step": ppo["seconds_per_step"],
                "mfu": ppo_flops_per_step / ppo["seconds_per_step"] / peak if peak else None,
                "peak_cuda_mib": ppo.get("peak_cuda_mib")},
            "rm (fixture for the PPO step)": {"tokens_per_s": None, "peak_cuda_mib": rm.get("peak_cuda_mib")},
        }}))


if __name__ == "__main__":
    main()
