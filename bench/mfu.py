"""CPU MFU of the bench rows: the model FLOPs a method needs per second, divided by the machine's
measured fp32 matmul peak at the same thread count.

    .venv/bin/python bench/mfu.py peak --runs 3            # the peak, GFLOP/s (set OMP_NUM_THREADS first)
    .venv/bin/python bench/mfu.py stats --sft F --rm F --dpo F --prompts F   # token counts of the data
    OMP_NUM_THREADS=1 .venv/bin/python bench/mfu.py markdown bench/RESULTS.md   # MFU of a written table

`bench/run.py` measures the peak once before the suite and the data's token counts after it, and
stores both in the run's results JSON; `report.py` computes the MFU column from them.

What is counted (work needed, not work done; every side of a row gets the same formula, so MFU
compares sides fairly, and a side that does more than the method needs simply scores lower):

- N_t: matmul parameters of the trunk (per layer: the q, k, v, o projections and the MLP's
  matrices); N_h: the LM head (hidden x vocab); d: hidden size. Embeddings are lookups, norms and
  attention's score/value products (which grow with the sequence, not with parameters) are not
  counted. One trained token costs 6 FLOPs per matmul parameter (forward 2, backward 4), one
  scored or generated token 2. With LoRA the frozen base costs 4 per trained token (forward, and
  the gradient with respect to its input; no weight gradient) and the adapters 6 x r x (in + out)
  per adapted matrix.
- The trunk runs over every real token of a sequence; the LM head only at the positions whose
  log-probs a loss or a sampler reads (the labelled tokens, the answer tokens); a scalar head
  (reward score, value) costs d where it is read.
- A prompt that several sequences share (a pair's two answers, GRPO's samples of one prompt) is
  needed once per pass: the method does not need it twice.

Per stage (unit of the row's metric):

- sft, per real token:  6 N_t + 6 N_h x (labelled tokens / real tokens)
- rm, per pair:         6 N_t x (P + A_c + A_r) + 6 d x 2
- dpo, per pair:        policy forward+backward and a reference forward over the same tokens:
                        (6 + 2) N_t x (P + A_c + A_r) + (6 + 2) N_h x (L_c + L_r)
- grpo / ppo, per step, for each group of n samples of a prompt (T = P + n A tokens, n A answer
  tokens), summed over the step's prompts:
    generation 2 N_t T + 2 N_h n A; old log-probs, reference: 2 N_t T + 2 N_h n A each;
    reward model 2 N_t T + 2 d n; policy training, per epoch, 6 N_t T + 6 N_h n A
    (LoRA: 4 N_t T + 4 N_h n A + 6 N_lora T);
    critic, where the method has one: a value head on the policy's body 2 d n A + per epoch 6 d n A;
    a critic model of its own (rlhflab's --critic separate) 2 N_t T + per epoch 6 N_t T
    (LoRA critic adapter: 4 N_t T + 6 N_lora T per epoch), plus its value head.

P: prompt tokens (chat template included), A: answer tokens (chat template's closing tokens
included), L: labelled (log-prob) tokens of an answer, E: PPO epochs.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from fixtures import MODELS, VOCAB, WORK  # bench/ is not a package: its own folder on the path

# The RL workloads' shapes (run.py's commands): prompts per step, samples per prompt, answer
# tokens, PPO epochs, LoRA rank (0: full fine-tuning).
RL_SHAPES = {
    "grpo": dict(prompts=4, samples=4, answer=32, epochs=4, lora=0),
    "ppo": dict(prompts=16, samples=1, answer=32, epochs=4, lora=0),
    "ppo-separate-critic": dict(prompts=16, samples=1, answer=32, epochs=4, lora=0),
    "ppo-lora-memory": dict(prompts=16, samples=1, answer=32, epochs=1, lora=16),
    "ppo-lora-memory-release": dict(prompts=16, samples=1, answer=32, epochs=1, lora=16),
}


# ---------------------------------------------------------------------------------------------
# Counting.


def matmul_params(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                  num_key_value_heads: int | None = None, head_dim: int | None = None, vocab_size: int = VOCAB,
                  gated_mlp: bool = True) -> dict:
    """Matmul parameters of a Llama-shaped decoder: trunk (attention + MLP projections of every
    layer), LM head, and every adapted matrix's (in, out) for counting LoRA adapters."""
    head_dim = head_dim or hidden_size // num_attention_heads
    kv = num_key_value_heads or num_attention_heads
    q_out, kv_out = num_attention_heads * head_dim, kv * head_dim
    attention = [(hidden_size, q_out), (hidden_size, kv_out), (hidden_size, kv_out), (q_out, hidden_size)]
    mlp = [(hidden_size, intermediate_size)] * (2 if gated_mlp else 1) + [(intermediate_size, hidden_size)]
    layer = attention + mlp
    return {"hidden": hidden_size, "layers": num_hidden_layers,
            "attention": num_hidden_layers * sum(i * o for i, o in attention),
            "mlp": num_hidden_layers * sum(i * o for i, o in mlp),
            "trunk": num_hidden_layers * sum(i * o for i, o in layer),
            "lm_head": hidden_size * vocab_size, "matrices": layer * num_hidden_layers}


