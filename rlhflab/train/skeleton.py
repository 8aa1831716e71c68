"""One training skeleton for sft, pretrain, rm and dpo: placement and accelerate set-up, the
held-out split, the batch order, the optimizer loop (accumulation, schedule, clipping, logging,
periodic eval, checkpoints, resume) and the closing summary. A stage file reads load, build, loop,
save, and hands the loop only what is its own (`StageParts`: how a micro-batch is made and scored,
its eval, its figures). PPO (rl.py) keeps its own on-policy loop and uses the building blocks: these
here, the engine checks and sums over processes (distributed.py), the optimizer and its step (optim.py).

What a word means in every stage:
- batch: `--batch-size` rows per micro-batch summed over all processes (each process takes its
  shard, `shard`); an optimizer step runs `--grad-accum` of them. Rows are a stage's training
  items: conversations (sft), blocks (pretrain), pairs or prompts (rm), pairs (dpo).
- split: `held_out_split`, the first max(1, int(rows * --eval-fraction)) of a seeded permutation.
- schedule: `total_steps` optimizer steps, warmup then decay over them (`make_scheduler`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from rlhflab import config as cfg
from rlhflab import memory, runs
from rlhflab.data.formats import load_records
from rlhflab.errors import NonFiniteError, UsageError
from rlhflab.models.compiled import compile_model
from rlhflab.models.loading import Placement, choose_placement
from rlhflab.train.distributed import (
    check_engine,
    check_launch,
    engine_name,
    shard,
    sharding_launch,
    shards_weights,
    sum_over_processes,
    uses_deepspeed,
)
from rlhflab.train.optim import lean_activations, make_optimizer, make_scheduler, optimizer_step


class _SharedTensorNotice(logging.Filter):
    """accelerate's save_state notes "Removed shared tensor {'lm_head.weight'}" at every checkpoint of
    a model with tied embeddings: the tie is restored on load, so there is nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_SharedTensorNotice())


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Setup:
    out: Path
    placement: Placement
    accelerator: object
    resume_from: Path | None
    state: dict = field(default_factory=dict)   # trainer_state.json of the checkpoint resumed from


def prepare_stage(config) -> Setup:
    """Placement, accelerator, seed and the stage directory. Validates before touching disk."""

    memory.reset_peak_memory()   # the stage's own peak goes into its summary
    if not config.progress:    # transformers' own bars too (loading weights, writing shards)
        hf_logging.disable_progress_bar()
    placement = choose_placement(config.device, config.dtype)
    if config.release_memory and not memory.release_freed_memory():
        print("note: --release-memory has no effect here (not glibc, or MALLOC_MMAP_THRESHOLD_ is set)",
              file=sys.stderr)
    out = runs.stage_dir(config)
    runs.check_stage_directory(out, config)
    resume_from = runs.find_resume(out, config.resume)
    log_with = None if config.report_to == "none" else config.report_to
    if log_with == "tensorboard":
        _require("tensorboard", "--report-to tensorboard")
    if log_with == "wandb":
        _require("wandb", "--report-to wandb")
    check_launch()
    # DeepSpeed without CUDA falls back to its CPU backend and says so in every process, and with it
    # installed, libraries import it in plain runs too: on the CPU, naming that backend makes the
    # same choice quietly.
    if placement.device.type == "cpu" and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    accelerator = Accelerator(
        cpu=placement.device.type == "cpu" and not sharding_launch(),   # the sharding engines' own switches decide
        mixed_precision=placement.mixed_precision if not getattr(config, "lora", False) else "no",
        log_with=log_with,
        project_dir=str(out),
        # One schedule step per optimizer step: accelerate's default steps a prepared schedule once
        # per process, which runs it N times too fast when the batch is counted over all processes.
        step_scheduler_with_optimizer=False,
        # DeepSpeed steps inside backward, at the last micro-batch of a step (see Loop._accumulate).
        gradient_accumulation_steps=getattr(config, "grad_accum", 1) if uses_deepspeed() else 1,
        # DeepSpeed or FSDP on CPUs: accelerate picks no backend without CUDA, so name gloo
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if sharding_launch() and placement.device.type == "cpu"
        else None,
    )
    placement = replace(placement, device=accelerator.device)   # cuda:<local rank> under a launcher
    processes = accelerator.num_processes
    check_engine(accelerator, config)
    if "batch_size" in {f.name for f in cfg.fields_of(type(config))} and config.batch_size < processes:
        raise UsageError(f"--batch-size {config.batch_size}: the micro-batch is counted over all processes and "
                         f"split between them; with {processes} processes give at least {processes}")
    if accelerator.is_main_process:   # one writer per directory: a second run on it is refused
        runs.lock_output(out)
    set_seed(config.seed)
    state = runs.load_trainer_state(resume_from) if resume_from else {}
    planned, now = state.get("plan"), _plan(config)
    if planned is not None and planned != now:
        print(f"warning: {resume_from} was written by a run planned as {planned}; this one is {now}: the "
              "learning-rate schedule continues on the new plan", file=sys.stderr)
    if state.get("processes", processes) != processes:
        print(f"warning: {resume_from} was written by {state['processes']} processes, this run has {processes}: "
              "the data order continues, but random streams (dropout, sampling) differ from an uninterrupted run",
              file=sys.stderr)
    return Setup(out, placement, accelerator, resume_from, state)


