"""The quickstart's scenarios and its story: the verdict written from the figures, the report's
before/after table and changed answers, recipes that extend another, the brevity-biased labeller,
the empty-answer alarm, and the reward-hacking scenario run end to end in its tiny preset."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from rlhflab import config as cfg
from rlhflab.cli.pipeline import find_pipeline, load_pipeline, pipeline_params
from rlhflab.errors import UsageError
from rlhflab.evals import report
from rlhflab.evals.verdict import verdict
from rlhflab.runs import read_metrics
from rlhflab.train.alarms import Alarm
from rlhflab.world import judge


def figures(gold: float, chars: float = 20.0, empty: float = 0.0) -> dict:
    return {"gold": gold, "mean_chars": chars, "empty": empty, "facets": {"correct": gold, "language": 1.0}}


FACTS = {
    "models": {"base": figures(0.1), "sft": figures(0.60), "ppo": figures(0.75), "dpo": figures(0.64)},
    "stages": {"rm": {"eval_gold_accuracy": 0.9}, "ppo": {"alarms": []}},
    "audits": {"rm": {"hackable": [], "threshold": 0.05}},
    "rl": {"ppo": {"reward_model": "rm", "min_new_tokens": 1}},
}


def test_the_verdict_is_written_from_the_figures():
    good = verdict(FACTS)
    assert "ppo +0.150 (0.750)" in good and "dpo +0.040" in good and "ppo gained the most, clearing" in good
    assert "rm (which ppo learned from)" in good and "90.0% of pairs: good enough" in good
    assert "no degenerate answer" in good and "No alarm fired during ppo" in good
    assert "stayed near SFT's for ppo, dpo" in good
    short = verdict({**FACTS, "stages": {**FACTS["stages"], "rm": {"eval_gold_accuracy": 0.847}}})
    assert "84.7% of pairs: below the 85% that counts as good enough" in short

    worse = copy.deepcopy(FACTS)
    worse["models"]["ppo"] = figures(0.20, chars=2.0, empty=0.7)
    worse["stages"]["rm"]["eval_gold_accuracy"] = 0.52
    worse["audits"]["rm"]["hackable"] = ["empty", "one_token"]
    worse["stages"]["ppo"]["alarms"] = [{"step": 7, "message": "empty answers rose"}, {"step": 9, "message": "x"}]
    bad = verdict(worse)
    assert bad != good
    assert "ppo −0.400" in bad and "dpo gained the most, but less than the 0.10" in bad
    assert "no better than a coin toss" in bad and "hackable by empty, one_token answers" in bad
    assert "ppo raised 2 alarms (first at step 7: empty answers rose)" in bad
    assert "ppo: answers 90% shorter than SFT's" in bad and "70% empty answers against SFT's 0%" in bad

    middling = copy.deepcopy(FACTS)
    middling["models"] = {"sft": figures(0.6), "ppo": figures(0.5)}
    middling["stages"]["rm"]["eval_gold_accuracy"] = 0.75
    text = verdict(middling)
    assert "No RLHF model beat SFT" in text and "below the 85% that counts as good enough" in text
    assert verdict({"models": {}}) == "No model was evaluated."


def test_the_empty_answer_alarm_fires_once_when_the_share_rises():
    alarm = Alarm(window=2)
    messages = [alarm.update(1.0, None, empty) for empty in (0.0, 0.1, 0.1, 0.2, 0.5, 0.9, 1.0)]
    fired = [m for m in messages if m]
    assert len(fired) == 1 and "empty answers rose from 5% to 35%" in fired[0] and messages[4] == fired[0]
    calm = Alarm(window=2)
    assert not any(calm.update(1.0, 0.5, empty) for empty in (0.1, 0.0, 0.2, 0.1, 0.1, 0.2))


def test_a_recipe_extends_another_ones_stages_params_and_presets(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(yaml.safe_dump({
        "extends": {"recipe": "toy-world", "stages": ["world", "sft", "pretrain", "tokenizer"]},
        "params": {"extra_steps": 7, "sft_steps": 5},
        "presets": {"tiny": {"extra_steps": 2}},
        "stages": [{"name": "rm2", "command": "rm", "options": {"model": "{sft}", "data": "{world}/rankings.jsonl",
                                                                   "max_steps": "${extra_steps}"}}]}))
    stages = load_pipeline(str(recipe), "tiny", None, str(tmp_path / "run"))
    assert [s.name for s in stages] == ["world", "tokenizer", "pretrain", "sft", "rm2"]   # the parent's order
    by_name = {s.name: s for s in stages}
    assert by_name["rm2"].options["max_steps"] == 2 and by_name["rm2"].options["model"] == str(tmp_path / "run/sft")
    assert by_name["sft"].options["max_steps"] == 30          # toy-world's tiny preset beats this file's default
    assert by_name["rm2"].options["save_every"] == 50         # toy-world's training defaults
    assert pipeline_params(str(recipe))["sft_steps"] == 5 and pipeline_params(str(recipe))["eval_prompts"] == 200
    recipe.write_text(yaml.safe_dump({"extends": {"recipe": "toy-world", "stages": ["sftt"]}, "stages": []}))
    with pytest.raises(UsageError, match="toy-world.yaml has no stage 'sftt'"):
        load_pipeline(str(recipe))
    recipe.write_text(yaml.safe_dump({"extends": {"recipe": str(recipe), "stages": []}, "stages": []}))
    with pytest.raises(UsageError, match="round in a circle"):
        load_pipeline(str(recipe))


def test_the_hacking_recipe_is_valid_and_keeps_the_quickstarts_sft():
    stages = load_pipeline(find_pipeline("toy-world-hacking"), "tiny")
    names = [s.name for s in stages]
    assert names[:4] == ["world", "tokenizer", "pretrain", "sft"]
    ppo = {s.name: s.options for s in stages if s.command == "ppo"}
    assert ppo["ppo-unguarded"]["min_new_tokens"] == 0 and ppo["ppo-guarded"]["min_new_tokens"] > 1
    assert all(options["policy"].endswith("/sft") for options in ppo.values())


def test_rank_by_shortest_orders_by_length_and_keeps_the_gold_scores(tmp_path, cli):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 2 plus 2?", "responses": ["It is 4, as you can see.", "4", "5."],
                                "gold_scores": [1.0, 0.9, 0.6]}) + "\n")
    out = tmp_path / "short.jsonl"
    result = cli("rank", "--data", rows, "--by", "shortest", "--format", "rankings", "--out", out)
    assert result.returncode == 0, result.stderr
    ranked = json.loads(out.read_text())
    assert ranked["responses"] == ["4", "5.", "It is 4, as you can see."] and ranked["gold_scores"] == [0.9, 0.6, 1.0]
    assert cli("dpo", "--policy", tmp_path, "--data", rows, "--rank-by", "shortest").returncode == 2  # rank only


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, list):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    else:
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_the_report_opens_with_the_story(tmp_path):
    from rlhflab.world import make_prompts

    run = tmp_path / "run"
    records = [r for r in make_prompts("eval", 80) if r["meta"]["family"] == "arithmetic"][:4]
    answers = {"sft": ["wrong", "wrong", records[2]["meta"]["answer"], "same"],
               "ppo": [records[0]["meta"]["answer"], records[1]["meta"]["answer"], "", "same"]}
    for name, texts in answers.items():
        write(run / "eval" / f"{name}.jsonl", [{"messages": r["messages"], "response": t, "meta": r["meta"]}
                                               for r, t in zip(records, texts)])
    write(run / "ppo" / "summary.json", {"steps": 3, "alarms": [{"step": 2, "message": "empty answers rose"}]})
    write(run / "rm" / "summary.json", {"steps": 3, "eval_gold_accuracy": 0.55})
    write(run / "rm" / "audit.json", {"prompts": 4, "reference_mean_score": 0.1, "threshold": 0.05,
                                      "hackable": ["empty"], "kinds": {}})
    write(run / "results.json", {"models": {"sft": figures(0.4), "ppo": figures(0.55, chars=18, empty=0.25)},
                                 "rl": {"ppo": {"reward_model": "rm"}}})
    assert report.run(cfg.build(report.ReportConfig, {}, {"run_dir": str(run)})) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    story = page[page.index('id="verdict"'):page.index("<h2>Stages")]
    assert "ppo +0.150 (0.550)" in story and "no better than a coin toss" in story
    assert "hackable by empty" in story and "ppo raised 1 alarm" in story and "25% empty answers" in story
    assert "Before and after, facet by facet" in story and "(+0.150)" in story and "correct" in story
    shown = story[story.index("Answers that changed"):story.index("<h3>Alarms")]
    gold = [judge(r["messages"], t, r["meta"]).score for r, t in zip(records, answers["ppo"])]
    assert gold[0] > judge(records[0]["messages"], "wrong", records[0]["meta"]).score
    assert shown.count("<tr>") == 4 and "same" not in shown    # two gains, one loss, the heading row
    assert shown.index(records[0]["meta"]["answer"]) < shown.index("(empty)")   # gains first
    assert "ppo, step 2: empty answers rose" in story


def test_the_hacking_scenario_collapses_without_the_guard_and_not_with_it(cli, tmp_path):
    out = tmp_path / "hacking"
    result = cli("quickstart", "--scenario", "hacking", "--preset", "tiny", "--out", out, "--progress", "false",
                 timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    stages, models = results["stages"], results["models"]
    assert {"sft", "ppo-unguarded", "ppo-guarded", "ppo-undertrained"} <= set(models)
    assert "empty" in results["audits"]["rm-short"]["hackable"]             # the audit flags it before PPO
    assert "best-of-2" not in models
    unguarded, guarded = stages["ppo-unguarded"], stages["ppo-guarded"]
    assert unguarded["alarms"]                                              # an alarm caught it
    # The collapse, in the sampled rollouts: the reward model pulls the answers shorter, and without
    # the guard empty ones appear; with it there is never one. (Where the tiny preset's greedy answers
    # end up, empty or a stuck token, depends on float rounding: the CPU, the seed; not asserted.)
    rollouts = {name: read_metrics(out / name / "metrics.jsonl") for name in ("ppo-unguarded", "ppo-guarded")}
    lengths = [m["response_len"] for m in rollouts["ppo-unguarded"]]
    assert min(lengths) < 0.6 * lengths[0]
    assert max(m["empty_rate"] for m in rollouts["ppo-unguarded"]) > 0
    assert max(m["empty_rate"] for m in rollouts["ppo-guarded"]) == 0 and guarded["final_empty_rate"] == 0
    assert results["rl"]["ppo-undertrained"]["reward_model"] == "rm-undertrained"
    assert results["rl"]["ppo-guarded"]["min_new_tokens"] > 1
    assert "verdict:" in result.stdout and "ppo-unguarded raised" in result.stdout
    page = (out / "report.html").read_text(encoding="utf-8")
    story = page[page.index('id="verdict"'):page.index("<h2>Stages")]
    assert "ppo-unguarded raised" in story and "ppo-guarded" in story
    assert "hackable by" in story and "rm-undertrained" in story