def lora_params(params: dict, rank: int) -> int:
    """Adapter parameters of LoRA rank `rank` on every trunk matrix (peft's all-linear: not the LM head)."""
    return sum(rank * (i + o) for i, o in params["matrices"])


def fixture_params(model: str) -> dict:
    """matmul_params of a bench fixture (fixtures.MODELS; the SFT, RM and LoRA fixtures share its shape)."""
    return matmul_params(**MODELS[model], vocab_size=VOCAB)


def critic_of(workload: str, side: str) -> str | None:
    """The row's critic design: None (critic-free), "head" (value head on the policy's body: TRL
    0.11.4's design and rlhflab's default, --critic shared), "model" (rlhflab's --critic separate in
    full mode, a model of its own), "adapter" (--critic separate under LoRA, an adapter over the base)."""
    if workload == "grpo":
        return None
    if side == "rlhflab" and workload.endswith("separate-critic"):
        return "adapter" if "lora" in workload else "model"
    return "head"


def rl_step_flops(params: dict, prompt: float, prompts: int, samples: int, answer: int, epochs: int, lora: int,
                  critic: str | None) -> dict:
    """FLOPs one RL step needs, by part (see the module's docstring)."""
    nt, nh, d = params["trunk"], params["lm_head"], params["hidden"]
    tokens, answers = prompt + samples * answer, samples * answer   # one group
    forward = 2 * nt * tokens + 2 * nh * answers
    n_lora = lora_params(params, lora) if lora else 0
    train = (4 * nt * tokens + 4 * nh * answers + 6 * n_lora * tokens) if lora else (6 * nt * tokens + 6 * nh * answers)
    parts = {"generation": forward, "old_logprobs": forward, "reference": forward,
             "reward": 2 * nt * tokens + 2 * d * samples, "policy_training": epochs * train}
    if critic == "head":
        parts["critic"] = 2 * d * answers + epochs * 6 * d * answers
    elif critic == "model":
        parts["critic"] = 2 * nt * tokens + 2 * d * answers + epochs * (6 * nt * tokens + 6 * d * answers)
    elif critic == "adapter":
        parts["critic"] = 2 * nt * tokens + 2 * d * answers + epochs * (4 * nt * tokens + 6 * n_lora * tokens
                                                                         + 6 * d * answers)
    return {k: v * prompts for k, v in parts.items()}


def flops_per_unit(workload: str, side: str, model: str, stats: dict) -> tuple[float, str] | None:
    """FLOPs the method needs per unit of the row's throughput: ("token" | "pair" | "step").
    `stats`: token counts of the workload's data (data_stats); None when they are missing."""
    if model not in MODELS:
        return None
    params = fixture_params(model)
    nt, nh, d = params["trunk"], params["lm_head"], params["hidden"]
    if workload == "sft":
        s = stats.get("sft")
        return (6 * nt + 6 * nh * s["labelled"] / s["tokens"], "token") if s else None
    if workload in ("rm", "dpo"):
        s = stats.get(workload)
        if not s:
            return None
        tokens = s["prompt"] + s["answers"]
        if workload == "rm":
            return 6 * nt * tokens + 6 * d * 2, "pair"
        return 8 * nt * tokens + 8 * nh * s["labelled"], "pair"
    if workload in RL_SHAPES:
        s = stats.get("prompts")
        if not s:
            return None
        return sum(rl_step_flops(params, s["prompt"], critic=critic_of(workload, side),
                                 **RL_SHAPES[workload]).values()), "step"
    return None


