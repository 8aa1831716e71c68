"""What every peer script shares: reading the bench's data files, timing the training loop,
and printing the one JSON line the harness reads (figure names as in rlhflab's summary.json).

Imported by scripts that run in the peers' own environments (TRL 1.16 and TRL 0.11.4), so it
needs nothing beyond the standard library and torch.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

STARTED = time.perf_counter()  # process start, near enough: this module is imported first


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def prompt_messages(row: dict) -> list[dict]:
    """The conversation up to the answer: `messages` (prompts file) or `prompt` (pairs file)."""
    return row["messages"] if "messages" in row else row["prompt"]


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def tail_mean(values: list[float]) -> float | None:
    """Mean of the last quarter (at least 5) of the values: the 'final loss' both sides report, the
    same rule in bench/run.py (one batch alone is noisy, and the two sides order batches differently)."""
    values = [v for v in values if v is not None]
    n = max(5, len(values) // 4)
    return sum(values[-n:]) / len(values[-n:]) if values else None


def report(**figures) -> None:
    """Print the one JSON line the harness reads; `load_s` is everything before training."""
    figures.setdefault("peak_rss_mib", peak_rss_mib())
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in figures.items()}), flush=True)


def trainer_callback():
    """A transformers TrainerCallback that times train begin -> end, each optimizer step (from the
    previous step's end, so a step's data loading counts in it) and keeps every logged loss."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self):
            self.begin = self.end = None
            self.losses: list[float] = []
            self.logs: list[dict] = []
            self.step_ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.logs.append(dict(logs))

        @property
        def seconds(self) -> float:
            return self.end - self.begin

        @property
        def step_times(self) -> list[float]:
            """Seconds of each optimizer step, the first from train begin."""
            ends = [self.begin, *self.step_ends]
            return [b - a for a, b in zip(ends, ends[1:])]

        @property
        def load_s(self) -> float:
            return self.begin - STARTED

    return Timing()


def common_args(parser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="scratch directory for the trainer's output_dir")


def training_arguments(args, **extra) -> dict:
    """TrainingArguments shared by the TRL 1.16 peers: rlhflab's optimizer and schedule (AdamW betas
    0.9/0.95, cosine decay without warm-up, as the bench runs rlhflab, clipping at 1.0), fp32,
    no gradient checkpointing, no saving, no workers, every step logged."""
    return dict(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, seed=args.seed,
        dataloader_num_workers=0, dataloader_pin_memory=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, **extra,
    )


def group_by_length(trainer, columns: dict[str, int]) -> None:
    """Let transformers' LengthGroupedSampler (train_sampling_strategy="group_by_length") group pair
    data: it infers lengths only from an `input_ids` column, which pair data lacks. Adds a `length`
    column (sum of the given token columns, each with its weight) and keeps it for the sampler."""
    trainer.train_dataset = trainer.train_dataset.map(
        lambda row: {"length": sum(weight * len(row[name]) for name, weight in columns.items())})
    trainer._set_signature_columns_if_needed()
    trainer._signature_columns = [*trainer._signature_columns, "length"]
