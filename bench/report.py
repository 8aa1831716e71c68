"""Writes bench/RESULTS.md from the figures bench/run.py collected (medians, ratios, targets).

    .venv/bin/python bench/report.py bench/work/results/<date>.json   # re-render a saved run

Text below the NOTES marker in an existing RESULTS.md (profiles, explanations) is kept.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import mfu

NOTES = "<!-- Everything below this line is written by hand and kept when bench/run.py rewrites this file. -->"
ROOT = str(Path(__file__).resolve().parent.parent) + "/"
UNITS = {"tokens_per_s": "tokens/s", "pairs_per_s": "pairs/s", "seconds_per_step": "s/step",
         "peak_rss_mib": "peak RSS MiB"}


def kept_notes(path: Path) -> str:
    if not path.exists():
        return ""
    text = path.read_text(encoding="utf-8")
    return text.split(NOTES, 1)[1].strip("\n") if NOTES in text else ""


GPU_HEADING, GPU_END = "## GPU (bf16)\n", "\n## Settings and exact commands"
KEPT_GPU = "The figures of an earlier run:\n\n"


def kept_gpu(path: Path) -> str:
    """The GPU section of an earlier RESULTS.md when it holds measurements, else "": a run on a
    machine without a GPU must not erase figures measured on one."""
    if not path.exists():
        return ""
    section, ended, _ = path.read_text(encoding="utf-8").partition(GPU_HEADING)[2].partition(GPU_END)
    section = section.strip("\n")
    if KEPT_GPU in section:   # kept by a run before, itself without a GPU
        return section.partition(KEPT_GPU)[2]
    return section if ended and not section.startswith("Not measured") else ""


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def side_summary(workload: dict, side: str) -> dict:
    runs = [r for r in workload["runs"] if r["side"] == side]
    ok = [r for r in runs if "error" not in r]
    metric = workload["metric"]
    pick = (lambda r: r["peak_rss_mib"]) if metric == "peak_rss_mib" else (lambda r: r.get(metric))
    return {"n": len(ok), "failed": len(runs) - len(ok), "values": [pick(r) for r in ok],
            "metric": median([pick(r) for r in ok]), "final_loss": median([r.get("final_loss") for r in ok]),
            "peak_rss_mib": median([r["peak_rss_mib"] for r in ok]),
            "train_time_s": median([r.get("train_time_s") for r in ok]),
            "reference_time_s": median([r.get("reference_time_s") for r in ok]),
            "outside_training_s": median([r.get("outside_training_s") for r in ok]),
            "seconds_per_step": median([r.get("seconds_per_step") for r in ok]),
            "final_reward": median([r.get("final_reward") for r in ok]),
            "errors": [r["error"] for r in runs if "error" in r], "command": ok[-1]["command"] if ok else
            (runs[-1]["command"] if runs else "")}


def ratio(metric: str, ours, theirs):
    """Speed-up for throughput and s/step (higher is better); memory share for peak RSS (lower is better)."""
    if ours is None or theirs is None or not ours or not theirs:
        return None
    if metric == "seconds_per_step":
        return theirs / ours
    return ours / theirs


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def rows(results: dict) -> list[dict]:
    out = []
    for workload in results["workloads"]:
        if workload.get("pending"):
            out.append({"workload": workload["name"], "model": workload["model"], "metric": UNITS[workload["metric"]],
                        "pending": workload["pending"]})
            continue
        ours = side_summary(workload, workload["sides"][0])
        for peer in workload["sides"][1:]:
            theirs = side_summary(workload, peer)
            r = ratio(workload["metric"], ours["metric"], theirs["metric"])
            targeted = workload["targeted_peer"] in ("*", peer)
            target = workload["target"] if targeted else None
            memory = workload["metric"] == "peak_rss_mib"
            met = None if target is None or r is None else (r <= target if memory else r >= target)
            if workload["parity"] and ours["final_loss"] is not None and theirs["final_loss"] is not None:
                gap = abs(ours["final_loss"] - theirs["final_loss"]) / abs(theirs["final_loss"])
                parity = f"{'yes' if gap <= 0.05 else 'NO'} ({gap:.1%})"
            else:
                parity = "n/a (RL: sampled rollouts differ)" if not workload["parity"] else "—"
            shares = [side_mfu(results, workload, side, summary) for side, summary in
                      ((workload["sides"][0], ours), (peer, theirs))]
            out.append({"workload": workload["name"], "model": workload["model"], "metric": UNITS[workload["metric"]],
                        "peer": peer, "ours": ours, "theirs": theirs, "ratio": r, "memory": memory,
                        "target": target, "met": met, "parity": parity, "mfu": shares})
    return out


def side_mfu(results: dict, workload: dict, side: str, summary: dict) -> str:
    """CPU MFU of one side (bench/mfu.py), as text; "—" when the run has no peak or token counts."""
    peak = (results.get("peak") or {}).get("gflops")
    got = mfu.mfu(workload["name"], side, workload["model"], workload["metric"], summary["metric"],
                  summary["seconds_per_step"], results.get("work_stats") or {}, peak)
    return "—" if got is None else f"{got['mfu']:.0%}"


def mfu_note(results: dict) -> str:
    peak = results.get("peak") or {}
    if not peak.get("gflops"):
        return f"CPU MFU: not measured ({peak.get('error', 'this run has no peak measurement')[:300]})."
    return (f"CPU MFU: the model FLOPs each row's method needs per second (`bench/mfu.py` has the formula per "
            f"stage: 6 per matmul parameter per trained token, 2 per scored or generated token, the LM head only "
            f"where a loss or the sampler reads it, a shared prompt once) over the peak of this machine measured at "
            f"the start of this run: a {peak['size']}x{peak['size']} fp32 matmul at {peak['threads']} thread(s), "
            f"{peak['gflops']:.1f} GFLOP/s (median of {', '.join(f'{v:.1f}' for v in peak['runs'])}). Both sides of "
            f"a row are counted with the same formula (work needed, not work done); the critic is the row's own "
            f"design. Memory rows use the side's s/step."
            + (f" Token counts of the data failed, so no row has one: {results['work_stats']['error'][-300:]}"
               if "error" in (results.get("work_stats") or {}) else ""))


def table(results: dict) -> str:
    lines = ["| workload | model | metric | rlhflab | peer | peer value | ratio | target | met? | final loss rlhflab / peer "
             "| parity | CPU MFU rlhflab / peer |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows(results):
        if "pending" in row:
            lines.append(f"| {row['workload']} | {row['model']} | {row['metric']} | pending | — | — | — | — | — | — | "
                         f"{row['pending']} | — |")
            continue
        kind = "x memory" if row["memory"] else "x speed"
        target = "—" if row["target"] is None else (f"≤ {row['target']}x memory" if row["memory"]
                                                     else f"≥ {row['target']}x")
        met = "—" if row["met"] is None else ("yes" if row["met"] else "**NO**")
        ratio_text = "—" if row["ratio"] is None else f"{row['ratio']:.3f}"
        failed = "".join(f" ({s['failed']} failed)" for s in (row["ours"], row["theirs"]) if s["failed"])
        lines.append(
            f"| {row['workload']} | {row['model']} | {row['metric']} | {fmt(row['ours']['metric'])} | {row['peer']} | "
            f"{fmt(row['theirs']['metric'])}{failed} | {ratio_text}{kind} | {target} | {met} | "
            f"{fmt(row['ours']['final_loss'], 4)} / {fmt(row['theirs']['final_loss'], 4)} | {row['parity']} | "
            f"{row['mfu'][0]} / {row['mfu'][1]} |")
    return "\n".join(lines)


def details(results: dict) -> str:
    lines = ["| workload | side | runs (metric) | training s | reference pass s | outside training s | "
             "peak RSS MiB | s/step | final reward |", "|---|---|---|---|---|---|---|---|---|"]
    for workload in results["workloads"]:
        if workload.get("pending"):
            continue
        for side in workload["sides"]:
            s = side_summary(workload, side)
            values = ", ".join(fmt(v) for v in s["values"]) or "—"
            lines.append(f"| {workload['name']} | {side} | {values} | {fmt(s['train_time_s'])} | "
                         f"{fmt(s['reference_time_s'])} | {fmt(s['outside_training_s'])} | {fmt(s['peak_rss_mib'])} | "
                         f"{fmt(s['seconds_per_step'])} | {fmt(s['final_reward'])} |")
    return "\n".join(lines)


def commands(results: dict) -> str:
    out = []
    for workload in results["workloads"]:
        if workload.get("pending"):
            continue
        at = f" (rlhflab at {workload['commit']})" if workload.get("commit") else ""
        out.append(f"**{workload['name']}**{at} — {workload['notes']}\n")
        for side in workload["sides"]:
            s = side_summary(workload, side)
            out.append(f"- {side}: `{s['command'].replace(ROOT, '')}`")
            out += [f"  - failed run: {e.replace(ROOT, '')}" for e in s["errors"]]
        out.append("")
    return "\n".join(out)


def gpu(results: dict, kept: str = "") -> str:
    section = results.get("gpu") or {}
    if not section.get("measured"):
        reason = section.get("reason", "no GPU on this machine")
        if kept:   # an earlier run's GPU figures, which this run could not replace
            return f"Not measured in this run: {reason}. {KEPT_GPU}{kept}"
        return f"Not measured: {reason}."
    lines = [f"Device: {section.get('device')} (torch {section.get('torch', '?')}), dtype bf16, model "
             f"{section.get('model')} ({section.get('parameters', 0) / 1e6:.0f}M parameters), one GPU.", "",
             "| workload | trained tokens/s | pairs/s | s/RL step | generated tokens/s | MFU | peak GPU memory MiB |",
             "|---|---|---|---|---|---|---|"]
    for name, figures in section.get("workloads", {}).items():
        if "error" in figures:
            lines.append(f"| {name} | failed: {figures['error'].strip().splitlines()[-1][:120]} | | | | | |")
            continue
        lines.append(f"| {name} | {fmt(figures.get('tokens_per_s'))} | {fmt(figures.get('pairs_per_s'))} | "
                     f"{fmt(figures.get('seconds_per_step'))} | {fmt(figures.get('generated_tokens_per_s'))} | "
                     f"{fmt(figures.get('mfu'), 3)} | {fmt(figures.get('peak_cuda_mib'))} |")
    return "\n".join(lines)


def render(results: dict, notes: str = "", kept_gpu_section: str = "") -> str:
    m = results["machine"]
    versions = "\n".join(f"- {name}: {v}" for name, v in m["versions"].items())
    quick = "\n> **--quick run: one short run per side, a smoke test of the harness, not a result.**\n" \
        if results["quick"] else ""
    return f"""# Benchmarks: rlhflab against its peers

