"""rlhflab: the ChatGPT recipe end to end (pretrain, SFT, reward model, PPO/GRPO, DPO)."""

import logging

__version__ = "0.1.0"

# bitsandbytes, which peft imports whenever it is installed, warns on CPUs with AVX512-BF16 that
# the optional `kernels` package for its faster CPU inference kernel is missing. rlhflab runs
# without it (training keeps 4-bit layers in their training layout; serving uses bitsandbytes' own
# CPU layout), so the warning on every command would only mislead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