def mfu(workload: str, side: str, model: str, metric: str, value: float | None, seconds_per_step: float | None,
        stats: dict, peak_gflops: float | None) -> dict | None:
    """{"gflops": needed GFLOP/s, "mfu": share of the peak} of one side, or None when it cannot be
    said (no peak, no data counts, or no throughput). Memory rows use the side's s/step."""
    needed = flops_per_unit(workload, side, model, stats or {})
    if needed is None or not peak_gflops:
        return None
    flops, unit = needed
    if unit == "step":
        seconds = value if metric == "seconds_per_step" else seconds_per_step
        rate = 1 / seconds if seconds else None
    else:
        rate = value
    if not rate:
        return None
    gflops = flops * rate / 1e9
    return {"gflops": gflops, "mfu": gflops / peak_gflops, "flops_per_unit": flops, "unit": unit}


# ---------------------------------------------------------------------------------------------
# Measuring: the peak, and the data's token counts.


def measure_peak(size: int = 2048, repeats: int = 5) -> dict:
    """Best of `repeats` fp32 (size x size) @ (size x size) products, GFLOP/s, at torch's thread
    count (OMP_NUM_THREADS)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - started)
    return {"gflops": 2 * size**3 / best / 1e9, "size": size, "repeats": repeats, "threads": torch.get_num_threads()}


def peak(runs: int = 3, size: int = 2048, repeats: int = 5) -> dict:
    """`runs` measurements (each a best of `repeats`); the peak is their median."""
    measured = [measure_peak(size, repeats) for _ in range(runs)]
    values = [round(m["gflops"], 2) for m in measured]
    return {"gflops": statistics.median(values), "runs": values, "size": size, "repeats": repeats,
            "threads": measured[0]["threads"], "date": time.strftime("%Y-%m-%dT%H:%M:%S")}


def common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def data_stats(sft: str | None = None, rm: str | None = None, dpo: str | None = None, prompts: str | None = None,
               tokenizer: str | None = None, max_length: int = 256, rows: dict | None = None) -> dict:
    """Token counts of the bench's data, encoded as rlhflab's stages encode it: SFT real and
    labelled tokens; per pair the shared prompt P, the two answers A_c + A_r and their labelled
    tokens; the mean RL prompt (chat template and generation prompt included). `rows`: name ->
    how many rows of that file (its first ones) the workload reads; all when absent."""
    from transformers import AutoTokenizer

    from rlhflab.data.formats import load_records as load
    from rlhflab.data.template import IGNORE_INDEX, encode_chat, encode_prompt
    from rlhflab.train.dpo import last_turn_labels

    rows = rows or {}

    def load_records(path, kind, name):
        return load(path, kind, max_rows=rows.get(name, 0))

    tok = AutoTokenizer.from_pretrained(tokenizer or str(WORK / "tokenizer"))
    out = {}
    if sft:
        encoded = [encode_chat(tok, r.messages, max_length) for r in load_records(sft, "sft", "sft")[0]]
        out["sft"] = {"rows": len(encoded), "tokens": sum(len(e.input_ids) for e in encoded),
                      "labelled": sum(e.n_trainable for e in encoded)}
    for name, path in (("rm", rm), ("dpo", dpo)):
        if not path:
            continue
        prompt = answers = labelled = 0
        records = load_records(path, "preference", name)[0]
        for r in records:
            chosen, rejected = (encode_chat(tok, r.messages + [{"role": "assistant", "content": text}], max_length,
                                            keep_end=name == "rm") for text in r.responses[:2])
            # the prompt as the stage renders it (a shared start of both answers is not counted as prompt)
            shared = min(len(encode_prompt(tok, r.messages)), common_prefix(chosen.input_ids, rejected.input_ids))
            prompt += shared
            answers += len(chosen.input_ids) + len(rejected.input_ids) - 2 * shared
            # DPO reads the log-probs of the last answer's tokens only
            labelled += sum(1 for x in last_turn_labels(chosen.labels) + last_turn_labels(rejected.labels)
                            if x != IGNORE_INDEX)
        n = max(len(records), 1)
        out[name] = {"pairs": len(records), "prompt": prompt / n, "answers": answers / n, "labelled": labelled / n}
    if prompts:
        lengths = [len(encode_prompt(tok, r.messages)[-max_length:]) for r in load_records(prompts, "prompts", "prompts")[0]]
        out["prompts"] = {"rows": len(lengths), "prompt": sum(lengths) / max(len(lengths), 1)}
    return out


# ---------------------------------------------------------------------------------------------
# A table already written: bench/RESULTS.md's "Per side" rows.


def per_side_rows(markdown: str) -> list[dict]:
    """(workload, side, median of the runs, s/step) from RESULTS.md's per-side table."""
    rows, inside = [], False
    for line in markdown.splitlines():
        if line.startswith("| workload | side | runs"):
            inside = True
            continue
        if inside and not line.startswith("|"):
            break
        if not inside or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        runs = [float(v) for v in re.findall(r"[-\d.]+", cells[2])]
        step = float(cells[7]) if cells[7] not in ("—", "") else None
        rows.append({"workload": cells[0], "side": cells[1], "median": statistics.median(runs) if runs else None,
                     "seconds_per_step": step})
    return rows


