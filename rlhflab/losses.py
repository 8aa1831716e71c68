"""Every loss, advantage estimator, KL estimator and reduction of rlhflab, as pure torch functions.

Nothing here knows about models, configs or data: tensors in, `(loss, metrics)` out, where metrics
are detached Python floats. Tests check each against hand-computed values.

Dimension legend:
    B  sequences in a batch          T  response tokens (right-padded)
    P  prompts                        K  ranked responses per prompt
    G  samples per prompt (a group; groups are contiguous, B = P * G)
Masks are (B, T), 1 on real response tokens, 0 on padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Masked reductions.


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) position of the last 1 in each row of a mask, left- or right-padded. A row without one
    is a bug upstream (a score would be read at a pad position), so it raises."""
    last = mask.shape[1] - 1 - mask.long().flip(-1).argmax(-1)
    if not bool(mask.gather(1, last[:, None]).bool().all()):
        raise AssertionError("a row has no real token: the score would be read at a pad position")
    return last


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    return masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def aggregate(loss_per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """Reduce a (B, T) loss: token-mean (all tokens equal), seq-mean-token-sum, seq-mean-token-mean."""
    mask = mask.to(loss_per_token.dtype)
    if mode == "token-mean":
        return masked_mean(loss_per_token, mask)
    per_sequence = (loss_per_token * mask).sum(-1)
    if mode == "seq-mean-token-sum":
        return per_sequence.mean()
    if mode == "seq-mean-token-mean":
        return (per_sequence / mask.sum(-1).clamp(min=1.0)).mean()
    raise ValueError(f"unknown aggregation {mode!r}: token-mean, seq-mean-token-sum, seq-mean-token-mean")


# ---------------------------------------------------------------------------------------------
# Log-probabilities.


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B, T) log p(label), in fp32, one row at a time to bound memory."""
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        row_logits = row_logits.float()
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) -> (B, T) entropy of the next-token distribution, in fp32."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def nll_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Mean next-token loss. `labels` must already be aligned with `logits` (the caller shifts)."""
    loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=ignore_index)
    tokens = int((labels != ignore_index).sum())
    return loss, {"loss": loss.item(), "tokens": float(tokens)}


# ---------------------------------------------------------------------------------------------
# Reward modelling.


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
                       center_coef: float = 0.0):
    """-log sigmoid(r_c - r_r - margin), plus center_coef * mean((r_c + r_r)^2) to keep scores near 0."""
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen.float() + r_rejected.float()) ** 2).mean()
    gap = (r_chosen - r_rejected).float()
    return loss, {"loss": loss.item(), "accuracy": (gap > 0).float().mean().item(), "margin": gap.mean().item(),
                  "chosen": r_chosen.float().mean().item(), "rejected": r_rejected.float().mean().item()}


