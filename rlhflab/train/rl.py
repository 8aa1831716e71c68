"""RL from human feedback (InstructGPT step 3): PPO with a critic, or GRPO / RLOO / REINFORCE++,
in one rollout -> score -> advantage -> update loop chosen by --estimator.

How this departs from the papers, and why:
- The collapse of a published run (an RM that liked empty answers) is guarded in two places: generation can
  suppress EOS for the first --min-new-tokens tokens, and the monitors log the empty-answer rate,
  response length and (on toy-world prompts) the gold score every step, with an alarm when the
  reward rises while the gold score falls, one when the share of empty answers rises and one when
  the answers shrink to half their length (alarms.py).
- The KL to the reference is a per-token reward penalty (Ziegler et al. 2019, InstructGPT) for
  gae/rloo/reinforce++, and a k3 loss term for grpo (Shao et al. 2024), unless --kl-mode says
  otherwise; log-ratios are clamped and computed in fp32.
- The critic is a value head on the policy's body by default (--critic shared, as TRL 0.11), not
  InstructGPT's separate value model (--critic separate): on the toy world it gave the same gold gain
  per second of training with faster steps and less memory.
- LoRA mode holds one copy of the base weights for all four roles (see train/roles.py).

Dimensions: B rollouts per step (= prompts x --n-samples), P prompt tokens, R response tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhflab import losses, runs
from rlhflab.config import ModelOptions, Renamed, TrainOptions, opt
from rlhflab.data.formats import Record, load_records
from rlhflab.data.template import encode_prompt, stop_token_ids, turn_end_ids
from rlhflab.errors import NonFiniteError, UsageError
from rlhflab.infer.engine import SamplingParams, generate
from rlhflab.models.compiled import compile_model
from rlhflab.rewards import compose
from rlhflab.train import distributed, optim, skeleton
from rlhflab.train.alarms import Alarm, GoldSignal, gold_signal
from rlhflab.train.roles import active_adapter, base_weight_copies, load_roles, save_policy
from rlhflab.train.sft import collate, encode_dataset, nll_sum
from rlhflab.train.text_rewards import JUDGE, text_reward
from rlhflab.world import probe_prompts


@dataclass
class RLConfig(ModelOptions, TrainOptions):
    """PPO (critic + GAE) or a critic-free estimator against a reward model."""

    stage = "ppo"
    deprecated_aliases = {"judge_rm": Renamed("eval_reward_model")}   # "judge" is the toy world's gold judge only
    # Training options that mean nothing here: a step is --rollout-prompts x --n-samples rollouts,
    # updated in --mini-batch slices for --ppo-epochs. Not options of `rlhflab ppo` (init=False),
    # so setting one is an unknown-option error rather than silently nothing.
    epochs: float = field(default=1.0, init=False)
    batch_size: int = field(default=1, init=False)
    grad_accum: int = field(default=1, init=False)
    group_by_length: bool = field(default=False, init=False)
    eval_every: int = field(default=0, init=False)
    log_every: int = opt(1, "write a metrics.jsonl line every N steps (the alarms watch every step)")
    policy: str | None = opt(None, "the SFT model (directory or adapter): initial policy and the reference")
    reward: str | None = opt(None, "reward model directory written by `rlhflab rm`; a Hugging Face sequence "
                                   "classifier with one label (scores the answer's text with its own tokenizer and "
                                   "template); or 'judge': the toy world's gold judge as a programmatic reward "
                                   "(toy-world prompts). With the last two the critic starts from SFT. Repeat it to "
                                   "add up weighted parts, each logged as reward/<part>: rm:DIR[:W], rules:DIR[:W] "
                                   "(a rule reward model), python:FILE:FUNC[:W] (a TRL-style reward function), "
                                   "judge[:W] (docs/rlaif.md)", repeatable=True)
    rule_penalty: float = opt(0.0, "with a rules:DIR reward part: subtract this from an answer's reward when its "
                                   "likeliest rule break passes --rule-threshold (a hard penalty; 0 = off)")
    rule_threshold: float = opt(0.5, "--rule-penalty: the violation probability that counts as a break")
    prompts: str | None = opt(None, "prompts file (prompts/messages/pairs/rankings formats are accepted)")
    estimator: str = opt("gae", "how advantages are estimated: gae is PPO with a critic (InstructGPT), the others "
                         "are critic-free", losses.ESTIMATORS)   # the table says what each one needs
    critic: str = opt("shared", "shared: a value head on the policy's body, one forward pass for both (as TRL 0.11; "
                      "faster, less memory, the same gold gain per second on the toy world); separate: the critic "
                      "has its own weights (InstructGPT; an adapter of its own under LoRA)", ("shared", "separate"))
    critic_init: str = opt("reward", "with --critic separate: initialise the critic from the reward model (InstructGPT) "
                           "or the SFT model", ("reward", "sft"))
    n_samples: int = opt(1, "responses per prompt (grpo/rloo need >= 2)")
    share_prompt: bool = opt(True, "critic-free estimators with --n-samples > 1: run the samples of one prompt "
                                   "packed in one row, the prompt once (needs --mini-batch a multiple of "
                                   "--n-samples; checked at the start, models that cannot take it fall back)")
    rollout_prompts: int = opt(16, "prompts per rollout (a step = one rollout + its updates)")
    mini_batch: int = opt(8, "rollouts per gradient step inside an update")
    ppo_epochs: int = opt(2, "passes over each rollout")
    max_new_tokens: int = opt(48, "longest response")
    min_new_tokens: int = opt(1, "suppress EOS until this many tokens were generated, so that an empty answer cannot be sampled; 0 = off")
    temperature: float = opt(1.0, "sampling temperature of rollouts")
    top_p: float = opt(1.0, "nucleus sampling of rollouts")
    kl_coef: float = opt(0.05, "initial KL coefficient beta")
    kl_target: float = opt(0.0, "adaptive KL: target KL per sequence (0 = fixed beta)")
    kl_horizon: int = opt(10000, "adaptive KL horizon (Ziegler et al.)")
    kl_mode: str = opt("auto", "KL as a reward penalty or a loss term (auto: loss for grpo, reward otherwise)",
                       ("auto", "reward", "loss"))
    kl_estimator: str = opt("k1", "per-token KL estimator in the reward (loss mode uses k3)", ("k1", "k2", "k3", "abs"))
    clip_eps: float = opt(0.2, "PPO ratio clip")
    value_clip: float = opt(0.2, "value clip around the rollout's values")
    vf_coef: float = opt(0.5, "value loss weight")
    critic_lr: float = opt(0.0, "critic learning rate (0 = same as --lr)")
    entropy_coef: float = opt(0.0, "entropy bonus weight")
    gamma: float = opt(1.0, "discount")
    lam: float = opt(0.95, "GAE lambda")
    whiten_advantages: bool = opt(True, "normalise advantages over the rollout")
    reward_norm: bool = opt(True, "normalise RM scores with running mean/std")
    reward_clip: float = opt(5.0, "clip (normalised) scores to +-this (0 = off)")
    missing_eos_penalty: float = opt(0.0, "subtract this from the score of a response cut at max length")
    target_kl_stop: float = opt(0.0, "stop an update early when approx KL to the rollout policy passes this (0 = off)")
    ptx_data: str | None = opt(None, "SFT conversations for the PPO-ptx term (InstructGPT)")
    ptx_coef: float = opt(0.0, "weight of the ptx next-token loss")
    probe_every: int = opt(10, "append responses to the probe prompts to samples.jsonl every N steps (0 = off)")
    alarm_window: int = opt(5, "logged steps over which reward and gold-score trends are compared")
    max_nonfinite: int = opt(3, "stop after this many non-finite batches in a row")
    eval_reward_model: str | None = opt(None, "a second, held-out reward model (from `rlhflab rm`, or a Hugging Face "
                                              "sequence classifier) used as the gold signal when prompts are not "
                                              "toy-world ones")
    max_rows: int = opt(0, "use at most this many prompts (0 = all)")
    max_length: int = opt(256, "longest prompt in tokens (longer prompts keep their end)")
    lr: float = opt(1e-4, "policy learning rate")
    warmup_ratio: float = opt(0.0, "share of steps spent warming the learning rate up")
    scheduler: str = opt("constant", "learning-rate schedule", ("cosine", "linear", "constant"))
    max_steps: int = opt(50, "RL steps (rollout + update)")

    def check(self):
        if not self.policy and not self.model:
            raise UsageError("give --policy (the SFT model directory or adapter)")
        if not self.reward:
            raise UsageError("give --reward (a reward model from `rlhflab rm`, a Hugging Face sequence classifier, "
                             "or 'judge' on toy-world prompts)")
        if not self.prompts:
            raise UsageError("give --prompts (a file of prompts)")
        parts = compose.parse_specs(self.reward)   # a malformed part is an error before anything loads
        if self.rule_penalty and not any(part.kind == "rules" for part in parts):
            raise UsageError("--rule-penalty needs a rules:DIR part in --reward")
        if self.n_samples < self.estimator_spec.min_samples:
            raise UsageError(f"--estimator {self.estimator} compares responses to the same prompt: --n-samples must "
                             f"be >= {self.estimator_spec.min_samples}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise UsageError("--ptx-coef > 0 needs --ptx-data (SFT conversations)")
        for name in ("n_samples", "rollout_prompts", "mini_batch", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')}: must be at least 1")
        if self.min_new_tokens > self.max_new_tokens:
            raise UsageError("--min-new-tokens must not exceed --max-new-tokens")
        if self.critic_init != "reward" and not (self.estimator_spec.critic and self.critic == "separate"):
            raise UsageError(f"--critic-init {self.critic_init} starts a separate critic, which this run does not have "
                             + ("(--critic shared, the default, is a fresh value head on the policy's body): add "
                                "--critic separate, or leave --critic-init out" if self.estimator_spec.critic else
                                f"(--estimator {self.estimator} has no critic): leave --critic-init out"))

    @property
    def estimator_spec(self) -> losses.Estimator:
        return losses.ESTIMATORS[self.estimator]

    @property
    def kl_in_loss(self) -> bool:
        return self.kl_mode == "loss" or (self.kl_mode == "auto" and self.estimator_spec.kl_in_loss)


SUMMARY_FIGURES = ("reward", "kl_k1", "response_len", "empty_rate", "gold")   # summary.json's final_* means


@dataclass
class Rollout:
    """One batch of experience; every tensor is detached."""

    input_ids: torch.Tensor       # (B, P+R) prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor  # (B, P+R)
    prompt_len: int               # P
    mask: torch.Tensor            # (B, R) 1 on response tokens (stop token included)
    old_logprobs: torch.Tensor    # (B, R) under the policy that generated it
    ref_logprobs: torch.Tensor    # (B, R) under the reference
    values: torch.Tensor | None   # (B, R) critic values (estimators with a critic only)
    advantages: torch.Tensor      # (B, R)
    returns: torch.Tensor | None  # (B, R) value targets (estimators with a critic only)
    rendered: tuple[torch.Tensor, torch.Tensor] | None = None  # ids, mask as a reward model reads them


def repetition(tokens: list[int]) -> float:
    """Share of repeated bigrams in a response (0 = none repeated)."""
    pairs = list(zip(tokens, tokens[1:]))
    return 1.0 - len(set(pairs)) / len(pairs) if len(pairs) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Rollout: generate, score, make advantages.


@torch.no_grad()
def collect(roles, tokenizer, records, config: RLConfig, step: int, kl_ctl, moments,
            text_reward=None, accelerator=None) -> tuple[Rollout, dict, list[str]]:
    """This process's rollouts of `records` (its share of the step's prompts), sampled with a seed
    of its own; the reward's running moments are those of every process's scores."""
    rank = accelerator.process_index if accelerator is not None else 0

    prompts = [encode_prompt(tokenizer, r.messages)[-config.max_length:] for r in records]
    params = SamplingParams(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                            temperature=config.temperature, top_p=config.top_p, do_sample=True,
                            stop_token_ids=tuple(stop_token_ids(tokenizer)), seed=config.seed * 100_003 + step + 1_000_003 * rank)
    with active_adapter(roles.lm, "default") if roles.lora else contextlib.nullcontext():
        gen = generate(roles.lm, tokenizer, prompts, params, step=step,
                       prompt_texts=[r.messages[-1]["content"] for r in records])
    input_ids, attention_mask = gen.sequences()
    prompt_len = gen.prompt_ids.shape[1]
    mask = gen.response_mask.float()                                                   # (B, R)
    # The scoring passes go in mini-batches: one pass over every rollout at once would hold
    # B x T x V logits at a time. The entropy monitor is read here, without grad, so the update
    # only pays for it when it is a loss term. Rows go by prompt length (a stable sort: a group's
    # samples share their prompt and stay together), so that each mini-batch sheds the left padding
    # its prompts do not need (Roles trims it); the results come back in the rollout's order.
    order = torch.argsort(attention_mask[:, :prompt_len].sum(-1), stable=True)
    unsorted = torch.argsort(order)

    def passes(fn, ids=input_ids, am=attention_mask):
        ids, am = ids[order], am[order]
        parts = [fn(ids[i:i + config.mini_batch], am[i:i + config.mini_batch])
                 for i in range(0, ids.shape[0], config.mini_batch)]
        if isinstance(parts[0], tuple):
            return [torch.cat(p)[unsorted] for p in zip(*parts)]
        return torch.cat(parts)[unsorted]

    estimator = config.estimator_spec
    shared = estimator.critic and roles.shared_critic
    if shared:
        old_logprobs, entropy, shared_values = passes(
            lambda ids, am: roles.policy_and_values(ids, am, prompt_len, with_entropy=True))
    else:
        old_logprobs, entropy = passes(
            lambda ids, am: roles.logprobs("policy", ids, am, prompt_len, with_entropy=True, group=roles.pack_group))
    ref_logprobs = passes(lambda ids, am: roles.logprobs("reference", ids, am, prompt_len, group=roles.pack_group)[0])
    rendered = as_rendered(gen, tokenizer)
    if text_reward is not None:
        raw_scores = torch.tensor(text_reward(records, gen.texts), device=mask.device)
    else:
        raw_scores = passes(roles.scores, *rendered).float()                                       # (B,)
    scores = raw_scores - config.missing_eos_penalty * (~gen.finished).float()
    everyone = accelerator.gather(scores) if accelerator is not None and accelerator.num_processes > 1 else scores
    if not torch.isfinite(everyone).all():   # seen alike by every process, which all skip the step
        raise FloatingPointError("non-finite reward")
    if config.reward_norm:
        mean, std = moments.update(everyone)
        scores = (scores - mean) / (std + 1e-6)
    if config.reward_clip:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    kl = losses.kl_penalty(old_logprobs, ref_logprobs, kind=config.kl_estimator) * mask  # (B, R)
    reward_kl = torch.zeros_like(kl) if config.kl_in_loss else kl
    values = None
    if estimator.critic:
        values = (shared_values if shared else passes(lambda ids, am: roles.values(ids, am, prompt_len))).float() * mask
    advantages, returns = estimator.advantages(losses.AdvantageInputs(
        scores, reward_kl, mask, kl_ctl.value, config.n_samples, config.gamma, config.lam, values))
    if config.whiten_advantages and estimator.whiten:
        advantages = losses.masked_whiten(advantages, mask)
    rollout = Rollout(input_ids, attention_mask, prompt_len, mask, old_logprobs, ref_logprobs, values,
                      advantages * mask, returns, rendered)
    lengths = mask.sum(-1)
    responses = [gen.response_ids[i, : int(lengths[i])].tolist() for i in range(len(records))]
    k3 = losses.kl_penalty(old_logprobs, ref_logprobs, kind="k3") * mask
    stats = {
        "reward": raw_scores.mean().item(), "reward_normalised": scores.mean().item(),
        "kl_k1": (losses.kl_penalty(old_logprobs, ref_logprobs, kind="k1") * mask).sum(-1).mean().item(),
        "kl_k3": k3.sum(-1).mean().item(), "kl_coef": kl_ctl.value,
        "response_len": lengths.mean().item(), "entropy": losses.masked_mean(entropy, mask).item(),
        "empty_rate": sum(not t.strip() for t in gen.texts) / len(gen.texts),
        "repetition_rate": sum(repetition(r) > 0.3 for r in responses) / len(responses),
        "truncated_rate": (~gen.finished).float().mean().item(),
        **getattr(text_reward, "last_parts", {}),   # a composed reward's parts, each on its own
    }
    return rollout, stats, gen.texts


# ---------------------------------------------------------------------------------------------
# Update: several epochs of mini-batches over one rollout.


def update(roles, optimizer, accelerator, rollout: Rollout, config: RLConfig, kl_ctl, ptx) -> dict:
    batch = rollout.mask.shape[0]
    sums: dict[str, float] = {}
    count, stopped_early = 0, False
    group = roles.pack_group  # packed rows need whole groups: shuffle groups, not rows
    critic = config.estimator_spec.critic
    for _ in range(config.ppo_epochs):
        # --mini-batch counts rollouts over all processes; each takes its share.
        share = config.mini_batch // accelerator.num_processes
        for idx in (torch.randperm(batch // group)[:, None] * group + torch.arange(group)).flatten().split(share):
            ids, am, mask = rollout.input_ids[idx], rollout.attention_mask[idx], rollout.mask[idx]
            shared = critic and roles.shared_critic
            if shared:
                logprobs, entropy, values = roles.policy_and_values(ids, am, rollout.prompt_len,
                                                                    with_entropy=bool(config.entropy_coef))
            else:
                logprobs, entropy = roles.logprobs("policy", ids, am, rollout.prompt_len,
                                                   with_entropy=bool(config.entropy_coef), group=group)
            loss, metrics = losses.policy_loss(logprobs, rollout.old_logprobs[idx], rollout.advantages[idx], mask,
                                               clip_eps=config.clip_eps)
            if config.entropy_coef:
                loss = loss - config.entropy_coef * losses.masked_mean(entropy, mask)
            if config.kl_in_loss:
                kl = losses.kl_penalty(logprobs, rollout.ref_logprobs[idx], kind="k3")
                loss = loss + kl_ctl.value * losses.masked_mean(kl, mask)
            if ptx is not None:
                ptx_loss = ptx.loss(roles)
                loss = loss + config.ptx_coef * ptx_loss
                metrics["ptx_loss"] = ptx_loss.item()
            if not torch.isfinite(loss) and accelerator.num_processes == 1:   # several: the synced gradient tells all
                raise FloatingPointError("non-finite loss")
            # A separate critic: policy backward first, so its graph is freed before the critic's
            # forward builds another (the gradients add up the same). A shared one: one graph, one backward.
            if not shared:
                accelerator.backward(loss)
            if critic:
                if not shared:
                    values = roles.values(ids, am, rollout.prompt_len)
                vf_loss, vf_metrics = losses.value_loss(values, rollout.values[idx], rollout.returns[idx], mask,
                                                        clip_eps=config.value_clip)
                if not torch.isfinite(vf_loss) and accelerator.num_processes == 1:
                    raise FloatingPointError("non-finite value loss")
                accelerator.backward(loss + config.vf_coef * vf_loss if shared else config.vf_coef * vf_loss)
                metrics.update(vf_metrics)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            metrics = distributed.average_gradients(accelerator, params, float(mask.sum()), metrics)
            optim.optimizer_step(accelerator, params, optimizer, None, config.max_grad_norm)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
            if config.target_kl_stop and metrics.get("approx_kl", 0.0) > config.target_kl_stop:
                stopped_early = True
                break
        if stopped_early:
            break
    out = {key: value / max(count, 1) for key, value in sums.items()}
    out["updates"], out["early_stop"] = count, int(stopped_early)
    return out


class PtxTerm:
    """PPO-ptx (InstructGPT): next-token loss on SFT data mixed into the policy update."""

    def __init__(self, path: str, tokenizer, config: RLConfig, device):
        records, _ = load_records(path, "sft", option="--ptx-data")
        self.examples, _ = encode_dataset(records, tokenizer, config.max_length)
        self.pad_id, self.device, self.size = tokenizer.pad_token_id, device, config.mini_batch
        self.rng = random.Random(config.seed)

    def loss(self, roles) -> torch.Tensor:
        batch = collate(self.rng.sample(self.examples, min(self.size, len(self.examples))), self.pad_id, self.device)
        with active_adapter(roles.lm, "default") if roles.lora else contextlib.nullcontext():
            total, n = nll_sum(roles.lm, batch)
        return total / max(n, 1)


# ---------------------------------------------------------------------------------------------
# Probes and inspection dumps.


def probe_records(records, world: bool) -> list:
    """A fixed set of prompts answered every --probe-every steps (toy-world probes when available)."""
    if world:

        return [Record(p["messages"], meta=p["meta"]) for p in probe_prompts()]
    return records[:6]


@torch.no_grad()
def write_probes(path: Path, roles, tokenizer, probes, config: RLConfig, step: int, gold: GoldSignal,
                 text_reward=None) -> None:

    params = SamplingParams(max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                            do_sample=False, stop_token_ids=tuple(stop_token_ids(tokenizer)))
    with active_adapter(roles.lm, "default") if roles.lora else contextlib.nullcontext():
        gen = generate(roles.lm, tokenizer, [encode_prompt(tokenizer, r.messages) for r in probes], params, step=step)
    scores = text_reward(probes, gen.texts) if text_reward is not None else \
        roles.scores(*as_rendered(gen, tokenizer)).tolist()
    with path.open("a", encoding="utf-8") as handle:
        for record, text, score in zip(probes, gen.texts, scores):
            row = {"step": step, "prompt": record.messages[-1]["content"], "response": text, "reward": round(score, 4)}
            if gold.world:
                row["gold"] = round(gold.judge(record.messages, text, record.meta).score, 4)
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def as_rendered(gen, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Rollouts as a reward model reads them: where it was trained to, after the chat template's
    end-of-turn tokens (engine.Generation.rendered)."""

    return gen.rendered(turn_end_ids(tokenizer), stop_token_ids(tokenizer), tokenizer.pad_token_id)


