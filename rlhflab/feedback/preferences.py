"""Preference data from a model's own samples: `rlhflab sample` and `rlhflab rank`.

`sample` writes K responses per prompt in the `rankings` shape (unranked, sample order).
`rank` orders them with a judge — the toy world's gold judge, its noisy annotators, a reward
model, or an AI labeller under a constitution (feedback/ai_labeller.py) — and writes `rankings`
(best first, with the scores) or `pairs` (best against worst).
Iterative DPO (`rlhflab dpo --rounds R`) runs the same two functions between its rounds.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhflab.config import opt, require
from rlhflab.data.formats import is_message_list, load_prompts
from rlhflab.data.template import stop_token_ids
from rlhflab.errors import UsageError
from rlhflab.feedback import ai_labeller
from rlhflab.feedback.constitution import load_constitution
from rlhflab.infer.engine import SamplingParams, generate_text
from rlhflab.models.loading import choose_placement, load_causal_lm, load_tokenizer
from rlhflab.rewards.model import load_reward_model, score_texts
from rlhflab.runs import atomic_write_jsonl, input_paths, refuse_a_directory, refuse_overwriting_inputs, text_lines
from rlhflab.world import judge
from rlhflab.world.preferences import perceived_scores


@dataclass
class SampleConfig:
    """Write K sampled responses per prompt (a rankings-shaped file, not yet ranked)."""

    stage = "sample"
    model: str | None = opt(None, "model directory or adapter to sample from")
    prompts: str | None = opt(None, "prompts file (prompts/messages/pairs/rankings formats are accepted)")
    out: str | None = opt(None, "JSONL file to write")
    k: int = opt(4, "responses per prompt")
    max_new_tokens: int = opt(48, "longest response")
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling")
    max_rows: int = opt(0, "use at most this many prompts (0 = all)")
    batch_size: int = opt(32, "sequences generated at once")
    seed: int = opt(0, "sampling seed (the samples also depend on --batch-size)")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")
    device: str = opt("auto", "where to run", ("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "weights dtype", ("auto", "fp32", "bf16", "fp16"))

    def check(self):   # --temperature and --top-p: their ranges (config.RANGES) are checked before this
        require(self, "model", "prompts", "out")
        if self.k < 2:
            raise UsageError("--k: must be at least 2 (a ranking needs two responses)")


@dataclass
class RankConfig:
    """Rank sampled responses with the gold judge or a reward model, into pairs or rankings."""

    stage = "rank"
    data: str | None = opt(None, "rankings-shaped JSONL from `rlhflab sample`")
    by: str = opt("judge", "who ranks: 'judge' (the toy world's gold judge), 'annotators' (its noisy labellers, "
                           "as the world's preference data), 'rm:DIR' (a reward model), or an AI labeller under "
                           "--constitution: 'model:DIR' (a local model) or 'openai:URL[#MODEL]' (an OpenAI-compatible "
                           "endpoint; key from OPENAI_API_KEY), or 'shortest' (a labeller biased to brevity: the "
                           "shorter answer wins whatever it says; the data of the reward-hacking scenario)")
    out: str | None = opt(None, "JSONL file to write")
    format: str = opt("pairs", "pairs (best against worst) or rankings (all, best first)", ("pairs", "rankings"))
    device: str = opt("auto", "where to run a reward model", ("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "weights dtype of a reward model", ("auto", "fp32", "bf16", "fp16"))
    seed: int = opt(0, "--by annotators: seed of their noise; AI labellers: seed of the principles drawn")
    constitution: str = opt("toy", "AI labellers: the constitution YAML file ('toy': the toy world's)")
    principles_per_pair: int = opt(0, "AI labellers: principles asked about per pair, drawn at random (0 = all)")
    combine: str = opt("first", "AI labellers: how the principles asked make one verdict: first (the constitution's "
                                "order is its priority: the first principle that decides), principles (each decides "
                                "alone, their margins summed) or mean (of their probabilities)",
                       ("first", "principles", "mean"))
    ranked_input: bool = opt(False, "AI labellers: --data is already ranked best first (by people); report the "
                                    "labeller's agreement with that order")
    judgments: str | None = opt(None, "AI labellers: write every pair's judgment (both orders, confidence) here")
    batch_size: int = opt(32, "AI labellers: questions per forward pass of a local model")

    def check(self):
        require(self, "data", "out")
        if self.by != SHORTEST:
            check_ranker(self.by, "--by")


RANKERS = ("judge", "annotators")   # and rm:DIR, model:DIR, openai:URL
SHORTEST = "shortest"   # `rank` only: a deliberately biased labeller (docs/scenarios.md)
AI_LABELLERS = ("model:", "openai:")


def check_ranker(by: str, option: str) -> None:
    if by not in RANKERS and not by.startswith(("rm:", *AI_LABELLERS)):
        raise UsageError(f"{option} {by!r}: expected 'judge', 'annotators', 'rm:DIR', 'model:DIR' or 'openai:URL'")


def sample_responses(model, tokenizer, records, k: int, max_new_tokens: int, temperature: float, top_p: float,
                     seed: int, batch_size: int = 32) -> list[dict]:
    """K sampled responses per prompt record, as rankings-shaped rows (unranked)."""

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, do_sample=True,
                            min_new_tokens=1, stop_token_ids=tuple(stop_token_ids(tokenizer)), seed=seed)
    conversations = [r.messages for r in records for _ in range(k)]
    out = generate_text(model, tokenizer, conversations, params, batch_size=batch_size)
    return [{"prompt": r.messages, "responses": out.texts[i * k:(i + 1) * k], "meta": r.meta}
            for i, r in enumerate(records)]


def scorer(by: str, placement=None, option: str = "--by", seed: int = 0, constitution: str = "toy",
           per_pair: int = 0):
    """A function (rows) -> list of score lists, one per row, from 'judge', 'annotators' (the judge's
    scores through the world's annotator noise, seeded by `seed`), 'rm:DIR' (given as `option`), or
    an AI labeller 'model:DIR' / 'openai:URL' under `constitution` (wins + half the ties)."""
    if by.startswith(AI_LABELLERS):
        rules = load_constitution(constitution)
        chat = ai_labeller.chat_backend(by, placement or choose_placement("auto", "auto"), option=option)
        return lambda rows: ai_labeller.label_rows(rows, chat, rules, per_pair, seed).scores
    if by in RANKERS:

        def gold(row):
            judged = [judge(row["prompt"], text, row.get("meta")) for text in row["responses"]]
            if judged[0].family is None:
                raise UsageError(f"{option} {by}: the toy world's judge knows no task in the prompt "
                                 f"{row['prompt'][-1]['content'][:60]!r}; rank such samples with rm:DIR")
            return [j.score for j in judged]

        if by == "judge":
            return lambda rows: [gold(row) for row in rows]
        rng = random.Random(f"annotators:{seed}")
        return lambda rows: [perceived_scores(gold(row), rng) for row in rows]

    model, tokenizer = load_reward_model(by[3:], placement or choose_placement("auto", "auto"), option=option)

    def by_rm(rows):
        flat = score_texts(model, tokenizer, [row["prompt"] + [{"role": "assistant", "content": text}]
                                              for row in rows for text in row["responses"]])
        out, start = [], 0
        for row in rows:
            out.append(flat[start:start + len(row["responses"])])
            start += len(row["responses"])
        return out

    return by_rm


def rank_rows(rows: list[dict], scores: list[list[float]], fmt: str) -> tuple[list[dict], int]:
    """Order each row's responses by score; returns (rows in `fmt`, prompts dropped because all tied)."""
    out, tied = [], 0
    for row, row_scores in zip(rows, scores):
        order = sorted(range(len(row_scores)), key=lambda i: -row_scores[i])
        best, worst = order[0], order[-1]
        if row_scores[best] == row_scores[worst]:
            tied += 1
            continue
        meta = row.get("meta") or {}
        # Toy-world rows carry the clean judge's score of each answer: kept, in the new order, so
        # that a reward model trained on the output is still measured against the gold order.
        gold = row.get("gold_scores")
        gold = gold if isinstance(gold, list) and len(gold) == len(row_scores) else None
        if fmt == "pairs":
            out.append({"prompt": row["prompt"], "chosen": row["responses"][best],
                        "rejected": row["responses"][worst], "meta": meta,
                        "scores": [row_scores[best], row_scores[worst]],
                        **({"chosen_gold": gold[best], "rejected_gold": gold[worst]} if gold else {})})
        else:
            out.append({"prompt": row["prompt"], "responses": [row["responses"][i] for i in order],
                        "scores": [row_scores[i] for i in order], "meta": meta,
                        **({"gold_scores": [gold[i] for i in order]} if gold else {})})
    return out, tied


def read_rows(path: str) -> list[dict]:
    """Rows of a rankings-shaped file, each checked; errors name the file and line."""
    if not Path(path).is_file():
        raise UsageError(f"--data {path}: no such file")
    rows = []
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        responses = row.get("responses") if isinstance(row, dict) else None
        if (not isinstance(responses, list) or len(responses) < 2
                or not all(isinstance(r, str) for r in responses)):
            raise UsageError(f"{path}:{line_no}: expected {{\"prompt\", \"responses\": [at least 2 strings]}}")
        if isinstance(row.get("prompt"), str):
            row["prompt"] = [{"role": "user", "content": row["prompt"]}]
        prompt = row.get("prompt")
        if not prompt or not is_message_list(prompt):
            raise UsageError(f"{path}:{line_no}: field 'prompt' must be a string or a non-empty list of "
                             "{\"role\", \"content\"} messages")
        if row.get("meta") is not None and not isinstance(row["meta"], dict):
            raise UsageError(f"{path}:{line_no}: field 'meta' must be an object")
        rows.append(row)
    if not rows:
        raise UsageError(f"--data {path}: no rows")
    return rows


def sample_command(config: SampleConfig) -> int:
    refuse_a_directory(config.out)
    refuse_overwriting_inputs(config.out, input_paths(config), directory=False)
    records = load_prompts(config.prompts)
    if config.max_rows:
        records = records[: config.max_rows]
    placement = choose_placement(config.device, config.dtype)
    model = load_causal_lm(config.model, placement, config.trust_remote_code).eval()
    tokenizer = load_tokenizer(config.model, config.trust_remote_code, option="--model")
    rows = sample_responses(model, tokenizer, records, config.k, config.max_new_tokens, config.temperature,
                            config.top_p, config.seed, config.batch_size)
    atomic_write_jsonl(config.out, rows)
    print(f"{len(rows)} prompts x {config.k} responses written to {config.out}")
    return 0


def rank_command(config: RankConfig) -> int:
    refuse_a_directory(config.out)
    refuse_overwriting_inputs(config.out, input_paths(config), directory=False)
    rows = read_rows(config.data)
    if config.by.startswith(AI_LABELLERS):
        return ai_rank(rows, config)
    if config.by == SHORTEST:   # fewer characters is better; an answer's content counts for nothing
        scores = [[-float(len(text.strip())) for text in row["responses"]] for row in rows]
    else:
        scores = scorer(config.by, choose_placement(config.device, config.dtype), seed=config.seed)(rows)
    ranked, tied = rank_rows(rows, scores, config.format)
    if not ranked:
        raise UsageError(f"{config.data}: every prompt's responses tied under --by {config.by}; nothing to write")
    atomic_write_jsonl(config.out, ranked)
    print(f"{len(ranked)} {config.format} written to {config.out} ({tied} prompts dropped: all responses tied)",
          file=sys.stderr)
    return 0


def ai_rank(rows: list[dict], config: RankConfig) -> int:
    """`rank --by model:DIR|openai:URL`: --format pairs writes every pair the labeller decided (ties
    left out) with its confidence; rankings orders each prompt's responses by wins + half the ties.
    Its agreement with gold / human labels goes to stderr."""
    rules = load_constitution(config.constitution)
    chat = ai_labeller.chat_backend(config.by, choose_placement(config.device, config.dtype),
                                    batch_size=config.batch_size)
    labels = ai_labeller.label_rows(rows, chat, rules, config.principles_per_pair, config.seed, config.combine)
    if config.judgments:
        atomic_write_jsonl(config.judgments, labels.judgments)
    report = ai_labeller.agreement(rows, labels, config.ranked_input)
    print("labeller: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()),
          file=sys.stderr)
    if config.format == "pairs":
        out = []
        for j in labels.judgments:
            if j["verdict"]:
                row = rows[j["row"]]
                win, lose = (j["i"], j["j"]) if j["verdict"] > 0 else (j["j"], j["i"])
                out.append({"prompt": row["prompt"], "chosen": row["responses"][win], "rejected": row["responses"][lose],
                            "confidence": j["confidence"], "meta": row.get("meta") or {}})
    else:
        out, _ = rank_rows(rows, labels.scores, "rankings")
    if not out:
        raise UsageError(f"{config.data}: the labeller decided no pair (every pair tied between the two orders); "
                         "nothing to write")
    atomic_write_jsonl(config.out, out)
    print(f"{len(out)} {config.format} written to {config.out}", file=sys.stderr)
    return 0
