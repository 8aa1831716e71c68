"""`rlhflab quickstart`: the whole recipe on the embedded toy world, no download.

world export -> tokenizer -> pretrain -> SFT -> reward model (+ audit) -> PPO -> DPO -> eval ->
report, each stage in its own directory under --out. Every step is an ordinary `rlhflab`
command, run as a user would run it; a step whose directory already holds its finished output is
skipped, and an interrupted training stage resumes from its last checkpoint. The 1M-parameter
toy model is fully fine-tuned for the reward model and PPO (a LoRA reward model on it reached
only ~0.6 gold accuracy against ~0.74 for full fine-tuning at the same step count); DPO uses
LoRA. The closing
table compares base, SFT, PPO, DPO and best-of-n (SFT samples picked by the reward model) with
the gold judge.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhflab.cli.main import main
from rlhflab.config import opt
from rlhflab.data.formats import load_prompts
from rlhflab.evals.evaluate import EvalConfig, best_of_n, evaluate_models
from rlhflab.evals.report import ReportConfig
from rlhflab.evals.report import run as write_report
from rlhflab.runs import atomic_write_json


@dataclass
class QuickstartConfig:
    """Run the whole recipe on the toy world and print what each stage bought."""

    stage = "quickstart"
    preset: str = opt("default", "how big: tiny (~1 min, for tests) or default (~10 min)", ("tiny", "default"))
    out: str = opt("runs/quickstart", "directory for every stage of the run")
    seed: int = opt(0, "seed of the world and of every stage")
    habit_rate: float = opt(0.0, "the toy world's demonstrator habits (`rlhflab world export --habit-rate`); "
                                 "0.6 gives SFT habits for RLHF to fix")
    progress: bool = opt(True, "show progress bars")


# Per preset: world size, tokenizer vocab, pretraining steps, and each stage's steps.
PRESETS = {
    "tiny": dict(world="small", vocab=600, model="tiny", block=64, pretrain_steps=30, sft_steps=30,
                 rm_steps=10, rm_batch=4, ppo_steps=2, dpo_steps=10, eval_prompts=24, best_of=2),
    "default": dict(world="default", vocab=2048, model="tiny", block=128, pretrain_steps=1000, sft_steps=600,
                    rm_steps=300, rm_batch=8, ppo_steps=40, dpo_steps=600, eval_prompts=200, best_of=8),
}


def steps(config: QuickstartConfig) -> list[tuple[str, list[str], Path]]:
    """(name, rlhflab arguments, file whose existence means the step is done)."""
    p, out, seed = PRESETS[config.preset], Path(config.out), str(config.seed)
    world, tok = out / "world", out / "tokenizer"
    common = ["--seed", seed, "--progress", str(config.progress).lower(), "--save-every", "50",
              "--resume", "auto", "--log-every", "10"]
    return [
        ("world", ["world", "export", "--out", str(world), "--size", p["world"], "--seed", seed,
                   "--habit-rate", str(config.habit_rate)],
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
        ("rm", ["rm", "--model", str(out / "sft"), "--data", str(world / "rankings.jsonl"), "--loss", "ranking",
                "--harden", "--out", str(out / "rm"), "--batch-size", str(p["rm_batch"]), "--lr", "1e-3",
                "--max-steps", str(p["rm_steps"]), *common],
         out / "rm" / "summary.json"),
        ("audit", ["rm", "audit", "--model", str(out / "rm"), "--prompts", str(world / "eval_prompts.jsonl"),
                   "--max-rows", "100"], out / "rm" / "audit.json"),
        ("ppo", ["ppo", "--policy", str(out / "sft"), "--reward", str(out / "rm"), "--prompts",
                 str(world / "prompts.jsonl"), "--out", str(out / "ppo"), "--max-steps", str(p["ppo_steps"]),
                 "--lr", "1e-4", "--kl-coef", "0.2", "--rollout-prompts", "32", "--mini-batch", "16",
                 *common[:-2], "--log-every", "1", "--probe-every", "10"], out / "ppo" / "summary.json"),
        ("dpo", ["dpo", "--policy", str(out / "sft"), "--lora", "--lora-r", "32", "--lora-alpha", "64",
                 "--data", str(world / "prefs.jsonl"), "--out", str(out / "dpo"), "--max-steps", str(p["dpo_steps"]),
                 "--loss", "rpo", "--lr", "5e-4", "--batch-size", "8", *common], out / "dpo" / "summary.json"),
    ]


def run(config: QuickstartConfig) -> int:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, args, done in steps(config):
        if done.exists():
            print(f"== {name}: done already ({done.parent}), skipped", file=sys.stderr)
            continue
        print(f"== {name}: rlhflab {' '.join(args)}", file=sys.stderr)
        code = main(args)
        if code != 0:
            print(f"quickstart: stage {name} failed (exit {code}); fix it and run the same command again to "
                  "continue from here", file=sys.stderr)
            return code
    results = evaluate(config)
    print(format_results(results))

    atomic_write_json(out / "results.json", results)
    print(f"\nresults: {out / 'results.json'}")
    write_report(ReportConfig(run_dir=str(out)))
    return 0


def evaluate(config: QuickstartConfig) -> dict:
    """Every model on the held-out prompts (gold judge, RM score, win rate against SFT, KL to SFT), plus stage figures."""

    out, p = Path(config.out), PRESETS[config.preset]
    figures_path = out / "eval" / "figures.json"
    if figures_path.exists():
        models = json.loads(figures_path.read_text(encoding="utf-8"))
    else:
        prompts = load_prompts(str(out / "world" / "eval_prompts.jsonl"))[: p["eval_prompts"]]
        paths = {"base" if name == "pretrain" else name: str(out / name)
                 for name in ("pretrain", "sft", "ppo", "dpo") if (out / name / "summary.json").exists()}
        eval_config = EvalConfig(model=",".join(f"{k}={v}" for k, v in paths.items()), prompts="",
                                 judge=f"rm:{out / 'rm'}", reference=str(out / "sft"), baseline=str(out / "sft"),
                                 seed=config.seed)
        models = evaluate_models(paths, prompts, eval_config, out / "eval")
        models["best-of-" + str(p["best_of"])] = best_of_n(str(out / "sft"), str(out / "rm"), prompts, p["best_of"],
                                                           eval_config, out / "eval")

        atomic_write_json(figures_path, models)
    results = {"models": models, "stages": {}}
    for name in ("pretrain", "sft", "rm", "ppo", "dpo"):
        summary = out / name / "summary.json"
        if summary.exists():
            results["stages"][name] = json.loads(summary.read_text(encoding="utf-8"))
    audit = out / "rm" / "audit.json"
    if audit.exists():
        results["audit"] = json.loads(audit.read_text(encoding="utf-8"))
    return results


def format_results(results: dict) -> str:
    models = results["models"]
    facets = ["correct", "language", "polite", "refusal", "concise", "nonrepetitive"]
    head = (f"{'model':<10} {'gold':>6} " + " ".join(f"{f[:8]:>8}" for f in facets)
            + f" {'rm':>6} {'win/SFT':>7} {'KL/SFT':>6} {'chars':>6} {'empty':>6}")
    lines = [head, "-" * len(head)]

    def cell(value, fmt, width):
        return f"{value:>{width}{fmt}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"

    for name, m in models.items():
        lines.append(f"{name:<10} {cell(m.get('gold'), '.3f', 6)} "
                     + " ".join(cell(m.get("facets", {}).get(f), ".3f", 8) for f in facets)
                     + f" {cell(m.get('rm_score'), '.2f', 6)} {cell(m.get('vs_baseline', {}).get('win_rate'), '.1%', 7)}"
                     + f" {cell(m.get('kl_to_reference'), '.2f', 6)} {cell(m.get('mean_chars'), '.1f', 6)}"
                     + f" {cell(m.get('empty'), '.1%', 6)}")
    stages = results["stages"]
    rm = stages.get("rm", {})
    if "eval_gold_accuracy" in rm:
        lines.append(f"reward model: accuracy vs clean gold ranking {rm['eval_gold_accuracy']:.3f}, "
                     f"vs noisy labels {rm.get('eval_accuracy', float('nan')):.3f}")
    audit = results.get("audit")
    if audit:
        lines.append("reward-model audit: " + ("hackable by " + ", ".join(audit["hackable"]) if audit["hackable"]
                                               else f"no degenerate answer wins on more than {audit['threshold']:.0%}"))
    for name in ("ppo",):
        alarms = stages.get(name, {}).get("alarms") or []
        lines.append(f"{name} alarms: " + ("; ".join(f"step {a['step']}: {a['message']}" for a in alarms) or "none"))
    lines.append("wall time: " + ", ".join(f"{name} {s.get('wall_time_s', 0):.0f}s" for name, s in stages.items()))
    return "\n".join(lines)
