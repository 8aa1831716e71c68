"""The command line as a user meets it: help, typos, bad values, bad files, exit codes."""

from __future__ import annotations

import pytest
from conftest import SAMPLES

from rlhflab import config as cfg
from rlhflab.cli.main import COMMANDS, _load, main, parse
from rlhflab.errors import UsageError


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sft", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for f in cfg.fields_of(cfg.SFTConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "(default: 0.0002)" in text and "(default: all-linear)" in text


def test_unknown_option_suggests_the_closest():
    with pytest.raises(UsageError, match=r"unknown option --lerning-rate|did you mean"):
        parse("sft", ["--lerning-rate", "1"])
    with pytest.raises(UsageError, match="did you mean '--lora-r'"):
        parse("sft", ["--lora-rr", "4"])


def test_bad_values_name_the_option_and_allowed_values():
    with pytest.raises(UsageError, match=r"--scheduler: 'cosin' is not one of: cosine, linear, constant"):
        parse("sft", ["--scheduler", "cosin"])
    with pytest.raises(UsageError, match=r"--batch-size \(on the command line\): expected int, got 'eight'"):
        parse("sft", ["--batch-size", "eight"])
    with pytest.raises(UsageError, match="--batch-size: must be at least 1"):
        parse("sft", ["--batch-size", "0"])


def test_a_repeated_option_overrides_unless_repeatable():
    assert parse("sft", ["--model", "m", "--data", "d", "--lr", "1e-4", "--lr", "1e-3"]).lr == 1e-3
    config = parse("eval", ["--model", "a=x", "--model", "b=y,c=z", "--prompts", "p.jsonl"])
    assert config.model == "a=x,b=y,c=z"


def test_yaml_then_cli_override_and_unknown_yaml_key(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("lr: 0.001\nbatch-size: 4\nlora: true\n")
    config = parse("sft", ["--config", str(good), "--batch-size", "2"])
    assert (config.lr, config.batch_size, config.lora) == (0.001, 2, True)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.001\nwarmup_ration: 0.1\n")
    with pytest.raises(UsageError, match=r"bad.yaml: unknown key 'warmup_ration'.*did you mean 'warmup_ratio'"):
        parse("sft", ["--config", str(bad)])


def test_an_old_option_name_still_works_with_a_one_line_note(tmp_path, capsys):
    """`ppo --judge-rm` and `eval --judge rm:DIR` are now --eval-reward-model and --reward-model
    ("judge" is the toy world's gold judge only); the old spellings map onto the new options."""
    ppo = ["--policy", "p", "--reward", "r", "--prompts", "x"]
    old = parse("ppo", [*ppo, "--judge-rm", "held-out-rm"])
    assert old == parse("ppo", [*ppo, "--eval-reward-model", "held-out-rm"]) and old.eval_reward_model == "held-out-rm"
    notes = capsys.readouterr().err.splitlines()
    assert notes == ["note: --judge-rm is deprecated; use --eval-reward-model"]
    assert parse("eval", ["--model", "m", "--prompts", "p", "--judge", "rm:dir"]).reward_model == "dir"
    assert "note: --judge is deprecated; use --reward-model (--judge rm:dir is --reward-model dir)" in capsys.readouterr().err
    old_yaml = tmp_path / "old.yaml"
    old_yaml.write_text("judge: rm:dir\n")
    assert parse("eval", ["--config", str(old_yaml), "--model", "m", "--prompts", "p"]).reward_model == "dir"
    with pytest.raises(UsageError, match="--judge 'dir': expected rm:DIR"):
        parse("eval", ["--model", "m", "--prompts", "p", "--judge", "dir"])
    with pytest.raises(UsageError, match="--judge-rm .* is the old name of --eval-reward-model"):
        parse("ppo", [*ppo, "--judge-rm", "a", "--eval-reward-model", "b"])
    with pytest.raises(SystemExit):
        main(["ppo", "--help"])
    assert "(old name, deprecated: --judge-rm)" in " ".join(capsys.readouterr().out.split())


def test_every_deprecated_alias_names_an_option_of_its_command():
    for command, (config_path, _, _) in COMMANDS.items():
        config_cls = _load(config_path)
        names = {f.name for f in cfg.fields_of(config_cls)}
        for old, alias in getattr(config_cls, "deprecated_aliases", {}).items():
            assert alias.to in names and old not in names, (command, old)


def test_every_command_parses_its_defaults_or_names_what_is_missing():
    for command in COMMANDS:
        try:
            parse(command, [])
        except ModuleNotFoundError:
            pytest.fail(f"`rlhflab {command}` points at a module that does not exist")
        except UsageError as error:
            # A stage that cannot run without an input must say which option gives it.
            assert "--" in str(error), f"`rlhflab {command}` with no options: {error}"


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model", "--data", SAMPLES / "sft_messages.jsonl"], "/no/such/model: no such directory"),
    (["--model", "MODEL", "--data", "/no/such/data.jsonl"], "data file not found: /no/such/data.jsonl"),
    (["--model", "MODEL", "--data", SAMPLES / "pairs.jsonl"], "looks like 'pairs' data"),
    (["--model", "MODEL", "--data", SAMPLES / "sft_messages.jsonl", "--optimiser", "adam"], "unknown option --optimiser"),
    (["--model", "MODEL", "--data", SAMPLES / "sft_messages.jsonl", "--qlora"], "--qlora trains a LoRA adapter on a 4-bit base: give --lora"),
    (["--model", "MODEL", "--data", SAMPLES / "sft_messages.jsonl", "--device", "cuda"], "no CUDA device"),
])
def test_bad_input_through_the_cli_exits_2_and_writes_nothing(args, message, cli, tiny_model, tmp_path):
    args = [tiny_model("llama") if a == "MODEL" else a for a in args]
    out = tmp_path / "out"
    result = cli("sft", *args, "--out", out)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists(), "a failed start must leave no output behind"


