"""`rlhflab report RUN_DIR`: one self-contained HTML page of what a run did.

It reads what the stages left behind (metrics.jsonl, summary.json, rm/audit.json, the RL probe
answers in samples.jsonl, results.json and eval/<model>.jsonl) and draws the curves as inline
SVG, so the page opens offline and can be mailed as one file. A run may hold any subset of
stages: what exists is shown, what is missing is skipped, and what cannot be read is listed at
the top of the page rather than stopping the report.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from rlhflab.config import opt
from rlhflab.errors import UsageError
from rlhflab.evals.page import esc, fmt, is_number, number_cell, prompt_text, read_json, read_jsonl, table, text_cell
from rlhflab.evals.story import run_facts, story_section
from rlhflab.runs import atomic_write_text

STAGE_ORDER = ("pretrain", "sft", "rm", "ppo", "grpo", "dpo")

# Metrics drawn together on one chart, in this order; any other numeric metric goes under "other metrics".
CHARTS = (
    ("loss", ("loss", "eval_loss")),
    ("accuracy", ("accuracy", "eval_accuracy", "eval_gold_accuracy")),
    ("reward", ("reward",)),
    ("gold score", ("gold",)),
    ("KL to the reference", ("kl_k1", "kl_k3")),
    ("response length (tokens)", ("response_len",)),
    ("entropy", ("entropy",)),
    ("empty answers", ("empty_rate",)),
)

# Overview columns: (heading, summary.json keys tried in order).
OVERVIEW = (
    ("steps", ("steps",)),
    ("wall time (s)", ("wall_time_s",)),
    ("final loss", ("final_loss",)),
    ("tokens/s", ("tokens_per_s",)),
    ("peak RSS (MiB)", ("peak_rss_mib", "peak_rss_mb")),
    ("peak CUDA (MiB)", ("peak_cuda_mib",)),
)

ANSWER_PROMPTS = 12     # held-out prompts shown side by side
PROBE_PROMPTS = 8       # probe prompts shown per RL stage
PROBE_CHECKPOINTS = 6   # steps shown per probe prompt, spread over training
MAX_POINTS = 1500       # points per curve; longer logs are thinned to keep the page light

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf")

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1, h2, h3 { font-weight: 600; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; } td, th { border: 1px solid #ddd; padding: .25em .5em;
  vertical-align: top; text-align: left; } th { background: #f5f5f5; } td.num { text-align: right;
  font-variant-numeric: tabular-nums; }
.text { white-space: pre-wrap; max-width: 40em; } .empty { color: #999; font-style: italic; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: .5em; }
svg.chart { width: 100%; height: auto; background: #fff; border: 1px solid #eee; }
tr.hackable td { background: #fde2e2; } .flag { color: #c00; font-weight: 600; }
.notes { background: #fff8e1; border: 1px solid #f0d98c; padding: .5em 1em; } .alarms { color: #c00; }
"""


@dataclass
class ReportConfig:
    """Write one self-contained HTML page of a run: curves, reward-model audit, eval table, answers."""

    stage = "report"
    run_dir: str | None = opt(None, "run directory to report on, e.g. runs/quickstart")
    out: str | None = opt(None, "HTML file to write (default: RUN_DIR/report.html)")


# ---------------------------------------------------------------------------------------------
# Finding the stages (what each left behind is read by page.py's forgiving readers).


def stage_sort_key(name: str) -> tuple:
    base, _, number = name.partition("-round-")
    base = base if base in STAGE_ORDER else base.split("-")[0]   # rm-short, ppo-guarded: with rm, ppo
    rank = STAGE_ORDER.index(base) if base in STAGE_ORDER else len(STAGE_ORDER)
    return rank, int(number) if number.isdigit() else -1, name


def find_stages(run_dir: Path) -> list[Path]:
    """Stage directories: those holding metrics.jsonl or summary.json, in recipe order."""
    stages = [p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
              and ((p / "metrics.jsonl").is_file() or (p / "summary.json").is_file())]
    return sorted(stages, key=lambda p: stage_sort_key(p.name))


