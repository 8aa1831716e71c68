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
    """What PPO watches every step, each alarm raised once each time its condition starts to hold:
    - the reward rising while the gold signal falls between two windows of logged steps, by more than
      the step-to-step noise explains;
    - the share of empty answers rising above that of the first window (the collapse onto empty
      answers of a reward model that likes them);
    - answers shrinking to under half the length of the first window's while the reward rises (the
      same collapse on its way, before the answers are empty)."""

    EMPTY_RISE = 0.2      # rise of the empty-answer share (absolute) that raises the alarm
    LENGTH_SHRINK = 0.5   # the answers' mean length as a share of the first window's that raises it
    MIN_GOLD_FALL = 0.02
    Z = 3.5               # how many standard errors a gold fall must exceed

    def __init__(self, window: int):
        self.window, self.rewards, self.golds, self.empties, self.lengths = window, [], [], [], []
        self.empty_raised = self.short_raised = self.diverge_raised = False

    def update(self, reward: float, gold: float | None, empty_rate: float | None = None,
               length: float | None = None) -> str | None:
        self.rewards.append(reward)
        messages = [m for m in (self.empty(empty_rate), self.shrinking(length), self.diverging(gold)) if m]
        return "; ".join(messages) or None

    def window_means(self, values: list[float]) -> tuple[float, float]:
        """The means of the first window and of the last one."""

        w = self.window
        return sum(values[:w]) / w, sum(values[-w:]) / w

    def empty(self, empty_rate: float | None) -> str | None:
        if empty_rate is None:
            return None
        self.empties.append(empty_rate)
        if len(self.empties) < 2 * self.window:
            return None
        start, now = self.window_means(self.empties)
        raised, self.empty_raised = self.empty_raised, now - start > self.EMPTY_RISE
        if self.empty_raised and not raised:
            return (f"empty answers rose from {start:.0%} to {now:.0%} of the rollouts (a reward model that "
                    "likes them; --min-new-tokens keeps EOS away from the start)")
        return None

    def shrinking(self, length: float | None) -> str | None:
        if length is None:
            return None
        self.lengths.append(length)
        if len(self.lengths) < 2 * self.window:
            return None
        start, now = self.window_means(self.lengths)
        reward_start, reward_now = self.window_means(self.rewards[-len(self.lengths):])
        raised = self.short_raised
        self.short_raised = start > 0 and now < self.LENGTH_SHRINK * start and reward_now > reward_start
        if self.short_raised and not raised:
            return (f"answers shrank from {start:.1f} to {now:.1f} tokens while the reward rose (a reward "
                    "model that likes short answers?)")
        return None

    def diverging(self, gold: float | None) -> str | None:
        if gold is None:
            return None
        self.golds.append(gold)
        w, golds, rewards = self.window, self.golds, self.rewards[-len(self.golds):]
        if len(golds) < 2 * w:
            return None
        reward_gain = sum(rewards[-w:]) / w - sum(rewards[-2 * w:-w]) / w
        gold_gain = sum(golds[-w:]) / w - sum(golds[-2 * w:-w]) / w
        # The step means of a few dozen sampled answers are noisy. Their noise is estimated from the
        # differences of consecutive steps over the whole run so far (a steady trend barely inflates
        # it); a fall counts when it exceeds MIN_GOLD_FALL and Z standard errors of the difference of
        # two windows' means: with a check every step, two standard errors would cry wolf every run.
        noise = math.sqrt(statistics.fmean((b - a) ** 2 for a, b in zip(golds, golds[1:])) / 2)
        fell = reward_gain > 0 and gold_gain < -max(self.MIN_GOLD_FALL, self.Z * noise * math.sqrt(2 / w))
        raised, self.diverge_raised = self.diverge_raised, fell
        if fell and not raised:
            return (f"reward rose by {reward_gain:.3f} while the gold score fell by {-gold_gain:.3f} "
                    "(possible reward hacking)")
        return None
