"""`rlhflab label simulate --url URL --admin-token TOKEN --annotators N`: the toy world's noisy
labellers working through a running `label serve`, over its real HTTP API.

Each simulated annotator is created through the admin API, then asks for tasks and submits
labels until none is left (or `--tasks-per-annotator` is reached), one thread each. How one
ranks: the gold judge scores every answer, the annotator perceives each score through their own
Gumbel noise of scale T (answers with equal gold scores share one draw, so they are tied), and
ranks by what they perceive: the world's Plackett-Luce annotator (rlhflab/world/preferences.py),
under which a pair with gold gap g is ordered right with probability sigmoid(g / T). T differs
per annotator: the world's calibrated T times exp(u), u uniform in [-spread, spread]. Rule
flags follow the judge's facets (wrong, wrong language, rude, complying with a harmful request),
each decision flipped with probability `--flag-error`.

The summary gives each annotator's T, the agreement with the clean gold order this T implies on
the pairs they ranked (expected), and the agreement they reached (measured): the figures to
hold the admin page's agreement against.
"""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

from rlhflab.config import opt
from rlhflab.errors import UsageError
from rlhflab.runs import atomic_write_text
from rlhflab.world import judge, tasks
from rlhflab.world.preferences import ANNOTATOR_TEMPERATURE, perceived_scores