def _plan(config) -> dict:
    """The options that fix a run's length, and so its learning-rate schedule."""
    return {name: getattr(config, name) for name in ("max_steps", "epochs", "batch_size", "grad_accum")
            if hasattr(config, name)}


def held_out_split(rows: list, fraction: float, seed: int, keep_order: bool = False) -> tuple[list, list]:
    """(train, held out): how every stage splits --data when --eval-data is absent.

    The held-out rows are the first max(1, int(len(rows) * fraction)) of a permutation seeded by
    `seed`: at least one when there are two rows or more, none with fraction 0 or a single row.
    Both parts come in the permutation's order; with `keep_order`, in the rows' own order (SFT's,
    kept because its data order, and so its figures, depend on it).
    """
    n_eval = max(1, int(len(rows) * fraction)) if len(rows) > 1 and fraction else 0
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    train, held = order[n_eval:], order[:n_eval]
    if keep_order:
        train, held = sorted(train), sorted(held)
    return [rows[i] for i in train], [rows[i] for i in held]


def load_preferences(config) -> tuple[list, list, object]:
    """(train records, held-out records, read stats) of --data preference pairs or rankings: the
    held-out set is --eval-data, or `held_out_split` of --data."""

    records, stats = load_records(config.data, "preference", config.format, config.skip_bad_rows, config.max_rows,
                                  columns=config.columns)
    if config.eval_data:
        held_out, _ = load_records(config.eval_data, "preference", config.format, option="--eval-data",
                                   columns=config.columns)
        return records, held_out, stats
    return *held_out_split(records, config.eval_fraction, config.seed), stats


