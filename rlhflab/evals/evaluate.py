"""`rlhflab eval`: compare models on the same prompts.

Per model: greedy answers, the gold judge's score (toy-world prompts only), the reward model's
score, the win rate against a baseline decided by that reward model (ties counted half, with a
95% Wilson interval), mean length, distinct-1/2, and — from one sampled answer per prompt — the
per-token entropy and the KL to a reference model (the sequence-level k1 estimate, which is
unbiased for samples from the model).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhflab.config import COMPILE_HELP, Renamed, opt
from rlhflab.data.formats import load_prompts
from rlhflab.data.template import stop_token_ids
from rlhflab.errors import UsageError
from rlhflab.feedback.preferences import sample_responses
from rlhflab.infer.engine import SamplingParams, generate_text, greedy_answers
from rlhflab.models.compiled import GENERATE, compile_model
from rlhflab.models.loading import _check_source, choose_placement, load_causal_lm, load_tokenizer
from rlhflab.rewards import compose
from rlhflab.rewards.model import is_reward_model, load_reward_model, score_texts
from rlhflab.runs import atomic_write_json, atomic_write_jsonl, input_paths, refuse_overwriting_inputs
from rlhflab.train.roles import response_logprobs
from rlhflab.world import judge
from rlhflab.world.judge import FACETS


def old_judge_value(value: str) -> str:
    """`--judge rm:DIR`, the old spelling of `--reward-model DIR`."""
    if not value.startswith("rm:"):
        raise UsageError(f"--judge {value!r}: expected rm:DIR")
    return value[3:]


@dataclass
class EvalConfig:
    """Compare models on held-out prompts: gold score, RM score, win rate, length, diversity, KL."""

    stage = "eval"
    # "judge" is the toy world's gold judge only; the reward model was `--judge rm:DIR`.
    deprecated_aliases = {"judge": Renamed("reward_model", value=old_judge_value)}
    model: str | None = opt(None, "models to compare (directories or adapters): repeat --model or separate with "
                                  "commas; NAME=PATH names one", repeatable=True)
    prompts: str | None = opt(None, "prompts file (toy-world ones get the gold judge)")
    baseline: str | None = opt(None, "model that the others' win rate is measured against (needs --reward-model)")
    reward_model: str | None = opt(None, "reward model directory that scores answers (and decides --baseline's win "
                                         "rate): from `rlhflab rm`, or a Hugging Face sequence classifier")
    reference: str | None = opt(None, "model to measure each model's KL to (e.g. the SFT model)")
    max_rows: int = opt(200, "prompts used (0 = all)")
    max_new_tokens: int = opt(48, "longest answer")
    batch_size: int = opt(32, "prompts generated at once")
    seed: int = opt(0, "seed of the sampled answers used for entropy and KL")
    out: str | None = opt(None, "write the figures here (a .json file, or a directory that gets figures.json), "
                                   "and each model's answers beside them as NAME.jsonl")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")
    device: str = opt("auto", "where to run", ("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "weights dtype", ("auto", "fp32", "bf16", "fp16"))
    compile: str = opt("auto", COMPILE_HELP, ("false", "true", "auto"))

    def check(self):
        if not self.model:
            raise UsageError("give --model (one or more, comma-separated)")
        if not self.prompts:
            raise UsageError("give --prompts")
        if self.baseline and not self.reward_model:
            raise UsageError("--baseline needs --reward-model DIR to decide who wins")
        named_models(self.model)   # the names; the paths are checked when the run starts (a pipeline's
        #                            earlier stages may still have to write them)


def named_models(spec: str) -> dict[str, str]:
    out = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, path = item.rpartition("=") if "=" in item else (Path(item).name or item, "", item)
        if not name or "/" in name:
            raise UsageError(f"--model {item}: give a name without '/' (NAME=PATH)")
        if name in out:
            raise UsageError(f"--model: two models are called {name!r} ({out[name]}, {path}); "
                             "name them with NAME=PATH")
        out[name] = path
    return out


# ---------------------------------------------------------------------------------------------
# Figures.


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (ties count half a success)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def win_rate(scores: list[float], baseline: list[float], tie: float = 1e-6) -> dict:
    wins = sum(a > b + tie for a, b in zip(scores, baseline))
    ties = sum(abs(a - b) <= tie for a, b in zip(scores, baseline))
    n = len(scores)
    rate = (wins + 0.5 * ties) / max(n, 1)
    low, high = wilson(wins + 0.5 * ties, n)
    return {"win_rate": rate, "wins": wins, "ties": ties, "losses": n - wins - ties, "ci95": [low, high]}


def distinct_n(token_lists: list[list[int]], n: int) -> float:
    """Unique n-grams over all n-grams, pooled across answers."""
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def gold_scores(records, texts: list[str]) -> dict | None:
    """Gold-judge mean and facets, or None when the prompts are not toy-world ones."""

    if not any(r.meta.get("family") for r in records):
        return None
    results = [judge(r.messages, text, r.meta) for r, text in zip(records, texts)]
    facets = {}
    for name in FACETS:
        values = [j.facets[name] for j in results if name in j.facets]
        facets[name] = sum(values) / len(values) if values else None
    return {"gold": sum(j.score for j in results) / len(results), "facets": facets}


def answer_figures(records, texts: list[str], tokenizer) -> dict:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return {"mean_chars": sum(len(t) for t in texts) / len(texts),
            "mean_tokens": sum(len(i) for i in ids) / len(ids),
            "empty": sum(not t.strip() for t in texts) / len(texts),
            "distinct_1": distinct_n(ids, 1), "distinct_2": distinct_n(ids, 2)}


@torch.no_grad()
def entropy_and_kl(model, reference, tokenizer, records, config) -> dict:
    """One sampled answer per prompt: mean per-token entropy, and sum over tokens of log p - log p_ref."""

    params = SamplingParams(max_new_tokens=config.max_new_tokens, do_sample=True, seed=config.seed,
                            stop_token_ids=tuple(stop_token_ids(tokenizer)))
    gen = generate_text(model, tokenizer, [r.messages for r in records], params, batch_size=config.batch_size)
    entropy_sum, tokens, kl_sum = 0.0, 0, 0.0
    size = config.batch_size
    for start in range(0, len(records), size):
        ids, mask = (t[start:start + size] for t in gen.sequences())
        prompt_len = gen.prompt_ids.shape[1]
        response_mask = gen.response_mask[start:start + size].float()
        logps, entropy = response_logprobs(model, ids, mask, prompt_len, with_entropy=True)
        entropy_sum += float((entropy * response_mask).sum())
        tokens += int(response_mask.sum())
        if reference is not None:
            ref_logps, _ = response_logprobs(reference, ids, mask, prompt_len)
            kl_sum += float(((logps - ref_logps) * response_mask).sum())
    out = {"entropy": entropy_sum / max(tokens, 1)}
    if reference is not None:
        out["kl_to_reference"] = kl_sum / len(records)
    return out


# ---------------------------------------------------------------------------------------------
# The command.


def evaluate_models(models: dict[str, str], records, config, answers_dir: Path | None = None) -> dict:
    """Figures per model (see the module docstring); answers written to answers_dir/NAME.jsonl."""

    placement = choose_placement(config.device, config.dtype)
    reference = load_causal_lm(config.reference, placement, config.trust_remote_code,
                               option="--reference").eval() if config.reference else None
    reward_model = load_reward_model(config.reward_model, placement) if config.reward_model else None
    texts, results = {}, {}
    everyone = dict(models)
    baseline_name = None
    if config.baseline:
        same = [name for name, path in models.items() if Path(path).resolve() == Path(config.baseline).resolve()]
        baseline_name = same[0] if same else "baseline"
        everyone.setdefault(baseline_name, config.baseline)
    for name, path in everyone.items():
        print(f"eval: {name} ({path})", file=sys.stderr)
        model = load_causal_lm(path, placement, config.trust_remote_code).eval()
        compile_model(model, config.compile, GENERATE, f"model {name}", train=False, generates=True)
        tokenizer = load_tokenizer(path, config.trust_remote_code)
        rows = greedy_answers(model, tokenizer, records, config.max_new_tokens, config.batch_size)
        texts[name] = [row["response"] for row in rows]
        if answers_dir is not None:
            atomic_write_jsonl(answers_dir / f"{name}.jsonl", rows)
        figures = answer_figures(records, texts[name], tokenizer)
        figures.update(gold_scores(records, texts[name]) or {})
        if reward_model is not None:
            conversations = [r.messages + [{"role": "assistant", "content": t}] for r, t in zip(records, texts[name])]
            figures["rm_scores"] = score_texts(*reward_model, conversations)
            figures["rm_score"] = sum(figures["rm_scores"]) / len(records)
        figures.update(entropy_and_kl(model, reference, tokenizer, records, config))
        results[name] = figures
    if baseline_name:
        for name in models:
            if name != baseline_name:
                results[name]["vs_baseline"] = win_rate(results[name]["rm_scores"], results[baseline_name]["rm_scores"])
    for figures in results.values():
        figures.pop("rm_scores", None)
    return results


def best_of_n(policy: str, rm: str, records, n: int, config, answers_dir: Path | None = None) -> dict:
    """Sample n answers per prompt from `policy`, keep the one the reward model scores highest. `rm`
    is a reward model directory, or weighted parts as `ppo --reward` takes them, comma-joined
    (rewards/compose.py): "rm:DIR,rules:DIR:0.5"."""

    placement = choose_placement(config.device, config.dtype)
    model = load_causal_lm(policy, placement, config.trust_remote_code).eval()
    tokenizer = load_tokenizer(policy, config.trust_remote_code)
    rows = sample_responses(model, tokenizer, records, n, config.max_new_tokens, 1.0, 1.0, config.seed,
                            config.batch_size)
    if compose.is_composed(rm):   # weighted parts, as `ppo --reward` takes them
        reward = compose.build(rm, placement, world_prompts=all(r.meta.get("family") for r in records))
        scores = reward([r for r in records for _ in range(n)], [t for row in rows for t in row["responses"]])
    else:
        reward_model, rm_tokenizer = load_reward_model(rm, placement)
        scores = score_texts(reward_model, rm_tokenizer, [row["prompt"] + [{"role": "assistant", "content": t}]
                                                          for row in rows for t in row["responses"]])
    texts, best_scores = [], []
    for i, row in enumerate(rows):
        mine = scores[i * n:(i + 1) * n]
        best = max(range(n), key=mine.__getitem__)
        texts.append(row["responses"][best])
        best_scores.append(mine[best])
    if answers_dir is not None:
        atomic_write_jsonl(answers_dir / f"best-of-{n}.jsonl",
                    [{"messages": r.messages, "response": t, "meta": r.meta} for r, t in zip(records, texts)])
    figures = answer_figures(records, texts, tokenizer)
    figures.update(gold_scores(records, texts) or {})
    figures["rm_score"] = sum(best_scores) / len(best_scores)
    return figures


def format_table(results: dict) -> str:
    columns = [("gold", "gold", ".3f"), ("rm_score", "rm", ".3f"), ("win", "win", ".1%"),
               ("mean_chars", "chars", ".1f"), ("empty", "empty", ".1%"), ("distinct_2", "dist-2", ".3f"),
               ("entropy", "entropy", ".3f"), ("kl_to_reference", "KL-ref", ".3f")]
    width = max(8, *(len(n) for n in results))
    head = f"{'model':<{width}} " + " ".join(f"{label:>8}" for _, label, _ in columns)
    lines = [head, "-" * len(head)]
    for name, fig in results.items():
        cells = []
        for key, _, fmt in columns:
            value = fig.get("vs_baseline", {}).get("win_rate") if key == "win" else fig.get(key)
            cells.append(f"{value:>8{fmt}}" if isinstance(value, (int, float)) else f"{'-':>8}")
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)


def run(config: EvalConfig) -> int:
    models = named_models(config.model)
    for path in models.values():   # every path, before any model runs
        _check_source(path, "--model")
        if is_reward_model(path):
            raise UsageError(f"--model {path}: a reward model, which scores answers but does not write them; "
                             "give it as --reward-model DIR")
    if config.reward_model and not Path(config.reward_model).is_dir():
        raise UsageError(f"--reward-model {config.reward_model}: no such directory")
    if config.reference:   # a KL between two vocabularies compares unrelated token ids
        vocab = load_tokenizer(config.reference, config.trust_remote_code, option="--reference").get_vocab()
        for name, path in models.items():
            if load_tokenizer(path, config.trust_remote_code, option="--model").get_vocab() != vocab:
                raise UsageError(f"--reference {config.reference}: its tokenizer is not {name}'s ({path}); "
                                 "the KL to it needs the same vocabulary")
    records = load_prompts(config.prompts)
    if config.max_rows:
        records = records[: config.max_rows]
    out = Path(config.out) if config.out else None
    if out is not None and (out.is_dir() or not out.suffix):
        out = out / "figures.json"          # a directory: the figures inside it, the answers beside them
    if out is not None and any(p.exists() and not p.is_dir() for p in out.parents):
        raise UsageError(f"--out {config.out}: a file stands where a directory of it should be")
    if out is not None:   # the figures and the answers beside them: never into a model's directory, nor over an input
        inputs = input_paths(config)
        for written in (out, *(out.parent / f"{name}.jsonl" for name in models)):
            refuse_overwriting_inputs(written, inputs, directory=False)
    results = evaluate_models(models, records, config, out.parent if out else None)
    print(format_table(results))
    if out is not None:
        atomic_write_json(out, {"prompts": config.prompts, "n": len(records), "models": results})
        print(f"figures: {out}")
    return 0

