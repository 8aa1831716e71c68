"""Rewards made of parts: `--reward SPEC` repeated, each part weighted, each logged on its own.

    rm:DIR[:W]               a reward model (from `rlhflab rm`, or a sequence classifier)
    rules:DIR[:W]            a rule reward model (`rm --rules`): the log-probability that the answer
                             breaks none of its rules, sum_r log(1 - p_r) (0 for a clean answer,
                             about -4 for a break it is 98% sure of, at most -9.2 per rule)
    python:FILE:FUNC[:W]     a Python function with the signature of TRL's GRPO reward functions
    judge[:W]                the toy world's gold judge (toy-world prompts only)
    DIR                      a plain directory is rm:DIR

The reward is sum_i W_i * part_i (W defaults to 1). A Python function is called as

    FUNC(prompts=[messages, ...], completions=[[{"role": "assistant", "content": text}], ...], **columns)

where `columns` are the prompts file's other fields and its rows' `meta` fields, one list each,
as TRL passes a dataset's extra columns; it returns one float per completion, or None where it
does not apply (that part then adds nothing to that completion's reward, as TRL sums with
nansum). A function that returns the wrong number of values, a non-number or NaN stops the run
with an error naming it, at the first rollout, before any update. With a hard penalty P
(`--rule-penalty`), a completion whose most likely rule break passes `--rule-threshold` also
loses P, whatever the weights.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhflab.data.formats import iter_raw_rows
from rlhflab.errors import UsageError
from rlhflab.rewards.model import check_reward_model, load_reward_model, score_texts
from rlhflab.rewards.rules import is_rule_model, load_rule_model, rule_probabilities
from rlhflab.world import judge

KINDS = ("rm", "rules", "python", "judge")


@dataclass
class Spec:
    kind: str                 # one of KINDS
    target: str               # directory, "FILE:FUNC", or "" for the judge
    weight: float = 1.0
    text: str = ""            # as given, for messages


def _weight(parts: list[str], least: int) -> tuple[list[str], float | None]:
    """Split a trailing :W off `parts` when there are more than `least` parts and it is a number."""
    if len(parts) > least:
        try:
            return parts[:-1], float(parts[-1])
        except ValueError:
            return parts, None
    return parts, None


def parse_specs(value: str, option: str = "--reward") -> list[Spec]:
    """The parts of a (comma-joined, repeatable) --reward value. UsageError names a malformed one."""
    specs = []
    for text in [t.strip() for t in value.split(",") if t.strip()]:
        kind, _, rest = text.partition(":")
        if kind == "judge":
            parts, weight = _weight(text.split(":"), 1)
            if len(parts) != 1:
                raise UsageError(f"{option} {text}: expected judge or judge:WEIGHT")
            specs.append(Spec("judge", "", 1.0 if weight is None else weight, text))
        elif kind in ("rm", "rules"):
            parts, weight = _weight(rest.split(":"), 1)
            if not parts or not parts[0]:
                raise UsageError(f"{option} {text}: expected {kind}:DIR or {kind}:DIR:WEIGHT")
            specs.append(Spec(kind, ":".join(parts), 1.0 if weight is None else weight, text))
        elif kind == "python":
            parts, weight = _weight(rest.split(":"), 2)
            if len(parts) < 2 or not parts[0] or not parts[-1]:
                raise UsageError(f"{option} {text}: expected python:FILE:FUNCTION or python:FILE:FUNCTION:WEIGHT")
            specs.append(Spec("python", ":".join(parts), 1.0 if weight is None else weight, text))
        else:
            specs.append(Spec("rm", text, 1.0, text))   # a plain directory, as before parts existed
    for spec in specs:
        if not math.isfinite(spec.weight):
            raise UsageError(f"{option} {spec.text}: the weight must be a finite number")
    if not specs:
        raise UsageError(f"{option}: no reward given")
    return specs


def is_composed(value: str | None) -> bool:
    """Whether --reward names parts (several, a weight, rules or python) rather than the one reward
    model or the judge that PPO scores directly."""
    if not value:
        return False
    specs = parse_specs(value)
    return len(specs) > 1 or specs[0].kind in ("rules", "python") or specs[0].weight != 1.0 or \
        specs[0].text.startswith("rm:")


class RewardFunctionError(UsageError):
    """A user's Python reward function failed to load, or returned something unusable."""