def _require(module: str, option: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise UsageError(f"{option} needs the {module} package: pip install {module}") from None


def start_outputs(setup: Setup, config) -> runs.MetricsLog:
    """Create the stage directory (only once inputs are known good) and save the resolved config.
    The main process writes; the others wait until it has."""
    if setup.accelerator.is_main_process:
        setup.out.mkdir(parents=True, exist_ok=True)
        runs.clean_stale_tmp(setup.out)
        if config.resume == runs.NEVER:   # chosen: start again, so no earlier checkpoint can be resumed into this run
            shutil.rmtree(setup.out / "checkpoints", ignore_errors=True)
        (setup.out / "summary.json").unlink(missing_ok=True)
        cfg.save(config, setup.out / "config.yaml")
    setup.accelerator.wait_for_everyone()
    if setup.accelerator.log_with and setup.accelerator.is_main_process:   # one writer of the run's logs
        project, name = tracker_names(config)
        setup.accelerator.init_trackers(project, config=cfg.to_dict(config), init_kwargs={"wandb": {"name": name}})
    return runs.MetricsLog(setup.out / "metrics.jsonl", setup.accelerator,
                           resume_step=setup.state.get("step", 0))


def tracker_names(config) -> tuple[str, str]:
    """(project, run name) for --report-to: wandb's --wandb-project and --wandb-name (default
    <run>/<stage>); tensorboard writes under the stage directory, in a folder named by the stage."""
    name = config.wandb_name or f"{config.run}/{config.stage}"
    return (config.wandb_project if config.report_to == "wandb" else config.stage), name


def total_steps(config, n_rows: int) -> int:
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = math.ceil(n_rows / config.batch_size / config.grad_accum)
    return max(1, math.ceil(per_epoch * config.epochs))


class BatchOrder:
    """Deterministic, resumable micro-batch order over `lengths`.

    Epoch e shuffles with seed (seed, e). With grouping, rows are sorted by length inside
    windows of 50 batches so a micro-batch holds similar lengths (less padding), and the
    batches themselves are shuffled. Position = (epoch, index of the next micro-batch).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group_by_length
        self.epoch, self.index = 0, 0
        self._batches = self._make(0)

    def _make(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths)).tolist()
        if self.group:
            window = self.batch_size * 50
            order = [i for start in range(0, len(order), window)
                     for i in sorted(order[start:start + window], key=lambda j: self.lengths[j])]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.group:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def next(self) -> list[int]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._make(self.epoch)
        batch = self._batches[self.index]
        self.index += 1
        return batch

    @property
    def epochs(self) -> float:
        """Passes made over the rows so far, fractional."""
        return self.epoch + self.index / max(1, len(self._batches))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._batches = self._make(self.epoch)


def batch_order(config, lengths: list[int], seed: int | None = None) -> BatchOrder:
    """The order of a stage's global micro-batches: --batch-size rows each, summed over processes."""
    return BatchOrder(lengths, config.batch_size, config.seed if seed is None else seed, config.group_by_length)


def checkpoint_trainable_only(accelerator) -> None:
    """With LoRA, checkpoints hold only the trainable weights (the adapter), not the frozen base."""

    def keep_trainable(models, weights, output_dir):
        for model, state in zip(models, weights):
            wanted = {name for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in wanted]:
                del state[key]

    accelerator.register_save_state_pre_hook(keep_trainable)


def save_checkpoint(setup: Setup, config, step: int, order: BatchOrder, extra: dict | None = None) -> Path:
    """Model, optimizer, scheduler and RNG through accelerate, plus the data position, atomically."""
    accelerator = setup.accelerator

    def write(tmp: Path) -> None:
        accelerator.save_state(str(tmp), safe_serialization=True)

    state = {"order": order.state_dict(), "plan": _plan(config), "processes": accelerator.num_processes,
             **(extra or {})}
    refuse_non_finite_weights(accelerator, step)
    if accelerator.num_processes == 1:
        return runs.save_checkpoint(setup.out, step, write, state, config.keep_checkpoints)
    # Every process writes its part (its random states; its weight shards under FSDP or ZeRO-3) into
    # one folder, which the main process then completes and renames into place.
    shared = setup.out / "checkpoints" / f".tmp-step-{step}-all"
    if accelerator.is_main_process:
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write(shared)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        runs.save_checkpoint(setup.out, step, lambda tmp: [os.replace(item, tmp / item.name) for item in shared.iterdir()],
                             state, config.keep_checkpoints)
        shutil.rmtree(shared, ignore_errors=True)
    accelerator.wait_for_everyone()
    return setup.out / "checkpoints" / f"step-{step}"


def refuse_non_finite_weights(accelerator, step: int) -> None:
    """A checkpoint holds finite weights only: one with NaN or inf is never written, so the one
    an error message calls the last good checkpoint is."""
    for model in accelerator._models:   # the models accelerate's save_state writes
        for name, param in accelerator.unwrap_model(model).named_parameters():
            if param.requires_grad and not torch.isfinite(param.detach()).all():
                raise NonFiniteError(f"weight {name} holds NaN or inf at step {step}; no checkpoint written")


def restore_checkpoint(setup: Setup, order: BatchOrder, strict: bool = True) -> int:
    """Load model/optimizer/scheduler/RNG and the data position; return the step to continue from.

    strict=False for LoRA checkpoints, which hold only the adapter (the base is loaded as usual).
    """
    setup.accelerator.load_state(str(setup.resume_from), strict=strict)
    order.load_state_dict(setup.state["order"])
    print(f"resumed from {setup.resume_from} at step {setup.state['step']}", file=sys.stderr)
    return setup.state["step"]


def progress(total: int, initial: int, desc: str, enabled: bool):
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


def check_finite(value: torch.Tensor, what: str, step: int, last_checkpoint: Path | None) -> None:
    if not torch.isfinite(value).all():

        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        raise NonFiniteError(f"{what} is {value.item()} at step {step}; stopped ({where})")


def finish(setup: Setup, summary: dict) -> dict:
    """Write summary.json last: its presence marks the stage as finished. The stage's peak memory
    is its own (counted from prepare_stage); one line on stdout says what was written."""
    summary = {**summary, **memory.peak_memory()}
    setup.accelerator.wait_for_everyone()   # every process is done with the directory (and the model saved)
    if setup.accelerator.is_main_process:
        runs.readable_as_usual(setup.out)
        runs.atomic_write_json(setup.out / "summary.json", summary)
        print(summary_line(summary.get("stage") or setup.out.name, setup.out, summary), flush=True)
    if setup.accelerator.log_with:
        setup.accelerator.end_training()
    runs.release_outputs()
    return summary


# The figures a stage's closing line shows, where its summary has them.
SUMMARY_LINE = (("steps", "{:,} steps"), ("final_loss", "loss {:.4g}"), ("eval_loss", "eval loss {:.4g}"),
                ("eval_accuracy", "eval accuracy {:.3f}"), ("final_reward", "reward {:.3f}"),
                ("final_gold", "gold {:.3f}"), ("final_kl_k1", "KL {:.3f}"), ("tokens_per_s", "{:,.0f} tokens/s"),
                ("pairs_per_s", "{:,.1f} pairs/s"), ("wall_time_s", "{:.1f} s"), ("peak_rss_mib", "peak RSS {:,.0f} MiB"),
                ("peak_cuda_mib", "peak CUDA {:,.0f} MiB"))


def summary_line(stage: str, out: Path, summary: dict) -> str:
    """`sft: wrote runs/x/sft (120 steps, loss 1.234, ..., peak RSS 658 MiB)`."""
    shown = [text.format(summary[key]) for key, text in SUMMARY_LINE
             if isinstance(summary.get(key), (int, float)) and not isinstance(summary.get(key), bool)]
    return f"{stage}: wrote {out}" + (f" ({', '.join(shown)})" if shown else "")


def merge_micro_rows(rows: list[dict], counts: tuple[str, ...] = ("pairs",)) -> dict:
    """One step's metrics from its gradient-accumulation micro-batches: counts add up, every other
    figure is averaged (weighted by a row's "pairs" where rows carry one), so a step with
    --grad-accum N logs what one batch of N times the size would."""
    if len(rows) == 1:
        return rows[0]
    weights = [float(r.get("pairs", 1.0)) or 1.0 for r in rows]
    total = sum(weights)
    merged = {}
    for key in rows[0]:
        values = [r[key] for r in rows if key in r]
        if key in counts:
            merged[key] = sum(values)
        elif len(values) == len(rows):
            merged[key] = sum(w * v for w, v in zip(weights, values)) / total
        else:   # a figure only some micro-batches have (hardening pairs, say): their plain mean
            merged[key] = sum(values) / len(values)
    return merged


# ---------------------------------------------------------------------------------------------
# The optimizer loop of sft, pretrain, rm and dpo.


@dataclass
class StageParts:
    """What a stage hands the loop: how a micro-batch is made and scored, and its own figures.

    batch(indices) -> what `loss` takes, from this process's rows of a micro-batch.
    loss(model, batch) -> (the loss to backpropagate, its figures); the figures hold the loop's
        unit ("tokens", "pairs"), counted for throughput.
    weight(batch) -> the micro-batch's part of the step's divisor. None: 1 each, so a step's loss is
        the mean of its micro-batches' mean losses. SFT gives summed losses and their token counts,
        so a step's loss is the mean over all its tokens and accumulation 8x1 equals 1x8 exactly.
    merge(figures of each micro-batch, divisor) -> the step's row, as logged.
    evaluate(model) -> held-out figures, logged every --eval-every steps; None: nothing held out.
    postfix(row) -> what the progress bar shows beside it.
    after_step(step, row): what a stage watches step by step (DPO's chosen-drop warning).
    """

    batch: Callable[[list[int]], Any]
    loss: Callable[[Any, Any], tuple[torch.Tensor, dict]]
    weight: Callable[[Any], int] | None = None
    merge: Callable[[list[dict], int], dict] = lambda figures, divisor: merge_micro_rows(figures)
    evaluate: Callable[[Any], dict] | None = None
    postfix: Callable[[dict], dict] = lambda row: {"loss": f"{row['loss']:.4f}"}
    after_step: Callable[[int, dict], None] | None = None


class Loop:
    """The optimizer loop of every stage but PPO (which learns on-policy, in its own loop).

    Building it makes the optimizer and the schedule over `steps`, prepares them and the model with
    accelerate and resumes from setup's checkpoint. `run` then takes optimizer steps: each runs
    --grad-accum micro-batches from `order` (this process's shard of each), clips, steps the
    optimizer and the schedule; every --log-every steps it logs the step's row, every --eval-every
    the held-out figures, every --save-every it writes a checkpoint. `unit` is what the stage counts
    for throughput ("tokens", "pairs"); `what` names its loss in the error a non-finite one raises.
    A stage whose data changes mid-run (DPO's online rounds) runs it `until` a step, then gives it
    the new data's `order` and its parts for the next run.
    """

    def __init__(self, setup: Setup, config, model, steps: int, order: BatchOrder, metrics: runs.MetricsLog,
                 unit: str, what: str, desc: str | None = None):
        self.setup, self.config, self.steps, self.order, self.metrics = setup, config, steps, order, metrics
        self.unit, self.what = unit, what
        accelerator = self.accelerator = setup.accelerator
        optimizer = make_optimizer(model, config)
        scheduler = make_scheduler(optimizer, config, steps)
        self.fused = lean_activations(model, config)
        self.compiled = compile_model(model, config.compile, config.stage, f"the {config.stage} model")
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        if config.lora:
            checkpoint_trainable_only(accelerator)
        self.step = restore_checkpoint(setup, order, strict=not config.lora) if setup.resume_from else 0
        self.last_checkpoint = setup.resume_from
        self.counted_before = setup.state.get(f"train_{unit}", 0)   # by the run this one resumes
        self.counted, self.train_time, self.timer, self.row = 0, 0.0, runs.Timer(), {}
        self.model.train()
        self.bar = progress(steps, self.step, desc or config.stage, config.progress and accelerator.is_main_process)

    def run(self, parts: StageParts, until: int | None = None, state: dict | None = None) -> None:
        """Optimizer steps up to step `until` (default: the last); `state` is the stage's own part
        of the checkpoints written meanwhile (DPO's round)."""
        config = self.config
        while self.step < (self.steps if until is None else until):
            started = time.perf_counter()
            figures, divisor = self._accumulate(parts, [self.order.next() for _ in range(config.grad_accum)])
            row = self.row = parts.merge(figures, divisor)
            try:
                grad_norm = optimizer_step(self.accelerator, self.model.parameters(), self.optimizer, self.scheduler,
                                           config.max_grad_norm)
            except FloatingPointError as exc:   # never applied; stop with the last good checkpoint named
                raise NonFiniteError(f"{exc} at step {self.step + 1}; the step was not applied, stopped "
                                     f"({self._last_good()})") from None
            self.step += 1
            self.counted += sum(int(f[self.unit]) for f in figures)
            self.train_time += time.perf_counter() - started
            if parts.after_step:
                parts.after_step(self.step, row)
            self.bar.set_postfix(parts.postfix(row), refresh=False)   # drawn by update, at most once a second
            self.bar.update(1)
            if self.step % config.log_every == 0 or self.step == self.steps:
                logged = {**row, "lr": self.scheduler.get_last_lr()[0], f"{self.unit}_per_s": self.rate,
                          "epoch": self.order.epochs}
                if grad_norm is not None:
                    logged["grad_norm"] = float(grad_norm)
                self.metrics.log(self.step, logged)
            if config.eval_every and self.step % config.eval_every == 0 and parts.evaluate:
                self.metrics.log(self.step, parts.evaluate(self.model))
            if config.save_every and self.step % config.save_every == 0 and self.step < self.steps:
                self.last_checkpoint = save_checkpoint(self.setup, config, self.step, self.order,
                                                       {**(state or {}), f"train_{self.unit}": self.total})

    def _accumulate(self, parts: StageParts, global_batches: list[list[int]]) -> tuple[list[dict], int]:
        """Forward and backward over one step's micro-batches, this process's share of each;
        gradients sync on the last only. Returns the figures of every process's micro-batches and the
        step's divisor, both counted over all processes.

        The loss is normalised over the global batch, so N processes train as one would: a stage with
        `weight` (SFT: summed token losses) divides by the weights summed over all processes; the
        others' micro-batch means are weighted by this process's share of the micro-batch's rows.
        Data-parallel engines average gradients over the N processes, hence the factor N.
        """
        acc, n = self.accelerator, self.accelerator.num_processes
        shares = [shard(rows, acc) for rows in global_batches]
        # A process with no row of a (short, last) micro-batch runs one with weight 0: it must still
        # take part in the gradient sync.
        batches = [parts.batch(mine or rows[:1]) for mine, rows in zip(shares, global_batches)]
        if parts.weight:
            divisor = sum_over_processes(acc, sum(parts.weight(b) for b, mine in zip(batches, shares) if mine))
            scales = [n / max(divisor, 1) if mine else 0.0 for mine in shares]
        else:
            divisor = len(batches)
            scales = [n * len(mine) / (len(rows) * divisor) for mine, rows in zip(shares, global_batches)]
        deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        figures, bad = [], None
        for i, (batch, scale, mine) in enumerate(zip(batches, scales, shares)):
            if deepspeed:   # DeepSpeed divides by --grad-accum itself and steps at the last micro-batch
                context, scale = acc.accumulate(self.model), scale * len(batches)
            else:
                context = contextlib.nullcontext() if i == len(batches) - 1 else acc.no_sync(self.model)
            with context:
                loss, micro = parts.loss(self.model, batch)
                if n == 1:
                    check_finite(loss, self.what, self.step + 1, self.last_checkpoint)
                elif bad is None and not torch.isfinite(loss):
                    bad = loss.item()   # raised below on every process alike, after the sync
                acc.backward(loss * scale)
            if mine:
                figures.append(micro)
        if n > 1:
            gathered = gather_object([(figures, bad)])
            figures = [f for part, _ in gathered for f in part]
            bad = next((b for _, b in gathered if b is not None), None)
            if bad is not None:
                check_finite(torch.tensor(bad), self.what, self.step + 1, self.last_checkpoint)
        return figures, divisor

    def _last_good(self) -> str:
        return (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                else "no checkpoint was written yet")

    @property
    def total(self) -> int:
        """Units trained on over the whole run, the part before a resume included."""
        return self.counted_before + self.counted

    @property
    def rate(self) -> float:
        """Units per second of training in this run, over all processes."""
        return self.counted / max(self.train_time, 1e-9)

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def full_weights(self) -> dict | None:
        """The whole model's weights gathered from its slices (every process calls it), when the
        engine shards them (FSDP, ZeRO-3); None otherwise: the unwrapped model holds them all."""
        return self.accelerator.get_state_dict(self.model) if shards_weights(self.accelerator) else None

    def close(self) -> dict:
        """End the progress bar; the loop's part of summary.json."""
        self.bar.close()
        return {"steps": self.step, f"{self.unit}_per_s": self.rate, f"train_{self.unit}": self.total,
                "train_time_s": self.train_time, "wall_time_s": self.timer.elapsed,
                "processes": self.accelerator.num_processes, "engine": engine_name(self.accelerator),
                "fused_modules": self.fused, **self.compiled.summary()}