Written by `bench/run.py` on {results['date']} (suite: {results['suite_s'] / 60:.1f} min). Regenerate with
`make bench` (or `.venv/bin/python bench/run.py`) whenever a stage gets faster.
{quick}
**Machine.** {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, no GPU, Python {m['python']}; rlhflab
at commit {m['commit']}. The machine is **shared with other developers** (load average
{' / '.join(map(str, m['load_at_start']))} at the start, {' / '.join(map(str, m.get('load_at_end', [])))} at the end): timings are
noisy. Runs alternate rlhflab, peer, rlhflab, peer ... so that drift hits every side alike; each
figure is the median of {results['repeats']} run(s). Every side runs with {results['threads']} torch thread(s)
(OMP_NUM_THREADS/MKL_NUM_THREADS): with two OpenMP threads on two cores that other processes also use,
one busy core stalls every parallel region (measured here: a 6M-model training step went from
0.3 s with one thread to 1.5 s with two while a test suite ran), which would measure the neighbours,
not the code.

Versions:
{versions}

## Results (CPU, fp32)

{table(results)}

{mfu_note(results)}

Ratio: speed-up of rlhflab over the peer (tokens/s, pairs/s: rlhflab / peer; s/step: peer / rlhflab);
for memory, rlhflab's peak RSS as a share of the peer's (lower is better). Final loss: mean of the
last quarter of the steps (at least 5; one batch alone is noisy, and the sides order their batches
differently); parity asks for them within 5%. Peak RSS is the
child process's ru_maxrss (wait4), read the same way for every side. Model load is excluded from
every throughput: rlhflab times its training loop, the TRL scripts time `trainer.train()` from
`on_train_begin` to `on_train_end` (or the loop of `PPOTrainer.step` calls); what each process spent
outside training (imports, load, tokenising, saving) is in the table below.

### Per side

{details(results)}

## GPU (bf16)

{gpu(results, kept_gpu_section)}

## Settings and exact commands

Paths are relative to the repository root; `bench/work/` holds the fixtures (`bench/fixtures.py`).
Every side gets the same data files, model directory, batch size, learning rate, maximum length and
number of steps. Peer settings: fp32 (`bf16=False`), `gradient_checkpointing=False` (TRL 1.16
defaults both on), `dataloader_num_workers=0`, `report_to="none"`, no checkpoint saving,
`logging_steps=1`, AdamW betas 0.9/0.95 and clipping at 1.0 as rlhflab (TRL 1.16 keeps its default
optimizer implementation, `adamw_torch_fused`; TRL 0.11.4 gets a plain `torch.optim.AdamW`), cosine
decay without warm-up on both sides (rlhflab runs with `--warmup-ratio 0`; constant rate for RL).
Fastest honest settings: batches grouped by length (`train_sampling_strategy="group_by_length"`,
for SFT, RM and DPO); padding-free and packing left off (without FlashAttention, on a CPU, they
would let packed sequences attend to each other);
DPO with the reference log-probs precomputed, in batches of 2 x the training batch as rlhflab;
generation in one batch of all prompts (TRL 0.11's default is 4 at a time); no vLLM on a CPU.

{commands(results)}
{NOTES}

{notes}
"""


if __name__ == "__main__":
    saved = json.loads(Path(sys.argv[1]).read_text())
    target = Path(__file__).resolve().parent / "RESULTS.md"
    target.write_text(render(saved, kept_notes(target)), encoding="utf-8")
    print(table(saved))
