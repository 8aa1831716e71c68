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


def test_killed_during_ppo_the_rerun_skips_finished_stages(tmp_path):
    """Kill the quickstart once PPO has started; running it again must not redo the earlier stages."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = tmp_path / "qs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "rlhflab.cli.main", "quickstart", "--preset", "tiny", "--out", str(out),
            "--progress", "false"]
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (out / "ppo" / "config.yaml").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (out / "rm" / "summary.json").exists() and not (out / "dpo" / "summary.json").exists()
    stamps = {name: (out / name / "summary.json").stat().st_mtime for name in ("pretrain", "sft", "rm")}
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("world", "tokenizer", "pretrain", "sft", "rm", "audit"):
        assert f"== {name}: done already" in again.stderr, name
    assert all((out / name / "summary.json").stat().st_mtime == t for name, t in stamps.items())
    assert (out / "ppo" / "summary.json").exists() and (out / "results.json").exists()
