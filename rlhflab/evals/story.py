"""The story at the top of `rlhflab report`'s page: a verdict written from the figures, each RLHF
model against SFT facet by facet, answers that changed, and every alarm."""

from __future__ import annotations

from pathlib import Path

from rlhflab.evals import verdict
from rlhflab.evals.page import esc, fmt, is_number, number_cell, prompt_text, read_jsonl, table, text_cell
from rlhflab.world import judge

CHANGED_ANSWERS = 3     # answers shown that the best model improved most (and as many it made worse)


def run_facts(results: dict | None, summaries: dict[str, dict | None], audits: dict[str, dict]) -> dict:
    """What the verdict reads: the quickstart's results.json, completed with what the stages left."""
    facts = dict(results) if isinstance(results, dict) else {}
    if not isinstance(facts.get("models"), dict):
        facts["models"] = {}
    if not isinstance(facts.get("stages"), dict):
        facts["stages"] = {name: s for name, s in summaries.items() if s is not None}
    if not isinstance(facts.get("audits"), dict):
        facts["audits"] = audits
    return facts


def delta_cell(value, before, higher_is_better: bool = True) -> str:
    if not is_number(value):
        return number_cell(None)
    if not is_number(before):
        return number_cell(value)
    change = value - before
    good = change > 0 if higher_is_better else change < 0
    color = "#888" if abs(change) < 1e-9 else ("#1a7f37" if good else "#c00")
    return (f'<td class="num">{esc(fmt(value))} <span style="color: {color}">'
            f'({"+" if change >= 0 else "−"}{abs(change):.3f})</span></td>')


def before_after_section(models: dict) -> str:
    sft = models.get(verdict.BASELINE)
    after = [name for name, m in models.items() if name not in verdict.NOT_RLHF and isinstance(m, dict)]
    if not isinstance(sft, dict) or not after:
        return ""
    facets = list(sft.get("facets") or {}) if isinstance(sft.get("facets"), dict) else []
    rows = []
    for label, get, higher in ([("gold", lambda m: m.get("gold"), True)]
                               + [(f, lambda m, f=f: (m.get("facets") or {}).get(f), True) for f in facets]
                               + [("mean chars", lambda m: m.get("mean_chars"), None),
                                  ("empty", lambda m: m.get("empty"), False)]):
        cells = [number_cell(get(sft), shade=higher is True)]
        cells += [delta_cell(get(models[name]), get(sft), higher is not False) if higher is not None
                  else number_cell(get(models[name])) for name in after]
        rows.append(f"<tr><td>{esc(label)}</td>{''.join(cells)}</tr>")
    return ("<h3>Before and after, facet by facet</h3><p>Held-out prompts; each RLHF model's change against SFT "
            "in brackets.</p>" + table(["figure", "sft", *after], rows))


def changed_answers(eval_dir: Path, best: str, notes: list[str]) -> list[tuple[str, str, str, float | None,
                                                                              float | None]]:
    """(prompt, SFT's answer, the best model's, their gold scores) where the answers differ: the
    largest gains first, then the largest losses; the first few that differ without a gold judge."""
    before = {prompt_text(r): r for r in read_jsonl(eval_dir / f"{verdict.BASELINE}.jsonl", notes)}
    found = []
    for row in read_jsonl(eval_dir / f"{best}.jsonl", notes):
        prompt = prompt_text(row)
        old = before.get(prompt)
        if old is None or old.get("response") == row.get("response"):
            continue
        meta, messages = row.get("meta"), row.get("messages")
        scores = [None, None]
        if isinstance(meta, dict) and meta.get("family") and isinstance(messages, list):
            scores = [judge(messages, str(r.get("response") or ""), meta).score for r in (old, row)]
        found.append((prompt, old.get("response"), row.get("response"), *scores))
    if not all(is_number(f[3]) for f in found):
        return found[: 2 * CHANGED_ANSWERS]
    found.sort(key=lambda f: f[3] - f[4])
    gains = [f for f in found if f[4] > f[3]][:CHANGED_ANSWERS]
    losses = [f for f in reversed(found) if f[4] < f[3]][:CHANGED_ANSWERS]
    return gains + losses


def changed_section(eval_dir: Path, facts: dict, notes: list[str]) -> str:
    best = next(iter(verdict.gains(facts)), None)
    if best is None or not (eval_dir / f"{best}.jsonl").is_file():
        return ""
    found = changed_answers(eval_dir, best, notes)
    if not found:
        return f"<h3>Answers that changed</h3><p>{esc(best)} answers every held-out prompt as SFT does.</p>"
    rows = [f'<tr><td class="text">{esc(prompt)}</td>{text_cell(old)}{number_cell(gold_old, shade=True)}'
            f"{text_cell(new)}{number_cell(gold_new, shade=True)}</tr>"
            for prompt, old, new, gold_old, gold_new in found]
    return (f"<h3>Answers that changed</h3><p>Held-out prompts where {esc(best)}, the model that gained the most "
            "gold score, answers otherwise than SFT: those it improved most, then those it made worse.</p>"
            + table(["prompt", "sft", "gold", best, "gold"], rows))


def alarms_section(facts: dict) -> str:
    items = [f"<li>{esc(name)}, step {esc(fmt(a.get('step')))}: {esc(a.get('message', ''))}</li>"
             for name, s in facts["stages"].items() if isinstance(s, dict)
             for a in (s.get("alarms") or []) if isinstance(a, dict)]
    watched = [name for name, s in facts["stages"].items() if isinstance(s, dict) and "alarms" in s]
    if not watched:
        return ""
    if not items:
        return f"<h3>Alarms</h3><p>No alarm fired ({esc(', '.join(watched))}).</p>"
    return f'<h3>Alarms</h3><ul class="alarms">{"".join(items)}</ul>'


def story_section(run_dir: Path, facts: dict, notes: list[str]) -> str:
    parts = [before_after_section(facts["models"]), changed_section(run_dir / "eval", facts, notes),
             alarms_section(facts)]
    return (f'<h2 id="verdict">What the run shows</h2><p class="verdict">{esc(verdict.verdict(facts))}</p>'
            + "".join(parts))
