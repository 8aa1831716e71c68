"""Peer for `rlhflab sft`: TRL 1.16's SFTTrainer on the same conversations, model and settings.

Loss on assistant turns only (assistant_only_loss with the bench template's generation markers,
so the trained tokens are those of rlhflab's label mask); batches grouped by length, as rlhflab
does by default. Padding-free and packing are left off: on the CPU they need FlashAttention to
keep sequences apart, so here they would change the model's attention, not just its speed.
Run in bench/.venv-trl. Prints one JSON line.
"""

from __future__ import annotations

import argparse

from _common import common_args, read_jsonl, report, tail_mean, trainer_callback, training_arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    common_args(parser)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    timing = trainer_callback()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = Dataset.from_list([{"messages": row["messages"]} for row in read_jsonl(args.data)])
    config = SFTConfig(**training_arguments(args), max_length=args.max_length, assistant_only_loss=True,
                       train_sampling_strategy="group_by_length", padding_free=False, packing=False)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[timing])
    trainer.train()
    tokens = trainer._total_train_tokens  # real (attention-mask) tokens, as rlhflab counts them
    report(peer="trl", version=__import__("trl").__version__, steps=trainer.state.global_step,
           train_time_s=timing.seconds, load_s=timing.load_s, tokens_per_s=tokens / timing.seconds,
           train_tokens=int(tokens), final_loss=tail_mean(timing.losses), losses=timing.losses,
           step_times=timing.step_times)


if __name__ == "__main__":
    main()
