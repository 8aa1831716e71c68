"""Rule reward models (Sparrow, Glaese et al. 2022, https://arxiv.org/abs/2209.14375): one
violation head per rule on a shared body, each a probability that the answer breaks its rule.

Trained by `rlhflab rm --rules` on rules.jsonl rows (docs/data-formats.md):

    {"prompt": "..." or [messages], "response": "...", "rules": {"harmful": 1, "rude": 0, ...}}

a rule missing from a row (or null) is unknown there and does not train its head. Saved like a
reward model, with `rule_head.safetensors` ((N, H) weight and (N,) bias, one row per rule) and
`rule_config.json` (the rule names, in head order) in place of the score head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from rlhflab.data.formats import is_message_list, iter_raw_rows
from rlhflab.data.template import encode_chat
from rlhflab.errors import UsageError
from rlhflab.models.loading import (
    adapter_base,
    context_limit,
    is_adapter_dir,
    load_causal_lm,
    load_tokenizer,
    record_adapter_base,
)
from rlhflab.rewards.model import RewardModel, score_by_length

RULE_CONFIG = "rule_config.json"
RULE_HEAD = "rule_head.safetensors"


class RuleModel(RewardModel):
    """A reward model's body with N violation logits instead of one score: (B, N)."""

    def __init__(self, lm, hidden_size: int, rules: list[str]):
        super().__init__(lm, hidden_size)
        self.rules = list(rules)
        self.score_head = nn.Linear(hidden_size, len(rules))
        nn.init.normal_(self.score_head.weight, std=hidden_size ** -0.5)
        nn.init.zeros_(self.score_head.bias)

    def forward(self, input_ids, attention_mask, position_ids=None, read_at=None) -> torch.Tensor:
        logits = super().forward(input_ids, attention_mask, position_ids, read_at)
        return logits.view(input_ids.shape[0] if read_at is None else read_at.shape[0], len(self.rules))


def is_rule_model(path: str | None) -> bool:
    return bool(path) and (Path(path) / RULE_HEAD).is_file()


def save_rule_model(model: RuleModel, tokenizer, out: Path, info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(str(out), safe_serialization=True)
    if info.get("lora"):
        record_adapter_base(out, info["base"])
    tokenizer.save_pretrained(str(out))
    save_file({k: v.detach().float().contiguous().cpu() for k, v in model.score_head.state_dict().items()},
              str(out / RULE_HEAD))
    (out / RULE_CONFIG).write_text(json.dumps({**info, "rules": model.rules}, indent=2), encoding="utf-8")


def load_rule_model(path: str, placement, trust_remote_code: bool = False, option: str = "--rules"):
    """A frozen RuleModel and its tokenizer from a directory written by `rlhflab rm --rules`."""
    if not is_rule_model(path):
        raise UsageError(f"{option} {path}: not a rule reward model (no {RULE_HEAD} from `rlhflab rm --rules`)")
    info = json.loads((Path(path) / RULE_CONFIG).read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(path, trust_remote_code, option=option)
    if is_adapter_dir(path):
        lm = PeftModel.from_pretrained(load_causal_lm(adapter_base(path), placement, trust_remote_code, option=option),
                                       path)
    else:
        lm = load_causal_lm(path, placement, trust_remote_code, option=option)
    hidden = (lm.get_base_model() if hasattr(lm, "get_base_model") else lm).config.hidden_size
    model = RuleModel(lm, hidden, info["rules"])
    head = load_file(str(Path(path) / RULE_HEAD))
    model.score_head.load_state_dict({"weight": head["weight"], "bias": head["bias"]})
    model.requires_grad_(False)
    return model.to(placement.device).eval(), tokenizer


@torch.no_grad()
def rule_probabilities(model: RuleModel, tokenizer, conversations: list[list[dict]], batch_size: int = 32,
                       max_length: int = 512) -> list[dict[str, float]]:
    """P(the last assistant turn breaks each rule), one {rule: p} per conversation."""
    device = next(model.parameters()).device
    max_length = min(max_length, context_limit(model) or max_length)
    seqs = [encode_chat(tokenizer, c, max_length, keep_end=True).input_ids for c in conversations]
    logits = score_by_length(seqs, model, tokenizer.pad_token_id, device, most=batch_size)     # (N, rules)
    return [dict(zip(model.rules, row)) for row in torch.sigmoid(logits.float()).tolist()]


def read_rule_rows(path: str, option: str = "--data") -> tuple[list[tuple[list[dict], str, dict]], list[str]]:
    """(rows as (prompt messages, response, {rule: 0/1 or None}), rule names in first-seen order).
    Errors name the file and line."""
    rows, names = [], []
    for where, row in iter_raw_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("response"), str) or \
                not isinstance(row.get("rules"), dict):
            raise UsageError(f"{where}: expected {{\"prompt\", \"response\": str, \"rules\": {{name: 0 or 1}}}} "
                             f"({option} --rules)")
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not prompt or not is_message_list(prompt):
            raise UsageError(f"{where}: field 'prompt' must be a string or a non-empty list of {{role, content}}")
        flags = {}
        for name, value in row["rules"].items():
            if value is not None and value not in (0, 1, True, False):
                raise UsageError(f"{where}: rules.{name} must be 0, 1, true, false or null, got {value!r}")
            flags[name] = None if value is None else int(value)
            if name not in names:
                names.append(name)
        rows.append((prompt, row["response"], flags))
    if not rows:
        raise UsageError(f"{option} {path}: no rows")
    return rows, names
