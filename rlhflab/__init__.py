"""rlhflab: the ChatGPT recipe end to end (pretrain, SFT, reward model, PPO/GRPO, DPO)."""

__version__ = "0.1.0"
