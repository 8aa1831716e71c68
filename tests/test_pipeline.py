"""`rlhflab run pipeline.yaml`: the worked configs validate; bad files are named; a small pipeline runs and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, SAMPLES

from rlhflab.cli.main import main
from rlhflab.cli.pipeline import load_pipeline
from rlhflab.errors import UsageError

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_worked_configs():
    names = {p.name for p in CONFIGS}
    assert {"qwen2.5-0.5b-lora.yaml", "baichuan-7b-lora.yaml", "toy-world.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_worked_config_validates_without_running(path, capsys):
    stages = load_pipeline(str(path))
    assert stages and len({s.name for s in stages}) == len(stages)
    assert main(["run", str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(stages) and all(line.startswith("rlhflab ") for line in printed)
    # References to earlier stages are resolved to their directories.
    assert not any("{" in line for line in printed)


@pytest.mark.parametrize("body,message", [
    ("stages: []", "'stages' must be a non-empty list"),
    ("stages:\n  - command: sfft", "unknown command 'sfft'"),
    ("stages:\n  - command: sft\n    options: {lerning_rate: 1}", "stage 1 (sft): unknown option --lerning-rate"),
    ("stages:\n  - command: rm\n    options: {model: '{sft}', data: x.jsonl}", "{sft} names no earlier stage"),
    ("stages:\n  - command: sft\n  - command: sft", "a stage called 'sft' exists already"),
    ("outt: x\nstages: []", "unknown key 'outt'"),
    ("stages:\n  - command: sft\n    options: {lr: fast}", "stage 1 (sft): --lr (in the pipeline): expected float"),
])
def test_bad_pipelines_are_named(body, message, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(body)
    with pytest.raises(UsageError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")
                       .replace(")", r"\)")):
        load_pipeline(str(path))


def test_a_small_pipeline_runs_and_skips_finished_stages(tiny_model, tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(f"""
out: {tmp_path / 'run'}
stages:
  - name: sft
    command: sft
    options: {{model: {tiny_model('llama')}, data: {SAMPLES / 'sft_messages.jsonl'}, max_steps: 2, progress: false}}
  - name: dpo
    command: dpo
    options: {{policy: '{{sft}}', data: {SAMPLES / 'pairs.jsonl'}, lora: true, max_steps: 2, progress: false}}
""")
    assert main(["run", str(path)]) == 0
    assert (tmp_path / "run" / "dpo" / "adapter_config.json").exists()
    stamp = (tmp_path / "run" / "sft" / "summary.json").stat().st_mtime
    capsys.readouterr()
    assert main(["run", str(path), "--only", "sft"]) == 0
    err = capsys.readouterr().err
    assert "done already" in err and "note" not in err
    assert (tmp_path / "run" / "sft" / "summary.json").stat().st_mtime == stamp
    text = path.read_text()
    path.write_text(text.replace("max_steps: 2", "max_steps: 3", 1))
    assert main(["run", str(path), "--only", "sft"]) == 0
    assert "it ran with other --max-steps than this file gives" in capsys.readouterr().err


def test_references_name_the_directory_each_stage_really_writes(tmp_path):
    body = """out: {root}
stages:
  - command: world export
    options: {{size: small}}
  - name: tok
    command: tokenizer train
    options: {{corpus: "{{world-export}}/corpus.txt", vocab_size: 500}}
  - command: sft
    options: {{model: some/model, data: "{{world-export}}/sft.jsonl", out: {root}/elsewhere}}
  - command: rm
    options: {{model: "{{sft}}", data: "{{world-export}}/prefs.jsonl"}}
""".format(root=tmp_path / "run")
    (tmp_path / "p.yaml").write_text(body)
    stages = {s.name: s for s in load_pipeline(str(tmp_path / "p.yaml"))}
    world = tmp_path / "run" / "world-export"
    assert stages["world-export"].argv[-2:] == ["--out", str(world)], "a directory it writes: OUT/NAME by default"
    assert stages["tok"].argv[:2] == ["--corpus", f"{world}/corpus.txt"]
    assert stages["sft"].out == tmp_path / "run" / "elsewhere"
    assert stages["rm"].argv[:2] == ["--model", str(tmp_path / "run" / "elsewhere")], "the sft stage's own out"
    (tmp_path / "q.yaml").write_text("stages:\n  - command: judge\n    options: {responses: r.jsonl}\n"
                                     "  - command: rm\n    options: {model: '{judge}', data: x.jsonl}\n")
    with pytest.raises(UsageError, match="writes no directory"):
        load_pipeline(str(tmp_path / "q.yaml"))


def test_yaml_lists_give_a_repeatable_option_its_values(tmp_path):
    (tmp_path / "p.yaml").write_text("""out: run