METRICS = {"sft": "tokens_per_s", "rm": "pairs_per_s", "dpo": "pairs_per_s", "grpo": "seconds_per_step",
           "ppo": "seconds_per_step", "ppo-separate-critic": "seconds_per_step"}


def default_stats() -> dict:
    """Token counts of the rows the bench's default (not --quick) workloads train on: the first 320
    conversations of the world's sft.jsonl, the first 240 pairs of prefs.jsonl (run.py's slices)."""
    world = WORK / "world"
    return data_stats(sft=str(world / "sft.jsonl"), rm=str(world / "prefs.jsonl"), dpo=str(world / "prefs.jsonl"),
                      prompts=str(world / "prompts.jsonl"), rows={"sft": 320, "rm": 240, "dpo": 240})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("peak", help="fp32 matmul peak at torch's thread count, JSON on stdout")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size", type=int, default=2048)
    s = sub.add_parser("stats", help="token counts of the bench's data files, JSON on stdout")
    for name in ("sft", "rm", "dpo", "prompts", "tokenizer"):
        s.add_argument(f"--{name}")
    m = sub.add_parser("markdown", help="MFU of every row of a RESULTS.md per-side table (measures the peak now)")
    m.add_argument("results")
    args = parser.parse_args()
    if args.what == "peak":
        print(json.dumps(peak(args.runs, args.size)))
    elif args.what == "stats":
        print(json.dumps(data_stats(args.sft, args.rm, args.dpo, args.prompts, args.tokenizer)))
    else:
        measured = peak()
        stats = default_stats()
        print(json.dumps({"peak": measured, "stats": stats}))
        print("| workload | side | metric (median) | s/step | FLOPs per unit | GFLOP/s needed | MFU |")
        print("|---|---|---|---|---|---|---|")
        for row in per_side_rows(Path(args.results).read_text(encoding="utf-8")):
            model = "llama-100m" if "lora" in row["workload"] else "llama-6m"
            metric = METRICS.get(row["workload"], "peak_rss_mib")
            got = mfu(row["workload"], row["side"], model, metric, row["median"], row["seconds_per_step"], stats,
                      measured["gflops"])
            if got is None:
                print(f"| {row['workload']} | {row['side']} | {row['median']} | {row['seconds_per_step']} | — | — | — |")
                continue
            print(f"| {row['workload']} | {row['side']} | {row['median']:.4g} | {row['seconds_per_step']} | "
                  f"{got['flops_per_unit']:.4g} per {got['unit']} | {got['gflops']:.1f} | {got['mfu']:.1%} |")


if __name__ == "__main__":
    main()
