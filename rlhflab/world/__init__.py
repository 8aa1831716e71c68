"""The toy world: a seeded, bilingual (English/Chinese) assistant world with a gold judge.

It lets a tiny model go through pretrain -> SFT -> RM -> PPO/DPO on a CPU in minutes, and it
is the ground truth that says whether RLHF helped. See export.py for the files it writes.
"""

from .corpus import corpus_text
from .demonstrator import candidates, demonstrate, good_response
from .export import export, probe_prompts
from .judge import Judgement, format_table, judge, judge_file
from .tasks import FAMILIES, make_prompts

__all__ = ["FAMILIES", "Judgement", "candidates", "corpus_text", "demonstrate", "export",
           "format_table", "good_response", "judge", "judge_file", "make_prompts",
           "probe_prompts"]