stages:
  - command: sft
    options: {model: some/model, data: x.jsonl}
  - command: eval
    options: {model: ["{sft}", other/model], prompts: p.jsonl}
""")
    stages = {s.name: s for s in load_pipeline(str(tmp_path / "p.yaml"))}
    assert stages["eval"].argv[:2] == ["--model", f"{Path('run') / 'sft'},other/model"]
    (tmp_path / "q.yaml").write_text("stages:\n  - command: sft\n    options: {model: [a, b], data: x.jsonl}\n")
    with pytest.raises(UsageError, match="takes one value, got a list"):
        load_pipeline(str(tmp_path / "q.yaml"))


def test_parameters_presets_and_settings_fill_the_options(tmp_path):
    (tmp_path / "p.yaml").write_text("""out: run
params: {seed: 0, steps: 100, lora: false}
presets:
  small: {steps: 5}
training_defaults: {seed: "${seed}", save_every: 7}
stages:
  - name: world
    command: world export
    done: "{world}/manifest.json"
    options: {seed: "${seed}", size: small}
  - command: sft
    options: {model: m, data: "{world}/sft.jsonl", max_steps: "${steps}", lora: "${lora}", log_every: 3}
""")
    path = str(tmp_path / "p.yaml")
    stages = {s.name: s for s in load_pipeline(path)}
    assert stages["sft"].options["max_steps"] == 100 and stages["sft"].options["save_every"] == 7
    assert stages["sft"].options["lora"] is False and stages["sft"].done == Path("run") / "sft" / "summary.json"
    assert stages["world"].done == Path("run") / "world" / "manifest.json"
    assert "--save-every" not in stages["world"].argv, "training defaults go to training stages only"
    stages = {s.name: s for s in load_pipeline(path, "small", {"seed": "4", "lora": True}, str(tmp_path / "o"))}
    assert stages["sft"].options["max_steps"] == 5 and stages["sft"].options["seed"] == 4
    assert stages["sft"].options["lora"] is True and stages["world"].options["seed"] == 4
    assert stages["sft"].out == tmp_path / "o" / "sft"
    with pytest.raises(UsageError, match="--set: unknown parameter 'sed'.*did you mean 'seed'"):
        load_pipeline(path, overrides={"sed": 1})
    with pytest.raises(UsageError, match="--preset big: .* no such preset .*small"):
        load_pipeline(path, "big")
    (tmp_path / "q.yaml").write_text("stages:\n  - command: sft\n    options: {model: m, data: d, lr: '${rate}'}\n")
    with pytest.raises(UsageError, match=r"option lr: \$\{rate\} is no parameter of this file"):
        load_pipeline(str(tmp_path / "q.yaml"))


def test_the_packaged_recipe_runs_by_name_with_a_preset_and_settings(capsys):
    assert main(["run", "toy-world", "--preset", "tiny", "--set", "seed=3", "--set", "habit_rate=0.3",
                 "--set", "world=habits", "--out", "somewhere", "--dry-run"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in printed] == ["world", "tokenizer", "pretrain", "sft", "rm", "rm", "ppo", "dpo"]
    assert "--size small --seed 3 --world habits --habit-rate 0.3 --rankings 0 --out somewhere/world" in printed[0]
    assert all("--seed 3" in line for line in printed[2:] if " audit " not in line)
    assert "--max-steps 30" in printed[3] and "--resume auto" in printed[3]
    assert main(["run", "toy-wrld", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no packaged recipe of that name (packaged: " in err and "toy-world" in err
    assert main(["run", "toy-world", "--set", "seed", "--dry-run"]) == 2
    assert "--set seed: expected name=value" in capsys.readouterr().err
