"""`rlhflab serve`: the OpenAI-compatible API on a real server (127.0.0.1, a free port), driven by
the official `openai` client and by raw HTTP for what a client library would never send."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port, uvicorn_in_thread

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from rlhflab.cli.main import main
from rlhflab.data.formats import load_records
from rlhflab.data.template import IM_END, encode_prompt, stop_token_ids
from rlhflab.infer import engine
from rlhflab.infer.convlog import ConversationLog
from rlhflab.infer.server import ServeConfig, ServedModels, create_app, load_models
from rlhflab.models.loading import choose_placement, load_causal_lm, load_tokenizer

HELLO = [{"role": "user", "content": "你好"}]


@contextmanager
def serving(models: ServedModels, log: ConversationLog | None = None, **options):
    """The app on uvicorn in a thread, as `rlhflab serve` runs it; yields (base url, app)."""
    config = ServeConfig(model="(in-process)", **options)
    app = create_app(models, config, log)
    try:
        with uvicorn_in_thread(app) as url:
            yield url, app
    finally:
        app.state.batcher.close()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
    finally:
        conn.close()
    try:
        return response.status, json.loads(text)
    except ValueError:
        return response.status, text


def make_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter with random (not zero) B matrices, so that it changes the base's answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = tiny_model("llama")
    adapter = make_adapter(base, root / "adapter")
    models = load_models(ServeConfig(model=str(base), adapter=f"lora-a={adapter}", name="tiny", device="cpu"))
    log = ConversationLog(root / "log.db")
    with serving(models, log) as (url, app):
        yield types.SimpleNamespace(url=url, app=app, models=models, base=base, adapter=adapter, log=log,
                                    root=root)
    log.close()


def reference(model, tokenizer, messages, max_tokens: int) -> str:
    """The engine's greedy answer, called directly: what the server must return."""
    params = engine.SamplingParams(max_new_tokens=max_tokens, do_sample=False,
                                   stop_token_ids=tuple(stop_token_ids(tokenizer)))
    return engine.generate_text(model, tokenizer, [messages], params).texts[0].rstrip("\ufffd")


# ---------------------------------------------------------------------------------------------
# The API through the openai client.


def test_lists_the_base_model_and_its_adapters(setup):
    models = client(setup.url).models.list()
    assert [m.id for m in models.data] == ["tiny", "lora-a"]
    assert client(setup.url).models.retrieve("lora-a").id == "lora-a"


def test_a_greedy_answer_is_the_engines_answer_with_usage(setup):
    reply = client(setup.url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    tokenizer = setup.models.tokenizer
    with setup.models.using("tiny") as model:
        expected = reference(model, tokenizer, HELLO, 12)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(encode_prompt(tokenizer, HELLO))
    assert 1 <= reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_answer_equals_the_whole_answer_and_ends_with_done(setup):
    whole = client(setup.url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0)
    stream = client(setup.url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0,
                                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    # On the wire: server-sent events, the last one `data: [DONE]`.
    body = json.dumps({"model": "tiny", "messages": HELLO, "max_tokens": 4, "stream": True}).encode()
    status, events = raw(setup.url, "POST", "/v1/chat/completions", body)
    assert status == 200
    assert events.strip().split("\n\n")[-1] == "data: [DONE]"


def test_an_adapter_is_chosen_by_the_model_field(setup):
    api = client(setup.url)
    ask = {"messages": HELLO, "max_tokens": 12, "temperature": 0}
    base_before = api.chat.completions.create(model="tiny", **ask).choices[0].message.content
    adapted = api.chat.completions.create(model="lora-a", **ask).choices[0].message.content
    base_after = api.chat.completions.create(model="tiny", **ask).choices[0].message.content
    assert adapted != base_before
    assert base_after == base_before
    with setup.models.using("lora-a") as model:
        assert adapted == reference(model, setup.models.tokenizer, HELLO, 12)


def test_stop_sequences_cut_the_answer_before_them(setup):
    api = client(setup.url)
    full = api.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    cut = text[:text.find(stop)]
    reply = api.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0,
                                        stop=[stop, "never appears"])
    assert reply.choices[0].message.content == cut
    assert reply.choices[0].finish_reason == "stop"
    stream = api.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == cut


def test_n_answers_and_a_seed_repeats_them(setup):
    api = client(setup.url)
    ask = {"model": "tiny", "messages": HELLO, "max_tokens": 10, "temperature": 1.0, "n": 3, "seed": 7}
    first, again = api.chat.completions.create(**ask), api.chat.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1   # three samples, not one answer thrice
    assert first.usage.completion_tokens <= 30
    stream = api.chat.completions.create(**ask, stream=True)
    texts = ["", "", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in first.choices]


def test_requests_that_arrive_together_are_batched_and_answered_correctly(setup):
    prompts = [[{"role": "user", "content": f"{a} + {b} = ?"}] for a in range(4) for b in range(4)]
    with setup.models.using("tiny") as model:
        expected = [reference(model, setup.models.tokenizer, p, 8) for p in prompts]
    before = setup.app.state.batcher.batches

    def ask(messages):
        return client(setup.url).chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                                         temperature=0).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == expected
    assert setup.app.state.batcher.batches - before < len(prompts)   # some decodes served several requests


