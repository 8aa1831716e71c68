"""The ranking page of `rlhflab label serve` in headless Chromium: sign in, order the answers with
the mouse (click and drag) and the keyboard, tie two, flag a rule, write a critique, submit, and
find exactly that ranking in the export. Nothing may be fetched from anywhere but the server."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from test_label_server import XSS, labeling, make_db

from rlhflab.cli.main import main

ANSWERS = ["Paris is the capital.", "It is Lyon.", XSS[0], "巴黎。", XSS[1]]


def test_rank_with_mouse_and_keyboard_and_export_exactly_that(browser, tmp_path):
    admin = make_db(tmp_path / "l.db", [("What is the capital of France?", ANSWERS)], overlap=1,
                    rules=("harmful", "wrong", "wrong language", "rude", "off-topic"))
    with labeling(tmp_path / "l.db") as (url, db):
        token = db.add_annotator("ann")
        page = browser.new_page()
        offline, dialogs = [], []
        page.on("request", lambda r: None if r.url.startswith(url) else offline.append(r.url))
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(url + "/rank")
        assert page.url.endswith("/login")
        page.fill("#token", "lbl-not-a-token")
        page.press("#token", "Enter")
        sync_api.expect(page.locator(".error")).to_contain_text("unknown token")
        page.fill("#token", token)
        page.click("button[type=submit]")
        sync_api.expect(page.locator("#task h1")).to_have_text("Task 1")
        assert page.title() != "pwned"
        # The answers are shown as text, under letters in a shuffled order.
        slot = {page.locator(f"#answer-{s} .text").text_content(): s for s in "ABCDE"}
        assert sorted(slot) == sorted(ANSWERS)

        def card(text):
            return page.locator(f"#answer-{slot[text]}")

        # Mouse: click "place next" for the best two, drag a third onto the list's end.
        card("Paris is the capital.").locator(".place-next").click()
        card("巴黎。").locator(".place-next").click()
        card("It is Lyon.").drag_to(page.locator("#order"))
        sync_api.expect(page.locator("#order li")).to_have_count(3)
        # Keyboard: the two scripts' letters, then `t` ties the last with the one above.
        page.locator("h1").click()
        page.keyboard.press(slot[XSS[0]].lower())
        page.keyboard.press(slot[XSS[1]].lower())
        page.keyboard.press("t")
        # Drag within the list: Lyon (3rd) onto the top half of the first item moves it to the top.
        first = page.locator("#order li").first
        page.locator(f"#order li[data-slot={slot['It is Lyon.']}]").drag_to(first, target_position={"x": 10, "y": 2})
        sync_api.expect(page.locator("#order li .letter")).to_have_text(
            [slot[t] for t in ("It is Lyon.", "Paris is the capital.", "巴黎。", XSS[0], XSS[1])])
        sync_api.expect(page.locator("#order li .level")).to_have_text(["1", "2", "3", "4", "4"])
        # Backspace takes the last back, the keyboard places it again (and `t` ties it again).
        page.keyboard.press("Backspace")
        sync_api.expect(page.locator("#order li")).to_have_count(4)
        page.keyboard.press(str("ABCDE".index(slot[XSS[1]]) + 1))
        page.keyboard.press("t")
        # Flag a rule and write a critique (typing in it must not place answers).
        card("It is Lyon.").locator(".rule[value=wrong]").check()
        card("It is Lyon.").locator("summary").click()
        card("It is Lyon.").locator(".critique").fill("Lyon is not the capital; abc t x")
        card("It is Lyon.").locator(".critique").press("a")
        page.locator("h1").click()
        page.keyboard.press("Enter")
        sync_api.expect(page.locator("#notice")).to_have_text("Label for task 1 stored.")
        sync_api.expect(page.locator("#all-done")).to_be_visible()
        assert dialogs == [] and page.title() != "pwned"

        # Reopened from "my labels", the page shows the stored label.
        page.click("a[href='/mine']")
        page.click("#mine a")
        sync_api.expect(page.locator("#order li .level")).to_have_text(["1", "2", "3", "4", "4"])
        sync_api.expect(card("It is Lyon.").locator(".rule[value=wrong]")).to_be_checked()
        page.close()
    assert offline == []

    out = tmp_path / "export"
    assert main(["label", "export", "--db", str(tmp_path / "l.db"), "--out", str(out)]) == 0
    (ranking,) = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert ranking["responses"][:3] == ["It is Lyon.", "Paris is the capital.", "巴黎。"]
    assert sorted(ranking["responses"][3:]) == sorted(XSS) and ranking["mean_positions"][3:] == [4.5, 4.5]
    pairs = [json.loads(line) for line in (out / "prefs.jsonl").read_text().splitlines()]
    assert len(pairs) == 10 - 1                       # every pair but the tied one
    rules = {r["response"]: r for r in map(json.loads, (out / "rules.jsonl").read_text().splitlines())}
    assert rules["It is Lyon."]["rules"]["wrong"] and not any(
        v for text, r in rules.items() for name, v in r["rules"].items() if (text, name) != ("It is Lyon.", "wrong"))
    assert rules["It is Lyon."]["critiques"] == ["Lyon is not the capital; abc t xa"]
    assert admin
