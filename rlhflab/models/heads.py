"""The output head of a causal LM, run only at the positions a loss reads.

SFT and DPO read next-token log-probs only on answer tokens, RL only on response tokens; the
rest of the (B, T, V) logits are computed and thrown away. At vocabulary 4096 the head is a
sixth of a small model's matmul work, and far more at 150k. `logits_at` runs the model's own
forward (so DDP, FSDP and DeepSpeed wrappers, and any elementwise logit scaling or soft-capping
after the head, still apply) with a pre-hook on the head that keeps only the selected hidden
states: the model returns (N, V) logits for the N selected positions, in row-major order.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification


def causal_lm(model):
    """The HF causal LM inside a peft wrapper (or the model itself)."""
    inner = getattr(model, "module", model)          # DDP / DeepSpeed wrappers
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def logits_at(model, select: torch.Tensor, return_hidden: bool = False, **forward_kwargs):
    """(N, V) logits at the N positions where the (B, T) bool `select` is True.

    `forward_kwargs` go to the model's forward (input_ids, attention_mask, ...); `select[b, t]`
    asks for the logits that predict token t + 1 of row b. With `return_hidden`, also the
    (B, T, H) hidden states the head would have read (a value head's input).
    """
    head = causal_lm(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(causal_lm(model)).__name__} has no output embeddings (LM head)")
    seen = []

    def keep_selected(module, args):
        hidden = args[0]
        if hidden.shape[:2] != select.shape:
            raise RuntimeError(f"LM head input {tuple(hidden.shape)} does not match the selection "
                               f"{tuple(select.shape)}: this model slices its hidden states before the head")
        seen.append(hidden)
        return (hidden[select],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(keep_selected)
    try:
        logits = model(**forward_kwargs).logits
    finally:
        handle.remove()
    logits = logits.reshape(-1, logits.shape[-1])
    return (logits, seen[0]) if return_hidden else logits


def answer_selection(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From (B, T) labels: the (B, T) positions whose next token is labelled, and those N targets."""
    targets = labels[:, 1:]
    labelled = targets != ignore_index
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labelled
    return select, targets[labelled]


def padding_mask_for(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask to give the model: None when every row is right-padded.

    Causal attention already keeps each real token from seeing the pads after it, so the outputs
    at real positions are the same without the mask, and attention can take its fused causal path
    (no (B, 1, T, T) mask built per layer; on a GPU, the flash kernel). Positions are unchanged:
    right padding numbers the real tokens 0..n-1 either way. Left-padded rows keep their mask.
    """
    if attention_mask.shape[1] < 2 or bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return None
    return attention_mask


# ---------------------------------------------------------------------------------------------
# A reward model's directory as Hugging Face reads it. Transformers loads any causal LM directory
# as AutoModelForSequenceClassification and fills a head it does not find with random weights,
# saying little; so a reward model written by rlhflab either carries its head where that class
# reads it, or cannot be loaded as one at all.

# config.json of a LoRA reward model's directory: an adapter has no head transformers could load,
# so this model type (which transformers does not know) makes every Auto class refuse it.
REWARD_ADAPTER_CONFIG = {
    "model_type": "rlhflab_reward_adapter__run_rlhflab_rm_export",
    "architectures": [],
    "note": "A LoRA reward model written by rlhflab: a peft adapter on base_model_name_or_path (adapter_config.json) "
            "and its score head (score_head.safetensors). `rlhflab rm export` writes it as an "
            "AutoModelForSequenceClassification.",
}


def classifier_head(lm) -> str | None:
    """The attribute under which this causal LM's *ForSequenceClassification keeps its one-label
    linear head ("score"), when that class reads the same body weights as the causal LM; else None."""
    config = lm.config.__class__.from_dict(lm.config.to_dict())
    config.num_labels = 1
    try:
        with torch.device("meta"):
            classifier = AutoModelForSequenceClassification.from_config(config)
    except (ValueError, KeyError, TypeError):
        return None
    head = getattr(classifier, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        return None
    body = {k for k in classifier.state_dict() if not k.startswith("score.")}
    return "score" if body <= set(lm.state_dict()) else None


def save_with_classifier_head(lm, weight: torch.Tensor, bias: torch.Tensor | None, out) -> float | None:
    """Save a full reward model's causal LM into `out` with its score head also stored as the
    sequence classifier's head, so the directory loads both as the causal LM rlhflab reads and as a
    working AutoModelForSequenceClassification. Returns the constant the classifier's scores fall
    short of rlhflab's (a bias its head has no room for), or None when no classifier can read it."""
    name = classifier_head(lm)
    if name is None:
        lm.save_pretrained(str(out), safe_serialization=True)
        return None
    head = torch.nn.Linear(weight.shape[1], 1, bias=False).to(weight.device, weight.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    labels = lm.config.num_labels
    lm.config.num_labels = 1
    lm.add_module(name, head)
    try:
        lm.save_pretrained(str(out), safe_serialization=True)
    finally:
        delattr(lm, name)
        lm.config.num_labels = labels
    return float(bias.detach().reshape(-1)[0]) if bias is not None else 0.0