# ---------------------------------------------------------------------------------------------
# A scripted model: exact control over the tokens, for streaming and end-of-turn.


class Scripted(torch.nn.Module):
    """Emits `script` token by token whatever the prompt (the KV cache is just a step counter)."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab = script, vocab
        self.config = types.SimpleNamespace(max_position_embeddings=1024)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=True, **_):
        step = past_key_values or 0
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 100.0
        return types.SimpleNamespace(logits=logits, past_key_values=step + 1)


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (the byte-level alphabet), so every Chinese character is split."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    ids = [tokenizer.convert_tokens_to_ids(mapping[b]) for b in text.encode("utf-8")]
    assert tokenizer.unk_token_id not in ids and None not in ids
    return ids


def test_chinese_streams_whole_characters_and_the_answer_stops_at_the_end_of_turn(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    answer = "你好，世界！我是助手。"
    script = byte_tokens(tokenizer, answer) + [tokenizer.convert_tokens_to_ids(IM_END)] + byte_tokens(tokenizer, "多余")
    assert tokenizer.decode(script[:2]).endswith("\ufffd")   # the split the server must hold back
    models = ServedModels(Scripted(script, len(tokenizer)), tokenizer, "scripted", {})
    with serving(models) as (url, _):
        api = client(url)
        stream = api.chat.completions.create(model="scripted", messages=HELLO, max_tokens=100, stream=True)
        pieces, reasons = [], []
        for chunk in stream:
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                reasons.append(choice.finish_reason)
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == answer
        assert [r for r in reasons if r] == ["stop"]
        whole = api.chat.completions.create(model="scripted", messages=HELLO, max_tokens=100)
        assert whole.choices[0].message.content == answer and whole.choices[0].finish_reason == "stop"
        assert whole.usage.completion_tokens == len(answer.encode()) + 1   # the end-of-turn token counts
        # max_tokens in the middle of a character: the answer ends before it, never with half of it.
        cut = api.chat.completions.create(model="scripted", messages=HELLO, max_tokens=4)
        assert cut.choices[0].message.content == "你" and cut.choices[0].finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# Bad input: a 4xx with an OpenAI-style error, and the server keeps serving.


def is_openai_error(body) -> bool:
    return isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"].get("message"), str) \
        and {"type", "param", "code"} <= set(body["error"])


GOOD = {"model": "tiny", "messages": HELLO, "max_tokens": 4}


@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "tiny", "messages": [', 400, None),                          # malformed JSON
    (b'[1, 2]', 400, None),                                                     # not an object
    (json.dumps({**GOOD, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({**GOOD, "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": 5}]}).encode(), 400, "messages"),
    (json.dumps({**GOOD, "messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "messages"),
    (json.dumps({**GOOD, "n": "2"}).encode(), 400, "n"),
    (json.dumps({**GOOD, "n": 0}).encode(), 400, "n"),
    (json.dumps({**GOOD, "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({**GOOD, "stop": [1]}).encode(), 400, "stop"),
    (json.dumps({**GOOD, "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({**GOOD, "model": 3}).encode(), 400, "model"),
    (json.dumps({**GOOD, "model": "gpt-5"}).encode(), 404, "model"),
    (json.dumps({**GOOD, "messages": []}).encode(), 400, "messages"),
    (json.dumps({**GOOD, "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({**GOOD, "max_tokens": -5}).encode(), 400, "max_tokens"),
    (json.dumps({**GOOD, "max_tokens": 10**6}).encode(), 400, "max_tokens"),
    (json.dumps({**GOOD, "max_tokens": 2.5}).encode(), 400, "max_tokens"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}'.encode("latin-1"), 400, None),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(setup, body, status, param):
    got, error = raw(setup.url, "POST", "/v1/chat/completions", body)
    assert got == status, error
    assert is_openai_error(error), error
    assert error["error"]["param"] == param
    assert raw(setup.url, "POST", "/v1/chat/completions", json.dumps(GOOD).encode())[0] == 200


def test_the_openai_client_raises_its_own_errors(setup):
    api = client(setup.url)
    with pytest.raises(openai.NotFoundError) as info:
        api.chat.completions.create(model="nope", messages=HELLO)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="tiny", messages=HELLO, max_tokens=setup.models.context)
    assert info.value.body["code"] == "context_length_exceeded"


def test_a_10_mb_body_is_refused_without_reading_it(setup):
    big = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * (10 * 2**20)}]}).encode()
    status, error = raw(setup.url, "POST", "/v1/chat/completions", big)
    assert status == 413 and is_openai_error(error)
    assert raw(setup.url, "POST", "/v1/chat/completions", json.dumps(GOOD).encode())[0] == 200


def test_unknown_paths_and_methods_answer_openai_errors(setup):
    for method, path in (("GET", "/v1/nothing"), ("GET", "/v1/models/nope"), ("PUT", "/v1/chat/completions")):
        status, error = raw(setup.url, method, path)
        assert status in (404, 405) and is_openai_error(error), (method, path, error)


def test_a_client_that_disconnects_mid_stream_does_not_hurt_the_server(setup):
    host, port = setup.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "tiny", "messages": HELLO, "max_tokens": 400, "stream": True,
                       "temperature": 1.0}).encode()
    batches = setup.app.state.batcher.batches
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        # closed after the first bytes, long before 400 tokens
    reply = client(setup.url).chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content is not None
    deadline = time.time() + 30
    while raw(setup.url, "GET", "/health")[1]["waiting"] and time.time() < deadline:
        time.sleep(0.05)
    assert raw(setup.url, "GET", "/health")[1]["waiting"] == 0
    assert setup.app.state.batcher.batches > batches


def test_an_api_key_is_required_when_set(setup):
    with serving(setup.models, api_key="sesame") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        status, error = raw(url, "POST", "/v1/chat/completions", json.dumps(GOOD).encode())
        assert status == 401 and is_openai_error(error)
        assert [m.id for m in client(url, "sesame").models.list().data] == ["tiny", "lora-a"]
        assert client(url, "sesame").chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).choices


def test_a_full_queue_answers_503_instead_of_growing(setup):
    with serving(setup.models, max_queue=2, max_batch_size=1, batch_wait_ms=50) as (url, _):
        def ask(_):
            return raw(url, "POST", "/v1/chat/completions", json.dumps({**GOOD, "max_tokens": 30}).encode())

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(ask, range(12)))
        statuses = [s for s, _ in results]
        assert 503 in statuses and 200 in statuses, statuses
        assert set(statuses) <= {200, 503}
        assert all(is_openai_error(body) for s, body in results if s == 503)
        assert all(body["choices"][0]["message"]["content"] is not None for s, body in results if s == 200)
        assert ask(0)[0] == 200


# ---------------------------------------------------------------------------------------------
# The conversation log and its export.


def test_every_answer_and_vote_is_logged_and_exported_as_training_files(setup):
    conversation = {"X-Conversation-Id": "conv-1"}
    ask = json.dumps({"model": "tiny", "messages": HELLO, "max_tokens": 6, "temperature": 1.0, "seed": 3}).encode()
    status, first = raw(setup.url, "POST", "/v1/chat/completions", ask, conversation)
    assert status == 200
    ask_again = json.dumps({"model": "tiny", "messages": HELLO, "max_tokens": 6, "temperature": 1.0,
                            "seed": 4}).encode()
    second = raw(setup.url, "POST", "/v1/chat/completions", ask_again, conversation)[1]
    assert first["choices"][0]["message"]["content"] != second["choices"][0]["message"]["content"]
    vote = {"id": first["id"], "choice": 0, "rating": 1}
    assert raw(setup.url, "POST", "/feedback", json.dumps(vote).encode()) == (200, {"stored": True})
    compare = {"better": {"id": second["id"], "choice": 0}, "worse": {"id": first["id"], "choice": 0}}
    assert raw(setup.url, "POST", "/feedback", json.dumps(compare).encode())[0] == 200
    status, error = raw(setup.url, "POST", "/feedback", json.dumps({"id": "nope", "rating": 1}).encode())
    assert status == 404 and is_openai_error(error)

    db = sqlite3.connect(setup.root / "log.db")
    row = db.execute("SELECT conversation, model, settings, messages FROM exchanges WHERE id = ?",
                     (first["id"],)).fetchone()
    assert row[0] == "conv-1" and row[1] == "tiny"
    assert json.loads(row[2])["seed"] == 3 and json.loads(row[3]) == HELLO
    assert db.execute("SELECT value FROM feedback WHERE kind = 'rating' AND exchange = ?",
                      (first["id"],)).fetchone() == (1,)
    db.close()

    out = setup.root / "export"
    assert main(["serve", "export", "--db", str(setup.root / "log.db"), "--out", str(out)]) == 0
    prompts, _ = load_records(str(out / "prompts.jsonl"), "prompts")
    assert HELLO in [r.messages for r in prompts]
    assert len(prompts) == len({json.dumps(r.messages) for r in prompts})   # each prompt once
    pairs, _ = load_records(str(out / "prefs.jsonl"), "preference")
    assert [(p.messages, p.responses) for p in pairs] == [
        (HELLO, [second["choices"][0]["message"]["content"], first["choices"][0]["message"]["content"]])]


def test_without_a_log_nothing_is_stored_and_votes_say_so(setup, tmp_path):
    with serving(setup.models) as (url, _):
        assert raw(url, "POST", "/v1/chat/completions", json.dumps(GOOD).encode())[0] == 200
        status, error = raw(url, "POST", "/feedback", json.dumps({"id": "x", "rating": 1}).encode())
        assert status == 409 and "--log-db" in error["error"]["message"]


def test_kill_9_during_writes_keeps_every_answered_conversation(tiny_model, tmp_path):
    db, port = tmp_path / "log.db", free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "rlhflab.cli.main", "serve", str(tiny_model("llama")),
                               "--port", str(port), "--log-db", str(db), "--device", "cpu"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                if raw(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        answered, stop = [], threading.Event()

        def keep_asking(worker: int):
            i = 0
            while not stop.is_set():
                body = {"model": Path(tiny_model("llama")).name, "messages": [
                    {"role": "user", "content": f"question {worker}-{i}"}], "max_tokens": 6}
                try:
                    status, reply = raw(url, "POST", "/v1/chat/completions", json.dumps(body).encode())
                except OSError:
                    return
                if status == 200:
                    answered.append(reply["id"])
                i += 1

        threads = [threading.Thread(target=keep_asking, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        while len(answered) < 20 and time.time() < deadline:
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)   # mid-stream of requests: some are being answered and logged
        server.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert len(answered) >= 20
    log = sqlite3.connect(db)
    assert log.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    logged = {row[0] for row in log.execute("SELECT id FROM exchanges")}
    assert set(answered) <= logged
    log.close()


# ---------------------------------------------------------------------------------------------
# 4-bit and 8-bit models.


@pytest.fixture(scope="module")
def model64(tokenizer_dir, tmp_path_factory):
    """A tiny llama whose layers are a whole number of 4-bit quantisation blocks (64) wide."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False))
    out = tmp_path_factory.mktemp("model64")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("bits, layer", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_quantize_writes_a_model_that_serve_and_chat_load_as_is(model64, tmp_path, cli, bits, layer):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / f"q{bits}"
    done = cli("quantize", model64, "--bits", bits, "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"{bits}-bit model written" in done.stdout
    fp32 = load_causal_lm(str(model64), choose_placement("cpu", "fp32"))
    quantized = load_causal_lm(str(out), choose_placement("cpu", "auto"))
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == layer
    assert quantized.get_memory_footprint() < fp32.get_memory_footprint()
    models = ServedModels(quantized, load_tokenizer(str(out)), "q", {})
    with serving(models) as (url, _):
        reply = client(url).chat.completions.create(model="q", messages=HELLO, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
        stream = client(url).chat.completions.create(model="q", messages=HELLO, max_tokens=8, temperature=0,
                                                     stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            reply.choices[0].message.content
    talk = subprocess.run([sys.executable, "-m", "rlhflab.cli.main", "chat", str(out), "--max-new-tokens", "4"],
                          input="hello\n/exit\n", capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert talk.returncode == 0, talk.stderr
    assert "assistant>" in talk.stdout


def test_quantized_model_narrower_than_a_block_is_judged_and_evaluated(tokenizer_dir, tmp_path, cli):
    """A 4-bit model 32 wide (half a quantisation block) loads through `load_causal_lm` as `judge` and
    `eval` do, and generates: the CPU repacking, which fails on such layers, is kept off for them."""
    pytest.importorskip("bitsandbytes")
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(
        hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id))
    model.save_pretrained(str(tmp_path / "narrow"))
    tokenizer.save_pretrained(str(tmp_path / "narrow"))
    assert cli("quantize", tmp_path / "narrow", "--bits", 4, "--out", tmp_path / "nf4").returncode == 0
    prompts = tmp_path / "prompts.jsonl"
    greet = {"family": "smalltalk", "lang": "en", "harmful": False, "answer": "Hello! How can I help you today?",
             "slots": {"intent": "greet"}, "entities": ["phrase:Hey, nice to meet you."], "split": "eval"}
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Hey, nice to meet you."}], "meta": greet})
                       + "\n", encoding="utf-8")
    done = cli("judge", "--model", tmp_path / "nf4", "--prompts", prompts, "--max-new-tokens", 4,
               "--out", tmp_path / "scored.jsonl")
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "scored.jsonl").read_text(encoding="utf-8").splitlines()) == 1


def test_quantized_model_ready_for_inference_holds_nothing_in_the_checkpoint_file(model64, tmp_path, cli):
    """After `ready_for_inference`, no tensor of a 4-bit model points into its memory-mapped
    safetensors file, so the file's pages are not resident next to the repacked weights."""
    pytest.importorskip("bitsandbytes")
    from rlhflab.infer.quantize import ready_for_inference

    assert cli("quantize", model64, "--bits", 4, "--out", tmp_path / "nf4").returncode == 0
    model = ready_for_inference(load_causal_lm(str(tmp_path / "nf4"), choose_placement("cpu", "auto")))
    with open("/proc/self/maps", encoding="utf-8") as maps:
        mapped = [[int(a, 16) for a in line.split()[0].split("-")] for line in maps
                  if str(tmp_path / "nf4") in line]
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for m in model.modules() for t in vars(getattr(getattr(m, "weight", None), "quant_state", None)
                                                           or types.SimpleNamespace()).values()
                if isinstance(t, torch.Tensor)]
    assert not [t for t in tensors if any(start <= t.data_ptr() < end for start, end in mapped)]
    prompt = torch.tensor([encode_prompt(load_tokenizer(str(tmp_path / "nf4")), HELLO)])
    assert model.generate(prompt, max_new_tokens=3, do_sample=False).shape[1] > prompt.shape[1]


def test_serve_load_in_4bit_quantizes_on_the_fly(model64):
    pytest.importorskip("bitsandbytes")
    models = load_models(ServeConfig(model=str(model64), load_in_4bit=True, device="cpu"))
    assert any(type(m).__name__ == "Linear4bit" for m in models.model.modules())
    with serving(models) as (url, _):
        reply = client(url).chat.completions.create(model=models.base_id, messages=HELLO, max_tokens=6)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_serve_refuses_bad_options(tiny_model, tmp_path, capsys):
    assert main(["serve", str(tiny_model("llama")), "--adapter", "no-equals-sign"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["serve", "export", "--db", str(tmp_path / "missing.db"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