def check_run_dir(name: str | None) -> Path:
    if not name:
        raise UsageError("give a run directory: `rlhflab report RUN_DIR` or --run-dir RUN_DIR (e.g. runs/quickstart)")
    run_dir = Path(name).expanduser()
    if not run_dir.exists():
        raise UsageError(f"{name}: no such directory")
    if not run_dir.is_dir():
        raise UsageError(f"{name} is a file; give the run directory")
    if not find_stages(run_dir):
        hint = ""
        if (run_dir / "metrics.jsonl").is_file() or (run_dir / "summary.json").is_file():
            hint = f"; it looks like one stage, give its run directory ({run_dir.parent})"
        raise UsageError(f"{name}: no stage directories (a stage directory holds metrics.jsonl or "
                         f"summary.json){hint}")
    return run_dir


# ---------------------------------------------------------------------------------------------
# Charts: plain SVG polylines, with alarm steps as dashed vertical lines.


def series(rows: list[dict], key: str) -> list[tuple[float, float]]:
    points = [(row["step"], row[key]) for row in rows if is_number(row.get("step")) and is_number(row.get(key))]
    if len(points) > MAX_POINTS:
        stride = math.ceil(len(points) / MAX_POINTS)
        points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
    return points


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if low == high:
        return low - 0.5, high + 0.5
    pad = (high - low) * 0.05
    return low - pad, high + pad


def nice_ticks(low: float, high: float, count: int = 5, whole: bool = False) -> tuple[list[float], int]:
    """Ticks on round values (1, 2, 2.5 or 5 times a power of ten) inside [low, high], as close to
    `count` of them as such steps allow, and the decimals their labels need; `whole`: integers (steps)."""
    exponent = math.floor(math.log10(max(high - low, 1e-12) / count))
    steps = [(m * 10.0 ** e, m) for e in (exponent - 1, exponent, exponent + 1) for m in (1, 2, 2.5, 5)]
    if whole:
        steps = [(step, m) for step, m in steps if step >= 1 and step == int(step) and m != 2.5] or [(1.0, 1)]

    def ticks(step):
        return range(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1)

    step, mantissa = min(steps, key=lambda s: (abs(len(ticks(s[0])) - count), -s[0]))
    decimals = 0 if whole else max(0, -math.floor(math.log10(step) + 1e-9) + (mantissa == 2.5))
    return [round(k * step, decimals + 6) for k in ticks(step)] or [low, high], decimals


def smoothed(line: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """An exponential moving average of a noisy curve (debiased at its start), its weight growing
    with the number of points: the trend in view, the raw curve drawn faintly under it."""
    weight = min(0.95, max(0.0, 1 - 10 / len(line)))
    out, average = [], 0.0
    for n, (x, y) in enumerate(line, 1):
        average = weight * average + (1 - weight) * y
        out.append((x, average / (1 - weight ** n)))
    return out


SMOOTH_FROM = 30        # a curve with this many points gets a smoothed line over its faint raw one


def line_chart(title: str, lines: dict[str, list[tuple[float, float]]], marks: list[tuple[float, str]]) -> str:
    width, height, left, right, top, bottom = 560, 240, 58, 14, 30, 40
    points = [p for line in lines.values() for p in line]
    x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
    if x0 == x1:
        x0, x1 = x0 - 0.5, x1 + 0.5
    y0, y1 = _span([y for _, y in points])

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" preserveAspectRatio="xMidYMid meet" '
             f'role="img" aria-label="{esc(title)}"><title>{esc(title)}</title>',
             f'<text x="{left}" y="16" font-size="13" font-weight="600">{esc(title)}</text>']
    y_ticks, decimals = nice_ticks(y0, y1)
    for y in y_ticks:
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>'
                     f'<text class="ytick" x="{left - 4}" y="{sy(y) + 4:.1f}" font-size="10" text-anchor="end">'
                     f'{y:.{decimals}f}</text>')
    x_ticks, _ = nice_ticks(x0, x1, 6, whole=True)
    for x in x_ticks:
        parts.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{height - bottom}" y2="{height - bottom + 4}" '
                     f'stroke="#999"/><text class="xtick" x="{sx(x):.1f}" y="{height - bottom + 15}" font-size="10" '
                     f'text-anchor="middle">{x:,.0f}</text>')
    parts.append(f'<text class="xlabel" x="{(left + width - right) / 2:.1f}" y="{height - 4}" font-size="11" '
                 'text-anchor="middle">optimizer step</text>')
    for step, message in marks:
        if x0 <= step <= x1:
            parts.append(f'<line class="alarm" x1="{sx(step):.1f}" x2="{sx(step):.1f}" y1="{top}" '
                         f'y2="{height - bottom}" stroke="#d62728" stroke-dasharray="4 3">'
                         f'<title>alarm at step {esc(fmt(step))}: {esc(message)}</title></line>')
    for slot, (name, line) in enumerate(lines.items()):
        color = COLORS[slot % len(COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line)
        if len(line) >= SMOOTH_FROM:
            trend = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in smoothed(line))
            parts.append(f'<polyline class="raw" fill="none" stroke="{color}" stroke-opacity="0.25" '
                         f'stroke-width="1" points="{coords}"/>'
                         f'<polyline class="smoothed" fill="none" stroke="{color}" stroke-width="2" points="{trend}"/>')
        else:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        if len(line) < 30:  # sparse series (end-of-training evals) would be invisible as a line
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in line]
        parts.append(f'<text x="{width - right - 130 * (len(lines) - 1 - slot)}" y="16" font-size="11" '
                     f'fill="{color}" text-anchor="end">{esc(name)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
                 'fill="none" stroke="#999"/></svg>')
    return "".join(parts)


