"""Building, saving and loading reward models (body + score head), in LoRA or full mode."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhflab.config import opt
from rlhflab.errors import UsageError

from rlhflab.models.loading import (adapter_base, apply_lora, context_limit, is_adapter_dir, load_causal_lm,
                                    load_tokenizer, record_adapter_base, resize_for_tokenizer)
from rlhflab.stages.rm import RewardModel


def build_reward_model(config, placement):
    """A trainable reward model from --model. Returns (model, tokenizer, info)."""
    from peft import PeftModel

    if config.model is None:
        raise UsageError("give --model (the SFT model, as InstructGPT starts the RM from it)")
    tokenizer = load_tokenizer(config.tokenizer or config.model, config.trust_remote_code, config.chat_template,
                               "--tokenizer" if config.tokenizer else "--model")
    if config.lora and is_adapter_dir(config.model):
        # Start from the SFT adapter's weights, on the SFT adapter's base: PPO can then share one base.
        base_name = adapter_base(config.model)
        base = load_causal_lm(base_name, placement, config.trust_remote_code)
        lm = PeftModel.from_pretrained(base, config.model, is_trainable=True)
    elif config.lora:
        base_name = config.model
        base = load_causal_lm(base_name, placement, config.trust_remote_code)
        resize_for_tokenizer(base, tokenizer)
        lm = apply_lora(base, config)
    else:
        base_name = None
        lm = load_causal_lm(config.model, placement, config.trust_remote_code, train_full=True)
        resize_for_tokenizer(lm, tokenizer)
    hidden = (lm.get_base_model() if hasattr(lm, "get_base_model") else lm).config.hidden_size
    model = RewardModel(lm, hidden).to(placement.device)
    return model, tokenizer, {"base": base_name, "lora": bool(config.lora), "hidden_size": hidden}


def save_reward_model(model: RewardModel, tokenizer, out: Path, info: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(str(out), safe_serialization=True)
    if info["lora"]:
        record_adapter_base(out, info["base"])
    tokenizer.save_pretrained(str(out))
    head = {k: v.detach().float().contiguous().cpu() for k, v in model.score_head.state_dict().items()}
    save_file(head, str(out / "score_head.safetensors"))
    (out / "reward_config.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


class SequenceClassifierReward(torch.nn.Module):
    """A Hugging Face `*ForSequenceClassification` model with one label, used as a reward model
    (what TRL's RewardTrainer and most published reward models save). The score is the model's own
    output, pooled where the model pools: its last token that is not its pad token."""

    def __init__(self, model, pad_id: int):
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None, read_at=None):
        if read_at is not None:   # rm.sharing_matches takes this as "cannot pack" and scores row by row
            raise NotImplementedError("a sequence classifier pools its own last token: packed rows cannot be read")
        ids = input_ids.masked_fill(attention_mask == 0, self.pad_id)   # its pad, not ours: that is what it skips
        return self.model(input_ids=ids, attention_mask=attention_mask).logits[:, 0].float()


def is_sequence_classifier(name: str | None) -> bool:
    """Whether `name` (a local directory) holds a Hugging Face sequence classifier rather than a
    reward model written by `rlhflab rm` (a causal LM with score_head.safetensors)."""
    path = Path(name) if name else None
    if path is None or not (path / "config.json").is_file() or (path / "score_head.safetensors").exists():
        return False
    try:
        architectures = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def reads_policy_tokens(reward: str, policy_tokenizer, trust_remote_code: bool = False) -> bool:
    """Whether a reward model can score the policy's own token ids: one written by `rlhflab rm`
    whose tokenizer has the policy's vocabulary. Any other (a sequence classifier, another
    vocabulary) has to read each answer as text, with its own tokenizer and template."""
    if is_sequence_classifier(reward):
        return False
    if not (Path(reward) / "tokenizer_config.json").is_file():
        return True   # not a reward model directory: its loader names the problem
    return load_tokenizer(reward, trust_remote_code).get_vocab() == policy_tokenizer.get_vocab()


def load_sequence_classifier(path: str, placement, trust_remote_code: bool = False, option: str = "--model"):
    """A frozen SequenceClassifierReward and its own tokenizer (and chat template) from `path`."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(path, trust_remote_code, option=option)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=placement.dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option} {path}: cannot load the sequence classifier: {exc}") from None
    if model.config.num_labels != 1:
        raise UsageError(f"{option} {path}: a sequence classifier with {model.config.num_labels} labels; "
                         "a reward model has exactly one (a scalar score)")
    pad_id = model.config.pad_token_id
    if pad_id is None:   # pool after the last real token; EOS is what such models are usually padded with
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        model.config.pad_token_id = pad_id
    reward = SequenceClassifierReward(model, pad_id)
    reward.requires_grad_(False)
    return reward.to(placement.device).eval(), tokenizer


def is_reward_model(path: str) -> bool:
    """Whether `path` holds a reward model (from `rlhflab rm`, or a sequence classifier): something
    that scores answers and cannot write them."""
    return (Path(path) / "reward_config.json").is_file() or is_sequence_classifier(path)


def check_reward_model(path: str, option: str) -> None:
    """Before any work is done: `path` holds a reward model, from `rlhflab rm` or a classifier."""
    if is_sequence_classifier(path):
        return
    if not path or not Path(path).is_dir():
        raise UsageError(f"{option} {path or '(empty)'}: no such directory")
    if not (Path(path) / "score_head.safetensors").is_file():
        raise UsageError(f"{option} {path}: not a reward model (no score_head.safetensors from `rlhflab rm`, and "
                         "not a Hugging Face *ForSequenceClassification)")


