"""Peer for `rlhflab ppo --estimator gae`: TRL 0.11.4's classic PPOTrainer.step (the PPO of the
seed articles), with the same SFT policy, reward model, prompts and shape of step.

One step on both sides = generate one completion of exactly --new-tokens tokens for each of
--batch prompts (EOS suppressed until then), score prompt + completion with the reward model at
the last token, then PPOTrainer.step: --epochs passes of mini-batches of --mini-batch. Fixed KL
coefficient, value and ratio clip 0.2, vf_coef 0.5 and scores clipped at 5, as rlhflab's defaults;
TRL's running score scaling is left off (in 0.11.4 it fails on the first step: `running.std` is a
float there), where rlhflab normalises scores by running moments (a few scalar operations). Generation in one batch of --batch prompts (TRL's default is 4 at a time).

--mode picks how the roles are held:
  full  the SFT model with TRL's value head (policy and critic share one body), a frozen deep
        copy as reference, and the reward model as a separate model (the 6M speed workload)
  peft  LoRA: the SFT adapter (trainable) on the base with TRL's value head, reference = the
        base with adapters off (TRL's own peft path), reward model merged into a second copy
        of the base (the common recipe)
  marl  LoRA, TRL's Multi-Adapter RL: as peft, but the reward is a second adapter plus score
        head on the same base (`reward_adapter=`), so one copy of the base holds every role

The bench's models are saved by transformers 5 and peft 0.21; the loaders below read them into
transformers 4.45 / peft 0.13 (config and tokenizer files differ in format, not in content).
Run in bench/.venv-trl011. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _common import STARTED, prompt_messages, read_jsonl, report, tail_mean


def llama_config(path: Path):
    from transformers import LlamaConfig

    values = json.loads((path / "config.json").read_text())
    rope = values.pop("rope_parameters", None) or {}
    values.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    values["torch_dtype"] = values.pop("dtype", "float32")
    values.pop("transformers_version", None)
    return LlamaConfig(**values)


def load_lm(path: Path):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), config=llama_config(path), torch_dtype=torch.float32)


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"), bos_token=spec.get("bos_token"), eos_token=spec.get("eos_token"),
        pad_token=spec.get("pad_token"), additional_special_tokens=spec.get("extra_special_tokens") or [])
    template = path / "chat_template.jinja"
    if template.exists():
        tokenizer.chat_template = template.read_text()
    return tokenizer


def compat_adapter(src: Path, dst: Path, extra: dict | None = None) -> Path:
    """Copy a peft 0.21 adapter dir for peft 0.13: keep the config keys 0.13 knows; add tensors."""
    from dataclasses import fields

    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    known = {f.name for f in fields(LoraConfig)}
    config = {k: v for k, v in json.loads((src / "adapter_config.json").read_text()).items() if k in known}
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    tensors.update(extra or {})
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def score_head(rm_dir: Path):
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(rm_dir / "score_head.safetensors"))
    weight = next(t for t in tensors.values() if t.ndim == 2)
    bias = next((t for t in tensors.values() if t.ndim == 1), None)
    head = torch.nn.Linear(weight.shape[1], 1, bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head.requires_grad_(False), tensors


def build(args):
    """(model with value head, reference or None, score(ids, mask) -> (B,) scores, tokenizer)."""
    import torch
    from trl import AutoModelForCausalLMWithValueHead, create_reference_model

    policy_dir, rm_dir = Path(args.policy), Path(args.reward)
    tokenizer = load_tokenizer(policy_dir)
    head, head_tensors = score_head(rm_dir)

    def body_scorer(lm):
        body = lm.model.eval().requires_grad_(False)

        @torch.no_grad()
        def score(ids, mask):
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
            last = mask.sum(-1) - 1                                             # right padding
            return head(hidden[torch.arange(ids.shape[0]), last]).squeeze(-1)
        return score

    if args.mode == "full":
        model = AutoModelForCausalLMWithValueHead.from_pretrained(load_lm(policy_dir))
        return model, create_reference_model(model), body_scorer(load_lm(rm_dir)), tokenizer

    from peft import PeftModel

    base_dir = Path(json.loads((policy_dir / "adapter_config.json").read_text())["base_model_name_or_path"])
    scratch = Path(args.out)
    policy_adapter = compat_adapter(policy_dir, scratch / "policy-adapter")
    lm = PeftModel.from_pretrained(load_lm(base_dir), str(policy_adapter), is_trainable=True)
    if args.mode == "peft":
        model = AutoModelForCausalLMWithValueHead.from_pretrained(lm)
        reward_lm = PeftModel.from_pretrained(load_lm(base_dir), str(compat_adapter(rm_dir, scratch / "rm-adapter")))
        return model, None, body_scorer(reward_lm.merge_and_unload()), tokenizer

    # marl: TRL finds the score head among the reward adapter's tensors by the name "score".
    extra = {f"base_model.model.score.{'weight' if t.ndim == 2 else 'bias'}": t for t in head_tensors.values()}
    rm_adapter = compat_adapter(rm_dir, scratch / "rm-adapter", extra)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(lm, reward_adapter=str(rm_adapter))

    @torch.no_grad()
    def score(ids, mask):
        per_token = model.compute_reward_score(input_ids=ids, attention_mask=mask).squeeze(-1)  # (B, T)
        return per_token[torch.arange(ids.shape[0]), mask.sum(-1) - 1]
    return model, None, score, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", required=True, help="SFT model dir (full) or SFT adapter dir (peft, marl)")
    parser.add_argument("--reward", required=True, help="reward model dir written by `rlhflab rm`")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--mode", choices=("full", "peft", "marl"), default="full")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--mini-batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--max-length", type=int, default=256, help="longest prompt (keeps its end)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="scratch directory")
    args = parser.parse_args()

    import random

    import torch
    from trl import PPOConfig, PPOTrainer

    shutil.rmtree(args.out, ignore_errors=True)
    torch.manual_seed(args.seed)
    model, reference, score, tokenizer = build(args)
    config = PPOConfig(
        batch_size=args.batch, mini_batch_size=args.mini_batch, ppo_epochs=args.epochs, learning_rate=args.lr,
        init_kl_coef=args.kl_coef, adap_kl_ctrl=False, kl_penalty="kl", cliprange=0.2, cliprange_value=0.2,
        vf_coef=0.5, gamma=1.0, lam=0.95, max_grad_norm=1.0, score_clip=5.0, seed=args.seed, gradient_checkpointing=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95))
    trainer = PPOTrainer(config=config, model=model, ref_model=reference, tokenizer=tokenizer, optimizer=optimizer)
    prompts = [tokenizer.apply_chat_template(prompt_messages(row), tokenize=True, add_generation_prompt=True)
               [-args.max_length:] for row in read_jsonl(args.prompts)]
    order = random.Random(args.seed)
    generation = dict(min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens, do_sample=True, top_k=0,
                      top_p=1.0, temperature=1.0, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    load_s = time.perf_counter() - STARTED

    step_times, losses, rewards, lengths = [], [], [], []
    for _ in range(args.steps):
        started = time.perf_counter()
        queries = [torch.tensor(p) for p in order.sample(prompts, args.batch)]
        responses = trainer.generate(queries, return_prompt=False, batch_size=args.batch, **generation)
        seqs = [torch.cat([q, r]) for q, r in zip(queries, responses)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
        scores = score(ids, mask)
        stats = trainer.step(queries, responses, list(scores.float()))
        step_times.append(time.perf_counter() - started)
        losses.append(float(stats["ppo/loss/total"]))
        rewards.append(float(scores.mean()))
        lengths.append(sum(len(r) for r in responses) / len(responses))
    seconds = sum(step_times)
    report(peer="trl", version=__import__("trl").__version__, mode=args.mode, steps=args.steps, train_time_s=seconds,
           load_s=load_s, seconds_per_step=seconds / args.steps, step_times=step_times,
           final_loss=tail_mean(losses), final_reward=tail_mean(rewards), response_len=tail_mean(lengths),
           losses=losses)


if __name__ == "__main__":
    main()
