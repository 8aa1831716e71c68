"""`rlhflab quickstart`: the whole recipe on the embedded toy world, no download.

world export -> tokenizer -> pretrain -> SFT -> gold-judge eval (the reward model, PPO and DPO
stages join the pipeline as they land),
each stage in its own directory under --out. Every step is an ordinary `rlhflab` command, run as
a user would run it; a step whose directory already holds its finished output is skipped, and an
interrupted training stage resumes from its last checkpoint. The closing table compares the
models with the gold judge.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlhflab.config import opt
from rlhflab.errors import UsageError


@dataclass
class QuickstartConfig:
    """Run the whole recipe on the toy world and print what each stage bought."""

    stage = "quickstart"
    preset: str = opt("default", "how big: tiny (~1 min, for tests) or default (~10 min)", ("tiny", "default"))
    out: str = opt("runs/quickstart", "directory for every stage of the run")
    seed: int = opt(0, "seed of the world and of every stage")
    progress: bool = opt(True, "show progress bars")


# Per preset: world size, tokenizer vocab, pretraining steps, and each stage's steps.
PRESETS = {
    "tiny": dict(world="small", vocab=600, model="tiny", block=64, pretrain_steps=30, sft_steps=30,
                 rm_steps=20, dpo_steps=10, eval_prompts=24),
    "default": dict(world="default", vocab=2048, model="tiny", block=128, pretrain_steps=1000, sft_steps=600,
                    rm_steps=300, dpo_steps=150, eval_prompts=200),
}


def steps(config: QuickstartConfig) -> list[tuple[str, list[str], Path]]:
    """(name, rlhflab arguments, file whose existence means the step is done)."""
    p, out, seed = PRESETS[config.preset], Path(config.out), str(config.seed)
    world, tok = out / "world", out / "tokenizer"
    common = ["--seed", seed, "--progress", str(config.progress).lower(), "--save-every", "50",
              "--resume", "auto", "--log-every", "10"]
    return [
        ("world", ["world", "export", "--out", str(world), "--size", p["world"], "--seed", seed],
         world / "manifest.json"),
        ("tokenizer", ["tokenizer", "train", "--corpus", f"{world / 'corpus.txt'},{world / 'sft.jsonl'}",
                       "--vocab-size", str(p["vocab"]), "--out", str(tok)], tok / "tokenizer.json"),
        ("pretrain", ["pretrain", "--preset", p["model"], "--tokenizer", str(tok), "--data", str(world / "corpus.txt"),
                      "--out", str(out / "pretrain"), "--max-length", str(p["block"]), "--batch-size", "16",
                      "--lr", "2e-3", "--max-steps", str(p["pretrain_steps"]), "--warmup-ratio", "0.02", *common],
         out / "pretrain" / "summary.json"),
        ("sft", ["sft", "--model", str(out / "pretrain"), "--data", str(world / "sft.jsonl"), "--out", str(out / "sft"),
                 "--max-length", "256", "--batch-size", "16", "--lr", "1e-3", "--max-steps", str(p["sft_steps"]),
                 *common], out / "sft" / "summary.json"),
    ]


def run(config: QuickstartConfig) -> int:
    from rlhflab.cli import main

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    for name, args, done in steps(config):
        if done.exists():
            print(f"== {name}: done already ({done.parent}), skipped", file=sys.stderr)
            continue
        print(f"== {name}: rlhflab {' '.join(args)}", file=sys.stderr)
        started = time.perf_counter()
        code = main(args)
        if code != 0:
            print(f"quickstart: stage {name} failed (exit {code}); fix it and run the same command again to "
                  "continue from here", file=sys.stderr)
            return code
        timings[name] = round(time.perf_counter() - started, 1)
    results = evaluate(config)
    print(format_results(results))
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\nresults: {out / 'results.json'}")
    return 0


def evaluate(config: QuickstartConfig) -> dict:
    """Gold-judge scores of each model on the held-out prompts, plus stage figures."""
    from rlhflab.commands import generate_answers, load_prompts
    from rlhflab.runs import atomic_write_text
    from rlhflab.world import judge_file

    out, p = Path(config.out), PRESETS[config.preset]
    prompts = load_prompts(str(out / "world" / "eval_prompts.jsonl"))[: p["eval_prompts"]]

    class Gen:  # generation options for generate_answers
        device, dtype, trust_remote_code, max_new_tokens, batch_size = "auto", "auto", False, 48, 32

    results = {"models": {}, "stages": {}}
    for name in ("pretrain", "sft", "dpo"):
        model_dir = out / name
        if not (model_dir / "summary.json").exists():
            continue
        answers = out / "eval" / f"{name}.jsonl"
        if not answers.exists():
            rows = generate_answers(str(model_dir), prompts, Gen)
            atomic_write_text(answers, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        scored = judge_file(str(answers))
        rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
        lengths = [len(r["response"]) for r in rows]
        results["models"]["base" if name == "pretrain" else name] = {
            "gold": scored["score"], "facets": scored["facets"],
            "mean_chars": sum(lengths) / len(lengths), "empty": sum(not r["response"].strip() for r in rows) / len(rows),
        }
    for name in ("pretrain", "sft", "rm", "dpo"):
        summary = out / name / "summary.json"
        if summary.exists():
            results["stages"][name] = json.loads(summary.read_text(encoding="utf-8"))
    return results


def format_results(results: dict) -> str:
    models = results["models"]
    facets = sorted({f for m in models.values() for f in m["facets"]})
    head = f"{'model':<8} {'gold':>6} " + " ".join(f"{f[:10]:>10}" for f in facets) + f" {'chars':>6} {'empty':>6}"
    lines = [head, "-" * len(head)]
    for name, m in models.items():
        lines.append(f"{name:<8} {m['gold']:>6.3f} " + " ".join(f"{m['facets'].get(f, float('nan')):>10.3f}" for f in facets)
                     + f" {m['mean_chars']:>6.1f} {m['empty']:>6.1%}")
    rm = results["stages"].get("rm", {})
    for key in ("eval_gold_accuracy", "eval_accuracy"):
        if key in rm:
            lines.append(f"reward model {key}: {rm[key]:.3f}")
    for name, s in results["stages"].items():
        lines.append(f"{name:<9} wall {s.get('wall_time_s', 0):7.1f}s  steps {s.get('steps', '-')}")
    return "\n".join(lines)
