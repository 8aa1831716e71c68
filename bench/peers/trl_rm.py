"""Peer for `rlhflab rm`: TRL 1.16's RewardTrainer (Bradley-Terry on pairs) on the same pairs,
starting model and settings. The model is AutoModelForSequenceClassification with one label on
the same body (its score head is freshly initialised, as rlhflab's is). Batches grouped by length
(an option of TRL's Trainer; with the toy world's pairs, random batches are ~45% padding).
Run in bench/.venv-trl. Prints one JSON line.
"""

from __future__ import annotations

import argparse

from _common import common_args, group_by_length, read_jsonl, report, tail_mean, trainer_callback, training_arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    common_args(parser)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    timing = trainer_callback()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
    rows = [{"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": row["chosen"]}],
             "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in read_jsonl(args.data)]
    config = RewardConfig(**training_arguments(args), max_length=args.max_length,
                          train_sampling_strategy="group_by_length")
    trainer = RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, callbacks=[timing])
    group_by_length(trainer, {"chosen_ids": 1, "rejected_ids": 1})
    trainer.train()
    pairs = trainer.state.global_step * args.batch_size
    report(peer="trl", version=__import__("trl").__version__, steps=trainer.state.global_step,
           train_time_s=timing.seconds, load_s=timing.load_s, pairs_per_s=pairs / timing.seconds, train_pairs=pairs,
           tokens_per_s=trainer._total_train_tokens / timing.seconds, final_loss=tail_mean(timing.losses),
           losses=timing.losses)


if __name__ == "__main__":
    main()
