"""`rlhflab critique`: supervised Constitutional AI (critique, then revise), as in Bai et al. 2022
(https://arxiv.org/abs/2212.08073), section 3.

For each prompt the model answers; then for --rounds rounds it is shown its current answer with
the critique request of a principle drawn at random, writes a critique, is given the principle's
revision request and writes a revised answer, which the next round critiques again. Written to
--out:

    sft.jsonl        {"messages": prompt + final answer, "meta"}   -> rlhflab sft --data
    prefs.jsonl      {"prompt", "chosen": final, "rejected": initial, "meta"}, only where the
                     revision changed the answer                    -> rlhflab dpo --data
    critiques.jsonl  every round: principle, answer, critique, revision
    summary.json     counts; on toy-world prompts the gold score before and after revision

How this departs from the paper: the answer is quoted in the user's turn rather than replayed as
the assistant's (constitution.critique_messages says why), and there are no few-shot examples;
a model that has never seen such requests needs to be taught them (the toy world's feedback
model, docs/rlaif.md).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhflab.config import opt, require
from rlhflab.data.formats import load_prompts
from rlhflab.errors import UsageError
from rlhflab.feedback.ai_labeller import chat_backend
from rlhflab.feedback.constitution import critique_messages, load_constitution, revision_messages
from rlhflab.models.loading import choose_placement
from rlhflab.runs import atomic_write_json, atomic_write_jsonl, refuse_a_file
from rlhflab.world import judge


@dataclass
class CritiqueConfig:
    """Answer, critique and revise under a constitution; write revised answers for SFT and pairs for DPO."""

    stage = "critique"
    model: str | None = opt(None, "the model that answers, critiques and revises: a directory or adapter, or "
                                  "'openai:URL[#MODEL]' for an OpenAI-compatible endpoint (key from OPENAI_API_KEY)")
    constitution: str = opt("toy", "constitution YAML file ('toy': the toy world's)")
    prompts: str | None = opt(None, "prompts file (prompts/messages/pairs/rankings formats are accepted)")
    out: str | None = opt(None, "output directory")
    rounds: int = opt(1, "critique-revision rounds per prompt, each with a principle drawn at random")
    principles: str | None = opt(None, "draw only from these principles (comma-separated names; default: all)")
    max_rows: int = opt(0, "use at most this many prompts (0 = all)")
    max_new_tokens: int = opt(48, "longest answer or revision")
    critique_tokens: int = opt(48, "longest critique")
    temperature: float = opt(1.0, "sampling temperature of the first answers (critiques and revisions are greedy)")
    batch_size: int = opt(32, "conversations generated at once by a local model")
    seed: int = opt(0, "seed of the answers' sampling and of the principles drawn")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")
    device: str = opt("auto", "where to run", ("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "weights dtype", ("auto", "fp32", "bf16", "fp16"))

    def check(self):   # --rounds and --temperature: their ranges (config.RANGES) are checked before this
        require(self, "model", "prompts", "out")


def revise(chat, prompts: list[list[dict]], principles, rounds: int,
           config: CritiqueConfig) -> tuple[list[str], list[str], list[dict]]:
    """(initial answers, final answers, trace rows) for each prompt."""
    rng = random.Random(f"critique:{config.seed}")
    initial = chat.complete(prompts, config.max_new_tokens, config.temperature, config.seed)
    current, trace = list(initial), []
    for round_ in range(1, rounds + 1):
        drawn = [rng.choice(principles) for _ in prompts]
        critiques = chat.complete([critique_messages(p, a, d) for p, a, d in zip(prompts, current, drawn)],
                                  config.critique_tokens)
        revised = chat.complete([revision_messages(p, a, c, d) for p, a, c, d in
                                 zip(prompts, current, critiques, drawn)], config.max_new_tokens)
        for index, (principle, answer, critique, revision) in enumerate(zip(drawn, current, critiques, revised)):
            trace.append({"index": index, "round": round_, "principle": principle.name, "answer": answer,
                          "critique": critique, "revision": revision})
        # An empty revision keeps the answer: "revise into nothing" is no improvement to learn from.
        current = [r if r.strip() else a for r, a in zip(revised, current)]
    return initial, current, trace


def run(config: CritiqueConfig) -> dict:
    refuse_a_file(config.out)
    constitution = load_constitution(config.constitution)
    principles = constitution.principles
    if config.principles:
        names = [n.strip() for n in config.principles.split(",") if n.strip()]
        known = {p.name for p in principles}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"--principles: {', '.join(unknown)} not in {constitution.path} "
                             f"(it has: {', '.join(sorted(known))})")
        principles = [p for p in principles if p.name in names]
    records = load_prompts(config.prompts)
    if config.max_rows:
        records = records[:config.max_rows]
    chat = chat_backend(config.model, choose_placement(config.device, config.dtype), config.trust_remote_code,
                        config.batch_size, option="--model")
    prompts = [r.messages for r in records]
    initial, final, trace = revise(chat, prompts, principles, config.rounds, config)

    sft_rows, pref_rows = [], []
    for record, first, last in zip(records, initial, final):
        meta = {**record.meta, "constitution": constitution.name}
        sft_rows.append({"messages": record.messages + [{"role": "assistant", "content": last}], "meta": meta})
        if last != first:
            pref_rows.append({"prompt": record.messages, "chosen": last, "rejected": first, "meta": meta})
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "sft.jsonl", sft_rows)
    atomic_write_jsonl(out / "prefs.jsonl", pref_rows)
    atomic_write_jsonl(out / "critiques.jsonl", trace)
    summary = {"stage": "critique", "model": config.model, "constitution": constitution.path, "prompts": len(records),
               "rounds": config.rounds, "revised": len(pref_rows), "revised_share": len(pref_rows) / max(1, len(records)),
               "principles": {p.name: sum(t["principle"] == p.name for t in trace) for p in principles}}
    if records and all(r.meta.get("family") for r in records):
        summary["gold_initial"] = sum(judge(r.messages, a, r.meta).score for r, a in zip(records, initial)) / len(records)
        summary["gold_revised"] = sum(judge(r.messages, a, r.meta).score for r, a in zip(records, final)) / len(records)
    atomic_write_json(out / "summary.json", summary)
    print(f"{len(records)} prompts, {len(pref_rows)} revised: {out / 'sft.jsonl'} and {out / 'prefs.jsonl'}"
          + (f"; gold {summary['gold_initial']:.3f} -> {summary['gold_revised']:.3f}" if "gold_revised" in summary
             else ""), file=sys.stderr)
    return summary
