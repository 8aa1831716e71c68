"""The optimizer, its learning-rate schedule and one optimizer step, as every stage takes them
(the skeleton's loop for sft, pretrain, rm and dpo; PPO's own loop in rl.py)."""

from __future__ import annotations

import math

import torch

from rlhflab.models.fused import fuse_layers
from rlhflab.models.loading import enable_gradient_checkpointing


def make_optimizer(model, config) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() or name.endswith("bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return adamw([g for g in groups if g["params"]], lr=config.lr)


def adamw(groups, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step where torch has one for these tensors (CPU and CUDA
    fp32/bf16 do): on a 6M-parameter model the optimizer step takes 6 ms instead of 25."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)


def make_scheduler(optimizer, config, total_steps: int):
    warmup = int(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lean_activations(model, config) -> int:
    """What the backward pass of the models inside `model` keeps (before accelerator.prepare): the
    leaner SwiGLU and RMSNorm backward everywhere it applies (models/fused.py), and every layer's
    activations recomputed with --gradient-checkpointing. Returns how many modules were fused."""
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return fuse_layers(model)


def optimizer_step(accelerator, params, optimizer, scheduler, max_grad_norm: float):
    """Clip (when asked), step the optimizer and the schedule, clear the gradients; returns the norm or None.

    A gradient whose norm is not finite is never applied: the gradients are cleared, nothing steps,
    and FloatingPointError says so (the caller stops, or skips the batch)."""
    params = list(params)
    norm = accelerator.clip_grad_norm_(params, max_grad_norm or math.inf)
    if norm is not None and not math.isfinite(float(norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"the gradient norm is {float(norm)}")
    norm = norm if max_grad_norm else None
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