def test_unknown_command(capsys):
    assert main(["sfft"]) == 2
    assert "did you mean 'sft'" in capsys.readouterr().err


def test_a_yaml_list_fills_a_repeatable_option(tmp_path):
    (tmp_path / "c.yaml").write_text("model: [runs/a/sft, runs/b/ppo]\nprompts: p.jsonl\n")
    config = parse("eval", ["--config", str(tmp_path / "c.yaml")])
    assert config.model == "runs/a/sft,runs/b/ppo"
    (tmp_path / "d.yaml").write_text("model: [a, b]\ndata: x.jsonl\n")
    with pytest.raises(UsageError, match="takes one value, got a list"):
        parse("sft", ["--config", str(tmp_path / "d.yaml")])


@pytest.mark.parametrize("command", [
    ["sample", "--model", "MODEL", "--prompts", SAMPLES / "prompts.jsonl"],
    ["rank", "--data", SAMPLES / "rankings.jsonl"],
    ["rm", "score", "--model", "MODEL", "--data", SAMPLES / "pairs.jsonl"],
    ["rm", "audit", "--model", "MODEL", "--prompts", SAMPLES / "prompts.jsonl"],
], ids=lambda c: " ".join(map(str, c[:2])))
def test_an_out_file_that_is_a_directory_is_refused_before_any_work(command, tiny_model, tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    args = [str(tiny_model("llama")) if a == "MODEL" else str(a) for a in command]
    assert main([*args, "--out", str(out)]) == 2
    assert f"--out {out}: a directory; expected the path of a file" in capsys.readouterr().err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("row,message", [
    ({"prompt": [], "responses": ["a", "b"]}, "non-empty list of"),
    ({"prompt": ["hi"], "responses": ["a", "b"]}, "non-empty list of"),
    ({"prompt": "hi", "responses": [1, 2]}, "at least 2 strings"),
    ({"prompt": "hi", "responses": ["a", "b"], "meta": "x"}, "field 'meta' must be an object"),
])
def test_rank_names_a_row_of_the_wrong_shape(row, message, tmp_path, capsys):
    import json

    data = tmp_path / "samples.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 plus 3?", "responses": ["5", "7"]}) + "\n" + json.dumps(row) + "\n")
    assert main(["rank", "--data", str(data), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{data}:2: " in (err := capsys.readouterr().err) and message in err, err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("second,message", [
    ('{"prompt": "hi", "chosen": "a", "rejected": 5}', ":2: "),
    ("{not json", ":2"),
])
def test_rm_score_names_the_bad_line_of_a_preference_file(second, message, tiny_model, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n' + second + "\n")
    assert main(["rm", "score", "--model", str(tiny_model("llama")), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert message in err and "looks like" not in err, err


def test_rm_audit_takes_prompts_or_a_reference_file_not_both(tiny_model, tmp_path, capsys):
    assert main(["rm", "audit", "--model", str(tiny_model("llama")), "--prompts", str(SAMPLES / "prompts.jsonl"),
                 "--reference", str(SAMPLES / "pairs.jsonl"), "--out", str(tmp_path / "a.json")]) == 2
    assert "give --prompts or --reference, not both" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()


def test_help_text_holds_no_internal_references(capsys):
    """--help is for users: no source-article numbers, issue numbers or commit hashes."""
    import re

    internal = re.compile(r"seed 0\d\d|issue #?\d|DESIGN|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([*command.split(), "--help"])
        text = capsys.readouterr().out
        assert "usage: rlhflab" in text, command
        assert not internal.search(text), (command, internal.search(text).group(0))
