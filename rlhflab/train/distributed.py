"""What the launch and the engine decide, for every stage: whether a launch started the processes
it was asked for, which engine runs (DDP, FSDP, DeepSpeed ZeRO) and what each stage runs under, and
the sums, means and gradients taken over processes. The skeleton (skeleton.py) and PPO's own loop
(rl.py) use them; with one process each is the identity."""

from __future__ import annotations

import os
import sys

import torch
from accelerate.utils import DistributedType

from rlhflab.errors import UsageError


def check_launch() -> None:
    """Refuse a launch that runs one process where several were asked for. `accelerate launch
    --num_processes N --cpu` (or on a machine without GPUs) starts a single process unless it goes
    through mpirun; that launcher leaves ACCELERATE_USE_CPU and MASTER_ADDR but no WORLD_SIZE."""
    env = os.environ
    asked_for_more = "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env
    started = any(name in env for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if asked_for_more and not started:
        raise UsageError("`accelerate launch` started ONE process, though more were asked for: on CPUs (--cpu, or "
                         "no GPU) its launcher starts several only through mpirun (--mpirun_hostfile). For several "
                         "CPU processes use `torchrun --nproc_per_node N -m rlhflab ...`; on GPUs give "
                         "`accelerate launch --multi_gpu` or a config from configs/accelerate/")


def uses_deepspeed() -> bool:
    """Whether accelerate will run DeepSpeed (set by `accelerate launch` with a DeepSpeed config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def sharding_launch() -> bool:
    """Whether the launch asks for DeepSpeed or FSDP (accelerate's switches, set by its launcher)."""
    return uses_deepspeed() or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def shards_weights(accelerator) -> bool:
    """Whether each process holds only a slice of the weights (FSDP, DeepSpeed ZeRO-3), so that a
    full copy must be gathered before the model is saved."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    return plugin is not None and plugin.zero_stage == 3


def engine_name(accelerator) -> str:
    """What trained the model, as summary.json says: single, ddp, fsdp or deepspeed-zero<stage>."""
    engine = accelerator.distributed_type
    if engine == DistributedType.DEEPSPEED:
        return f"deepspeed-zero{accelerator.state.deepspeed_plugin.zero_stage}"
    if engine == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    return "single" if accelerator.num_processes == 1 else "ddp"


def check_engine(accelerator, config) -> None:
    """What each engine runs: every stage under DDP; SFT and pretraining under FSDP and DeepSpeed
    ZeRO-1/2/3; RM and DPO under ZeRO-1/2 as well. PPO's roles run their own forward passes, which
    DDP serves (gradients are averaged by hand, `average_gradients`) but the sharding engines do not."""
    engine = accelerator.distributed_type
    if sharding_launch() and engine not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UsageError("FSDP was asked for, but accelerate runs FSDP on GPUs only: on CPUs launch with DDP "
                         "(torchrun --nproc_per_node N) or DeepSpeed (configs/accelerate/zero2.yaml)")
    if engine not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        if engine not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            print(f"note: {engine.value} is untested with rlhflab", file=sys.stderr)
        return
    name = "FSDP" if engine == DistributedType.FSDP else f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if config.stage == "ppo" or (config.stage in ("rm", "dpo") and shards_weights(accelerator)):
        raise UsageError(f"`rlhflab {config.stage}` does not run under {name} in this release; launch it with "
                         "DDP (configs/accelerate/ddp.yaml, or torchrun)"
                         + ("" if config.stage == "ppo" else " or DeepSpeed ZeRO-2"))
    if engine == DistributedType.DEEPSPEED:   # no dataloader is prepared: say what a process's micro-batch is
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = max(1, config.batch_size // accelerator.num_processes)
        ds["gradient_accumulation_steps"] = config.grad_accum
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * config.grad_accum * accelerator.num_processes
        ds["gradient_clipping"] = config.max_grad_norm
        if shards_weights(accelerator):   # the saved model is gathered whole from the slices
            ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def sum_over_processes(accelerator, value: float) -> float:
    """`value` summed over all processes (itself with one)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor(float(value), dtype=torch.float64, device=accelerator.device), "sum").item()


def average_gradients(accelerator, params, weight: float, figures: dict) -> dict:
    """Make every process's gradients the global ones, for a model whose forward passes do not go
    through the engine's wrapper (PPO's roles): each process's gradient of its mean loss, weighted
    by its `weight` (its response tokens), summed over processes and divided by the summed weights,
    which is the gradient of the mean over all processes' tokens. `figures` (floats) are averaged
    with the same weights and returned, so that every process decides alike (early stops). A
    non-finite gradient anywhere reaches every process, and the gradient-norm check stops them all."""
    if accelerator.num_processes == 1:
        return figures
    grads = [p.grad for p in params if p.grad is not None]
    keys = sorted(figures)
    flat = torch.cat([g.detach().flatten().float() for g in grads]
                     + [torch.tensor([1.0] + [float(figures[k]) for k in keys], device=accelerator.device)]) * weight
    flat = accelerator.reduce(flat, "sum")
    total = flat[-len(keys) - 1].item()
    flat = flat / max(total, 1e-12)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return dict(zip(keys, flat[offset + 1:].tolist()))


def mean_over_processes(accelerator, row: dict) -> dict:
    """A row of figures averaged over processes (each holds the same number of items); numbers only."""
    if accelerator.num_processes == 1:
        return row
    keys = sorted(k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    values = accelerator.reduce(torch.tensor([float(row[k]) for k in keys], dtype=torch.float64,
                                             device=accelerator.device), "mean")
    means = {k: int(v) if isinstance(row[k], int) and v == int(v) else v for k, v in zip(keys, values.tolist())}
    return {**row, **means}


def shard(batch: list[int], accelerator) -> list[int]:
    """This process's share of a global micro-batch (data parallel under accelerate launch)."""
    n, rank = accelerator.num_processes, accelerator.process_index
    return batch[rank::n] if n > 1 else batch
