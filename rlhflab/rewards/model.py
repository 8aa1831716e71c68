"""Building, saving and loading reward models (body + score head), in LoRA or full mode."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification

from rlhflab.config import opt
from rlhflab.data.template import encode_chat
from rlhflab.errors import UsageError
from rlhflab.losses import last_token_index
from rlhflab.models.forward import hidden_states
from rlhflab.models.heads import REWARD_ADAPTER_CONFIG, padding_mask_for, save_with_classifier_head
from rlhflab.models.loading import (
    adapter_base,
    check_model_directory,
    choose_placement,
    context_limit,
    is_adapter_dir,
    load_causal_lm,
    load_tokenizer,
    load_trainable,
    record_adapter_base,
)
from rlhflab.models.packing import pack_groups, packed_length, packing_agrees
from rlhflab.runs import atomic_write_directory, atomic_write_json, check_output_directory, check_safetensors


def build_reward_model(config, placement):
    """A trainable reward model from --model. Returns (model, tokenizer, info)."""

    if config.model is None:
        raise UsageError("give --model (the SFT model, as InstructGPT starts the RM from it)")
    # With --lora on an SFT adapter, the reward adapter starts from it, on its base: PPO can then share one base.
    loaded = load_trainable(config, placement, config.model)
    lm = loaded.model
    hidden = (lm.get_base_model() if hasattr(lm, "get_base_model") else lm).config.hidden_size
    model = RewardModel(lm, hidden).to(placement.device)
    return model, loaded.tokenizer, {"base": loaded.base, "lora": bool(config.lora), "hidden_size": hidden}


def save_reward_model(model: RewardModel, tokenizer, out: Path, info: dict) -> None:
    """The body (a full causal LM, or a LoRA adapter) with its tokenizer, score_head.safetensors and
    reward_config.json. A full model also carries its head as a Hugging Face sequence classifier's
    (it loads as a working AutoModelForSequenceClassification); an adapter directory refuses to
    load as one (see models/heads.py), rather than load with a random head."""
    out.mkdir(parents=True, exist_ok=True)
    if info["lora"]:
        model.lm.save_pretrained(str(out), safe_serialization=True)
        record_adapter_base(out, info["base"])
        atomic_write_json(out / "config.json", REWARD_ADAPTER_CONFIG)
    else:
        offset = save_with_classifier_head(model.lm, model.score_head.weight.detach(), model.score_head.bias, out)
        info = {**info, "sequence_classifier": offset is not None}
        if offset:
            info["sequence_classifier_offset"] = offset   # its scores are rlhflab's minus this constant
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
        if read_at is not None:   # can_share_prompt takes this as "cannot pack" and scores row by row
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
    check_model_directory(Path(path), option)
    if not (Path(path) / "score_head.safetensors").is_file():
        raise UsageError(f"{option} {path}: not a reward model (no score_head.safetensors from `rlhflab rm`, and "
                         "not a Hugging Face *ForSequenceClassification)")


def load_reward_model(path: str, placement, trust_remote_code: bool = False, option: str = "--model"):
    """A frozen reward model and its tokenizer: a directory written by `rlhflab rm`, or a Hugging
    Face sequence classifier with one label (SequenceClassifierReward)."""

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
    packed row, the prompt once, when the model passes can_share_prompt."""

    device = next(model.parameters()).device
    max_length = min(max_length, context_limit(model) or max_length)   # GPT-2 style learned positions end
    seqs = [encode_chat(tokenizer, c, max_length, keep_end=True).input_ids for c in conversations]
    groups: list[list[list[int]]] = []
    for index, seq in enumerate(seqs):
        if index and conversations[index][:-1] == conversations[index - 1][:-1]:
            groups[-1].append(seq)
        else:
            groups.append([seq])
    share = len(groups) < len(seqs) and can_share_prompt(model, tokenizer.pad_token_id, device, len(tokenizer))
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