def stage_charts(rows: list[dict], marks: list[tuple[float, str]]) -> str:
    charts, used = [], {"step"}
    for title, keys in CHARTS:
        lines = {key: series(rows, key) for key in keys}
        lines = {key: line for key, line in lines.items() if line}
        used.update(keys)
        if lines:
            charts.append(line_chart(title, lines, marks))
    others = sorted({k for row in rows for k, v in row.items() if k not in used and is_number(v)})
    extra = [line_chart(key, {key: series(rows, key)}, marks) for key in others]
    out = f'<div class="charts">{"".join(charts)}</div>' if charts else ""
    if extra:
        out += (f'<details><summary>other metrics ({esc(", ".join(others))})</summary>'
                f'<div class="charts">{"".join(extra)}</div></details>')
    return out


# ---------------------------------------------------------------------------------------------
# Sections.


def stage_alarms(rows: list[dict], summary: dict | None) -> list[tuple[float, str]]:
    found = [(row["step"], row["alarm"]) for row in rows if isinstance(row.get("alarm"), str)
             and is_number(row.get("step"))]
    for alarm in (summary or {}).get("alarms") or []:
        if isinstance(alarm, dict) and is_number(alarm.get("step")):
            found.append((alarm["step"], str(alarm.get("message", ""))))
    return sorted(set(found))


def overview_section(stages: list[Path], summaries: dict[str, dict | None]) -> str:
    """One row per stage; a column only some stages could have (peak CUDA memory) shows when one has it."""
    columns = [(head, keys) for head, keys in OVERVIEW if head != "peak CUDA (MiB)"
               or any(s and any(k in s for k in keys) for s in summaries.values())]
    rows = []
    for stage in stages:
        summary = summaries[stage.name]
        status = "finished" if summary is not None else "unfinished (no summary.json)"
        cells = [number_cell(next((summary[k] for k in keys if k in summary), None) if summary else None)
                 for _, keys in columns]
        rows.append(f"<tr><td>{esc(stage.name)}</td><td>{esc(status)}</td>{''.join(cells)}</tr>")
    return ("<h2>Stages</h2><p>Peak memory is each stage's own, counted from its start.</p>"
            + table(["stage", "status"] + [h for h, _ in columns], rows))