def ranking_loss(scores: torch.Tensor, mask: torch.Tensor | None = None):
    """InstructGPT's K-way loss (Ouyang et al. 2022, eq. 1): scores (P, K) best first; the mean of
    -log sigmoid(s_i - s_j) over all pairs i < j of a prompt, every prompt weighted equally."""
    scores = scores.float()
    k = scores.shape[1]
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.bool()
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=scores.device), diagonal=1)  # i < j
    pair_ok = upper & valid[:, :, None] & valid[:, None, :]                                     # (P, K, K)
    diff = scores[:, :, None] - scores[:, None, :]                                              # s_i - s_j
    per_pair = -F.logsigmoid(diff)
    n_pairs = pair_ok.sum((1, 2)).clamp(min=1)
    per_prompt = (per_pair * pair_ok).sum((1, 2)) / n_pairs
    loss = per_prompt.mean()
    accuracy = ((diff > 0) & pair_ok).sum() / pair_ok.sum().clamp(min=1)
    return loss, {"loss": loss.item(), "accuracy": accuracy.item(), "pairs": float(pair_ok.sum())}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of predicted probabilities against 0/1 outcomes, equal-width bins."""
    probs, labels = probs.float().flatten(), labels.float().flatten()
    edges = torch.linspace(0, 1, n_bins + 1)
    total = 0.0
    for i in range(n_bins):
        low, high = edges[i], edges[i + 1]
        inside = (probs > low) & (probs <= high) if i else (probs >= low) & (probs <= high)
        if inside.any():
            total += inside.float().mean().item() * abs(probs[inside].mean().item() - labels[inside].mean().item())
    return total


# ---------------------------------------------------------------------------------------------
# DPO family (inputs are summed sequence log-probs, (B,)).

DPO_LOSSES = ("dpo", "ipo", "cdpo", "simpo", "rpo")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
             loss_type: str = "dpo", label_smoothing: float = 0.0, simpo_gamma: float = 0.5, chosen_nll=None,
             rpo_alpha: float = 1.0, chosen_lengths=None, rejected_lengths=None):
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {loss_type!r}: one of {', '.join(DPO_LOSSES)}")
    pc, pr = policy_chosen_logps.float(), policy_rejected_logps.float()
    rc, rr = ref_chosen_logps.float(), ref_rejected_logps.float()
    if loss_type == "simpo":
        # SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin gamma.
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("simpo needs chosen_lengths and rejected_lengths")
        chosen_reward = beta * pc / chosen_lengths.float()
        rejected_reward = beta * pr / rejected_lengths.float()
        losses = -F.logsigmoid(chosen_reward - rejected_reward - simpo_gamma)
    else:
        chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
        logits = (pc - rc) - (pr - rr)
        if loss_type == "ipo":
            # IPO (Azar et al. 2023): squared distance of the log-ratio gap to 1/(2 beta).
            losses = (logits - 1.0 / (2.0 * beta)) ** 2
        elif loss_type == "cdpo":
            # Conservative DPO: labels flipped with probability label_smoothing.
            losses = (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
                      - label_smoothing * F.logsigmoid(-beta * logits))
        else:
            losses = -F.logsigmoid(beta * logits)
        if loss_type == "rpo":
            # RPO (Pang et al. 2024): DPO plus the NLL of the chosen response.
            if chosen_nll is None:
                raise ValueError("rpo needs chosen_nll")
            losses = losses + rpo_alpha * chosen_nll.float()
    loss = losses.mean()
    margin = chosen_reward - rejected_reward
    return loss, {"loss": loss.item(), "rewards/chosen": chosen_reward.mean().item(),
                  "rewards/rejected": rejected_reward.mean().item(),
                  "rewards/accuracy": (margin > 0).float().mean().item(), "rewards/margin": margin.mean().item(),
                  "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()}


# ---------------------------------------------------------------------------------------------
# PPO.


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                agg: str = "token-mean"):
    """Clipped surrogate (Schulman et al. 2017), per token."""
    log_ratio = (logprobs.float() - old_logprobs.float()).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate(per_token, mask, agg)
    with torch.no_grad():
        m = mask.to(ratio.dtype)
        clipfrac = masked_mean((clipped > unclipped).float(), m)
        approx_kl = masked_mean((-log_ratio).exp() - 1 + log_ratio, m)  # k3 of new vs old
        ratio_max = (ratio * m).max() if m.any() else torch.tensor(1.0)
    return loss, {"pg_loss": loss.item(), "clipfrac": clipfrac.item(), "approx_kl": approx_kl.item(),
                  "ratio_mean": masked_mean(ratio.detach(), m).item(), "ratio_max": ratio_max.item()}


def value_loss(values, old_values, returns, mask, clip_eps: float = 0.2, agg: str = "token-mean"):
    """0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2)."""
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * aggregate(torch.maximum(unclipped_err, clipped_err), mask, agg)
    with torch.no_grad():
        m = mask.to(values.dtype)
        residual = masked_var(returns - values, m)
        explained = 1.0 - residual / masked_var(returns, m).clamp(min=1e-8)
        vf_clipfrac = masked_mean((clipped_err > unclipped_err).float(), m)
    return loss, {"vf_loss": loss.item(), "vf_clipfrac": vf_clipfrac.item(), "explained_variance": explained.item()}


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    Values past the last real token count as 0, so padding never leaks into the estimate.
    Returns (advantages, returns), both (B, T) and zero on padding.
    """
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def kl_penalty(logprobs, ref_logprobs, kind: str = "k1", clamp: float = 10.0) -> torch.Tensor:
    """Per-token KL(policy || reference) estimates from samples of the policy, in fp32
    (http://joschu.net/blog/kl-approx.html): k1 = r, k2 = r^2/2, k3 = exp(-r) - 1 + r, r = logp - logp_ref."""
    log_ratio = (logprobs.float() - ref_logprobs.float()).clamp(-clamp, clamp)
    if kind == "k1":
        return log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return (-log_ratio).exp() - 1.0 + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}: k1, k2, k3, abs")




def token_rewards(score, kl, mask, kl_coef: float) -> torch.Tensor:
    """Per-token reward: -kl_coef * KL everywhere, plus the sequence score at the last real token."""
    rewards = -kl_coef * kl.float() * mask.to(torch.float32)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += score.float()
    return rewards


