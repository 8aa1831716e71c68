"""`rlhflab report`: a hand-made run directory rendered to one self-contained, escaped HTML page."""

from __future__ import annotations

import json
import re

import pytest

from rlhflab import config as cfg
from rlhflab.errors import UsageError
from rlhflab.evals import report


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    write_jsonl(run / "sft" / "metrics.jsonl",
                [{"step": s, "loss": 3.0 / s, "lr": 1e-3, "note": "text is not plotted"} for s in (10, 20, 30)])
    write_json(run / "sft" / "summary.json", {"steps": 30, "wall_time_s": 12.5, "final_loss": 0.1,
                                              "tokens_per_s": 1000.0, "peak_rss_mib": 512.0})
    write_jsonl(run / "rm" / "metrics.jsonl", [{"step": 10, "loss": 0.6, "accuracy": 0.6},
                                               {"step": 20, "loss": 0.5, "accuracy": 0.7},
                                               {"step": 20, "eval_accuracy": 0.68, "eval_ece": 0.05}])
    write_json(run / "rm" / "summary.json", {"steps": 20, "eval_accuracy": 0.68, "eval_gold_accuracy": 0.9})
    write_json(run / "rm" / "audit.json", {
        "prompts": 4, "reference_mean_score": 0.5, "threshold": 0.05, "hackable": ["ramble"],
        "kinds": {"empty": {"wins": 0, "n": 4, "share": 0.0, "mean_score": -1.0},
                  "ramble": {"wins": 2, "n": 4, "share": 0.5, "mean_score": 0.9}}})
    ppo_rows = [{"step": s, "reward": 0.1 * s, "gold": 0.5 - 0.01 * s, "kl_k1": 0.01 * s, "kl_k3": 0.009 * s,
                 "response_len": 10 + s, "entropy": 2.0, "empty_rate": 0.0} for s in range(1, 6)]
    ppo_rows[3]["alarm"] = "reward rises while gold falls"
    ppo_rows.append("not a row")
    write_jsonl(run / "ppo" / "metrics.jsonl", ppo_rows)
    with (run / "ppo" / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        handle.write('{"step": 6, "rew')  # a line cut short by a killed process
    write_json(run / "ppo" / "summary.json",
               {"steps": 5, "alarms": [{"step": 4, "message": "reward rises while gold falls"}]})
    write_jsonl(run / "ppo" / "samples.jsonl",
                [{"step": s, "prompt": "2+2?", "response": f"answer at {s}", "reward": 0.1, "gold": 0.5}
                 for s in (1, 3, 5)])
    write_json(run / "results.json", {"models": {
        "base": {"gold": 0.2, "facets": {"correct": 0.1, "polite": 1.0}, "mean_chars": 7.0, "empty": 0.3},
        "sft": {"gold": 0.6, "facets": {"correct": 0.4, "polite": 1.0}, "mean_chars": 20.0, "empty": 0.0}},
        "stages": {}})
    prompts = [[{"role": "user", "content": "你好吗?"}],
               [{"role": "user", "content": "say <script>alert(1)</script>"}]]
    write_jsonl(run / "eval" / "pretrain.jsonl", [{"messages": m, "response": "…"} for m in prompts])
    write_jsonl(run / "eval" / "sft.jsonl", [{"messages": prompts[0], "response": "我很好,谢谢。"},
                                             {"messages": prompts[1], "response": "<script>bad()</script>"}])
    return run


def render(run) -> str:
    assert report.run(cfg.build(report.ReportConfig, {}, {"run_dir": str(run)})) == 0
    return (run / "report.html").read_text(encoding="utf-8")


def chart_titles(page: str) -> list[str]:
    return re.findall(r'<svg class="chart"[^>]*aria-label="([^"]*)"', page)


def test_full_run_renders_every_section(run_dir, capsys):
    page = render(run_dir)
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    titles = chart_titles(page)
    assert titles == ["loss", "lr",                        # sft; lr is one of its "other metrics"
                      "loss", "accuracy", "eval_ece",      # rm
                      "reward", "gold score", "KL to the reference", "response length (tokens)", "entropy",
                      "empty answers"]                     # ppo
    assert page.count("<svg") == len(titles)
    assert page.count('class="alarm"') == 6  # every ppo chart marks step 4, once
    assert "alarm at step 4: reward rises while gold falls" in page
    assert re.search(r'<tr class="hackable"><td>ramble <span class="flag">HACKABLE', page)
    assert "unreadable line(s) skipped" in page and "ppo" in page
    assert "answer at 5" in page and "2+2?" in page
    assert "我很好,谢谢。" in page and "你好吗?" in page
    assert "<script>" not in page and "&lt;script&gt;bad()&lt;/script&gt;" in page
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "text is not plotted" not in page
    assert page.index('id="stage-sft"') < page.index('id="stage-rm"') < page.index('id="stage-ppo"')


def test_one_stage_still_renders(tmp_path):
    run = tmp_path / "single"
    write_jsonl(run / "pretrain" / "metrics.jsonl", [{"step": 1, "loss": 5.0}])
    page = render(run)
    assert chart_titles(page) == ["loss"] and "unfinished" in page


def test_out_option_and_bad_directories(run_dir, tmp_path):
    out = tmp_path / "elsewhere" / "page.html"
    assert report.run(report.ReportConfig(run_dir=str(run_dir), out=str(out))) == 0
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert report.run(report.ReportConfig(run_dir=str(run_dir), out=str(out.parent))) == 0   # a directory
    assert (out.parent / "report.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no stage directories"):
        report.run(report.ReportConfig(run_dir=str(tmp_path / "empty")))
    with pytest.raises(UsageError, match="missing: no such directory"):
        report.run(report.ReportConfig(run_dir=str(tmp_path / "missing")))
    with pytest.raises(UsageError, match="looks like one stage"):
        report.run(report.ReportConfig(run_dir=str(run_dir / "sft")))
    with pytest.raises(UsageError, match="give a run directory"):
        report.run(report.ReportConfig())


def test_the_page_parses_as_balanced_html(run_dir):
    """A headless stand-in for opening it in a browser (none is installed here): every element
    opened is closed in order, and the plots and tables are real elements, not text."""
    from html.parser import HTMLParser

    void = {"meta", "br", "hr", "img", "input", "link", "col", "wbr"}

    class Strict(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.counts, self.errors = [], {}, []

        def handle_starttag(self, tag, attrs):
            self.counts[tag] = self.counts.get(tag, 0) + 1
            if tag not in void:
                self.stack.append(tag)

        def handle_startendtag(self, tag, attrs):
            self.counts[tag] = self.counts.get(tag, 0) + 1

        def handle_endtag(self, tag):
            if not self.stack or self.stack[-1] != tag:
                self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            else:
                self.stack.pop()

    parser = Strict()
    parser.feed(render(run_dir))
    parser.close()
    assert not parser.errors and not parser.stack, (parser.errors[:5], parser.stack)
    assert parser.counts.get("svg", 0) >= 10 and parser.counts.get("table", 0) >= 3
    assert parser.counts.get("polyline", 0) + parser.counts.get("path", 0) >= 10


def test_the_figures_rlhflab_eval_wrote_are_shown(tmp_path):
    """Without the quickstart's results.json, `rlhflab eval --out RUN/eval` output is the table,
    with the columns eval prints (reward-model score, win rate, KL) where a model has them."""
    run = tmp_path / "run"
    write_json(run / "sft" / "summary.json", {"steps": 2})
    write_json(run / "eval" / "figures.json", {"prompts": "p.jsonl", "n": 3, "models": {
        "sft": {"gold": 0.61, "rm_score": 1.25, "kl_to_reference": 0.0, "mean_chars": 20.0, "empty": 0.0},
        "ppo": {"gold": 0.66, "rm_score": 1.75, "kl_to_reference": 0.4, "vs_baseline": {"win_rate": 0.7},
                "mean_chars": 18.0, "empty": 0.0}}})
    page = render(run)
    assert "Held-out evaluation" in page and "win rate" in page and "KL to ref." in page
    assert ">1.75<" in page and ">0.7<" in page
