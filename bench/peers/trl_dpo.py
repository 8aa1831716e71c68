"""Peer for `rlhflab dpo`: TRL 1.16's DPOTrainer (sigmoid loss) on the same pairs, policy and
settings, with the reference log-probs precomputed (TRL's fastest configuration) or live.

The reference pass is timed on its own: TRL runs it inside the trainer's constructor, rlhflab
before its loop; both report it as reference_time_s, and pairs_per_s counts it in, as rlhflab's
summary does (the pairs file holds exactly the pairs trained, so the pass is over those alone).
Precompute batch = 2 x the training batch, as rlhflab's. Batches grouped by length, as rlhflab's.
Run in bench/.venv-trl. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import time

from _common import common_args, group_by_length, read_jsonl, report, tail_mean, trainer_callback, training_arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    common_args(parser)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--precompute-ref", choices=("true", "false"), default="true")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    reference_s = [0.0]
    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):
        started = time.perf_counter()
        try:
            return precompute(self, *a, **k)
        finally:
            reference_s[0] += time.perf_counter() - started

    DPOTrainer._precompute_ref_logps = timed_precompute

    timing = trainer_callback()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [{"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": row["chosen"]}],
             "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in read_jsonl(args.data)]
    precomputed = args.precompute_ref == "true"
    config = DPOConfig(**training_arguments(args), max_length=args.max_length, loss_type=["sigmoid"],
                       beta=args.beta, precompute_ref_log_probs=precomputed,
                       precompute_ref_batch_size=2 * args.batch_size, train_sampling_strategy="group_by_length")
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[timing])
    group_by_length(trainer, {"prompt_ids": 2, "chosen_ids": 1, "rejected_ids": 1})  # what rlhflab groups by
    trainer.train()
    pairs = trainer.state.global_step * args.batch_size
    load_s = timing.load_s - reference_s[0]
    report(peer="trl", version=__import__("trl").__version__, reference="precomputed" if precomputed else "live",
           steps=trainer.state.global_step, train_time_s=timing.seconds, reference_time_s=reference_s[0],
           load_s=load_s, pairs_per_s=pairs / (timing.seconds + reference_s[0]),
           loop_pairs_per_s=pairs / timing.seconds, train_pairs=pairs, final_loss=tail_mean(timing.losses),
           losses=timing.losses, step_times=timing.step_times)


if __name__ == "__main__":
    main()
