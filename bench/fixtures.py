"""Bench fixtures, built locally into bench/work/ (no download): the toy world's data, a 4096-token
byte-level BPE tokenizer, two randomly initialised Llama models (~6M and ~100M parameters), and
the SFT and reward models that the RM, PPO and GRPO workloads start from (trained by rlhflab).

Runs in rlhflab's own environment (it imports rlhflab.world and the tokenizer trainer). Every
artefact is written once and reused; delete bench/work/ to rebuild.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

WORK = Path(__file__).resolve().parent / "work"

# ChatML exactly as rlhflab's default template renders it, with TRL's {% generation %} markers
# around each assistant answer and its <|im_end|>: the rendered text is identical, and TRL's
# assistant_only_loss then trains the same tokens rlhflab's label mask trains.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# name -> Llama shape; vocab 4096 comes from the tokenizer. Untied embeddings, as in Llama.
MODELS = {
    "llama-6m": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    # ~25M, the middle size of the scaling curves (bench/scaling.py)
    "llama-25m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8),
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
    # ~0.5B, for the GPU section only (bench/gpu.py)
    "llama-500m": dict(hidden_size=1152, intermediate_size=4608, num_hidden_layers=24, num_attention_heads=18),
}
VOCAB = 4096
MAX_POSITIONS = 1024


def world_data() -> Path:
    """The toy world's files (sft.jsonl, prefs.jsonl, prompts.jsonl, ...) under work/world."""
    out = WORK / "world"
    if (out / "manifest.json").is_file():
        return out
    from rlhflab.world import export

    out.mkdir(parents=True, exist_ok=True)
    export(out, seed=0, size="default")
    return out


def tokenizer_dir() -> Path:
    out = WORK / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    from rlhflab.models.tokenizer import train_tokenizer

    data = world_data()
    texts = [p for p in (data / "corpus.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    for line in (data / "sft.jsonl").read_text(encoding="utf-8").splitlines():
        texts.extend(m["content"] for m in json.loads(line)["messages"])
    tokenizer = train_tokenizer(texts, VOCAB)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    return out


def model_dir(name: str) -> Path:
    """A randomly initialised (seed 0) Llama saved with the bench tokenizer beside it."""
    out = WORK / name
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
        num_key_value_heads=MODELS[name]["num_attention_heads"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **MODELS[name],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


# Trained starting points for the RM, PPO and GRPO workloads, made by rlhflab itself (a few steps
# each: their quality does not change the speed being measured). name -> (command, its options).
TRAINED = {
    "sft-6m": ("sft", "--model {llama-6m} --data {world}/sft.jsonl --max-steps 150 --batch-size 16 --lr 1e-3"),
    "rm-6m": ("rm", "--model {sft-6m} --data {world}/prefs.jsonl --max-steps 60 --batch-size 8 --lr 1e-4"),
    "sft-100m-lora": ("sft", "--model {llama-100m} --lora true --data {world}/sft.jsonl --max-steps 4 --batch-size 4"),
    "rm-100m-lora": ("rm", "--model {sft-100m-lora} --lora true --data {world}/prefs.jsonl --max-steps 4 --batch-size 4"),
}
NEEDS = {"sft-6m": ["llama-6m"], "rm-6m": ["sft-6m"], "rm-6m-seqcls": ["rm-6m"],
         "sft-100m-lora": ["llama-100m"], "rm-100m-lora": ["sft-100m-lora"]}


def trained_dir(name: str, paths: dict, env: dict | None = None) -> Path:
    """Run `rlhflab <stage>` once into work/<name>; summary.json marks it finished."""
    out = WORK / name
    if (out / "summary.json").is_file():
        return out
    stage, options = TRAINED[name]
    argv = [sys.executable, "-m", "rlhflab", stage, *shlex.split(options.format(**{k: str(v) for k, v in paths.items()})),
            "--max-length", "256", "--out", str(out), "--eval-fraction", "0", "--progress", "false"]
    print("fixture:", " ".join(argv[2:]), flush=True)
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def seqcls_dir(rm_dir: Path) -> Path:
    """rlhflab's full reward model as a LlamaForSequenceClassification (for TRL's GRPO, which takes
    a reward *model* in that form). Same body, same head weight; the head's bias is dropped, which
    changes no GRPO advantage (rewards are compared within each group)."""
    out = rm_dir.with_name(rm_dir.name + "-seqcls")
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(str(rm_dir))
    config.num_labels, config.architectures = 1, ["LlamaForSequenceClassification"]
    model = LlamaForSequenceClassification(config)
    body = {k.removeprefix("model."): v for k, v in load_file(str(rm_dir / "model.safetensors")).items()
            if k.startswith("model.")}
    model.model.load_state_dict(body)
    head = load_file(str(rm_dir / "score_head.safetensors"))
    with torch.no_grad():
        model.score.weight.copy_(next(t for t in head.values() if t.ndim == 2))
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(rm_dir)).save_pretrained(str(out))
    return out


def build(names=("llama-6m",), env: dict | None = None) -> dict:
    """Build what is missing (and what it needs); return the paths the workloads use."""
    paths = {"world": world_data(), "tokenizer": tokenizer_dir()}

    def make(name: str) -> None:
        if name in paths:
            return
        for need in NEEDS.get(name, []):
            make(need)
        if name in MODELS:
            paths[name] = model_dir(name)
        elif name == "rm-6m-seqcls":
            paths[name] = seqcls_dir(paths["rm-6m"])
        else:
            paths[name] = trained_dir(name, paths, env)

    for name in names:
        make(name)
    return paths


if __name__ == "__main__":
    for key, path in build(tuple(sys.argv[1:]) or ("llama-6m",)).items():
        print(f"{key}: {path}")