# ---------------------------------------------------------------------------------------------
# Critic-free advantages.


def grpo_advantages(scores, group_size: int, eps: float = 1e-6, std_normalize: bool = True) -> torch.Tensor:
    """GRPO (Shao et al. 2024): score minus its group's mean, over the group's std."""
    grouped = scores.float().view(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if std_normalize:
        centred = centred / (grouped.std(-1, keepdim=True) + eps)
    return centred.flatten()


def rloo_advantages(scores, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): score minus the mean of the other samples of the same prompt."""
    grouped = scores.float().view(-1, group_size)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).flatten()


def reinforce_pp_advantages(token_rewards, mask, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): discounted return-to-go per token, whitened over the whole batch."""
    mask = mask.to(torch.float32)
    rewards = token_rewards.float() * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running
    return masked_whiten(returns, mask)


def broadcast_to_tokens(advantages, mask) -> torch.Tensor:
    """(B,) sequence advantages -> (B, T) on real tokens."""
    return advantages.float()[:, None] * mask.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# The estimators of `rlhflab ppo --estimator`, and what each needs from the RL loop, in one table.
# The loop asks a row, never a name: a new estimator is one function, one row and its test.


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator gets from a scored rollout (G samples per prompt, groups contiguous)."""

    scores: torch.Tensor          # (B,) sequence scores (normalised, clipped)
    kl: torch.Tensor              # (B, T) per-token KL penalty; zeros when the KL is a loss term
    mask: torch.Tensor            # (B, T)
    kl_coef: float                # beta
    group: int                    # G
    gamma: float
    lam: float
    values: torch.Tensor | None   # (B, T) critic values; None for an estimator without a critic


def gae_estimate(x: AdvantageInputs):
    """PPO as in InstructGPT: the score at the last token and the KL penalty on every token as
    per-token rewards, then GAE on the critic's values."""
    return gae(token_rewards(x.scores, x.kl, x.mask, x.kl_coef), x.values, x.mask, x.gamma, x.lam)


def reinforce_pp_estimate(x: AdvantageInputs):
    return reinforce_pp_advantages(token_rewards(x.scores, x.kl, x.mask, x.kl_coef), x.mask, x.gamma), None


def grpo_estimate(x: AdvantageInputs):
    return broadcast_to_tokens(grpo_advantages(x.scores - x.kl_coef * x.kl.sum(-1), x.group), x.mask), None


def rloo_estimate(x: AdvantageInputs):
    return broadcast_to_tokens(rloo_advantages(x.scores - x.kl_coef * x.kl.sum(-1), x.group), x.mask), None


@dataclass(frozen=True)
class Estimator:
    """One advantage estimator and everything the RL loop decides by it."""

    advantages: Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor | None]]  # -> advantages (B, T),
    #                             returns (B, T) as the critic's targets, or None without a critic
    critic: bool       # learns a value function: a critic role, its optimizer group, the value loss. Its
    #                    passes run row by row, so only estimators without one run a prompt's samples packed
    min_samples: int   # responses per prompt it needs (2: it compares the samples of one prompt)
    kl_in_loss: bool   # where --kl-mode auto puts the KL: a k3 loss term, or a per-token reward penalty
    whiten: bool       # whether --whiten-advantages applies (the others normalise in their own way)


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(gae_estimate, critic=True, min_samples=1, kl_in_loss=False, whiten=True),
    "grpo": Estimator(grpo_estimate, critic=False, min_samples=2, kl_in_loss=True, whiten=False),  # as Shao et al. 2024
    "rloo": Estimator(rloo_estimate, critic=False, min_samples=2, kl_in_loss=False, whiten=False),
    "reinforce++": Estimator(reinforce_pp_estimate, critic=False, min_samples=1, kl_in_loss=False, whiten=False),
}


# ---------------------------------------------------------------------------------------------
# KL controllers and running moments (stateful, with state_dict for exact resume).


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: move beta in proportion to the KL's relative error, clipped to +-20%."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + error * n_steps / self.horizon


class RunningMoments:
    """Running mean and std of everything seen so far (Chan et al.'s parallel merge)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, x: torch.Tensor) -> tuple[float, float]:
        x = x.detach().float().flatten()
        n = float(x.numel())
        batch_mean = x.mean().item()
        batch_var = x.var(unbiased=False).item() if n > 1 else 0.0
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total
        return self.mean, math.sqrt(self.var * total / max(total - 1, 1))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
