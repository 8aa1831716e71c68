"""Peer for `rlhflab ppo --estimator grpo`: TRL 1.16's GRPOTrainer with the same policy, reward
model, prompts and shape of step.

One RL step on both sides = generate (prompts x samples) completions of exactly --new-tokens
tokens (EOS suppressed until then, so both sides generate the same number of tokens), score them
with the reward model, then --epochs passes of mini-batches of --mini-batch completions, one
optimizer step each. In TRL terms: per_device_train_batch_size = mini-batch, steps_per_generation
= completions / mini-batch, num_iterations = epochs, so one generation feeds
steps_per_generation x num_iterations optimizer steps. KL to the reference as a k3 loss term with
beta = --beta (rlhflab's grpo default), so both sides keep and run a reference model.

The reward is rlhflab's reward model converted to LlamaForSequenceClassification (bench fixture
rm-6m-seqcls; same body and head weight). Generation: transformers' generate with its KV cache
(no vLLM on a CPU). Run in bench/.venv-trl. Prints one JSON line.
"""

from __future__ import annotations

import argparse

from _common import prompt_messages, read_jsonl, report, tail_mean, trainer_callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True, help="a LlamaForSequenceClassification directory")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--steps", type=int, required=True, help="RL steps (generation rounds)")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--mini-batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    timing = trainer_callback()
    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, dtype=torch.float32)
    reward_tokenizer = AutoTokenizer.from_pretrained(args.reward)
    dataset = Dataset.from_list([{"prompt": prompt_messages(row)} for row in read_jsonl(args.prompts)])
    completions = args.prompts_per_step * args.samples
    per_step = completions // args.mini_batch * args.epochs  # optimizer steps per RL step
    config = GRPOConfig(
        output_dir=args.out, max_steps=args.steps * per_step, per_device_train_batch_size=args.mini_batch,
        steps_per_generation=completions // args.mini_batch, num_iterations=args.epochs,
        num_generations=args.samples, max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
        beta=args.beta, epsilon=0.2, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=args.seed,
        dataloader_num_workers=0, dataloader_pin_memory=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, reward_processing_classes=reward_tokenizer, callbacks=[timing])
    trainer.train()
    rl_steps = trainer.state.global_step / per_step
    rewards = [log.get("reward") for log in timing.logs]
    report(peer="trl", version=__import__("trl").__version__, steps=rl_steps, optimizer_steps=trainer.state.global_step,
           train_time_s=timing.seconds, load_s=timing.load_s, seconds_per_step=timing.seconds / rl_steps,
           final_loss=tail_mean(timing.losses), final_reward=tail_mean(rewards), losses=timing.losses,
           completion_length=tail_mean([log.get("completions/mean_length") for log in timing.logs]))


if __name__ == "__main__":
    main()
