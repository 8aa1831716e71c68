"""The HTML report in headless Chromium: per-stage peak memory, readable axes (round ticks, a
labelled x axis), smoothed curves over faint raw ones, and charts that use the page's width."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

from rlhflab.evals import report

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def round_step(values: list[float]) -> bool:
    """Evenly spaced by 1, 2, 2.5 or 5 times a power of ten."""
    gaps = [b - a for a, b in zip(values, values[1:])]
    if not gaps or max(gaps) - min(gaps) > 1e-9 * max(1.0, abs(max(gaps))):
        return False
    mantissa = gaps[0] / 10 ** math.floor(math.log10(gaps[0]))
    return any(abs(mantissa - m) < 1e-6 for m in (1, 2, 2.5, 5))


def test_report_in_chromium_shows_stage_memory_and_readable_axes(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium (Debian: apt-get install chromium)")
    run = tmp_path / "run"
    noise = random.Random(0)
    write(run / "sft" / "metrics.jsonl", "".join(
        json.dumps({"step": s, "loss": 3.0 / (1 + s / 20) + noise.uniform(-0.3, 0.3)}) + "\n" for s in range(1, 121)))
    write(run / "sft" / "summary.json", json.dumps({"steps": 120, "final_loss": 0.9, "peak_rss_mib": 812.5}))
    write(run / "rm" / "metrics.jsonl", "".join(
        json.dumps({"step": s, "loss": 0.7 - 0.01 * s, "accuracy": 0.5 + 0.01 * s}) + "\n" for s in range(7, 37, 7)))
    write(run / "rm" / "summary.json", json.dumps({"steps": 35, "peak_rss_mib": 431.0}))
    page_path = tmp_path / "report.html"
    page_path.write_text(report.render(run), encoding="utf-8")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(page_path.as_uri())
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

        memory = {row.locator("td").nth(0).inner_text(): row.locator("td").nth(-1).inner_text()
                  for row in page.locator("table").first.locator("tr").all()[1:]}
        assert memory == {"sft": "812.5", "rm": "431"}   # each stage's own figure

        charts = page.locator("svg.chart")
        assert charts.count() == 3   # sft loss, rm loss, rm accuracy
        content = page.evaluate("document.body.clientWidth")
        for i in range(charts.count()):
            chart = charts.nth(i)
            assert chart.bounding_box()["width"] > 0.4 * content   # two to a row across the page, not 520 px
            assert chart.locator("text.xlabel").text_content() == "optimizer step"
            for axis in ("ytick", "xtick"):
                ticks = [float(t.replace(",", "")) for t in chart.locator(f"text.{axis}").all_text_contents()]
                assert len(ticks) >= 2 and round_step(ticks), (axis, ticks)
        dense = charts.nth(0)
        assert dense.locator("polyline.raw").count() == 1 and dense.locator("polyline.smoothed").count() == 1
        assert float(dense.locator("polyline.raw").get_attribute("stroke-opacity")) < 0.5
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