def load_function(target: str, option: str = "--reward") -> Callable:
    """FUNC from FILE (target "FILE:FUNC"), with named errors for a missing file, a syntax error,
    an import that fails, and a missing or non-callable function."""
    path_text, _, name = target.rpartition(":")
    path = Path(path_text)
    where = f"{option} python:{target}"
    if not path.is_file():
        raise RewardFunctionError(f"{where}: no such file {path_text}")
    spec = importlib.util.spec_from_file_location(f"rlhflab_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise RewardFunctionError(f"{where}: syntax error in {path_text}, line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:   # the user's module ran and raised: say where
        raise RewardFunctionError(f"{where}: importing {path_text} failed: {_where_raised(exc, path)}") from None
    function = getattr(module, name, None)
    if function is None:
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and v.__module__ == module.__name__)
        raise RewardFunctionError(f"{where}: {path_text} has no function {name!r}"
                                  + (f" (it defines: {', '.join(found)})" if found else ""))
    if not callable(function):
        raise RewardFunctionError(f"{where}: {name} in {path_text} is a {type(function).__name__}, not a function")
    return function


def _where_raised(exc: Exception, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    at = f" (line {frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{at}"


def checked_values(values, n: int, where: str) -> list[float | None]:
    """A reward function's return value as n floats or None; RewardFunctionError otherwise."""
    if hasattr(values, "tolist"):   # numpy arrays, tensors
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(f"{where}: returned {type(values).__name__}; expected a list of {n} floats "
                                  "(or None)")
    if len(values) != n:
        raise RewardFunctionError(f"{where}: returned {len(values)} values for {n} completions")
    out = []
    for index, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RewardFunctionError(f"{where}: value {index} is {value!r}; expected a float or None")
        if not math.isfinite(value):
            raise RewardFunctionError(f"{where}: value {index} is {value} (not finite); return None to skip a "
                                      "completion")
        out.append(float(value))
    return out


class ComposedReward:
    """(records, texts) -> weighted-sum rewards; `last_parts` holds each part's mean of the last call
    (as "reward/<name>"), for the metrics."""

    def __init__(self, parts: list[tuple[str, float, Callable]], rule_penalty: float = 0.0,
                 rule_threshold: float = 0.5, columns: dict[str, dict] | None = None):
        self.parts, self.rule_penalty, self.rule_threshold = parts, rule_penalty, rule_threshold
        self.columns = columns or {}
        self.last_parts: dict[str, float] = {}
        self.last_rules: list[dict] | None = None

    def __call__(self, records, texts: list[str]) -> list[float]:
        totals, logged = [0.0] * len(texts), {}
        self.last_rules = None
        for name, weight, part in self.parts:
            values = part(self, records, texts)
            present = [v for v in values if v is not None]
            logged[f"reward/{name}"] = sum(present) / len(present) if present else float("nan")
            if len(present) < len(values):
                logged[f"reward/{name}_skipped"] = (len(values) - len(present)) / len(values)
            totals = [t + weight * v if v is not None else t for t, v in zip(totals, values)]
        if self.rule_penalty and self.last_rules is not None:
            broken = [max(p.values(), default=0.0) > self.rule_threshold for p in self.last_rules]
            totals = [t - self.rule_penalty * b for t, b in zip(totals, broken)]
            logged["reward/rule_penalty_rate"] = sum(broken) / len(broken)
        self.last_parts = logged
        return totals

    def kwargs(self, records) -> dict[str, list]:
        """Extra columns for Python reward functions: meta fields and the file's other fields."""
        rows = [{**(r.meta or {}), **self.columns.get(r.source, {})} for r in records]
        names = sorted({k for row in rows for k in row})
        return {k: [row.get(k) for row in rows] for k in names}


def _file_columns(path: str | None) -> dict[str, dict]:
    """{"file:line": the row's fields other than the prompt and meta}, for Python reward functions."""
    if not path:
        return {}
    out = {}
    for where, row in iter_raw_rows(path):
        if isinstance(row, dict):
            out[where] = {k: v for k, v in row.items() if k not in ("prompt", "messages", "meta")}
    return out


def build(value: str, placement, prompts_path: str | None = None, world_prompts: bool = True,
          rule_penalty: float = 0.0, rule_threshold: float = 0.5, trust_remote_code: bool = False,
          option: str = "--reward") -> ComposedReward:
    """Load every part of --reward (models, rule models, functions) before any work is done."""
    specs = parse_specs(value, option)
    if rule_penalty and not any(s.kind == "rules" for s in specs):
        raise UsageError(f"--rule-penalty needs a rules:DIR part in {option}")
    parts, names = [], set()

    def unique(name: str) -> str:
        n, k = name, 2
        while n in names:
            n, k = f"{name}_{k}", k + 1
        names.add(n)
        return n

    for spec in specs:
        where = f"{option} {spec.text}"
        if spec.kind == "judge":
            if not world_prompts:
                raise UsageError(f"{where}: the toy world's judge scores only toy-world prompts (with meta.family)")
            parts.append((unique("judge"), spec.weight, lambda self, records, texts: [
                judge(r.messages, t, r.meta).score for r, t in zip(records, texts)]))
        elif spec.kind == "rm":
            check_reward_model(spec.target, where)
            model, tokenizer = load_reward_model(spec.target, placement, trust_remote_code, option=where)
            parts.append((unique("rm"), spec.weight, _rm_part(model, tokenizer)))
        elif spec.kind == "rules":
            if not is_rule_model(spec.target):
                raise UsageError(f"{where}: not a rule reward model (train one with `rlhflab rm --rules`)")
            model, tokenizer = load_rule_model(spec.target, placement, trust_remote_code, option=where)
            parts.append((unique("rules"), spec.weight, _rules_part(model, tokenizer)))
        else:
            function = load_function(spec.target, option)
            name = unique(spec.target.rpartition(":")[2])
            parts.append((name, spec.weight, _python_part(function, f"{where}")))
    return ComposedReward(parts, rule_penalty, rule_threshold, _file_columns(prompts_path))


RULE_FLOOR = 1e-4   # 1 - p is floored here: a certain break costs log(1e-4) = -9.2, not -inf


def rules_log_probability(probabilities: dict[str, float]) -> float:
    """sum_r log(1 - p_r): the rule model's log-probability that an answer keeps every rule, in the
    same log-odds units as a preference reward model's score. A break the rule model is sure of then
    outweighs what a preference RM gives for style (minus the probability would cap its cost at 1)."""
    return sum(math.log(max(1.0 - p, RULE_FLOOR)) for p in probabilities.values())


def _rm_part(model, tokenizer):
    def part(self, records, texts):
        return score_texts(model, tokenizer, [r.messages + [{"role": "assistant", "content": t}]
                                              for r, t in zip(records, texts)])
    return part


def _rules_part(model, tokenizer):
    def part(self, records, texts):
        probs = rule_probabilities(model, tokenizer, [r.messages + [{"role": "assistant", "content": t}]
                                                      for r, t in zip(records, texts)])
        self.last_rules = probs
        return [rules_log_probability(p) for p in probs]
    return part


def _python_part(function, where: str):
    def part(self, records, texts):
        try:
            values = function(prompts=[r.messages for r in records],
                              completions=[[{"role": "assistant", "content": t}] for t in texts],
                              **self.kwargs(records))
        except Exception as exc:   # the user's function raised: name it and where, not a bare traceback
            raise RewardFunctionError(f"{where}: raised {_where_raised(exc, Path(inspect.getfile(function)))}") \
                from None
        return checked_values(values, len(texts), where)
    return part