@dataclass
class SimulateConfig:
    """Label a running `rlhflab label serve` with the toy world's simulated annotators."""

    stage = "label simulate"
    url: str = opt("http://127.0.0.1:8100", "the labeling server")
    admin_token: str = opt("", "an admin token (from `label init`): the annotators are created with it")
    annotators: int = opt(3, "simulated annotators, working at the same time")
    tasks_per_annotator: int = opt(0, "stop each annotator after this many labels (0: until no task is left)")
    name_prefix: str = opt("sim", "annotators are named PREFIX-01, PREFIX-02, ...")
    temperature: float = opt(ANNOTATOR_TEMPERATURE, "the annotators' typical noise scale T (the toy world's)")
    spread: float = opt(0.5, "each annotator's T is temperature x exp(u), u uniform in [-spread, spread]")
    flag_error: float = opt(0.05, "probability that a rule-flag decision is flipped")
    seed: int = opt(0, "seed of the annotators' noise")
    out: str = opt("", "JSON file for the summary (per-annotator noise and agreement); empty: print only")

    def check(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise UsageError(f"--url {self.url}: expected the labeling server's http:// or https:// address")
        if not self.admin_token:
            raise UsageError("--admin-token: give the admin token printed by `rlhflab label init`")
        if self.temperature <= 0 or self.spread < 0:   # the other numbers: config.RANGES, checked before this
            raise UsageError("--temperature must be positive and --spread not negative")


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def call(url: str, token: str, method: str, path: str, body: dict | None = None, timeout: float = 60) -> dict:
    """One JSON request; HttpError on an error answer, OSError when the server cannot be reached."""
    data = json.dumps(body).encode("utf-8") if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        try:
            text = json.loads(text).get("error", text)
        except ValueError:
            pass
        raise HttpError(exc.code, text) from None


def create_annotator(url: str, admin_token: str, name: str) -> str:
    try:
        return call(url, admin_token, "POST", "/api/admin/annotators", {"name": name})["token"]
    except HttpError as exc:
        if exc.status == 409:
            raise UsageError(f"an annotator named {name!r} exists already; choose another --name-prefix") from None
        if exc.status in (401, 403):
            raise UsageError("--admin-token: not an admin token of this server") from None
        raise


FLAG_FACETS = {"wrong": lambda f, harmful: not harmful and f.get("correct", 1.0) < 0.5,
               "wrong language": lambda f, harmful: f["language"] < 0.5,
               "rude": lambda f, harmful: f["polite"] < 0.5,
               "harmful": lambda f, harmful: harmful and f["refusal"] < 0.5}


@dataclass
class SimulatedAnnotator:
    """One noisy labeller; `work` labels tasks until none is left or `limit` is reached."""

    name: str
    token: str
    temperature: float
    seed: str = "0"          # with the task's id, seeds this annotator's noise on that task
    flag_error: float = 0.05
    acknowledged: list[str] = field(default_factory=list)   # submission ids the server said it stored
    pairs: list[tuple[float, bool]] = field(default_factory=list)   # (gold gap, ordered right) per strict pair

    def label(self, task: dict) -> dict:
        """The request body of this annotator's label of `task` (as /api/next returns it)."""
        rng = random.Random(f"{self.seed}:{self.name}:{task['task']}")   # the same, whatever order tasks come in
        judged = [judge(task["prompt"], a["text"]) for a in task["answers"]]
        gold = [j.score for j in judged]
        seen = perceived_scores(gold, rng, self.temperature)
        levels = sorted(set(seen), reverse=True)
        order = [[a["slot"] for a, s in zip(task["answers"], seen) if s == level] for level in levels]
        for i in range(len(gold)):
            for j in range(i + 1, len(gold)):
                if gold[i] != gold[j]:
                    self.pairs.append((abs(gold[i] - gold[j]), (seen[i] > seen[j]) == (gold[i] > gold[j])))
        parsed = tasks.parse_messages(task["prompt"]) or {}
        harmful = bool(parsed.get("harmful"))
        flags = {}
        for answer, judgement in zip(task["answers"], judged):
            names = [rule for rule, test in FLAG_FACETS.items() if rule in task["rules"]
                     and test(judgement.facets, harmful) != (rng.random() < self.flag_error)]
            if names:
                flags[answer["slot"]] = names
        return {"task": task["task"], "submission": f"{self.name}-{task['task']}-{uuid.uuid4().hex[:12]}",
                "order": order, "all_bad": max(gold) < 0.3, "flags": flags,
                "seconds": round(rng.uniform(5, 60), 1)}

    def submit(self, url: str, body: dict, retries: int = 5) -> dict:
        """Send a label; a network failure is retried with the same body (the server stores it once)."""
        for attempt in range(retries + 1):
            try:
                answer = call(url, self.token, "POST", "/api/label", body)
                self.acknowledged.append(body["submission"])
                return answer
            except OSError:
                if attempt == retries:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def work(self, url: str, limit: int = 0) -> int:
        done = 0
        while not limit or done < limit:
            task = call(url, self.token, "GET", "/api/next")
            if task.get("task") is None:
                break
            self.submit(url, self.label(task))
            done += 1
        return done

    def expected_agreement(self) -> float | None:
        if not self.pairs:
            return None
        return sum(1 / (1 + math.exp(-gap / self.temperature)) for gap, _ in self.pairs) / len(self.pairs)

    def measured_agreement(self) -> float | None:
        return sum(right for _, right in self.pairs) / len(self.pairs) if self.pairs else None


def make_annotators(config: SimulateConfig) -> list[SimulatedAnnotator]:
    rng = random.Random(f"simulate:{config.seed}")
    out = []
    for index in range(1, config.annotators + 1):
        name = f"{config.name_prefix}-{index:02d}"
        temperature = config.temperature * math.exp(rng.uniform(-config.spread, config.spread))
        token = create_annotator(config.url, config.admin_token, name)
        out.append(SimulatedAnnotator(name, token, temperature, str(config.seed), config.flag_error))
    return out


def run_annotators(url: str, annotators: list[SimulatedAnnotator], limit: int = 0) -> list[BaseException]:
    """Every annotator in its own thread; returns the errors they stopped with."""
    errors: list[BaseException] = []

    def one(annotator):
        try:
            annotator.work(url, limit)
        except BaseException as exc:   # noqa: BLE001 - reported below, with the annotator's name
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(a,), daemon=True) for a in annotators]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def simulate_command(config: SimulateConfig) -> int:
    try:
        call(config.url, config.admin_token, "GET", "/health")
    except OSError as exc:
        raise UsageError(f"--url {config.url}: no labeling server answers there ({exc})") from None
    annotators = make_annotators(config)
    start = time.perf_counter()
    errors = run_annotators(config.url, annotators, config.tasks_per_annotator)
    seconds = time.perf_counter() - start
    rows = [{"name": a.name, "temperature": round(a.temperature, 4), "labels": len(a.acknowledged),
             "pairs": len(a.pairs), "expected_gold_agreement": a.expected_agreement(),
             "measured_gold_agreement": a.measured_agreement()} for a in annotators]
    every = [p for a in annotators for p in a.pairs]
    summary = {"annotators": rows, "labels": sum(r["labels"] for r in rows), "seconds": round(seconds, 2),
               "expected_gold_agreement": (sum(a.expected_agreement() * len(a.pairs) for a in annotators if a.pairs)
                                           / len(every)) if every else None,
               "measured_gold_agreement": sum(r for _, r in every) / len(every) if every else None}
    print(f"{'annotator':<12} {'T':>6} {'labels':>6} {'expected':>9} {'measured':>9}")
    for r in rows:
        exp, got = r["expected_gold_agreement"], r["measured_gold_agreement"]
        print(f"{r['name']:<12} {r['temperature']:6.3f} {r['labels']:6d} "
              f"{'' if exp is None else f'{exp:9.3f}'} {'' if got is None else f'{got:9.3f}'}")
    print(f"{summary['labels']} labels in {seconds:.1f} s; agreement with the gold order: expected "
          f"{summary['expected_gold_agreement'] or 0:.3f}, measured {summary['measured_gold_agreement'] or 0:.3f}")
    if config.out:
        atomic_write_text(config.out, json.dumps(summary, indent=2) + "\n")
    for exc in errors:
        print(f"an annotator stopped: {exc}", file=sys.stderr)
    return 1 if errors else 0
