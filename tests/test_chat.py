"""`rlhflab chat`: model resolution, the scripted loop on a tiny model, streaming, and run() on piped stdin."""

from __future__ import annotations

import copy
import io
import json
import sys

import pytest

from rlhflab import config as cfg
from rlhflab.errors import UsageError
from rlhflab.infer import chat, engine


def chat_config(**values) -> chat.ChatConfig:
    return cfg.build(chat.ChatConfig, {}, {"device": "cpu", "max_new_tokens": 12, **values})


def scripted(lines: list[str]):
    """read_line that replays `lines`, then reports end of input; and the prompts it was shown."""
    pending, prompts = list(lines), []

    def read_line(prompt: str):
        prompts.append(prompt)
        return pending.pop(0) if pending else None

    return read_line, prompts


@pytest.fixture
def recorded_generation(monkeypatch):
    """Wrap the engine's generate_text: record each conversation, its streamed deltas and its answer."""
    calls = []
    real = engine.generate_text

    def recording(model, tokenizer, conversations, params, **kw):
        deltas = []
        on_text = kw.pop("on_text")

        def stream(text):
            deltas.append(text)
            on_text(text)

        generation = real(model, tokenizer, conversations, params, on_text=stream, **kw)
        calls.append({"messages": copy.deepcopy(conversations[0]), "deltas": deltas, "text": generation.texts[0]})
        return generation

    monkeypatch.setattr(engine, "generate_text", recording)
    return calls


def test_scripted_session_keeps_resets_and_streams(tiny_model, recorded_generation):
    config = chat_config(temperature=1.0, seed=3)
    model, tokenizer = chat.load(str(tiny_model("llama")), config)
    read_line, prompts = scripted(["hello", "how are you?", "/reset", "/system be brief", "你好", "/help",
                                   "/exit", "never read"])
    shown = []
    history = chat.chat_loop(model, tokenizer, config, read_line, shown.append)

    user_turns = [[m["content"] for m in c["messages"] if m["role"] == "user"] for c in recorded_generation]
    assert user_turns == [["hello"], ["hello", "how are you?"], ["你好"]]
    first, second, third = (c["messages"] for c in recorded_generation)
    assert second[1] == {"role": "assistant", "content": recorded_generation[0]["text"]}
    assert first[0]["role"] == "user" and third[0] == {"role": "system", "content": "be brief"}
    assert history == third + [{"role": "assistant", "content": recorded_generation[2]["text"]}]
    for call in recorded_generation:
        assert "".join(call["deltas"]) == call["text"]
    output = "".join(shown)
    assert "(conversation cleared)" in output and "/system TEXT" in output
    assert prompts == ["you> "] * 7  # nothing read after /exit


def test_streamed_deltas_keep_whole_characters(tiny_model):
    from rlhflab.infer.engine import SamplingParams, generate_text

    # The tiny tokenizer splits Chinese characters over byte tokens: some prefixes end mid-character.
    model, tokenizer = chat.load(str(tiny_model("llama")), chat_config())
    ids = tokenizer("你好世界,谢谢", add_special_tokens=False)["input_ids"]
    assert any(tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))
    for seed in range(10):
        pieces = []
        params = SamplingParams(max_new_tokens=12, seed=seed, temperature=1.5)
        out = generate_text(model, tokenizer, [[{"role": "user", "content": "你好世界"}]], params,
                            on_text=pieces.append)
        if not out.texts[0].endswith("\ufffd"):  # a random model may end on half a character
            assert "".join(pieces) == out.texts[0]


