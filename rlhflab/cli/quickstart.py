"""`rlhflab quickstart`: the whole recipe on the embedded toy world, no download.

world export -> tokenizer -> pretrain -> SFT -> reward model (+ audit) -> PPO -> DPO -> eval ->
report, each stage in its own directory under --out. The stages are the packaged recipe
rlhflab/recipes/toy-world.yaml, run as `rlhflab run toy-world` runs it: every step an ordinary
`rlhflab` command, a finished step skipped, an interrupted training stage resumed from its last
checkpoint. The closing table compares base, SFT, PPO, DPO and best-of-n (SFT samples picked by
the reward model) with the gold judge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhflab.cli.pipeline import Stage, find_pipeline, load_pipeline, pipeline_params, run_stages
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


RECIPE = "toy-world"   # rlhflab/recipes/toy-world.yaml: the stages, their options and the presets


def recipe(config: QuickstartConfig) -> tuple[list[Stage], dict]:
    """The packaged recipe's stages and parameters, with this command's options applied."""
    path = find_pipeline(RECIPE)
    preset = None if config.preset == "default" else config.preset
    overrides = {"seed": config.seed, "habit_rate": config.habit_rate, "progress": config.progress}
    return load_pipeline(path, preset, overrides, config.out), pipeline_params(path, preset, overrides)


def run(config: QuickstartConfig) -> int:
    stages, params = recipe(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    code = run_stages(stages)
    if code != 0:
        return code
    results = evaluate(config, params)
    print(format_results(results))
    atomic_write_json(out / "results.json", results)
    print(f"\nresults: {out / 'results.json'}")
    write_report(ReportConfig(run_dir=str(out)))
    return 0


def evaluate(config: QuickstartConfig, params: dict) -> dict:
    """Every model on the held-out prompts (gold judge, RM score, win rate against SFT, KL to SFT), plus stage figures."""

    out = Path(config.out)
    figures_path = out / "eval" / "figures.json"
    if figures_path.exists():
        models = json.loads(figures_path.read_text(encoding="utf-8"))
    else:
        prompts = load_prompts(str(out / "world" / "eval_prompts.jsonl"))[: int(params["eval_prompts"])]
        paths = {"base" if name == "pretrain" else name: str(out / name)
                 for name in ("pretrain", "sft", "ppo", "dpo") if (out / name / "summary.json").exists()}
        eval_config = EvalConfig(model=",".join(f"{k}={v}" for k, v in paths.items()), prompts="",
                                 reward_model=str(out / "rm"), reference=str(out / "sft"), baseline=str(out / "sft"),
                                 seed=config.seed)
        models = evaluate_models(paths, prompts, eval_config, out / "eval")
        models["best-of-" + str(params["best_of"])] = best_of_n(str(out / "sft"), str(out / "rm"), prompts,
                                                                int(params["best_of"]),
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
