"""The README's main job, end to end, in its tiny preset."""

from __future__ import annotations

import json


def test_tiny_quickstart_runs_the_pipeline_and_reruns_without_redoing(cli, tmp_path):
    out = tmp_path / "qs"
    result = cli("quickstart", "--preset", "tiny", "--out", out, "--progress", "false", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {"base", "sft", "ppo", "dpo", "best-of-2"} == set(results["models"])
    for model in results["models"].values():
        assert 0.0 <= model["gold"] <= 1.0 and "language" in model["facets"]
    assert results["models"]["sft"]["kl_to_reference"] == 0.0  # SFT is its own reference
    assert "win_rate" in results["models"]["ppo"]["vs_baseline"]
    assert {"rm", "ppo", "dpo"} <= set(results["stages"]) and "hackable" in results["audit"]
    assert "gold" in result.stdout and "best-of-2" in result.stdout and "reward-model audit" in result.stdout
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "<svg" in report and "best-of-2" in report
    stamp = (out / "sft" / "summary.json").stat().st_mtime
    again = cli("quickstart", "--preset", "tiny", "--out", out, "--progress", "false", timeout=600)
    assert again.returncode == 0 and "done already" in again.stderr
    assert (out / "sft" / "summary.json").stat().st_mtime == stamp
