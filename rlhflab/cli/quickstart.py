"""`rlhflab quickstart`: the whole recipe on the embedded toy world, no download.

world export -> tokenizer -> pretrain -> SFT -> reward model (+ audit) -> PPO -> DPO -> eval ->
report, each stage in its own directory under --out. The stages are the packaged recipe
rlhflab/recipes/toy-world.yaml, run as `rlhflab run toy-world` runs it: every step an ordinary
`rlhflab` command, a finished step skipped, an interrupted training stage resumed from its last
checkpoint. The closing table compares base, SFT, PPO, DPO and best-of-n (SFT samples picked by
the reward model) with the gold judge, and a verdict written from the figures closes the output.

`--scenario hacking` runs rlhflab/recipes/toy-world-hacking.yaml instead: the same world and SFT,
then what goes wrong with a bad reward model and what catches it (docs/scenarios.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhflab.cli.pipeline import Stage, find_pipeline, load_pipeline, pipeline_params, read_pipeline, run_stages
from rlhflab.config import opt
from rlhflab.data.formats import load_prompts
from rlhflab.evals.evaluate import EvalConfig, best_of_n, evaluate_models
from rlhflab.evals.report import ReportConfig
from rlhflab.evals.report import run as write_report
from rlhflab.evals.verdict import verdict
from rlhflab.runs import atomic_write_json, refuse_a_file


@dataclass
class QuickstartConfig:
    """Run the whole recipe on the toy world and print what each stage bought."""

    stage = "quickstart"
    preset: str = opt("default", "how big: tiny (~1 min, for tests) or default (~10 min on 2 CPU cores)", ("tiny", "default"))
    scenario: str = opt("default", "what to run: default (the recipe working), or hacking (a reward model that likes "
                                   "short answers and an under-trained one, PPO on them, and the guards and alarms "
                                   "that catch it)", ("default", "hacking"))
    out: str | None = opt(None, "directory for every stage of the run (default: runs/quickstart, or "
                                "runs/quickstart-SCENARIO)")
    seed: int = opt(0, "seed of the world and of every stage")
    world: str = opt("default", "which toy world (`rlhflab world export --world`): default (habits that SFT copies "
                                "and RLHF must fix), habits (the earlier world with two habits), classic (habit-free)",
                     ("default", "habits", "classic"))
    habit_rate: float = opt(0.6, "how often the demonstrator falls into its habits (`rlhflab world export "
                                 "--habit-rate`)")
    progress: bool = opt(True, "show progress bars")


# Each scenario's packaged recipe (rlhflab/recipes/NAME.yaml): the stages, their options and the presets.
SCENARIOS = {"default": "toy-world", "hacking": "toy-world-hacking"}
POLICY_COMMANDS = ("pretrain", "sft", "ppo", "dpo")   # stages that write a model that answers: evaluated


def recipe(config: QuickstartConfig) -> tuple[list[Stage], dict]:
    """The packaged recipe's stages and parameters, with this command's options applied."""
    path = find_pipeline(SCENARIOS[config.scenario])
    preset = None if config.preset == "default" else config.preset
    overrides = {"seed": config.seed, "world": config.world, "habit_rate": config.habit_rate,
                 "progress": config.progress}
    return load_pipeline(path, preset, overrides, out_dir(config)), pipeline_params(path, preset, overrides)


def out_dir(config: QuickstartConfig) -> str:
    """--out, else the scenario's recipe's own `out`."""
    return config.out or str(read_pipeline(find_pipeline(SCENARIOS[config.scenario])).get("out")
                             or f"runs/quickstart-{config.scenario}")


def run(config: QuickstartConfig) -> int:
    refuse_a_file(out_dir(config))
    stages, params = recipe(config)
    out = Path(out_dir(config))
    out.mkdir(parents=True, exist_ok=True)
    code = run_stages(stages)
    if code != 0:
        return code
    results = evaluate(config, params, stages, out)
    print(format_results(results))
    atomic_write_json(out / "results.json", results)
    print(f"\nresults: {out / 'results.json'}")
    write_report(ReportConfig(run_dir=str(out)))
    print("\nverdict: " + verdict(results))
    return 0


def evaluate(config: QuickstartConfig, params: dict, stages: list[Stage], out: Path) -> dict:
    """Every model on the held-out prompts (gold judge, RM score, win rate against SFT, KL to SFT), plus stage
    figures, the reward-model audits, and which reward model each RL stage learned from."""

    by_dir = {str(stage.out): stage.name for stage in stages if stage.out is not None}
    reward_models = [stage.name for stage in stages if stage.command == "rm"]
    figures_path = out / "eval" / "figures.json"
    if figures_path.exists():
        models = json.loads(figures_path.read_text(encoding="utf-8"))
    else:
        prompts = load_prompts(str(out / "world" / "eval_prompts.jsonl"))[: int(params["eval_prompts"])]
        paths = {"base" if stage.name == "pretrain" else stage.name: str(stage.out) for stage in stages
                 if stage.command in POLICY_COMMANDS and (stage.out / "summary.json").exists()}
        rm = str(out / reward_models[0])   # the first reward model scores every answer
        eval_config = EvalConfig(model=",".join(f"{k}={v}" for k, v in paths.items()), prompts="",
                                 reward_model=rm, reference=str(out / "sft"), baseline=str(out / "sft"),
                                 seed=config.seed)
        models = evaluate_models(paths, prompts, eval_config, out / "eval")
        if int(params.get("best_of") or 0) > 1:
            models["best-of-" + str(params["best_of"])] = best_of_n(str(out / "sft"), rm, prompts,
                                                                    int(params["best_of"]), eval_config, out / "eval")
        atomic_write_json(figures_path, models)
    results = {"scenario": config.scenario, "models": models, "stages": {}, "audits": {}, "rl": {}}
    for stage in stages:
        summary = stage.out / "summary.json" if stage.out is not None else None
        if summary is not None and summary.exists():
            results["stages"][stage.name] = json.loads(summary.read_text(encoding="utf-8"))
        if stage.command == "rm" and (stage.out / "audit.json").exists():
            results["audits"][stage.name] = json.loads((stage.out / "audit.json").read_text(encoding="utf-8"))
        if stage.command == "ppo":
            results["rl"][stage.name] = {"reward_model": by_dir.get(str(stage.options.get("reward"))),
                                         "min_new_tokens": stage.options.get("min_new_tokens")}
    if reward_models and reward_models[0] in results["audits"]:
        results["audit"] = results["audits"][reward_models[0]]
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
    audits = results.get("audits") or ({"rm": results["audit"]} if results.get("audit") else {})
    for name, rm in stages.items():
        if "eval_gold_accuracy" in rm:
            lines.append(f"reward model {name}: accuracy vs clean gold ranking {rm['eval_gold_accuracy']:.3f}, "
                         f"vs its training labels {rm.get('eval_accuracy', float('nan')):.3f}")
    for name, audit in audits.items():
        lines.append(f"reward-model audit ({name}): " + (
            "hackable by " + ", ".join(audit["hackable"]) if audit["hackable"]
            else f"no degenerate answer wins on more than {audit['threshold']:.0%}"))
    for name, summary in stages.items():
        if "alarms" in summary:
            alarms = summary["alarms"] or []
            lines.append(f"{name} alarms: " + ("; ".join(f"step {a['step']}: {a['message']}" for a in alarms)
                                               or "none"))
    lines.append("wall time: " + ", ".join(f"{name} {s.get('wall_time_s', 0):.0f}s" for name, s in stages.items()))
    return "\n".join(lines)