def summary_tables(summary: dict) -> str:
    """Headline figures (final_*, eval_*) in view; every other plain figure folded away."""
    scalars = {k: v for k, v in summary.items() if v is None or isinstance(v, (int, float, str, bool))}
    headline = {k: v for k, v in scalars.items() if k.startswith(("final_", "eval_"))}
    rest = {k: v for k, v in scalars.items() if k not in headline}

    def rows(figures):
        return [f"<tr><td>{esc(k)}</td>{number_cell(v) if is_number(v) else f'<td>{esc(fmt(v))}</td>'}</tr>"
                for k, v in figures.items()]

    out = table(["figure", "value"], rows(headline)) if headline else ""
    if rest:
        out += f"<details><summary>summary.json</summary>{table(['figure', 'value'], rows(rest))}</details>"
    return out


def audit_section(audit: dict) -> str:
    kinds = audit.get("kinds")
    if not isinstance(kinds, dict):
        return ""
    hackable = set(audit.get("hackable") or [])
    threshold = audit.get("threshold", 0.05)
    rows = []
    for kind, entry in kinds.items():
        entry = entry if isinstance(entry, dict) else {}
        flag = '<span class="flag">HACKABLE</span>' if kind in hackable else ""
        row_class = ' class="hackable"' if kind in hackable else ""
        rows.append(f"<tr{row_class}><td>{esc(kind)} {flag}</td>{number_cell(entry.get('share'))}"
                    f"{number_cell(entry.get('mean_score'))}</tr>")
    verdict = (f"hackable: {', '.join(sorted(hackable))}" if hackable
               else f"no kind above {fmt(threshold)}")
    intro = (f"<p>Share of {esc(fmt(audit.get('prompts')))} prompts where a degenerate answer scores at least as "
             f"high as the reference answer (reference mean score {esc(fmt(audit.get('reference_mean_score')))}); "
             f"a kind above {esc(fmt(threshold))} is hackable. Verdict: <b>{esc(verdict)}</b>.</p>")
    return "<h3>Reward-model audit</h3>" + intro + table(["kind", "share", "mean score"], rows)


def spread(values: list, count: int) -> list:
    """At most `count` values, evenly spread, first and last included."""
    if len(values) <= count:
        return values
    return [values[round(i * (len(values) - 1) / (count - 1))] for i in range(count)]


def probes_section(rows: list[dict]) -> str:
    by_prompt: dict[str, dict] = {}
    for row in rows:
        if is_number(row.get("step")):
            by_prompt.setdefault(str(row.get("prompt", "")), {})[row["step"]] = row
    if not by_prompt:
        return ""
    parts = [f"<h3>Probe answers during training</h3><p>{len(by_prompt)} probe prompts, answered greedily; "
             f"up to {PROBE_CHECKPOINTS} checkpoints each.</p>"]
    for prompt, answers in list(by_prompt.items())[:PROBE_PROMPTS]:
        lines = [f"<tr><td class=\"num\">{esc(fmt(step))}</td>{number_cell(answers[step].get('reward'))}"
                 f"{number_cell(answers[step].get('gold'), shade=True)}{text_cell(answers[step].get('response'))}</tr>"
                 for step in spread(sorted(answers), PROBE_CHECKPOINTS)]
        parts.append(f'<p class="text"><b>prompt:</b> {esc(prompt)}</p>'
                     + table(["step", "reward", "gold", "response"], lines))
    return "".join(parts)


def stage_section(stage: Path, summary: dict | None, notes: list[str]) -> str:
    rows = read_jsonl(stage / "metrics.jsonl", notes)
    marks = stage_alarms(rows, summary)
    parts = [f'<h2 id="stage-{esc(stage.name)}">{esc(stage.name)}</h2>']
    if summary is None:
        parts.append("<p>unfinished: no summary.json yet</p>")
    if marks:
        items = "".join(f"<li>step {esc(fmt(step))}: {esc(message)}</li>" for step, message in marks)
        parts.append(f'<ul class="alarms">{items}</ul>')
    parts.append(stage_charts(rows, marks))
    if isinstance(summary, dict):
        parts.append(summary_tables(summary))
    audit = read_json(stage / "audit.json", notes)
    if isinstance(audit, dict):
        parts.append(audit_section(audit))
    parts.append(probes_section(read_jsonl(stage / "samples.jsonl", notes)))
    return "".join(parts)