def test_long_history_drops_oldest_exchanges(tiny_model):
    tokenizer = chat.load(str(tiny_model("llama")), chat_config())[1]
    messages = [{"role": "system", "content": "sys"}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer " * 5}]
    messages.append({"role": "user", "content": "last"})
    kept, dropped, fits = chat.fit_context(tokenizer, messages, 60)
    assert fits and dropped > 0 and kept[0]["content"] == "sys" and kept[-1]["content"] == "last"
    assert kept[1]["role"] == "user"
    assert chat.fit_context(tokenizer, messages[-1:], 1)[2] is False


def _stage(run_dir, name, finished=True, marker="config.json"):
    stage = run_dir / name
    stage.mkdir(parents=True)
    (stage / marker).write_text("{}", encoding="utf-8")
    if finished:
        (stage / "summary.json").write_text(json.dumps({"steps": 1}), encoding="utf-8")
    return stage


def test_run_dir_picks_the_best_finished_policy(tmp_path):
    _stage(tmp_path, "pretrain")
    sft = _stage(tmp_path, "sft", marker="adapter_config.json")
    _stage(tmp_path, "rm", marker="reward_config.json")
    ppo = _stage(tmp_path, "ppo", finished=False)
    name, chosen = chat.resolve_model(str(tmp_path))
    assert name == str(sft) and "the sft policy" in chosen and "skipped: ppo" in chosen
    (ppo / "summary.json").write_text("{}", encoding="utf-8")
    name, chosen = chat.resolve_model(str(tmp_path))
    assert name == str(ppo) and "the ppo policy" in chosen
    assert chat.resolve_model(str(sft))[0] == str(sft)


def test_bad_targets_are_usage_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match="nope: no such file"):
        chat.resolve_model(str(missing))
    with pytest.raises(UsageError, match="reward model"):
        chat.resolve_model(str(_stage(tmp_path, "rm", marker="reward_config.json")))
    _stage(tmp_path / "run", "sft", finished=False)
    with pytest.raises(UsageError, match="no finished policy yet: no summary.json .* in sft"):
        chat.resolve_model(str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="neither a model"):
        chat.resolve_model(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="--top-p"):
        chat_config(top_p=0)
    with pytest.raises(UsageError, match="give a model"):
        chat.run(chat_config())


def test_run_on_piped_stdin(tiny_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n你好\n/exit\n"))
    assert chat.run(chat_config(model=str(tiny_model("llama")), temperature=0)) == 0
    captured = capsys.readouterr()
    assert "you> hello\nassistant> " in captured.out and "you> 你好\nassistant> " in captured.out
    assert "chatting with" in captured.err


def test_chat_answers_a_typed_question_in_a_pseudo_terminal(tiny_model):
    """The user's view: `rlhflab chat MODEL` in a terminal, a question typed, an answer streamed, /exit."""
    import os
    import pty
    import select
    import subprocess

    from conftest import ROOT

    controller, terminal = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "rlhflab.cli.main", "chat", str(tiny_model("llama")),
                                "--max-new-tokens", "6", "--device", "cpu"],
                               stdin=terminal, stdout=terminal, stderr=terminal, env=env, close_fds=True)
    os.close(terminal)
    seen = b""

    def read_until(marker: bytes, count: int, timeout: float = 120.0) -> None:
        nonlocal seen
        import time

        deadline = time.monotonic() + timeout
        while seen.count(marker) < count and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                try:
                    seen += os.read(controller, 4096)
                except OSError:
                    break
        assert seen.count(marker) >= count, seen.decode(errors="replace")[-2000:]

    try:
        read_until(b"you> ", 1)
        os.write(controller, "What is 2 plus 3? 你好\n".encode())
        read_until(b"you> ", 2)
        os.write(controller, b"/exit\n")
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(controller)
    after_question = seen.split(b"you> ")[1]
    assert "2 plus 3".encode() in after_question  # the typed line is echoed by the terminal
    assert len(after_question.strip()) > len("What is 2 plus 3? 你好".encode()), "no answer was shown"


def test_answers_leave_room_for_the_question_in_a_short_context(tiny_model, monkeypatch, capsys):
    """GPT-2 here holds 256 positions: with --max-new-tokens 256 every message was refused."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    assert chat.run(chat_config(model=str(tiny_model("gpt2")), temperature=0, max_new_tokens=256)) == 0
    out = capsys.readouterr().out
    assert "answers are kept to 128" in out and "too long" not in out and "assistant> " in out