class RewardModel(nn.Module):
    """Transformer body (from a causal LM, possibly LoRA-wrapped) + a linear score head."""

    def __init__(self, lm, hidden_size: int):
        super().__init__()
        self.lm = lm
        self.score_head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.score_head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.score_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
                read_at: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) scores read at the last real token of each row (left or right padding); or, for rows
        packed by `pack_groups` (a 4D mask, explicit positions), (N,) scores read at `read_at`."""

        if read_at is not None:
            hidden = hidden_states(self.lm, input_ids, attention_mask, position_ids)
            return self.score_head(hidden[read_at[:, 0], read_at[:, 1]].float()).squeeze(-1)
        hidden = hidden_states(self.lm, input_ids, padding_mask_for(attention_mask))   # (B, T, H)
        last = last_token_index(attention_mask)
        return self.score_head(hidden[torch.arange(hidden.shape[0]), last].float()).squeeze(-1)


def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def length_chunks(lengths: list[int], waste: float = 0.15, most: int = 32) -> list[list[int]]:
    """Indices grouped by length so that padding adds at most `waste` to a chunk's real tokens."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks, current, real = [], [], 0
    for i in order:
        longest = lengths[i]  # sorted: the newcomer is the longest
        if current and (longest * (len(current) + 1) > (1 + waste) * (real + longest) or len(current) == most):
            chunks.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    return chunks + [current] if current else chunks


def score_by_length(seqs: list[list[int]], model, pad_id: int, device, most: int = 32) -> torch.Tensor:
    """(N,) scores in input order, computed in chunks of similar length.

    One padded batch pads every answer to the longest (a hardening ramble is many times a normal
    answer, and even plain preference pairs waste ~50% on padding); chunks of similar length cut
    the padded tokens, and the time, with the same result.
    """
    chunks = length_chunks([len(s) for s in seqs], most=most)
    parts = []
    for chunk in chunks:
        ids, mask = pad_right([seqs[i] for i in chunk], pad_id, device)
        parts.append(model(ids, mask))
    order = [i for chunk in chunks for i in chunk]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(device)]


def score_groups(groups: list[list[list[int]]], model, pad_id: int, device, share: bool,
                 most: int | None = None) -> torch.Tensor:
    """(N,) scores of every sequence of every group, in order. With `share`, each group (the
    responses to one prompt) is one packed row whose prompt runs once: a pair of toy-world
    answers is ~28% fewer tokens, a ranking of four ~45%. Without, as score_by_length. `most`:
    rows per forward pass (default 16 packed rows, or score_by_length's)."""
    if not share:
        flat = [s for g in groups for s in g]
        return score_by_length(flat, model, pad_id, device) if most is None else \
            score_by_length(flat, model, pad_id, device, most=most)
    dtype = next(model.parameters()).dtype
    lengths = [packed_length(g) for g in groups]
    per_group: list[torch.Tensor | None] = [None] * len(groups)
    for chunk in length_chunks(lengths, most=most or 16):
        packed = pack_groups([groups[i] for i in chunk], pad_id, device, dtype)
        scores = model(packed["input_ids"], packed["attention_mask"], packed["position_ids"], packed["read_at"])
        for i, part in zip(chunk, scores.split([len(groups[i]) for i in chunk])):
            per_group[i] = part
    return torch.cat(per_group)


def can_share_prompt(model, pad_id: int, device, vocab_size: int) -> bool:
    """Whether this model scores packed rows as it scores sequences one by one: checked once on a
    small made-up group, since not every architecture honours a 4D mask and explicit positions
    (ALiBi models, FlashAttention-2 kernels)."""
    ids = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, max(vocab_size, 4), (6,), generator=ids).tolist()
    tails = [torch.randint(3, max(vocab_size, 4), (n,), generator=ids).tolist() for n in (3, 5, 2)]
    groups = [[prompt + t for t in tails], [prompt[:4] + t for t in tails[:2]]]
    return packing_agrees(model, lambda: score_groups(groups, model, pad_id, device, share=True),
                          lambda: score_groups(groups, model, pad_id, device, share=False),
                          next(model.parameters()).dtype)


def load_score_head(rm_dir: Path, hidden_size: int, device, option: str = "--reward") -> nn.Linear:
    """The reward model's score head (score_head.safetensors: a (1, H) weight and a bias)."""

    path = Path(rm_dir) / "score_head.safetensors"
    if not path.exists():
        raise UsageError(f"{option} {rm_dir}: no score_head.safetensors (is it a reward model from `rlhflab rm`?)")
    check_safetensors(path, option)
    tensors = load_file(str(path))
    weight = next((t for k, t in tensors.items() if t.ndim == 2), None)
    if weight is None:
        raise UsageError(f"{option} {rm_dir}: score_head.safetensors holds no (1, hidden) weight")
    bias = next((t for k, t in tensors.items() if t.ndim == 1), None)
    if weight.shape != (1, hidden_size):
        raise UsageError(f"{option} {rm_dir}: score head has shape {tuple(weight.shape)}, the policy's hidden size is {hidden_size}")
    head = nn.Linear(hidden_size, 1, bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head.to(device)
