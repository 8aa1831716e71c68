"""What the sections of `rlhflab report` share: forgiving readers of what a run left behind, and
the small HTML pieces every section is built of (always escaped).

Each reader returns nothing rather than failing, and says why in `notes`: a report of a
half-finished or hand-made run is still worth having.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

MAX_CHARS = 600   # longest answer shown in full


def read_json(path: Path, notes: list[str]):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        notes.append(f"{path}: not valid JSON ({exc}); skipped")
        return None


def read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    if not path.is_file():
        return []
    rows, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    if bad:
        notes.append(f"{path}: {len(bad)} unreadable line(s) skipped (first: line {bad[0]})")
    return rows


# ---------------------------------------------------------------------------------------------
# Small HTML pieces.


def esc(value) -> str:
    return html.escape(str(value))


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"


def number_cell(value, shade: bool = False) -> str:
    """A right-aligned number; scores in [0, 1] get a red-to-green background when `shade`."""
    style = ""
    if shade and is_number(value) and 0 <= value <= 1:
        style = f' style="background: hsl({120 * value:.0f}, 55%, 85%)"'
    return f'<td class="num"{style}>{esc(fmt(value))}</td>'


def text_cell(text) -> str:
    if text is None:
        return '<td class="empty">–</td>'
    if not isinstance(text, str) or not text.strip():
        return '<td class="empty">(empty)</td>'
    shown = text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + " …"
    return f'<td class="text">{esc(shown)}</td>'


def table(head: list[str], rows: list[str]) -> str:
    heading = "".join(f"<th>{esc(h)}</th>" for h in head)
    return f"<table><tr>{heading}</tr>{''.join(rows)}</table>"


def prompt_text(row: dict) -> str:
    """The conversation an answer replies to: its one message, or every turn labelled by role."""
    messages = row.get("messages", row.get("prompt"))
    if isinstance(messages, str):
        return messages
    if not isinstance(messages, list):
        return ""
    turns = [m for m in messages if isinstance(m, dict)]
    if len(turns) == 1:
        return str(turns[0].get("content", ""))
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in turns)
