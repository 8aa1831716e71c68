"""Losses and estimators against values computed by hand (or by a plain Python loop)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhflab import losses as L

T = torch.tensor


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_gae_by_hand_and_right_padding():
    rewards, values, mask = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]])
    gamma, lam = 0.9, 0.8
    d2 = 1.0 - 0.7
    d1 = 0.0 + gamma * 0.7 - 0.6
    d0 = 0.0 + gamma * 0.6 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    adv, ret = L.gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, T([[a0, a1, a2]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, T([[a0 + 0.5, a1 + 0.6, a2 + 0.7]]), atol=1e-6, rtol=0)
    # The same row padded with junk on the right gives the same numbers and zeros on padding.
    padded, _ = L.gae(T([[0.0, 0.0, 1.0, 5.0]]), T([[0.5, 0.6, 0.7, 9.0]]), T([[1.0, 1.0, 1.0, 0.0]]), gamma, lam)
    torch.testing.assert_close(padded[:, :3], adv, atol=1e-6, rtol=0)
    assert padded[0, 3] == 0


def test_ranking_loss_is_the_mean_of_pairwise_losses():
    s = T([[2.0, 1.0, -0.5]])
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum(-math.log(sig(s[0, i].item() - s[0, j].item())) for i, j in pairs) / 3
    loss, metrics = L.ranking_loss(s)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["accuracy"] == 1.0
    # A prompt with only 2 valid responses counts its one pair; each prompt weighs the same.
    loss2, _ = L.ranking_loss(T([[2.0, 1.0, -0.5], [0.0, 1.0, 7.0]]), mask=T([[1, 1, 1], [1, 1, 0]]))
    assert loss2.item() == pytest.approx((expected + -math.log(sig(-1.0))) / 2, abs=1e-6)


def test_bradley_terry_margin_and_centering():
    loss, m = L.bradley_terry_loss(T([1.0]), T([0.0]), margin=0.5, center_coef=0.1)
    assert loss.item() == pytest.approx(-math.log(sig(0.5)) + 0.1 * 1.0, abs=1e-6)
    assert m["accuracy"] == 1.0


def test_dpo_family_by_hand():
    pc, pr, rc, rr = T([-1.0]), T([-3.0]), T([-2.0]), T([-2.5])
    beta = 0.5
    logits = (-1 + 2) - (-3 + 2.5)  # 1.5
    loss, m = L.dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(-math.log(sig(beta * logits)), abs=1e-6)
    assert m["rewards/margin"] == pytest.approx(beta * logits, abs=1e-6)
    ipo, _ = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert ipo.item() == pytest.approx((logits - 1 / (2 * beta)) ** 2, abs=1e-6)
    cdpo, _ = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="cdpo", label_smoothing=0.2)
    assert cdpo.item() == pytest.approx(-0.8 * math.log(sig(0.75)) - 0.2 * math.log(sig(-0.75)), abs=1e-6)
    simpo, _ = L.dpo_loss(pc, pr, rc, rr, beta=2.0, loss_type="simpo", simpo_gamma=0.5,
                          chosen_lengths=T([2.0]), rejected_lengths=T([3.0]))
    assert simpo.item() == pytest.approx(-math.log(sig(2 * (-0.5) - 2 * (-1.0) - 0.5)), abs=1e-6)
    rpo, _ = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="rpo", chosen_nll=T([0.7]), rpo_alpha=2.0)
    assert rpo.item() == pytest.approx(loss.item() + 1.4, abs=1e-6)
    same, m0 = L.dpo_loss(pc, pr, pc, pr)
    assert same.item() == pytest.approx(math.log(2), abs=1e-6) and m0["rewards/margin"] == 0
    with pytest.raises(ValueError, match="dpo, ipo, cdpo, simpo, rpo"):
        L.dpo_loss(pc, pr, rc, rr, loss_type="kto")


def test_policy_loss_clips():
    mask = T([[1.0, 1.0]])
    old = T([[0.0, 0.0]])
    new = T([[math.log(1.5), math.log(0.9)]])
    adv = T([[1.0, 1.0]])
    loss, m = L.policy_loss(new, old, adv, mask, clip_eps=0.2)
    # token 1: min(1.5, 1.2) * 1 = 1.2 (clipped); token 2: 0.9.
    assert loss.item() == pytest.approx(-(1.2 + 0.9) / 2, abs=1e-6)
    assert m["clipfrac"] == pytest.approx(0.5)


def test_value_loss_clips_around_old_values():
    loss, m = L.value_loss(T([[2.0]]), T([[0.0]]), T([[3.0]]), T([[1.0]]), clip_eps=0.5)
    # unclipped (2-3)^2 = 1; clipped v=0.5 -> (0.5-3)^2 = 6.25; max = 6.25, times 0.5.
    assert loss.item() == pytest.approx(3.125, abs=1e-6) and m["vf_clipfrac"] == 1.0


def test_kl_estimators():
    lp, ref = T([0.0, -1.0]), T([-0.5, 0.0])
    r = torch.tensor([0.5, -1.0])
    torch.testing.assert_close(L.kl_penalty(lp, ref, "k1"), r)
    torch.testing.assert_close(L.kl_penalty(lp, ref, "k2"), 0.5 * r ** 2)
    k3 = L.kl_penalty(lp, ref, "k3")
    torch.testing.assert_close(k3, torch.exp(-r) - 1 + r)
    assert (k3 >= 0).all()
    assert L.kl_penalty(T([100.0]), T([0.0]), "k1", clamp=10.0).item() == 10.0
    assert L.kl_penalty(T([1.0], dtype=torch.bfloat16), T([0.0], dtype=torch.bfloat16)).dtype == torch.float32


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = T([[0.1, 0.2, 0.3], [0.1, 0.1, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = L.token_rewards(T([1.0, 2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(out, T([[-0.05, -0.1, 1.0 - 0.15], [-0.05, 2.0 - 0.05, 0.0]]))


def test_group_advantages_by_hand():
    scores = T([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    grpo = L.grpo_advantages(scores, 3, eps=0.0)
    torch.testing.assert_close(grpo[:3], T([-1.0, 0.0, 1.0]))  # mean 2, std 1
    rloo = L.rloo_advantages(scores, 3)
    torch.testing.assert_close(rloo, T([1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0]))


def test_reinforce_pp_returns_then_whitens():
    rewards, mask = T([[0.0, 1.0], [2.0, 0.0]]), T([[1.0, 1.0], [1.0, 0.0]])
    returns = T([1.0, 1.0, 2.0])  # row 0: [1, 1]; row 1: [2]
    expected = (returns - returns.mean()) / returns.std()
    out = L.reinforce_pp_advantages(rewards, mask, gamma=1.0)
    torch.testing.assert_close(out[mask.bool()], expected, atol=1e-5, rtol=0)
    assert out[1, 1] == 0


def _scored_rollout(values=None):
    """One prompt, two samples: scores 1 and 3, per-token KL 0.2, 0.4 | 0.2, beta 0.5."""
    return L.AdvantageInputs(scores=T([1.0, 3.0]), kl=T([[0.2, 0.4], [0.2, 0.0]]), mask=T([[1.0, 1.0], [1.0, 0.0]]),
                             kl_coef=0.5, group=2, gamma=1.0, lam=1.0, values=values)


def test_each_estimator_row_by_hand():
    # Per-token rewards (-0.5 KL, the score on the last token): [-0.1, 0.8] and [2.9]; returns-to-go
    # [0.7, 0.8] and [2.9]. Sequence scores less 0.5 x summed KL: 0.7 and 2.9.
    adv, ret = L.ESTIMATORS["gae"].advantages(_scored_rollout(values=T([[0.5, 0.25], [1.0, 9.0]])))
    torch.testing.assert_close(adv, T([[0.7 - 0.5, 0.8 - 0.25], [2.9 - 1.0, 0.0]]))   # lam = 1: return - value
    torch.testing.assert_close(ret, T([[0.7, 0.8], [2.9, 0.0]]))
    adv, ret = L.ESTIMATORS["reinforce++"].advantages(_scored_rollout())
    returns = T([0.7, 0.8, 2.9])
    torch.testing.assert_close(adv[adv != 0], (returns - returns.mean()) / returns.std(), atol=1e-5, rtol=0)
    assert ret is None
    adv, ret = L.ESTIMATORS["grpo"].advantages(_scored_rollout())
    half = 1.1 / (2.2 / math.sqrt(2))                                  # (score - mean) / std over the group
    torch.testing.assert_close(adv, T([[-half, -half], [half, 0.0]]), atol=1e-5, rtol=0)
    assert ret is None
    adv, ret = L.ESTIMATORS["rloo"].advantages(_scored_rollout())
    torch.testing.assert_close(adv, T([[0.7 - 2.9, 0.7 - 2.9], [2.9 - 0.7, 0.0]]))   # minus the other sample
    assert ret is None


@pytest.mark.parametrize("name", list(L.ESTIMATORS))
def test_every_estimator_row_keeps_the_table_s_promises(name):
    """What the RL loop relies on, for any row: critic targets exactly when it has a critic, (B, T)
    advantages that are zero on padding, and a group size it can be given."""
    row = L.ESTIMATORS[name]
    advantages, returns = row.advantages(_scored_rollout(values=T([[0.5, 0.25], [1.0, 0.0]]) if row.critic else None))
    assert advantages.shape == (2, 2) and advantages[1, 1] == 0
    assert (returns is not None) == row.critic
    assert row.min_samples >= 1


def test_aggregate_modes_and_empty_rows():
    x, mask = T([[1.0, 3.0], [5.0, 0.0]]), T([[1.0, 1.0], [1.0, 0.0]])
    assert L.aggregate(x, mask, "token-mean").item() == pytest.approx(3.0)
    assert L.aggregate(x, mask, "seq-mean-token-sum").item() == pytest.approx(4.5)
    assert L.aggregate(x, mask, "seq-mean-token-mean").item() == pytest.approx(3.5)
    empty = L.aggregate(x, T([[0.0, 0.0], [0.0, 0.0]]), "seq-mean-token-mean")
    assert torch.isfinite(empty) and empty.item() == 0


def test_adaptive_kl_and_running_moments():
    ctl = L.AdaptiveKLController(0.1, target=1.0, horizon=10)
    ctl.update(5.0, 1)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 / 10))
    ctl.update(0.0, 1)
    assert ctl.value < 0.1 * (1 + 0.2 / 10)
    moments = L.RunningMoments()
    a, b = torch.randn(7), torch.randn(5) + 3
    moments.update(a)
    mean, std = moments.update(b)
    both = torch.cat([a, b])
    assert mean == pytest.approx(both.mean().item(), abs=1e-5) and std == pytest.approx(both.std().item(), abs=1e-5)


def test_gather_logprobs_and_entropy_match_log_softmax():
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    labels = torch.randint(0, 5, (2, 3))
    out = L.gather_logprobs(logits, labels)
    assert out.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(out, expected)
    p = torch.softmax(logits.float(), -1)
    torch.testing.assert_close(L.entropy_from_logits(logits), -(p * p.log()).sum(-1))


def test_ece_is_zero_when_calibrated_and_large_when_not():
    assert L.expected_calibration_error(T([1.0, 1.0, 0.0]), T([1.0, 1.0, 0.0])) == pytest.approx(0.0)
    assert L.expected_calibration_error(T([0.95, 0.95]), T([0.0, 0.0])) == pytest.approx(0.95)
