"""Direct preference optimisation: the reward-model-free path, with its variants and iterative rounds.

The policy starts from the SFT model, which is also the reference. With --lora there is ONE copy
of the base weights: the policy is a trainable adapter, the reference the frozen SFT adapter (or
the base with adapters off when SFT was merged). With full fine-tuning the reference log-probs
are computed once, in a no-grad pass before training and cached next to the run
(--precompute-ref, the default), or live from a frozen copy.

Chosen and rejected answers go through the model in one concatenated forward pass. Only the
last assistant turn is scored, so a multi-turn prompt's earlier answers do not count.

`--rounds R` is iterative (online) DPO: each round after the first (or every round, without
--data) samples K answers per prompt from the current policy, ranks them (gold judge or a
reward model), and trains on best-against-worst pairs. The reference stays the SFT model.

Dimensions: B pairs per micro-batch; the forward batch is 2B rows, chosen first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhflab import losses, runs
from rlhflab.config import DataOptions, ModelOptions, TrainOptions, opt
from rlhflab.data.formats import Record, load_records
from rlhflab.data.template import IGNORE_INDEX, encode_chat
from rlhflab.errors import UsageError
from rlhflab.feedback.preferences import check_ranker, rank_rows, sample_responses, scorer
from rlhflab.models.heads import answer_selection, causal_lm, logits_at, padding_mask_for
from rlhflab.models.loading import load_causal_lm, load_trainable, resize_for_tokenizer
from rlhflab.models.packing import pack_groups, packing_agrees
from rlhflab.rewards.model import check_reward_model
from rlhflab.train import skeleton
from rlhflab.train.roles import active_adapter, clone_frozen, save_trained_policy
from rlhflab.train.sft import collate


@dataclass
class DPOConfig(ModelOptions, DataOptions, TrainOptions):
    """DPO and its variants on preference pairs (or rankings), optionally in online rounds."""

    stage = "dpo"
    policy: str | None = opt(None, "the SFT model (directory or adapter): the starting policy and the reference")
    loss: str = opt("dpo", "dpo (sigmoid), ipo, cdpo (label smoothing), simpo (reference-free), rpo (dpo + NLL)",
                    losses.DPO_LOSSES)
    beta: float = opt(0.1, "strength of the implicit KL to the reference (simpo: reward scale)")
    label_smoothing: float = opt(0.1, "cdpo: assumed share of flipped labels")
    simpo_gamma: float = opt(0.5, "simpo: target reward margin")
    rpo_alpha: float = opt(1.0, "rpo: weight of the chosen answer's per-token NLL")
    precompute_ref: bool = opt(True, "compute reference log-probs once before training (else live, every step)")
    pairs_from_rankings: str = opt("all", "rankings data: all K-choose-2 pairs, or best against worst only",
                                   ("all", "best-worst"))
    warn_chosen_drop: float = opt(5.0, "warn when the chosen answers' log-prob falls this many nats below the reference")
    rounds: int = opt(1, "iterative DPO: rounds of sample -> rank -> train (rounds after the first need --prompts)")
    max_steps: int = opt(0, "optimizer steps to run in each round (0 = derive from --epochs)")
    prompts: str | None = opt(None, "prompts to sample from in online rounds")
    k: int = opt(4, "online rounds: responses sampled per prompt")
    rank_by: str = opt("judge", "online rounds: who ranks the samples, 'judge' (toy world), 'annotators' (its "
                                "noisy labellers) or 'rm:DIR'")
    round_prompts: int = opt(256, "online rounds: prompts sampled per round")
    max_new_tokens: int = opt(48, "online rounds: longest sampled answer")
    temperature: float = opt(1.0, "online rounds: sampling temperature")
    batch_size: int = opt(8, "pairs per micro-batch, counted over all processes (each takes its share)")
    lr: float = opt(5e-5, "peak learning rate")
    max_length: int = opt(256, "longest prompt + answer in tokens (longer ones keep their start)")
    share_prompt: bool = opt(True, "run chosen and rejected packed in one row, their shared prompt once "
                                   "(checked at the start; models that cannot take a 4D attention mask fall back)")

    def check(self):
        if not self.policy and not self.model:
            raise UsageError("give --policy (the SFT model directory or adapter)")
        if not self.data and not self.prompts:
            raise UsageError("give --data (preference pairs or rankings), or --prompts to sample pairs online")
        if self.rounds < 1:
            raise UsageError("--rounds: must be at least 1")
        if (self.rounds > 1 or not self.data) and not self.prompts:
            raise UsageError("online rounds sample from the policy: give --prompts")

        check_ranker(self.rank_by, "--rank-by")
        if self.k < 2:
            raise UsageError("--k: must be at least 2")
        if self.round_prompts < 1:
            raise UsageError(f"--round-prompts: must be at least 1, got {self.round_prompts}")
        if self.temperature < 0:
            raise UsageError(f"--temperature: must not be negative, got {self.temperature}")
        if self.beta <= 0:
            raise UsageError("--beta: must be positive")


# ---------------------------------------------------------------------------------------------
# Encoding and log-probs.


def last_turn_labels(labels: list[int]) -> list[int]:
    """Keep the labels of the last assistant turn only (the answer being compared)."""
    end = max((i for i, x in enumerate(labels) if x != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [x if start <= i <= end else IGNORE_INDEX for i, x in enumerate(labels)]


def encode_pairs(records, tokenizer, max_length: int, from_rankings: str) -> tuple[list[dict], dict]:
    """Records -> [{"chosen": Encoded-like dict, "rejected": ...}]; pairs with no answer token left are dropped."""
    pairs, truncated, dropped = [], 0, 0
    seen: dict[tuple[str, str], dict] = {}   # an answer in several pairs (pairs cut from one ranking) is encoded once
    for record in records:
        responses, n = record.responses, len(record.responses)
        if n == 2 or from_rankings == "all":
            index_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        else:
            index_pairs = [(0, n - 1)]
        conversation = json.dumps(record.messages, ensure_ascii=False, sort_keys=True)
        encoded = []
        for response in responses:
            if (conversation, response) not in seen:
                enc = encode_chat(tokenizer, record.messages + [{"role": "assistant", "content": response}], max_length)
                seen[conversation, response] = {"input_ids": enc.input_ids, "labels": last_turn_labels(enc.labels),
                                                "truncated": enc.truncated}
            encoded.append(seen[conversation, response])
            truncated += encoded[-1]["truncated"]
        for i, j in index_pairs:
            a, b = encoded[i], encoded[j]
            if all(x == IGNORE_INDEX for x in a["labels"]) or all(x == IGNORE_INDEX for x in b["labels"]):
                dropped += 1
                continue
            pairs.append({"chosen": a, "rejected": b})
    return pairs, {"rows_truncated": truncated, "pairs_without_answer_tokens": dropped}


def sequence_logps(model, pairs: list[dict], pad_id: int, device, packed: bool = False) -> tuple[torch.Tensor, ...]:
    """One forward pass over chosen + rejected: (chosen, rejected) summed log-probs and token counts, (B,).
    With `packed`, each pair is one row whose shared prompt runs once (packed_sequence_logps)."""

    if packed:
        return packed_sequence_logps(model, pairs, pad_id, device)

    batch = collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id, device)
    select, targets = answer_selection(batch["labels"], IGNORE_INDEX)
    logits = logits_at(model, select, input_ids=batch["input_ids"],
                       attention_mask=padding_mask_for(batch["attention_mask"]))
    token_logps = -torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")   # (N,)
    per_position = torch.zeros(select.shape, dtype=token_logps.dtype, device=token_logps.device)
    per_position[select] = token_logps
    logps, counts = per_position.sum(-1), select.sum(-1)
    b = len(pairs)
    return logps[:b], logps[b:], counts[:b], counts[b:]


def packed_sequence_logps(model, pairs: list[dict], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """sequence_logps with chosen and rejected packed in one row (models/packing.py): the prompt
    tokens they share run once, and the last of them starts each answer's segment, so that its
    logits predict the answer's first token as they would in a row of its own."""

    groups, prefixes = [], []
    for pair in pairs:
        (a, b), (la, lb) = ((pair[k]["input_ids"] for k in ("chosen", "rejected")),
                            (pair[k]["labels"] for k in ("chosen", "rejected")))
        shared, limit = 0, min(len(a), len(b)) - 1
        while shared < limit and a[shared] == b[shared] and la[shared] == IGNORE_INDEX == lb[shared]:
            shared += 1
        groups.append([a, b])
        prefixes.append(max(shared - 1, 0))
    rows = pack_groups(groups, pad_id, device, causal_lm(model).dtype, prefix_lengths=prefixes)
    shape = rows["input_ids"].shape
    select = torch.zeros(shape, dtype=torch.bool)
    targets = torch.zeros(shape, dtype=torch.long)
    owner = torch.zeros(shape, dtype=torch.long)
    for n, (row, start, _) in enumerate(rows["segments"]):    # pair i: segments 2i (chosen), 2i + 1
        labels, prefix = pairs[n // 2]["chosen" if n % 2 == 0 else "rejected"]["labels"], prefixes[n // 2]
        for j in range(prefix, len(labels) - 1):               # position j predicts token j + 1
            if labels[j + 1] != IGNORE_INDEX:
                select[row, start + j - prefix], targets[row, start + j - prefix] = True, labels[j + 1]
                owner[row, start + j - prefix] = n
    logits = logits_at(model, select.to(device), input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                       position_ids=rows["position_ids"])
    token_logps = -torch.nn.functional.cross_entropy(logits.float(), targets[select].to(device), reduction="none")
    owners = owner[select].to(device)
    sums = torch.zeros(2 * len(pairs), dtype=token_logps.dtype, device=device).index_add_(0, owners, token_logps)
    counts = torch.bincount(owners, minlength=2 * len(pairs))
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


def can_share_prompt(model, pad_id: int, device, vocab_size: int) -> bool:
    """Whether packed pairs get the log-probs single rows get, on two made-up pairs (see
    models/packing.py for the models that cannot take it)."""

    ids = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(3, max(vocab_size, 4), (n,), generator=ids).tolist()  # noqa: E731
    pairs = []
    for prompt_len, answers in ((6, (3, 5)), (4, (2, 4))):
        prompt = draw(prompt_len)
        rows = [prompt + draw(n) for n in answers]
        pairs.append({key: {"input_ids": row, "labels": [IGNORE_INDEX] * prompt_len + row[prompt_len:]}
                      for key, row in zip(("chosen", "rejected"), rows)})
    return packing_agrees(model, lambda: torch.stack(sequence_logps(model, pairs, pad_id, device, packed=True)[:2]),
                          lambda: torch.stack(sequence_logps(model, pairs, pad_id, device)[:2]),
                          causal_lm(model).dtype)


# ---------------------------------------------------------------------------------------------
# Policy and reference.


class PolicyAndReference:
    """The trainable policy and a way to get reference log-probs, with one base copy under LoRA."""

    def __init__(self, config, placement):
        self.config, self.placement = config, placement
        self.source = config.policy or config.model
        loaded = load_trainable(config, placement, self.source, "--policy")
        self.model, self.tokenizer, self.base_name = loaded.model, loaded.tokenizer, loaded.base
        self.reference_adapter, self.frozen = None, None
        self.shared_prompt = False  # set by run once can_share_prompt has checked the model
        if config.lora:
            if loaded.adapter:   # the SFT adapter: the policy trains on from it, a frozen copy is the reference
                self.model.load_adapter(self.source, adapter_name="reference", is_trainable=False)
                self.reference_adapter = "reference"
            for name, param in self.model.named_parameters():
                param.requires_grad = ".default." in name
        elif not config.precompute_ref and config.loss != "simpo":
            self.frozen = clone_frozen(self.model)

    @contextlib.contextmanager
    def reference(self, policy_untouched: bool):
        """A model that computes reference log-probs (no grad, eval mode) for the duration of the block."""

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if self.config.lora:
                    with active_adapter(self.model, self.reference_adapter):
                        yield self.model
                elif self.frozen is not None:
                    yield self.frozen
                elif policy_untouched:
                    yield self.model  # before the first update the policy is the reference
                else:
                    yield self._load_reference()
        finally:
            self.model.train(was_training)

    def _load_reference(self):
        model = load_causal_lm(self.source, self.placement, self.config.trust_remote_code, option="--policy")
        resize_for_tokenizer(model, self.tokenizer)
        return clone_frozen(model)


def reference_logps(policy: PolicyAndReference, pairs: list[dict], config, policy_untouched: bool, device,
                    cache: Path | None = None, show: bool = False, needed: list[int] | None = None) -> dict:
    """{"chosen": (N,), "rejected": (N,)} reference log-probs, cached in `cache` when given.

    Only the pairs in `needed` (default: all) are computed — training for a few hundred steps on
    a large file visits a fraction of it; the others stay NaN.
    """

    if config.loss == "simpo":  # reference-free
        zeros = torch.zeros(len(pairs))
        return {"chosen": zeros, "rejected": zeros}
    needed = sorted(set(range(len(pairs)) if needed is None else needed))
    if cache is not None and cache.is_file():
        cached = load_file(str(cache))
        if cached["chosen"].shape[0] == len(pairs) and bool(torch.isfinite(cached["chosen"][needed]).all()):
            return cached
    out = {"chosen": torch.full((len(pairs),), float("nan")), "rejected": torch.full((len(pairs),), float("nan"))}
    size = max(1, config.batch_size * 2)
    # Chunks of similar length: chosen and rejected of a chunk are padded to its longest answer.
    by_length = sorted(needed, key=lambda i: max(len(pairs[i]["chosen"]["input_ids"]),
                                                 len(pairs[i]["rejected"]["input_ids"])))
    bar = skeleton.progress(len(needed), 0, "reference log-probs", show)
    with policy.reference(policy_untouched) as model:
        for start in range(0, len(by_length), size):
            chunk = by_length[start:start + size]
            c, r, _, _ = sequence_logps(model, [pairs[i] for i in chunk], policy.tokenizer.pad_token_id, device,
                                        policy.shared_prompt)
            out["chosen"][chunk], out["rejected"][chunk] = c.cpu(), r.cpu()
            bar.update(len(chunk))
    bar.close()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")   # each process writes its own, then renames
        save_file(out, str(tmp))
        tmp.replace(cache)
    return out


def planned_indices(order: skeleton.BatchOrder, batches: int) -> list[int]:
    """Every pair index that `batches` micro-batches of this (fresh) order will visit."""
    return sorted({i for _ in range(batches) for i in order.next()})


def pair_loss(policy_model, pairs, ref: dict, indices: list[int], config, pad_id, device, packed: bool = False):
    """DPO-family loss and metrics of one micro-batch."""
    pc, pr, nc, nr = sequence_logps(policy_model, [pairs[i] for i in indices], pad_id, device, packed)
    rc, rr = ref["chosen"][indices].to(device), ref["rejected"][indices].to(device)
    loss, metrics = losses.dpo_loss(pc, pr, rc, rr, beta=config.beta, loss_type=config.loss,
                                    label_smoothing=config.label_smoothing, simpo_gamma=config.simpo_gamma,
                                    chosen_nll=-pc / nc.clamp(min=1), rpo_alpha=config.rpo_alpha,
                                    chosen_lengths=nc.clamp(min=1), rejected_lengths=nr.clamp(min=1))
    metrics["logps/chosen_shift"] = (pc - rc).mean().item() if config.loss != "simpo" else 0.0
    return loss, metrics


@torch.no_grad()
def evaluate(model, pairs, ref, config, pad_id, device, packed: bool = False) -> dict:
    """Held-out loss, implicit-reward accuracy and margin."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    size = max(1, config.batch_size * 2)
    for start in range(0, len(pairs), size):
        indices = list(range(start, min(start + size, len(pairs))))
        _, metrics = pair_loss(model, pairs, ref, indices, config, pad_id, device, packed)
        for key in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen_shift"):
            totals[key] = totals.get(key, 0.0) + metrics[key] * len(indices)
    model.train(was_training)
    return {"eval_" + k.split("/")[-1]: v / len(pairs) for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------
# Online rounds.


ROUND_OPTIONS = ("rank_by", "k", "round_prompts", "max_new_tokens", "temperature", "seed")


def round_pairs(policy: PolicyAndReference, config, round_no: int, prompts, out: Path) -> tuple[list, dict]:
    """Sample from the current policy, rank, and return pair records. A resumed run reuses the
    round's files when they were made with the same options (the policy that sampled them is gone)."""

    folder = out / f"round-{round_no}"
    pairs_file, info_file = folder / "pairs.jsonl", folder / "round.json"
    recipe = {name: getattr(config, name) for name in ROUND_OPTIONS}
    if pairs_file.is_file() and info_file.is_file():
        made_with = json.loads(info_file.read_text(encoding="utf-8")).get("options")
        if made_with != recipe:
            changed = sorted(k for k in recipe if (made_with or {}).get(k) != recipe[k])
            print(f"note: round {round_no}'s samples were made with other "
                  f"{', '.join('--' + k.replace('_', '-') for k in changed)}; sampling again", file=sys.stderr)
            pairs_file.unlink()
    if not pairs_file.is_file():
        rng = torch.Generator().manual_seed(config.seed * 1000 + round_no)
        chosen = torch.randperm(len(prompts), generator=rng)[: config.round_prompts].tolist()
        print(f"round {round_no}: sampling {config.k} answers for {len(chosen)} prompts", file=sys.stderr)
        rows = sample_responses(policy.model, policy.tokenizer, [prompts[i] for i in chosen], config.k,
                                config.max_new_tokens, config.temperature, 1.0, config.seed + round_no)
        scores = scorer(config.rank_by, policy.placement, "--rank-by", seed=config.seed * 1000 + round_no)(rows)
        ranked, tied = rank_rows(rows, scores, "pairs")
        if not ranked:   # nothing written: a run with other options must sample afresh
            raise UsageError(f"round {round_no}: every prompt's samples tied under --rank-by {config.rank_by}; "
                             "nothing to train on (raise --temperature or --k)")
        flat = [s for row in scores for s in row]
        runs.atomic_write_jsonl(folder / "samples.jsonl", rows)
        runs.atomic_write_json(info_file, {
            "round": round_no, "prompts": len(rows), "pairs": len(ranked), "tied_prompts": tied,
            "mean_sample_score": sum(flat) / len(flat), "ranked_by": config.rank_by, "options": recipe})
        runs.atomic_write_jsonl(pairs_file, ranked)   # last: its presence means the round is complete
    info = json.loads(info_file.read_text(encoding="utf-8"))
    info.pop("options", None)
    records = []
    for line in pairs_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        records.append(Record(row["prompt"], [row["chosen"], row["rejected"]], meta=row.get("meta") or {}))
    return records, info


# ---------------------------------------------------------------------------------------------
# The stage.


def run(config: DPOConfig) -> dict:
    # Load.
    records, stats, eval_records = [], None, []
    if config.data:
        records, eval_records, stats = skeleton.load_preferences(config)
    prompts = []
    if config.prompts:
        prompts, _ = load_records(config.prompts, "prompts", option="--prompts")
    online = config.rounds > 1 or not config.data
    if online and config.rank_by.startswith("rm:"):   # before round 1 trains

        check_reward_model(config.rank_by[3:], "--rank-by")
    if online and config.rank_by in ("judge", "annotators") and not all(p.meta.get("family") for p in prompts):
        raise UsageError(f"--rank-by {config.rank_by} ranks answers with the toy world's judge, but "
                         f"{config.prompts} has prompts without a toy-world meta.family: give --rank-by rm:DIR, "
                         "or world prompts")
    setup = skeleton.prepare_stage(config)
    policy = PolicyAndReference(config, setup.placement)
    tokenizer, device = policy.tokenizer, setup.placement.device
    pad_id = tokenizer.pad_token_id
    if config.share_prompt:
        policy.shared_prompt = can_share_prompt(policy.model, pad_id, device, len(tokenizer))
        if not policy.shared_prompt:
            print("note: this model does not give packed pairs the log-probs of single rows (4D attention mask); "
                  "chosen and rejected each run with their own copy of the prompt", file=sys.stderr)
    metrics_log = skeleton.start_outputs(setup, config)
    show = config.progress and setup.accelerator.is_main_process
    state = setup.state
    round_no = state.get("round", 1)
    untouched = setup.resume_from is None
    if untouched:   # a fresh start: online rounds and reference caches of an earlier attempt are stale
        for stale in [*setup.out.glob("round-*"), *setup.out.glob("ref_logps_*.safetensors")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)   # another process may remove it first
            else:
                stale.unlink(missing_ok=True)

    # Eval pairs and their reference log-probs (fixed for the whole run).
    eval_pairs, _ = encode_pairs(eval_records, tokenizer, config.max_length, config.pairs_from_rankings)
    ref_started = time.perf_counter()
    eval_ref = reference_logps(policy, eval_pairs, config, untouched, device, setup.out / "ref_logps_eval.safetensors",
                               show) if eval_pairs else None

    def items_of(round_no: int) -> tuple[list[dict], dict, dict]:
        info = {}
        if round_no == 1 and config.data:
            round_records = records
        else:
            round_records, info = round_pairs(policy, config, round_no, prompts, setup.out)
        pairs, enc_stats = encode_pairs(round_records, tokenizer, config.max_length, config.pairs_from_rankings)
        if not pairs:
            raise UsageError(f"round {round_no}: no pair has an answer token left after --max-length {config.max_length}")
        return pairs, {**enc_stats, **info}, info

    def order_of(pairs):
        lengths = [len(p["chosen"]["input_ids"]) + len(p["rejected"]["input_ids"]) for p in pairs]
        return skeleton.batch_order(config, lengths, config.seed + round_no)

    pairs, enc_stats, round_info = items_of(round_no)
    steps_per_round = state.get("steps_per_round") or skeleton.total_steps(config, len(pairs))
    ref = reference_logps(policy, pairs, config, untouched, device,
                          setup.out / f"ref_logps_round{round_no}.safetensors", show,
                          planned_indices(order_of(pairs), steps_per_round * config.grad_accum))
    ref_time = time.perf_counter() - ref_started

    # Build.
    steps = steps_per_round * config.rounds
    loop = skeleton.Loop(setup, config, policy.model, steps, order_of(pairs), metrics_log, unit="pairs",
                         what="the DPO loss", desc=f"dpo ({config.loss})")
    window, warned = [], False

    def watch_chosen(step: int, row: dict) -> None:
        """Warn once when the chosen answers' mean log-prob shift over --log-every steps falls below
        -(--warn-chosen-drop) nats."""
        nonlocal window, warned
        window = (window + [row["logps/chosen_shift"]])[-config.log_every:]
        if not warned and len(window) == config.log_every and sum(window) / len(window) < -config.warn_chosen_drop:
            warned = True
            print(f"\n[warning] step {step}: the chosen answers' log-prob is {-sum(window) / len(window):.1f} nats "
                  "below the reference. DPO widens the gap between chosen and rejected, which can also push the "
                  "chosen answer down; --loss rpo adds an NLL term that holds it up (see the README).", file=sys.stderr)

    def parts_of(pairs: list[dict], ref: dict, round_no: int) -> skeleton.StageParts:
        def loss(model, indices: list[int]):
            loss, figures = pair_loss(model, pairs, ref, indices, config, pad_id, device, policy.shared_prompt)
            return loss, {**figures, "pairs": float(len(indices))}

        return skeleton.StageParts(
            batch=lambda indices: indices,
            loss=loss,
            merge=lambda figures, _: {**skeleton.merge_micro_rows(figures), "round": round_no},
            evaluate=(lambda model: evaluate(model, eval_pairs, eval_ref, config, pad_id, device, policy.shared_prompt))
            if eval_pairs else None,
            postfix=lambda row: {"loss": f"{row['loss']:.4f}", "acc": f"{row['rewards/accuracy']:.2f}"},
            after_step=watch_chosen,
        )

    # Loop, round by round. A resumed run's summary covers the whole run: the rounds before its checkpoint too.
    rounds_log = list(state.get("rounds_log", []))
    while loop.step < steps:
        if loop.step >= round_no * steps_per_round:  # next online round: sample from the policy as it is now
            rounds_log.append({"round": round_no, **round_info})
            round_no += 1
            loop.bar.clear()
            pairs, enc_stats, round_info = items_of(round_no)
            extra_started = time.perf_counter()
            ref = reference_logps(policy, pairs, config, False, device,
                                  setup.out / f"ref_logps_round{round_no}.safetensors", show,
                                  planned_indices(order_of(pairs), steps_per_round * config.grad_accum))
            ref_time += time.perf_counter() - extra_started
            loop.order = order_of(pairs)
            if "mean_sample_score" in round_info:
                metrics_log.log(loop.step, {"round": round_no, "round_sample_score": round_info["mean_sample_score"]})
        loop.run(parts_of(pairs, ref, round_no), until=round_no * steps_per_round,
                 state={"round": round_no, "steps_per_round": steps_per_round, "rounds_log": rounds_log})
    trained = loop.close()
    rounds_log.append({"round": round_no, **round_info})

    # Save.
    unwrapped, row = loop.unwrapped(), loop.row
    figures = (evaluate(unwrapped, eval_pairs, eval_ref, config, pad_id, device, policy.shared_prompt)
               if eval_pairs else {})
    if setup.accelerator.is_main_process:

        save_trained_policy(unwrapped, tokenizer, setup.out, config.lora, policy.base_name)
    summary = {"stage": "dpo", "loss_type": config.loss, "beta": config.beta, **trained,
               "shared_prompt": policy.shared_prompt,
               "final_loss": row.get("loss"), "final_train_accuracy": row.get("rewards/accuracy"),
               "final_margin": row.get("rewards/margin"), "final_chosen_shift": row.get("logps/chosen_shift"),
               **figures, "pairs_per_s": loop.counted / max(loop.train_time + ref_time, 1e-9),
               "reference_time_s": ref_time, "rounds": rounds_log, "reference": (
                   "adapter" if policy.reference_adapter else "adapters-off" if config.lora else
                   "precomputed" if config.precompute_ref else "live"),
               "rows_read": stats.rows_read if stats else 0, "rows_skipped": stats.rows_skipped if stats else 0,
               "rows_without_preference": stats.rows_without_preference if stats else 0,
               **enc_stats, "lora": config.lora, "chosen_drop_warning": warned}
    return skeleton.finish(setup, summary)
