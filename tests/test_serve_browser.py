"""The chat page of `rlhflab serve` in headless Chromium: type, watch the answer stream in, vote
(thumbs and "which of two answers is better"), and find the votes in the log database."""

from __future__ import annotations

import json
import sqlite3

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from test_serve import make_adapter, serving

from rlhflab.infer.convlog import ConversationLog
from rlhflab.infer.server import ServeConfig, load_models


def test_chat_page_streams_an_answer_and_stores_votes(browser, tiny_model, tmp_path):
    base = tiny_model("llama")
    adapter = make_adapter(base, tmp_path / "adapter")
    models = load_models(ServeConfig(model=str(base), adapter=f"lora-a={adapter}", name="tiny", device="cpu"))
    log = ConversationLog(tmp_path / "log.db")
    offline = []
    with serving(models, log) as (url, _):
        page = browser.new_page()
        # Nothing may come from anywhere but the server: the page must work offline.
        page.on("request", lambda r: None if r.url.startswith(url) else offline.append(r.url))
        page.goto(url + "/")
        sync_api.expect(page.locator("#model option")).to_have_count(2)
        page.select_option("#model", "lora-a")
        page.fill("#temperature", "1")
        page.fill("#max-tokens", "12")
        page.click("#system-box summary")
        page.fill("#system", "你是一个乐于助人的助手。")
        page.fill("#input", "你好")
        page.press("#input", "Enter")

        sync_api.expect(page.locator(".message.user")).to_have_text("你好")
        answer = page.locator(".message.assistant .text").first
        sync_api.expect(page.locator(".message.assistant .thumb-up")).to_have_count(1)   # streamed to the end
        first_text = answer.text_content()
        assert first_text
        page.click(".thumb-up")
        sync_api.expect(page.locator("#status")).to_have_text("vote stored")

        page.click("#regenerate")
        sync_api.expect(page.locator(".pair .message.assistant")).to_have_count(2)
        sync_api.expect(page.locator("#compare")).to_be_visible()
        sync_api.expect(page.locator(".pair .thumb-up")).to_have_count(2)
        second_text = page.locator(".pair .message.assistant .text").nth(1).text_content()
        page.click("#compare [data-pick='1']")     # B, the regenerated answer, is better
        sync_api.expect(page.locator("#compare")).to_be_hidden()
        sync_api.expect(page.locator(".message.assistant")).to_have_count(1)
        page.close()

    db = sqlite3.connect(tmp_path / "log.db")
    exchanges = db.execute("SELECT id, model, messages, answers, conversation FROM exchanges ORDER BY created").fetchall()
    assert len(exchanges) == 2
    (first_id, model, messages, answers, conversation), second = exchanges
    assert model == "lora-a" and conversation and second[4] == conversation
    assert json.loads(messages) == [{"role": "system", "content": "你是一个乐于助人的助手。"},
                                    {"role": "user", "content": "你好"}]
    assert json.loads(answers) == [first_text] and json.loads(second[3]) == [second_text]
    assert db.execute("SELECT exchange, value FROM feedback WHERE kind = 'rating'").fetchall() == [(first_id, 1)]
    assert db.execute("SELECT exchange, other_exchange FROM feedback WHERE kind = 'compare'").fetchall() == \
        [(second[0], first_id)]
    db.close()
    log.close()
    assert offline == []
