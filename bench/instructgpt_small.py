"""InstructGPT's headline, small: does a small model trained with RLHF beat a ~4x larger model
trained with SFT alone? (In the paper, people preferred the 1.3B InstructGPT model's answers to
those of the 175B GPT-3, https://arxiv.org/abs/2203.02155.)

    .venv/bin/python bench/instructgpt_small.py --run runs/quickstart [--out runs/quickstart-large]

Takes a finished quickstart run (its world, tokenizer and models) and trains, on the same data
and with the same options as the run's own pretrain and SFT stages, a larger model from the
`small` preset instead of `tiny` (about 4x the parameters). Then every model answers the run's
held-out prompts greedily and is compared with the larger SFT model two ways: the gold judge's
mean score, and a head-to-head in which three of the toy world's noisy annotators (the same
noise as the preference data) compare each pair of answers and the majority decides (equal gold
scores are ties: the judge has no opinion, so neither have its annotators). Prints a table and
writes it as JSON to OUT/headline.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from rlhflab.data.formats import load_prompts
from rlhflab.evals.evaluate import EvalConfig, evaluate_models
from rlhflab.world.judge import judge
from rlhflab.world.preferences import ANNOTATOR_TEMPERATURE, perceived_scores

ANNOTATORS = 3


def recipe_options(run: Path) -> dict[str, dict]:
    """The pretrain and SFT options the run used (its config.yaml), by stage name."""
    import yaml

    options = {}
    for name in ("pretrain", "sft"):
        config = yaml.safe_load((run / name / "config.yaml").read_text(encoding="utf-8"))
        options[name] = {k: v for k, v in config.items() if v is not None and k not in ("out", "resume")}
    return options


def train(stage: str, options: dict, out: Path) -> None:
    if (out / "summary.json").is_file():
        return
    argv = [sys.executable, "-m", "rlhflab", stage, "--out", str(out), "--progress", "false"]
    for key, value in options.items():
        if isinstance(value, (dict, list)):
            continue
        argv += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    print(" ".join(argv[2:]), flush=True)
    subprocess.run(argv, check=True)


def head_to_head(records, answers: list[str], baseline: list[str], seed: int) -> dict:
    """Majority of ANNOTATORS noisy annotators per prompt, answers against the baseline's."""
    rng = random.Random(f"head-to-head:{seed}")
    wins = ties = 0
    for record, mine, theirs in zip(records, answers, baseline):
        gold = [judge(record.messages, mine, record.meta).score, judge(record.messages, theirs, record.meta).score]
        if abs(gold[0] - gold[1]) < 1e-9:
            ties += 1
            continue
        votes = sum(a > b for a, b in (perceived_scores(gold, rng, ANNOTATOR_TEMPERATURE)
                                        for _ in range(ANNOTATORS)))
        wins += votes * 2 > ANNOTATORS
    n = len(records)
    return {"wins": wins, "ties": ties, "losses": n - wins - ties, "win_rate": (wins + 0.5 * ties) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished quickstart run directory")
    parser.add_argument("--out", type=Path, help="where the larger model goes (default: RUN-large)")
    parser.add_argument("--preset", default="small", help="size of the larger model (a pretrain preset)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the annotators' noise")
    args = parser.parse_args()
    run, out = args.run, args.out or args.run.with_name(args.run.name + "-large")

    options = recipe_options(run)
    train("pretrain", {**options["pretrain"], "preset": args.preset}, out / "pretrain")
    train("sft", {**options["sft"], "model": str(out / "pretrain")}, out / "sft")

    prompts = load_prompts(str(run / "world" / "eval_prompts.jsonl"))
    models = {f"sft-{args.preset}": str(out / "sft"), "sft": str(run / "sft")}
    models.update({name: str(run / name) for name in ("ppo", "dpo") if (run / name / "summary.json").is_file()})
    config = EvalConfig(model=",".join(models.values()), prompts="")
    figures = evaluate_models(models, prompts, config, out / "answers")
    answers = {name: [json.loads(line)["response"] for line in (out / "answers" / f"{name}.jsonl").open()]
               for name in models}
    # PPO and DPO keep the small SFT model's size (DPO's directory may be a LoRA adapter on it).
    small = json.loads((run / "sft" / "summary.json").read_text()).get("parameters")
    large = json.loads((out / "sft" / "summary.json").read_text()).get("parameters")
    parameters = {name: large if name.startswith("sft-") else small for name in models}
    baseline = f"sft-{args.preset}"
    table = {}
    for name in models:
        table[name] = {"parameters": parameters.get(name), "gold": figures[name].get("gold"),
                       "vs_large_sft": None if name == baseline else
                       head_to_head(prompts, answers[name], answers[baseline], args.seed)}
    print(f"{'model':<12} {'params':>10} {'gold':>6} {'win rate vs ' + baseline:>22}")
    for name, row in table.items():
        win = row["vs_large_sft"]["win_rate"] if row["vs_large_sft"] else None
        shown = "-" if win is None else f"{win:.1%}"
        print(f"{name:<12} {row['parameters'] or 0:>10,} {row['gold']:>6.3f} {shown:>22}")
    (out / "headline.json").write_text(json.dumps({"run": str(run), "prompts": len(prompts), "table": table},
                                                  indent=1))


if __name__ == "__main__":
    main()
