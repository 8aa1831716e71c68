"""--compile: torch.compile on a model's repeated transformer blocks, with a fallback.

Regional compilation: every decoder layer (the blocks of the model's layer list) is compiled in
place, not the whole model. One compiled graph serves all the layers, so compile time is that of
one layer; and everything around the blocks stays plain Python: peft wrappers and adapter
switching, the LM-head selection hook (heads.logits_at), value and score heads, the engine's
decoding loop over the KV cache. Parameter names are unchanged, so checkpoints, `save_pretrained`
and accelerate see the model they always did.

Shapes are compiled dynamic (`dynamic=True`): one graph for every batch size and sequence length
(sizes 0 and 1 get one more each, as torch specialises them), not a recompilation per new length.
A KV cache is another matter: a block that writes into it is specialised to its layer (the cache
slot it updates), one graph per layer, prefill and decode. So a body called without asking for a
cache (training, scoring, evaluation: every pass but decoding) is told not to build one, which
transformers otherwise does by default. Decoding itself runs the compiled blocks only in the
commands that generate (eval, chat) and where --compile compiles GENERATE (`true`, or `auto` where
measured faster), with the recompile limit raised to the graphs it needs; elsewhere (RL's
rollouts, a pretraining run's sample continuations) the blocks run plain while a cache is passed.

Compiling must never stop a run: a failure at compile time or at the first call of a compiled
block prints one `note:` line naming the model and the reason, and the model runs uncompiled
from then on.
"""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import dataclass, field

import torch
import torch._dynamo
from torch import nn
from transformers.cache_utils import Cache

from rlhflab.models.heads import causal_lm

# GENERATE stands for decoding over a KV cache (eval, chat) among the stages below.
GENERATE = "generate"
# --compile auto: the stages (pretrain, sft, rm, dpo, ppo, GENERATE) where compiling was measured
# faster on the CPU, its compile time counted. None yet: on the 2-core CPU a few dozen steps did
# not earn back ~10 CPU seconds of compiling (docs/results.md, "--compile, measured 2026-11-30").
# Not measured on CUDA: auto leaves it off there.
AUTO_STAGES: frozenset[str] = frozenset()


def wanted(setting: str, stage: str, device: torch.device) -> bool:
    """Whether --compile `setting` compiles in `stage` on `device`."""
    if setting == "auto":
        return device.type == "cpu" and stage in AUTO_STAGES
    return setting == "true"


def repeated_blocks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(blocks, bodies): the transformer blocks of every model inside `model`, the items of each
    module list whose items are all of one class and have modules of their own (a decoder's
    layers), and the modules that hold those lists (the bodies that run them)."""
    blocks: list[nn.Module] = []
    bodies: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            items = list(child) if isinstance(child, nn.ModuleList) else []
            if items and len({type(item) for item in items}) == 1 and any(True for _ in items[0].children()):
                blocks.extend(items)
                bodies.append(module)
            else:
                visit(child)

    visit(model)
    return list(dict.fromkeys(blocks)), list(dict.fromkeys(bodies))   # modules shared by two roles: once


def _no_cache_unless_asked(module, args, kwargs):
    """A body's forward pre-hook: no KV cache unless the caller asked for one (use_cache=True) or
    passed one in."""
    if kwargs.get("use_cache") is None and kwargs.get("past_key_values") is None:
        kwargs["use_cache"] = False
    return args, kwargs


@dataclass
class Compiled:
    """The compiled blocks of one model and what became of them."""

    what: str                                  # the model as the note names it
    blocks: list[nn.Module] = field(default_factory=list)
    hooks: list = field(default_factory=list)   # the bodies' no-cache hooks
    decode: bool = False                       # also when decoding over a KV cache (the engine's decode steps)
    active: bool = False                       # compiled, and no failure since
    seconds: float = 0.0                       # spent compiling in the probe
    reason: str | None = None                  # why it runs uncompiled, when it was asked to compile

    def fall_back(self, reason: str) -> None:
        if self.reason is None:
            print(f"note: --compile: {self.what} runs uncompiled ({reason})", file=sys.stderr, flush=True)
        self.active, self.reason = False, reason
        for block in self.blocks:
            block._compiled_call_impl = None   # nn.Module.__call__ runs the plain forward again
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def summary(self) -> dict:
        """This model's part of summary.json."""
        return {"compiled": self.active, "compile_time_s": round(self.seconds, 3)}


def _reason(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _guarded(block: nn.Module, state: Compiled):
    compiled_call = torch.compile(block._call_impl, dynamic=True)

    def call(*args, **kwargs):
        decoding = any(isinstance(value, Cache) for value in kwargs.values())
        if state.active and (state.decode or not decoding):
            try:
                return compiled_call(*args, **kwargs)
            except Exception as exc:   # compiling failed: nothing ran yet, so run it plain
                state.fall_back(_reason(exc))
        return block._call_impl(*args, **kwargs)

    return call


def compile_model(model: nn.Module, setting: str, stage: str, what: str, train: bool = True,
                  generates: bool = False) -> Compiled:
    """Compile `model`'s transformer blocks in place when --compile `setting` asks for it in `stage`,
    then run a two-row probe through it (forward, and backward when `train`), so that a model that
    cannot compile falls back here, with its note, rather than in the middle of a run. `what` names
    the model in that note ("the policy"). A command whose work is decoding (`generates`: eval, chat)
    also decodes compiled where --compile asks for GENERATE; the others decode plain. Returns what
    became of it (Compiled.summary())."""
    device = next(model.parameters()).device
    state = Compiled(f"{what} ({type(causal_lm(model)).__name__})",
                     decode=generates and wanted(setting, GENERATE, device))
    if not wanted(setting, stage, device):
        return state
    state.blocks, bodies = repeated_blocks(model)
    if not state.blocks:
        state.fall_back("no repeated transformer blocks found to compile")
        return state
    # Decoding with a KV cache: a graph per layer for the prompt and one for the next tokens,
    # plus a few for training, evaluation and batches of one.
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 2 * len(state.blocks) + 8)
    started = time.perf_counter()
    try:
        state.active = True
        state.hooks = [body.register_forward_pre_hook(_no_cache_unless_asked, with_kwargs=True)
                       for body in bodies if "use_cache" in inspect.signature(body.forward).parameters]
        for block in state.blocks:
            block._compiled_call_impl = _guarded(block, state)
        _probe(bodies[0], device, train)
    except Exception as exc:
        state.fall_back(_reason(exc))
    state.seconds = time.perf_counter() - started
    return state


def _probe(body: nn.Module, device: torch.device, train: bool) -> None:
    """One small forward through a body (and backward, when it trains), then one without grad in
    eval mode (evaluation, scoring, generation); random streams and gradients are left as they were."""
    ids = torch.ones((2, 8), dtype=torch.long, device=device)
    params = [p for p in body.parameters() if p.requires_grad and p.grad is None]
    was_training = body.training

    def hidden() -> torch.Tensor:
        out = body(input_ids=ids)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            if train and params:
                body.train()
                hidden().float().mean().backward()
            body.eval()
            with torch.no_grad():
                hidden()
        finally:
            body.train(was_training)
            for p in params:
                p.grad = None
