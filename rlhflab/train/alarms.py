"""What PPO's monitors hold the reward against, and when they raise an alarm: the gold signal (the
toy world's judge on world prompts, or a held-out reward model) and the alarms on reward rising
while the gold score falls, and on the share of empty answers rising."""

from __future__ import annotations

import math
import statistics

from rlhflab.rewards.model import reads_policy_tokens
from rlhflab.train.roles import load_eval_reward_model
from rlhflab.train.text_rewards import text_scores
from rlhflab.world import judge


class GoldSignal:
    """The ground truth the monitors compare the reward with: the toy world's judge on world
    prompts, or a second, held-out reward model (--eval-reward-model) that reads the policy's tokens
    (`eval_rm`) or the answers' text (`eval_rm_text`)."""

    def __init__(self, records, eval_rm=None, eval_rm_text=None):
        self.judge, self.eval_rm, self.eval_rm_text = judge, eval_rm, eval_rm_text
        self.world = all(r.meta.get("family") for r in records)

    @property
    def available(self) -> bool:
        return self.world or self.eval_rm is not None or self.eval_rm_text is not None

    def __call__(self, records, texts, input_ids=None, attention_mask=None) -> float | None:
        if self.world:
            return sum(self.judge(r.messages, t, r.meta).score for r, t in zip(records, texts)) / len(texts)
        if self.eval_rm is not None:
            return float(self.eval_rm.scores(input_ids, attention_mask).mean())
        if self.eval_rm_text is not None:
            return sum(self.eval_rm_text(records, texts)) / len(texts)
        return None


def gold_signal(records, config, placement, tokenizer) -> GoldSignal:
    """The monitors' ground truth: the toy world's judge, or --eval-reward-model (any kind of reward model)."""

    if not config.eval_reward_model:
        return GoldSignal(records)
    if not reads_policy_tokens(config.eval_reward_model, tokenizer, config.trust_remote_code):
        return GoldSignal(records, eval_rm_text=text_scores(config.eval_reward_model, placement, config,
                                                            "--eval-reward-model"))
    return GoldSignal(records, load_eval_reward_model(config.eval_reward_model, placement))


class Alarm:
    """Reward rising while the gold signal falls over a window of logged steps; and, with or without
    a gold signal, the share of empty answers rising above that of the first window (the collapse
    onto empty answers of a reward model that likes them), raised once each time it crosses."""

    EMPTY_RISE = 0.2   # rise of the empty-answer share (absolute) that raises the alarm
    MIN_GOLD_FALL = 0.02

    def __init__(self, window: int):
        self.window, self.rewards, self.golds, self.empties, self.empty_raised = window, [], [], [], False

    def update(self, reward: float, gold: float | None, empty_rate: float | None = None) -> str | None:
        messages = [m for m in (self.empty(empty_rate), self.diverging(reward, gold)) if m]
        return "; ".join(messages) or None

    def empty(self, empty_rate: float | None) -> str | None:
        if empty_rate is None:
            return None
        self.empties.append(empty_rate)
        w = self.window
        if len(self.empties) < 2 * w:
            return None
        start, now = sum(self.empties[:w]) / w, sum(self.empties[-w:]) / w
        raised, self.empty_raised = self.empty_raised, now - start > self.EMPTY_RISE
        if self.empty_raised and not raised:
            return (f"empty answers rose from {start:.0%} to {now:.0%} of the rollouts (a reward model that "
                    "likes them; --min-new-tokens keeps EOS away from the start)")
        return None

    def diverging(self, reward: float, gold: float | None) -> str | None:
        if gold is None:
            return None
        self.rewards.append(reward)
        self.golds.append(gold)
        if len(self.golds) < 2 * self.window:
            return None
        w = self.window
        reward_gain = sum(self.rewards[-w:]) / w - sum(self.rewards[-2 * w:-w]) / w
        before, now = self.golds[-2 * w:-w], self.golds[-w:]
        gold_gain = sum(now) / w - sum(before) / w
        # The step means of a few dozen sampled answers are noisy: a fall counts when it is larger than
        # MIN_GOLD_FALL and than twice the standard error of the difference of the two windows' means,
        # estimated from each window's own spread (a steady trend does not inflate it).
        spread = math.sqrt((statistics.pvariance(before) + statistics.pvariance(now)) / 2)
        if reward_gain > 0 and gold_gain < -max(self.MIN_GOLD_FALL, 2 * spread * math.sqrt(2 / w)):
            return f"reward rose by {reward_gain:.3f} while the gold score fell by {-gold_gain:.3f} (possible reward hacking)"
        return None
