"""AI feedback: a model asked which of two answers better follows a constitution's principle.

`rlhflab rank --by model:DIR` (a local Hugging Face model or adapter) or `--by openai:URL` (any
OpenAI-compatible endpoint: `rlhflab serve`, vLLM ...). For every pair of a prompt's responses and
each principle asked about, the labeller sees the pair in BOTH orders, because language models
favour a position (often the first): with p_ab = P("(A)" | i shown first) and p_ba = P("(A)" | j
shown first), i wins when p_ab > 0.5 and p_ba < 0.5, j wins in the mirror case, and the pair is a
TIE when the two orders disagree (the labeller picked a position, not an answer). The question
asks for "(A)" when both answers follow the principle equally, so a principle that does not tell
them apart says "(A)" in both orders and abstains. By default (`--combine first`) the
constitution's order is its priority: the first principle that decides settles the pair, with
confidence (p_ab + 1 - p_ba) / 2 for i; `decide` also sums the deciding principles' margins, or
averages the probabilities over all the principles asked.
A local model's probabilities come from the log-probs of the two replies; an endpoint's from its
`logprobs` when it returns them, else from its greedy reply (probability 1 or 0, 0.5 when it
answers neither).

The same two chat backends (`chat_backend`) write answers, critiques and revisions for
`rlhflab critique`.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass, field

import torch

from rlhflab.data.template import encode_prompt, stop_token_ids
from rlhflab.errors import UsageError
from rlhflab.feedback.constitution import CHOICES, Constitution, comparison_messages
from rlhflab.infer.engine import SamplingParams, _accepts_position_ids, generate_text, left_pad
from rlhflab.models.forward import position_ids, response_logprobs
from rlhflab.models.heads import logits_at
from rlhflab.models.loading import context_limit, load_causal_lm, load_tokenizer
from rlhflab.world import judge


class LocalChat:
    """A local causal LM (directory, adapter or hub id) as a chat backend."""

    def __init__(self, path: str, placement, trust_remote_code: bool = False, batch_size: int = 32,
                 option: str = "--model"):
        self.model = load_causal_lm(path, placement, trust_remote_code, option=option).eval()
        self.tokenizer = load_tokenizer(path, trust_remote_code, option=option)
        self.batch_size, self.name = batch_size, path

    def complete(self, conversations: list[list[dict]], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, do_sample=temperature > 0,
                                min_new_tokens=1, stop_token_ids=tuple(stop_token_ids(self.tokenizer)), seed=seed)
        return generate_text(self.model, self.tokenizer, conversations, params, batch_size=self.batch_size).texts

    @torch.no_grad()
    def choice_probs(self, conversations: list[list[dict]]) -> list[float]:
        """P(CHOICES[0]) against CHOICES[1] as the reply to each conversation: the two replies'
        probabilities at the first token where they differ ("A" against "B" after "("), one
        forward pass per question; the log-prob of each whole reply where they differ from
        their first token on."""
        choice_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in CHOICES]
        limit = context_limit(self.model) or 4096
        device = next(self.model.parameters()).device
        width = max(map(len, choice_ids))
        split = next((k for k, tokens in enumerate(zip(*choice_ids)) if len(set(tokens)) > 1), None)
        one_pass = bool(split)   # a shared start, then distinct tokens (0: nothing shared; None: no difference)
        out: list[float] = []
        for start in range(0, len(conversations), self.batch_size):
            prompts = [encode_prompt(self.tokenizer, c)[-(limit - width):]
                       for c in conversations[start:start + self.batch_size]]
            if one_pass:
                ids, mask = left_pad([p + choice_ids[0][:split] for p in prompts], self.tokenizer.pad_token_id)
                ids, mask = ids.to(device), mask.to(device)
                select = torch.zeros_like(ids, dtype=torch.bool)
                select[:, -1] = True
                kwargs = {"input_ids": ids, "attention_mask": mask}
                if _accepts_position_ids(self.model):
                    kwargs["position_ids"] = position_ids(mask)
                last = logits_at(self.model, select, **kwargs).float()                    # (N, V)
                out += last[:, [c[split] for c in choice_ids]].softmax(-1)[:, 0].tolist()
                continue
            prompt_ids, prompt_mask = left_pad([p for p in prompts for _ in CHOICES], self.tokenizer.pad_token_id)
            tail = torch.full((len(prompts) * len(CHOICES), width), self.tokenizer.pad_token_id, dtype=torch.long)
            tail_mask = torch.zeros_like(tail)
            for row in range(tail.shape[0]):
                ids = choice_ids[row % len(CHOICES)]
                tail[row, :len(ids)], tail_mask[row, :len(ids)] = torch.tensor(ids), 1
            ids = torch.cat([prompt_ids, tail], 1).to(device)
            mask = torch.cat([prompt_mask, tail_mask], 1).to(device)
            logprobs, _ = response_logprobs(self.model, ids, mask, prompt_ids.shape[1])       # (2N, R)
            totals = (logprobs * tail_mask.to(device)).sum(-1).view(len(prompts), len(CHOICES))  # (N, 2)
            out += totals.softmax(-1)[:, 0].tolist()
        return out


class OpenAIChat:
    """An OpenAI-compatible chat endpoint (`rlhflab serve`, vLLM ...) as a chat backend."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None):
        try:
            import openai
        except ImportError:
            raise UsageError("--by openai:URL needs the openai package (pip install openai)") from None
        self.client = openai.OpenAI(base_url=url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none")
        self.name = url
        try:
            self.model = model or self.client.models.list().data[0].id
        except Exception as exc:   # connection refused, bad URL, auth: all say the endpoint is unusable
            raise UsageError(f"openai:{url}: cannot list the endpoint's models ({exc})") from None

    def _ask(self, messages, max_tokens: int, temperature: float, seed: int, logprobs: bool = False):
        kwargs = {"logprobs": True, "top_logprobs": 10} if logprobs else {}
        return self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                   temperature=temperature, seed=seed, **kwargs).choices[0]

    def complete(self, conversations, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[str]:
        return [self._ask(c, max_new_tokens, temperature, seed).message.content or "" for c in conversations]

    def choice_probs(self, conversations) -> list[float]:
        return [_probability_of_a(self._ask(c, 4, 0.0, 0, logprobs=True)) for c in conversations]


def _probability_of_a(choice) -> float:
    """P(first answer) from an endpoint's reply: its top log-probs at the first token that names a
    choice when it returns them, else its text."""
    content = getattr(choice.logprobs, "content", None) if choice.logprobs is not None else None
    for token in content or []:
        if token.token.strip(" (") in ("A", "B"):
            probs = {"A": 0.0, "B": 0.0}
            for top in token.top_logprobs or [token]:
                key = top.token.strip(" (")
                if key in probs:
                    probs[key] += math.exp(top.logprob)
            if probs["A"] + probs["B"] > 0:
                return probs["A"] / (probs["A"] + probs["B"])
    named = set(re.findall(r"\(([AB])\)|\b([AB])\b", choice.message.content or ""))
    said = {letter for pair in named for letter in pair if letter}
    return 1.0 if said == {"A"} else 0.0 if said == {"B"} else 0.5


def chat_backend(spec: str, placement, trust_remote_code: bool = False, batch_size: int = 32,
                 option: str = "--by", api_key: str | None = None):
    """'model:DIR' (or a bare directory / hub id) -> LocalChat; 'openai:URL[#MODEL]' -> OpenAIChat."""
    if spec.startswith("openai:"):
        url, _, model = spec[len("openai:"):].partition("#")
        return OpenAIChat(url, model or None, api_key)
    path = spec[len("model:"):] if spec.startswith("model:") else spec
    return LocalChat(path, placement, trust_remote_code, batch_size, option=option)


# ---------------------------------------------------------------------------------------------
# Labelling.


def verdict(p_ab: float, p_ba: float) -> int:
    """+1 (i better), -1 (j better) or 0 (tie): the two orders must agree on the ANSWER.
    p_ab: P(first shown is better) with i first; p_ba: the same with j first."""
    if p_ab > 0.5 and p_ba < 0.5:
        return 1
    if p_ab < 0.5 and p_ba > 0.5:
        return -1
    return 0


COMBINE = ("mean", "principles", "first")   # how the principles asked about a pair make one verdict


def decide(orders: list[tuple[float, float]], combine: str = "mean") -> tuple[int, float]:
    """(verdict, confidence) of a pair from each principle's (p_ab, p_ba), in the constitution's order.

    mean: the probabilities averaged over the principles, then `verdict`; confidence
    (p_ab + 1 - p_ba) / 2 for the winner. The two others let each principle decide on its own
    (both of its orders must agree, else it abstains), so that a principle that does not tell the
    answers apart cannot outvote, by its position bias, one that does:
    principles: the pair goes to the answer with the larger sum of the deciding principles'
    margins (p_ab + 1 - p_ba) / 2 - 0.5; confidence 0.5 + |sum| / number deciding.
    first: the constitution's order is its priority: the first principle that decides decides,
    with its own confidence.
    Both tie when no principle decides (or, for principles, when the margins cancel)."""
    if combine == "mean":
        p_ab, p_ba = sum(a for a, _ in orders) / len(orders), sum(b for _, b in orders) / len(orders)
        p_i = (p_ab + 1 - p_ba) / 2
        return verdict(p_ab, p_ba), max(p_i, 1 - p_i)
    if combine not in COMBINE:
        raise UsageError(f"--combine {combine!r}: expected one of {', '.join(COMBINE)}")
    margins = [(a + 1 - b) / 2 - 0.5 for a, b in orders if verdict(a, b)]
    if combine == "first":
        margins = margins[:1]
    total = sum(margins)
    if not margins or total == 0:
        return 0, 0.5
    return (1 if total > 0 else -1), 0.5 + abs(total) / len(margins)


@dataclass
class Labels:
    scores: list[list[float]]                    # per row, per response: wins + half the ties
    judgments: list[dict] = field(default_factory=list)   # {row, i, j, verdict, confidence, p_ab, p_ba,
    #                                                        by_principle: {name: [p_ab, p_ba]}}


def label_rows(rows: list[dict], chat, constitution: Constitution, per_pair: int = 0, seed: int = 0,
               combine: str = "first") -> Labels:
    """Every pair of each row's responses, asked in both orders about `per_pair` principles drawn
    per pair (0 = all of them), decided by `decide(..., combine)`; each judgment keeps every
    principle's two probabilities (`by_principle`)."""
    if combine not in COMBINE:   # before any question is asked
        raise UsageError(f"--combine {combine!r}: expected one of {', '.join(COMBINE)}")
    rng = random.Random(f"labeller:{seed}")
    asks, conversations = [], []
    for r, row in enumerate(rows):
        n = len(row["responses"])
        for i in range(n):
            for j in range(i + 1, n):
                chosen = constitution.principles if not per_pair else \
                    sorted(rng.sample(constitution.principles, min(per_pair, len(constitution.principles))),
                           key=constitution.principles.index)   # in the constitution's order, for `first`
                asks.append((r, i, j, [p.name for p in chosen]))
                a, b = row["responses"][i], row["responses"][j]
                for principle in chosen:
                    conversations.append(comparison_messages(row["prompt"], a, b, principle))
                    conversations.append(comparison_messages(row["prompt"], b, a, principle))
    probs = chat.choice_probs(conversations)
    if not all(math.isfinite(p) for p in probs):
        raise UsageError(f"the labeller {chat.name} gave non-finite probabilities")
    scores = [[0.0] * len(row["responses"]) for row in rows]
    judgments, at = [], 0
    for r, i, j, names in asks:
        pairs = probs[at:at + 2 * len(names)]
        at += 2 * len(names)
        orders = list(zip(pairs[0::2], pairs[1::2]))           # per principle: (p_ab, p_ba)
        v, confidence = decide(orders, combine)
        scores[r][i] += (v == 1) + 0.5 * (v == 0)
        scores[r][j] += (v == -1) + 0.5 * (v == 0)
        p_ab, p_ba = sum(p for p, _ in orders) / len(names), sum(p for _, p in orders) / len(names)
        judgments.append({"row": r, "i": i, "j": j, "verdict": v, "principles": names,
                          "confidence": round(confidence, 4), "p_ab": round(p_ab, 4), "p_ba": round(p_ba, 4),
                          "by_principle": {n: [round(a, 4), round(b, 4)] for n, (a, b) in zip(names, orders)}})
    return Labels(scores, judgments)


def reference_scores(row: dict, ranked_input: bool) -> tuple[list[float] | None, list[float] | None]:
    """(gold, human) scores of a row's responses where known: gold from `gold_scores` or the toy
    world's judge (rows with a toy-world meta.family); human from the file's order (best first)
    when the input is a ranked file."""
    gold = row.get("gold_scores")
    if gold is None and (row.get("meta") or {}).get("family"):
        gold = [judge(row["prompt"], text, row.get("meta")).score for text in row["responses"]]
    human = [float(-k) for k in range(len(row["responses"]))] if ranked_input else None
    return gold, human


def agreement(rows: list[dict], labels: Labels, ranked_input: bool = False) -> dict:
    """How often the labeller's decided pairs agree with gold / human order (pairs that reference
    leaves tied are skipped), its tie rate, and its mean confidence."""
    report = {"pairs": len(labels.judgments),
              "tie_rate": sum(j["verdict"] == 0 for j in labels.judgments) / max(1, len(labels.judgments)),
              "mean_confidence": sum(j["confidence"] for j in labels.judgments) / max(1, len(labels.judgments))}
    refs = [reference_scores(row, ranked_input) for row in rows]
    for name, index in (("gold", 0), ("human", 1)):
        agree = decided = total = 0
        for j in labels.judgments:
            ref = refs[j["row"]][index]
            if ref is None or ref[j["i"]] == ref[j["j"]]:
                continue
            total += 1
            if j["verdict"]:
                decided += 1
                agree += (j["verdict"] > 0) == (ref[j["i"]] > ref[j["j"]])
        if decided:
            report[f"{name}_agreement"] = agree / decided          # on the pairs it decided
        if total:
            report[f"{name}_agreement_ties_half"] = (agree + 0.5 * (total - decided)) / total
            report[f"{name}_pairs"] = total
    return report
