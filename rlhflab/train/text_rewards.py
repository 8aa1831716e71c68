"""Rewards that PPO reads from an answer's text rather than from the policy's tokens: the toy
world's gold judge (--reward judge), a Hugging Face sequence classifier, or a reward model with a
vocabulary other than the policy's. Each re-reads prompt and answer with its own tokenizer and chat
template. (A composed --reward of weighted parts is built by rewards/compose.py and scores text
the same way.)"""

from __future__ import annotations

from rlhflab.rewards.model import load_reward_model, reads_policy_tokens, score_texts
from rlhflab.world import judge

JUDGE = "judge"  # --reward judge: the toy world's gold judge instead of a reward model


def text_reward(config, placement, tokenizer):
    """A reward computed from each answer's text, not from the policy's tokens: the toy world's
    judge (--reward judge), a Hugging Face sequence classifier, or a reward model with a vocabulary
    other than the policy's; these re-read prompt and answer with their own tokenizer and chat
    template. None for a reward model that scores the policy's own tokens (on the shared base,
    under --lora). `config`: the ppo options (rl.RLConfig)."""

    if config.reward == JUDGE:
        return judge_scores
    if reads_policy_tokens(config.reward, tokenizer, config.trust_remote_code):
        return None
    return text_scores(config.reward, placement, config, "--reward")


def judge_scores(records, texts: list[str]) -> list[float]:
    """--reward judge: the toy world's gold score of each answer."""

    return [judge(r.messages, text, r.meta).score for r, text in zip(records, texts)]


def text_scores(path: str, placement, config, option: str):
    """Scores of (record, answer text) pairs by the reward model at `path`, with its own tokenizer
    (`config`: the ppo options, for --trust-remote-code)."""

    model, tokenizer = load_reward_model(path, placement, config.trust_remote_code, option)

    def scores(records, texts: list[str]) -> list[float]:
        return score_texts(model, tokenizer, [r.messages + [{"role": "assistant", "content": text}]
                                              for r, text in zip(records, texts)])
    return scores