def dump_nonfinite(out: Path, step: int, records, reason: str, rank: int = 0) -> None:
    """Keep the prompts of a skipped batch for inspection (each process its own share)."""
    runs.atomic_write_json(out / "nonfinite" / (f"step-{step}.json" if rank == 0 else f"step-{step}-process-{rank}.json"),
                           {"step": step, "reason": reason, "prompts": [r.messages for r in records]})


# ---------------------------------------------------------------------------------------------
# The loop.


def run(config: RLConfig) -> dict:
    # Load.
    records, stats = load_records(config.prompts, "prompts", option="--prompts", max_rows=config.max_rows)
    if config.reward == JUDGE and not GoldSignal(records).world:  # before anything is loaded or written
        raise UsageError(f"--reward judge scores answers with the toy world's judge, but {config.prompts} has "
                         "prompts without a toy-world meta.family (export them with `rlhflab world export`)")
    setup = skeleton.prepare_stage(config)
    if config.lora and config.lora_dropout:
        print(f"note: --lora-dropout {config.lora_dropout} has no effect here: RL runs the policy without dropout, so "
              "that the log-probs of a rollout and of its update compare like with like", file=sys.stderr)
    processes = setup.accelerator.num_processes
    for name in ("rollout_prompts", "mini_batch"):   # counted over all processes, which each take an equal share
        if getattr(config, name) % processes:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(config, name)}: counted over all processes and "
                             f"split evenly between them; with {processes} processes give a multiple of {processes}")
    composed = compose.build(config.reward, setup.placement, config.prompts, GoldSignal(records).world,
                             config.rule_penalty, config.rule_threshold, config.trust_remote_code) \
        if compose.is_composed(config.reward) else None
    # A composed reward scores the answers' text, as the judge does: the roles then hold no reward model.
    roles, tokenizer, info = load_roles(dataclasses.replace(config, reward=JUDGE) if composed else config,
                                        setup.placement)
    reward_from_text = composed or text_reward(config, setup.placement, tokenizer)
    if config.share_prompt and not config.estimator_spec.critic and config.n_samples > 1:
        if (config.mini_batch // processes) % config.n_samples:
            print(f"note: --mini-batch {config.mini_batch} (per process: {config.mini_batch // processes}) is not a "
                  f"multiple of --n-samples {config.n_samples}, so a "
                  "prompt's samples can fall in different mini-batches: each runs with its own copy of the prompt",
                  file=sys.stderr)
        elif roles.can_share_prompt(len(tokenizer)):
            roles.pack_group = config.n_samples
        else:
            print("note: this model does not give packed rows the log-probs of single ones (4D attention mask); "
                  "each sample runs with its own copy of the prompt", file=sys.stderr)
    gold = gold_signal(records, config, setup.placement, tokenizer)
    probes = probe_records(records, gold.world)

    # Build.
    accelerator = setup.accelerator
    groups = [{"params": roles.trainable_parameters("policy"), "lr": config.lr}]
    if config.estimator_spec.critic:
        groups.append({"params": roles.trainable_parameters("critic"), "lr": config.critic_lr or config.lr})
    optimizer = optim.adamw(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = optim.make_scheduler(optimizer, config, config.max_steps)
    fused = optim.lean_activations(roles, config)
    # every role's body; the rollouts decode plain (a compiled KV cache costs more than it saves here)
    compiled = compile_model(roles, config.compile, config.stage, "the policy")
    roles, optimizer, scheduler = accelerator.prepare(roles, optimizer, scheduler)
    roles_module = accelerator.unwrap_model(roles)
    if config.lora:
        skeleton.checkpoint_trainable_only(accelerator)
    kl_ctl = (losses.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.kl_target
              else losses.FixedKLController(config.kl_coef))
    moments = losses.RunningMoments()
    order = skeleton.BatchOrder([1] * len(records), config.rollout_prompts, config.seed, group_by_length=False)
    ptx = PtxTerm(config.ptx_data, tokenizer, config, accelerator.device) if config.ptx_coef > 0 else None
    metrics_log = skeleton.start_outputs(setup, config)
    step = 0
    if setup.resume_from:
        step = skeleton.restore_checkpoint(setup, order, strict=not config.lora)
        kl_ctl.load_state_dict(setup.state["kl_controller"])
        moments.load_state_dict(setup.state["reward_moments"])
    samples_path = setup.out / "samples.jsonl"
    if not setup.resume_from and accelerator.is_main_process:
        samples_path.unlink(missing_ok=True)
    alarm, alarms, nonfinite, last_checkpoint = Alarm(config.alarm_window), [], 0, setup.resume_from
    # Each step's summary figures, the steps before a resume included (from the checkpoint), so
    # that the summary and the alarms of a resumed run are those of an uninterrupted one.
    history = list(setup.state.get("history", []))
    alarms = list(setup.state.get("alarms", []))
    for past in history:
        alarm.update(past["reward"], past.get("gold"), past.get("empty_rate"), past.get("response_len"))

    # Loop.
    timer = runs.Timer()
    bar = skeleton.progress(config.max_steps, step, config.stage, config.progress and accelerator.is_main_process)
    while step < config.max_steps:
        started = time.perf_counter()
        # This process's share of the step's prompts (all of them with one process).
        batch_records = [records[i] for i in distributed.shard(order.next(), accelerator) for _ in range(config.n_samples)]
        try:
            rollout, row, texts = collect(roles_module, tokenizer, batch_records, config, step + 1, kl_ctl, moments,
                                           reward_from_text, accelerator)
            row.update(update(roles_module, optimizer, accelerator, rollout, config, kl_ctl, ptx))
            nonfinite = 0
        except FloatingPointError as exc:
            nonfinite += 1
            dump_nonfinite(setup.out, step + 1, batch_records, str(exc), accelerator.process_index)
            if nonfinite >= config.max_nonfinite:
                raise NonFiniteError(f"{exc} in {nonfinite} batches in a row, last at step {step + 1}; batches dumped "
                                     f"to {setup.out / 'nonfinite'} (last good checkpoint: {last_checkpoint})") from None
            step += 1
            continue
        scheduler.step()
        step += 1
        gold_score = gold(batch_records, texts, *rollout.rendered) if gold.available else None
        if gold_score is not None:
            row["gold"] = gold_score
        # Every process's rollouts count: figures are their means, and the KL controller (the same
        # in every process) sees them all.
        row = distributed.mean_over_processes(accelerator, {**row, "rollouts": len(batch_records)})
        row["rollouts"] = round(row["rollouts"] * processes)
        gold_score = row.get("gold")
        kl_ctl.update(row["kl_k1"], row["rollouts"])
        row["step_time_s"] = time.perf_counter() - started
        message = alarm.update(row["reward"], gold_score, row.get("empty_rate"), row.get("response_len"))
        if message:
            row["alarm"] = message
            alarms.append({"step": step, "message": message})
            print(f"\n[alarm] step {step}: {message}", file=sys.stderr)
        history.append({k: row[k] for k in (*SUMMARY_FIGURES, "step_time_s") if k in row})
        if step % config.log_every == 0 or step == config.max_steps:
            metrics_log.log(step, row)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row['kl_k1']:.3f}", len=f"{row['response_len']:.1f}",
                        refresh=False)   # drawn by update, at most once a second
        bar.update(1)
        if config.probe_every and (step % config.probe_every == 0 or step == config.max_steps) \
                and accelerator.is_main_process:
            write_probes(samples_path, roles_module, tokenizer, probes, config, step, gold, reward_from_text)
        if config.save_every and step % config.save_every == 0 and step < config.max_steps:
            last_checkpoint = skeleton.save_checkpoint(setup, config, step, order, {
                "kl_controller": kl_ctl.state_dict(), "reward_moments": moments.state_dict(),
                "history": history, "alarms": alarms})
    bar.close()

    # Save.
    if accelerator.is_main_process:
        # The guard travels with the model: it was trained never to meet EOS in its first tokens, so
        # decoded without the guard it may end there (generation_config.json; HF generate honours it too).
        if config.min_new_tokens > 0:
            roles_module.lm.generation_config.min_new_tokens = config.min_new_tokens
        save_policy(roles_module, tokenizer, setup.out, info)
    tail = history[-max(1, len(history) // 5):]
    summary = {"stage": config.stage, "estimator": config.estimator, "shared_prompt": roles_module.pack_group > 1,
               "steps": step, "wall_time_s": timer.elapsed,
               **{f"final_{k}": sum(r[k] for r in tail) / len(tail) for k in
                  SUMMARY_FIGURES if tail and all(k in r for r in tail)},
               "alarms": alarms, "base_weight_copies": base_weight_copies(roles_module), "lora": config.lora,
               "prompts": len(records), "rows_read": stats.rows_read, "rows_skipped": stats.rows_skipped,
               "seconds_per_step": sum(r["step_time_s"] for r in history) / max(1, len(history)),
               "fused_modules": fused, **compiled.summary()}
    return skeleton.finish(setup, summary)