def load_reward_model(path: str, placement, trust_remote_code: bool = False, option: str = "--model"):
    """A frozen reward model and its tokenizer: a directory written by `rlhflab rm`, or a Hugging
    Face sequence classifier with one label (SequenceClassifierReward)."""
    from peft import PeftModel

    from rlhflab.stages.rl_roles import load_score_head

    check_reward_model(path, option)
    if is_sequence_classifier(path):
        return load_sequence_classifier(path, placement, trust_remote_code, option)
    tokenizer = load_tokenizer(path, trust_remote_code, option=option)
    if is_adapter_dir(path):
        base = load_causal_lm(adapter_base(path), placement, trust_remote_code, option=option)
        lm = PeftModel.from_pretrained(base, path)
    else:
        lm = load_causal_lm(path, placement, trust_remote_code, option=option)
    hidden = (lm.get_base_model() if hasattr(lm, "get_base_model") else lm).config.hidden_size
    model = RewardModel(lm, hidden)
    model.score_head = load_score_head(Path(path), hidden, placement.device, option)
    model.requires_grad_(False)
    return model.to(placement.device).eval(), tokenizer


@torch.no_grad()
def score_texts(model, tokenizer, conversations: list[list[dict]], batch_size: int = 32, max_length: int = 512) -> list[float]:
    """Scores of full conversations whose last turn is the assistant's answer. Neighbours that
    share everything but that answer (best-of-n, an audit's answers to one prompt) run as one
    packed row, the prompt once, when the model passes rm.sharing_matches."""
    from rlhflab.data.template import encode_chat
    from rlhflab.stages.rm import score_groups, sharing_matches

    device = next(model.parameters()).device
    max_length = min(max_length, context_limit(model) or max_length)   # GPT-2 style learned positions end
    seqs = [encode_chat(tokenizer, c, max_length, keep_end=True).input_ids for c in conversations]
    groups: list[list[list[int]]] = []
    for index, seq in enumerate(seqs):
        if index and conversations[index][:-1] == conversations[index - 1][:-1]:
            groups[-1].append(seq)
        else:
            groups.append([seq])
    share = len(groups) < len(seqs) and sharing_matches(model, tokenizer.pad_token_id, device, len(tokenizer))
    most = max(1, batch_size // max(1, round(len(seqs) / len(groups)))) if share else batch_size
    return score_groups(groups, model, tokenizer.pad_token_id, device, share, most=most).tolist()


@dataclass
class ExportConfig:
    """Write a reward model from `rlhflab rm` as a Hugging Face sequence classifier."""

    stage = "rm-export"
    model: str | None = opt(None, "reward model directory written by `rlhflab rm` (LoRA adapters are merged)")
    out: str | None = opt(None, "output directory: an AutoModelForSequenceClassification with one label")
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")


def export_command(config: ExportConfig) -> int:
    """`rlhflab rm export`: the same body and head as an `*ForSequenceClassification` model, which
    TRL, OpenRLHF and inference servers load as a reward model. Their score heads have no bias: the
    bias is dropped and recorded, a constant that no comparison of two answers depends on."""
    from transformers import AutoModelForSequenceClassification

    from rlhflab.models.loading import choose_placement
    from rlhflab.runs import atomic_write_directory, atomic_write_json, check_output_directory

    if not config.model or not config.out:
        raise UsageError("give --model (a reward model from `rlhflab rm`) and --out (where to write it)")
    if is_sequence_classifier(config.model):
        raise UsageError(f"--model {config.model}: already a Hugging Face sequence classifier")
    check_output_directory(config.out, config.model, "exported_from.json")
    reward, tokenizer = load_reward_model(config.model, choose_placement("cpu", "fp32"), config.trust_remote_code)
    lm = reward.lm.merge_and_unload() if hasattr(reward.lm, "merge_and_unload") else reward.lm
    model_config = copy.deepcopy(lm.config)
    model_config.num_labels, model_config.pad_token_id = 1, tokenizer.pad_token_id
    try:
        classifier = AutoModelForSequenceClassification.from_config(model_config,
                                                                    trust_remote_code=config.trust_remote_code)
    except ValueError as exc:
        raise UsageError(f"--model {config.model}: transformers has no sequence classifier for this "
                         f"architecture: {exc}") from None
    head, bias = getattr(classifier, "score", None), reward.score_head.bias
    if not isinstance(head, torch.nn.Linear) or head.weight.shape != reward.score_head.weight.shape:
        raise UsageError(f"--model {config.model}: {type(classifier).__name__} has no one-label linear `score` "
                         "head to take the reward model's")
    classifier.base_model.load_state_dict(lm.base_model.state_dict())
    with torch.no_grad():
        head.weight.copy_(reward.score_head.weight)
        if getattr(head, "bias", None) is not None:
            head.bias.copy_(bias if bias is not None else torch.zeros_like(head.bias))
    dropped = float(bias) if bias is not None and getattr(head, "bias", None) is None else 0.0

    def fill(tmp: Path) -> None:
        classifier.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / "exported_from.json", {"reward_model": str(Path(config.model).resolve()),
                                                       "dropped_bias": dropped})

    out = atomic_write_directory(config.out, fill, config.model, "exported_from.json")
    print(f"{type(classifier).__name__} written to {out}" +
          (f"; its scores are the reward model's minus {dropped:.6g} (the head's bias)" if dropped else ""))
    return 0
