"""Leaner backward passes for two blocks every Llama-family model repeats: the SwiGLU MLP's
activation and the RMSNorm.

Autograd keeps, for the backward pass, every intermediate its ops will need: for
`silu(gate) * up` that is gate, silu(gate) and up; for an RMSNorm the input, its normalised copy
and more. Written as one autograd function each, the backward recomputes the cheap parts instead:

- SwiGLU keeps gate and up and recomputes silu(gate): one (B, T, intermediate) tensor fewer per
  layer, the largest activations of the model.
- RMSNorm keeps its input and the (B, T, 1) inverse norm. With a frozen fp32 weight (LoRA, a
  frozen role) it keeps only its output, which the projections after it keep anyway, and recovers
  the normalised input as output / weight: no (B, T, hidden) tensor of its own at all.

The results and gradients are those of the model's own code (tests compare them at fp32 rounding
on every architecture they build). A module is only rewritten when its own forward, run once on a
small random input, gives what the replacement gives; anything else (another activation, Gemma's
(1 + weight) norm, GPT-2's LayerNorm and GELU MLP) runs as it was. Passes without gradients
(generation, scoring) compute exactly what they did: the norms take their own forward there, and
the MLP's function only multiplies silu(gate) by up.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _normalise(x, eps):
    """(x in fp32) * rstd and the (..., 1) rstd, as Llama's RMSNorm computes them."""
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32 * rstd, rstd


def _norm_input_grad(xhat, rstd, grad_xhat):
    # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)), along the normalised dimension
    return rstd * (grad_xhat - xhat * (grad_xhat * xhat).mean(-1, keepdim=True))


class _RMSNorm(torch.autograd.Function):
    """weight * normalised(x), keeping x and rstd (the normalised copy is recomputed)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xhat, rstd = _normalise(x, eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * xhat.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_x = _norm_input_grad(xhat, rstd, grad.float() * weight.float()).to(x.dtype)
        return grad_x, grad_weight, None


class _FrozenRMSNorm(torch.autograd.Function):
    """weight * normalised(x) for a frozen fp32 weight without zeros: keeps the output only (the
    layers after it keep it too), and rstd; the normalised input is output / weight."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xhat, rstd = _normalise(x, eps)
        out = weight * xhat
        ctx.save_for_backward(out, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, weight, rstd = ctx.saved_tensors
        return _norm_input_grad(out / weight, rstd, grad * weight), None, None


def _swiglu_mlp_forward(self, x):
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def _rms_norm_forward(self, x):
    weight = self.weight
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return type(self).forward(self, x)
    if not weight.requires_grad and x.dtype == weight.dtype == torch.float32 and _no_zeros(self):
        return _FrozenRMSNorm.apply(x, weight, self.variance_epsilon)
    return _RMSNorm.apply(x, weight, self.variance_epsilon)


def _no_zeros(norm) -> bool:
    """Whether the (frozen) weight has no zero, checked again only when the weight changed."""
    weight = norm.weight
    stamp = (weight.data_ptr(), weight._version)
    if norm.__dict__.get("_rlhflab_checked") != stamp:
        norm.__dict__["_rlhflab_no_zeros"] = bool((weight != 0).all())
        norm.__dict__["_rlhflab_checked"] = stamp
    return norm.__dict__["_rlhflab_no_zeros"]


def _is_swiglu_mlp(module) -> bool:
    if not all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(module, "act_fn", None)
    probe = torch.linspace(-6, 6, 25)
    try:
        return callable(act) and torch.allclose(act(probe), F.silu(probe), rtol=1e-6, atol=1e-6)
    except Exception:    # noqa: BLE001 - an activation that cannot run on a probe is not SiLU
        return False


def _is_rms_norm(module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _agrees(module, fused_forward, width: int) -> bool:
    """Whether the replacement computes what the module's own forward does, with gradients on, on
    a small random input (a subclass may compute something else under the same names)."""
    # the dtype the module computes in: its first floating-point weight's (a 4-bit layer's is packed bytes)
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if param is None:
        return False
    try:
        x = torch.randn(2, 3, width, device=param.device, dtype=param.dtype, requires_grad=True)
        with torch.enable_grad():
            expected = type(module).forward(module, x)
            got = fused_forward(module, x)
    except Exception:    # noqa: BLE001 - any failure means: leave the module as it is
        return False
    tol = 1e-5 if param.dtype == torch.float32 else 2e-2
    return isinstance(expected, torch.Tensor) and expected.shape == got.shape and torch.allclose(
        expected.float(), got.float(), rtol=tol, atol=tol)


def fuse_layers(model: nn.Module) -> int:
    """Give every SwiGLU MLP and RMSNorm of `model` the leaner backward, in place (on the instances,
    so other models of the same class are untouched, and a deep copy keeps its own); returns how
    many modules were rewritten. Idempotent."""
    checked: dict[tuple, bool] = {}
    done = 0
    for module in model.modules():
        if "forward" in module.__dict__:
            continue    # rewritten already, or wrapped by someone else: leave it
        if _is_swiglu_mlp(module):
            fused, width = _swiglu_mlp_forward, _in_features(module.gate_proj)
        elif _is_rms_norm(module):
            fused, width = _rms_norm_forward, module.weight.shape[0]
        else:
            continue
        key = (type(module), fused)
        if key not in checked:
            checked[key] = width is not None and _agrees(module, fused, width)
        if checked[key]:
            module.forward = types.MethodType(fused, module)
            done += 1
    return done


def _in_features(linear) -> int | None:
    base = getattr(linear, "base_layer", linear)   # a LoRA-wrapped projection
    return getattr(base, "in_features", None)
