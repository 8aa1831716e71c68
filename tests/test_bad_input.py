"""Bad files meet named errors, never a traceback: other encodings (a UTF-8 byte-order mark is
simply read), broken weight files, configs and checkpoints, rows without a preference, and every
command walked with bad values."""

from __future__ import annotations

import json
import shutil
import signal
import struct
from pathlib import Path

import pytest
from conftest import SAMPLES, run_cli

from rlhflab import config as cfg
from rlhflab.cli.main import COMMANDS, _load, main
from rlhflab.data.formats import load_records

ROW = {"messages": [{"role": "user", "content": "Où est la gare ?"}, {"role": "assistant", "content": "À gauche."}]}


def outcome(capsys, argv) -> tuple[int, str]:
    """Exit status and stderr of `rlhflab ARGV` run in this process; an exception escaping main is a
    traceback the user would have seen, and fails the test."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:   # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def write_rows(path: Path, rows: list[dict], encoding: str) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes(text.encode(encoding))
    return path


# ---------------------------------------------------------------------------------------------
# 3. Encodings: every reader names the file and line; a UTF-8 byte-order mark is accepted.


def readers(tmp_path: Path, model: Path):
    """(argv, the file it reads): each reader of user files, given `{file}`."""
    return {
        "sft --data .jsonl": ["sft", "--model", model, "--data", "{file}.jsonl"],
        "sft --data .json": ["sft", "--model", model, "--data", "{file}.json"],
        "pretrain --data .txt": ["pretrain", "--model", model, "--data", "{file}.txt"],
        "rm --data": ["rm", "--model", model, "--data", "{file}.jsonl"],
        "dpo --data": ["dpo", "--policy", model, "--data", "{file}.jsonl"],
        "ppo --prompts": ["ppo", "--policy", model, "--reward", model, "--prompts", "{file}.jsonl"],
        "sample --prompts": ["sample", "--model", model, "--prompts", "{file}.jsonl", "--out", tmp_path / "s.jsonl"],
        "rank --data": ["rank", "--data", "{file}.jsonl", "--out", tmp_path / "r.jsonl"],
        "judge --responses": ["judge", "--responses", "{file}.jsonl"],
        "eval --prompts": ["eval", "--model", model, "--prompts", "{file}.jsonl"],
        "rm score --data": ["rm", "score", "--model", model, "--data", "{file}.jsonl"],
        "tokenizer train --corpus": ["tokenizer", "train", "--corpus", "{file}.txt", "--out", tmp_path / "tok"],
        "--config": ["sft", "--config", "{file}.yaml"],
        "run --pipeline": ["run", "--pipeline", "{file}.yaml"],
    }


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_every_reader_names_the_file_and_line_of_another_encoding(encoding, tiny_model, tmp_path, capsys):
    model = tiny_model("llama")
    for name, argv in readers(tmp_path, model).items():
        suffix = argv[[i for i, a in enumerate(argv) if str(a).startswith("{file}")][0]].split(".")[-1]
        bad = tmp_path / f"bad.{suffix}"
        if suffix == "yaml":
            bad.write_bytes("model: x\n# café\n".encode(encoding))
        elif suffix == "json":
            bad.write_bytes(json.dumps([ROW], ensure_ascii=False).encode(encoding))
        elif suffix == "txt":
            bad.write_bytes("Une phrase.\n\nUn café, s'il vous plaît.\n".encode(encoding))
        else:   # a first line in plain ASCII: the error must find the line that is not UTF-8
            first = {"prompt": "hi", "chosen": "a", "rejected": "b", "responses": ["a", "b"],
                     "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                     "response": "yo", "text": "plain"}
            rows = [first, {**first, "prompt": "café", "text": "café", "response": "café"}]
            if encoding == "latin-1":
                bad.write_bytes(json.dumps(rows[0]).encode() + b"\n" + json.dumps(rows[1], ensure_ascii=False)
                                .encode("latin-1") + b"\n")
            else:
                write_rows(bad, rows, "utf-16")
        argv = [str(bad) if str(a).startswith("{file}") else a for a in argv]
        code, err = outcome(capsys, argv)
        line = {"jsonl": 2, "yaml": 2, "txt": 3}.get(suffix, 1) if encoding == "latin-1" else 1
        assert code == 2 and f"{bad}:{line}:" in err, (name, err)
        assert ("not UTF-8" if encoding == "latin-1" else "UTF-16") in err, (name, err)


def test_a_utf8_byte_order_mark_is_read(tiny_model, tmp_path, capsys):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(ROW, ensure_ascii=False) + "\n" for _ in range(4)).encode())
    records, _ = load_records(str(data), "sft")
    assert len(records) == 4 and records[0].messages == ROW["messages"]
    config = tmp_path / "bom.yaml"
    config.write_bytes(b"\xef\xbb\xbfmax_steps: 1\n")
    code, err = outcome(capsys, ["sft", "--model", tiny_model("llama"), "--data", data, "--config", config,
                                 "--out", tmp_path / "run", "--progress", "false"])
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 1


# ---------------------------------------------------------------------------------------------
# 4. Broken model files, configs and checkpoints are named.


def broken_copy(model: Path, where: Path, how: str) -> Path:
    out = where / f"model-{how}"
    shutil.copytree(model, out)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "tiny":
        weights.write_bytes(b"\x01\x02")
    elif how == "garbage-header":
        weights.write_bytes(struct.pack("<Q", 20) + b"{not json at all....." + data[28:])
    return out


@pytest.mark.parametrize("how", ["truncated", "empty", "tiny", "garbage-header"])
def test_a_broken_weights_file_is_named(how, tiny_model, tmp_path, capsys):
    model = broken_copy(tiny_model("llama"), tmp_path, how)
    code, err = outcome(capsys, ["sft", "--model", model, "--data", SAMPLES / "sft_messages.jsonl",
                                 "--out", tmp_path / "o"])
    assert code == 2 and f"{model / 'model.safetensors'} is not a complete safetensors file" in err
    assert not (tmp_path / "o").exists()


def test_every_stage_names_a_truncated_weights_file(tiny_model, sft_and_rm, tmp_path, capsys):
    model = broken_copy(tiny_model("llama"), tmp_path, "truncated")
    sft, rm = sft_and_rm
    rm_copy = tmp_path / "rm"
    shutil.copytree(rm, rm_copy)
    head = rm_copy / "score_head.safetensors"
    head.write_bytes(head.read_bytes()[:-8])
    out = tmp_path / "out"
    world_prompts = write_rows(tmp_path / "world.jsonl", [{"prompt": "hi", "meta": {"family": "smalltalk"}}], "utf-8")
    stages = {
        "sft": ["sft", "--model", model, "--data", SAMPLES / "sft_messages.jsonl", "--out", out],
        "pretrain": ["pretrain", "--model", model, "--data", SAMPLES / "corpus.txt", "--out", out],
        "rm": ["rm", "--model", model, "--data", SAMPLES / "pairs.jsonl", "--out", out],
        "dpo": ["dpo", "--policy", model, "--data", SAMPLES / "pairs.jsonl", "--out", out],
        "ppo --policy": ["ppo", "--policy", model, "--reward", rm, "--prompts", SAMPLES / "prompts.jsonl", "--out", out],
        "ppo --reward": ["ppo", "--policy", sft, "--reward", rm_copy, "--prompts", SAMPLES / "prompts.jsonl",
                         "--out", out, "--lora"],
        "sample": ["sample", "--model", model, "--prompts", SAMPLES / "prompts.jsonl", "--out", tmp_path / "s.jsonl"],
        "eval": ["eval", "--model", model, "--prompts", SAMPLES / "prompts.jsonl"],
        "rm score": ["rm", "score", "--model", rm_copy, "--data", SAMPLES / "pairs.jsonl"],
        "rm audit": ["rm", "audit", "--model", rm_copy, "--reference", SAMPLES / "pairs.jsonl"],
        "merge": ["merge", "--adapter", rm_copy, "--out", tmp_path / "merged"],
        "chat": ["chat", "--model", model],
        "judge": ["judge", "--model", model, "--prompts", world_prompts],
    }
    for name, argv in stages.items():
        code, err = outcome(capsys, argv)
        broken = head if rm_copy in argv else model / "model.safetensors"
        assert code == 2 and f"{broken} is not a complete safetensors file" in err, (name, err)
        assert not out.exists(), name


def test_broken_configs_adapters_and_data_are_named(tiny_model, tmp_path, capsys):
    model = tiny_model("llama")
    shapes = tmp_path / "shapes"
    shutil.copytree(model, shapes)
    config = json.loads((shapes / "config.json").read_text())
    (shapes / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{ this is not json")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone"),
                                                             "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"pickle")
    reward = tmp_path / "reward"
    shutil.copytree(model, reward)
    (reward / "score_head.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    (reward / "reward_config.json").write_text("garbage")
    parquet = tmp_path / "data.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet")
    data = SAMPLES / "sft_messages.jsonl"
    cases = [
        (["sft", "--model", shapes, "--data", data], "do not have the shapes its config.json gives"),
        (["sft", "--init-config", garbage, "--tokenizer", model, "--data", data], f"--init-config {garbage}"),
        (["ppo", "--policy", adapter, "--reward", model, "--prompts", SAMPLES / "prompts.jsonl"],
         f"--policy {adapter}: an adapter whose base model {tmp_path / 'gone'}"),
        (["dpo", "--policy", pickled, "--data", SAMPLES / "pairs.jsonl"], "a pickled adapter_model.bin is not read"),
        (["rm", "score", "--model", reward, "--data", SAMPLES / "pairs.jsonl"], "reward_config.json is not valid JSON"),
        (["sft", "--model", model, "--data", parquet], f"{parquet}: not a readable .parquet file"),
    ]
    for argv, message in cases:
        code, err = outcome(capsys, [*argv, "--out", tmp_path / "o"] if argv[0] != "rm" else argv)
        assert code == 2 and message in err, (argv[:2], err)
        assert not (tmp_path / "o").exists()


def test_resume_onto_a_broken_checkpoint_is_named_and_writes_nothing(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["sft", "--model", tiny_model("llama"), "--data", SAMPLES / "sft_messages.jsonl", "--out", out,
            "--progress", "false", "--max-steps", 2, "--save-every", 1]
    assert outcome(capsys, args)[0] == 0
    checkpoint = out / "checkpoints" / "step-1"
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "config.yaml").unlink()
    del before["config.yaml"]
    for resume in ("auto", str(checkpoint)):
        code, err = outcome(capsys, [*args, "--resume", resume])
        assert code == 2 and f"--resume: {weights} is not a complete safetensors file" in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before, "nothing written"
    (checkpoint / "trainer_state.json").write_text("{")
    code, err = outcome(capsys, [*args, "--resume", str(checkpoint)])
    assert code == 2 and "trainer_state.json is damaged" in err


# ---------------------------------------------------------------------------------------------
# 7. Rows without a preference are dropped and counted; judge checks its rows.


def test_rows_without_a_preference_are_dropped_and_counted(tmp_path, capsys):
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "same", "rejected": "same"},
            {"prompt": "c", "responses": ["r", "r", "r"]}, {"prompt": "d", "chosen": "p", "rejected": "q"}]
    pairs = write_rows(tmp_path / "pairs.jsonl", [r for r in rows if "chosen" in r], "utf-8")
    rankings = write_rows(tmp_path / "rankings.jsonl", [{"prompt": "c", "responses": ["r", "r", "r"]},
                                                        {"prompt": "e", "responses": ["r", "s", "r"]}], "utf-8")
    records, stats = load_records(str(pairs), "preference")
    assert [r.responses for r in records] == [["x", "y"], ["p", "q"]] and stats.rows_without_preference == 1
    records, stats = load_records(str(rankings), "preference")
    assert len(records) == 1 and stats.rows_without_preference == 1
    assert "1 rows whose responses are all the same text" in capsys.readouterr().err


@pytest.mark.parametrize("row,message", [
    ({"messages": "hi", "response": "yo"}, "field 'messages' must be a list"),
    ({"messages": [{"role": "user", "content": 3}], "response": "yo"}, "field 'messages' must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "response": 7}, "field 'response' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}], "response": "yo", "meta": [1]}, "field 'meta' must be"),
    (["not", "an", "object"], "expected a JSON object"),
])
def test_judge_checks_each_rows_types(row, message, tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "hi"}], "response": "yo"}
    responses = write_rows(tmp_path / "r.jsonl", [good, row], "utf-8")
    code, err = outcome(capsys, ["judge", "--responses", responses])
    assert code == 2 and f"{responses}:2: {message}" in err, err


# ---------------------------------------------------------------------------------------------
# Every command, walked with bad values: a named error and a non-zero exit, never a traceback.


def string_options(command: str) -> list[str]:
    cls = _load(COMMANDS[command][0])
    types = cfg._resolved_types(cls)
    return ["--" + f.name.replace("_", "-") for f in cfg.fields_of(cls)
            if cfg._base_type(types[f.name]) is str and not f.metadata.get("choices")]


@pytest.fixture
def bad_things(tiny_model, tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9"}\n')
    return {"a Latin-1 file": latin, "a broken model": broken_copy(tiny_model("llama"), tmp_path, "truncated"),
            "a missing path": tmp_path / "no" / "such"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_meets_bad_values_with_a_named_error(command, bad_things, capsys):
    def too_long(signum, frame):
        raise AssertionError(f"`rlhflab {command}` went on working with bad values")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(60)
    try:
        for what, value in bad_things.items():   # --out: an existing file (a new path is a good --out)
            argv = [x for o in string_options(command) for x in (o, bad_things["a Latin-1 file"] if o == "--out" else value)]
            code, err = outcome(capsys, [*command.split(), *argv])
            assert code not in (0, None) and f"rlhflab {command}" in err, (command, what, err)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_real_command_line_prints_no_traceback(tmp_path):
    result = run_cli("ppo", "--top-p", "-inf", "--out", tmp_path / "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "--top-p: must be a finite number in (0, 1], got -inf" in result.stderr