def results_section(results: dict) -> str:
    models = results.get("models")
    if not isinstance(models, dict) or not models:
        return ""
    models = {name: m for name, m in models.items() if isinstance(m, dict)}
    facets = sorted({f for m in models.values() if isinstance(m.get("facets"), dict) for f in m["facets"]})
    def win_rate(m: dict):
        return m["vs_baseline"].get("win_rate") if isinstance(m.get("vs_baseline"), dict) else None

    # What `rlhflab eval` prints beside the gold judge, where some model has it.
    extra = [(label, get) for label, get in (("rm score", lambda m: m.get("rm_score")), ("win rate", win_rate),
                                              ("KL to ref.", lambda m: m.get("kl_to_reference")))
             if any(get(m) is not None for m in models.values())]
    rows = []
    for name, m in models.items():
        facet_values = m.get("facets") if isinstance(m.get("facets"), dict) else {}
        cells = [number_cell(m.get("gold"), shade=True)] + [number_cell(facet_values.get(f), shade=True)
                                                           for f in facets]
        cells += [number_cell(get(m)) for _, get in extra]
        cells += [number_cell(m.get("mean_chars")), number_cell(m.get("empty"))]
        rows.append(f"<tr><td>{esc(name)}</td>{''.join(cells)}</tr>")
    return ("<h2>Held-out evaluation</h2>"
            + table(["model", "gold", *facets, *(label for label, _ in extra), "mean chars", "empty"], rows))


def answers_section(eval_dir: Path, notes: list[str]) -> str:
    files = sorted(eval_dir.glob("*.jsonl"), key=lambda p: stage_sort_key(p.stem)) if eval_dir.is_dir() else []
    answers = {}
    for path in files:
        rows = read_jsonl(path, notes)
        if rows:
            answers[path.stem] = {prompt_text(r): r.get("response") for r in rows}
    if not answers:
        return ""
    prompts = []
    for by_prompt in answers.values():
        prompts += [p for p in by_prompt if p not in prompts]
    rows = [f'<tr><td class="text">{esc(prompt)}</td>'
            + "".join(text_cell(by_prompt.get(prompt)) for by_prompt in answers.values()) + "</tr>"
            for prompt in prompts[:ANSWER_PROMPTS]]
    return (f"<h2>Answers side by side</h2><p>The first {min(len(prompts), ANSWER_PROMPTS)} of {len(prompts)} "
            "held-out prompts.</p>" + table(["prompt", *answers], rows))


# ---------------------------------------------------------------------------------------------
# The page: the story on top (story.py), then the stages, the evaluation and the answers.


def render(run_dir: Path) -> str:
    notes: list[str] = []
    stages = find_stages(run_dir)
    summaries = {s.name: read_json(s / "summary.json", notes) for s in stages}
    summaries = {k: v if isinstance(v, dict) else None for k, v in summaries.items()}
    # The quickstart's results.json, else what `rlhflab eval --out RUN/eval` wrote (the same "models").
    results = read_json(run_dir / "results.json", notes) or read_json(run_dir / "eval" / "figures.json", notes)
    audits = {s.name: a for s in stages if isinstance(a := read_json(s / "audit.json", notes), dict)}
    body = [story_section(run_dir, run_facts(results, summaries, audits), notes), overview_section(stages, summaries)]
    body += [stage_section(stage, summaries[stage.name], notes) for stage in stages]
    if isinstance(results, dict):
        body.append(results_section(results))
    body.append(answers_section(run_dir / "eval", notes))
    where = run_dir.resolve()
    head = (f"<h1>rlhflab run: {esc(where.name)}</h1><p>{esc(where)}, "
            f"written {esc(time.strftime('%Y-%m-%d %H:%M'))}</p>")
    if notes:
        head += '<div class="notes"><b>skipped:</b><ul>' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul></div>"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>rlhflab report: '
            f"{esc(where.name)}</title><style>{STYLE}</style></head><body>{head}{''.join(body)}"
            "</body></html>\n")


def run(config: ReportConfig) -> int:
    run_dir = check_run_dir(config.run_dir)
    out = Path(config.out) if config.out else run_dir / "report.html"
    if out.is_dir():
        out = out / "report.html"
    atomic_write_text(out, render(run_dir))
    print(out)
    return 0
