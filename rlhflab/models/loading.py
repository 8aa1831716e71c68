"""Loading models and tokenizers: a local directory (HF model or peft adapter), a hub id, or a
fresh model built from a config or a named preset. Device and dtype are chosen, not assumed:
CUDA with bf16 where the card supports it, else fp32 on the CPU (bf16 on a CPU without native
support is ~20x slower).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    PreTrainedModel,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from rlhflab import runs
from rlhflab.data.template import ensure_chat_template, ensure_pad_token, stop_token_ids
from rlhflab.errors import UsageError
from rlhflab.models.heads import save_with_classifier_head
from rlhflab.runs import (
    atomic_write_directory,
    atomic_write_json,
    check_output_directory,
    check_weight_files,
    resolve_adapter_base,
)

# Llama-shaped presets for models trained from scratch (vocab size comes from the tokenizer).
PRESETS = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8),
    "bench": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    "bench-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
}


@dataclass
class Placement:
    device: torch.device
    dtype: torch.dtype          # dtype of frozen / LoRA-base weights
    train_dtype: torch.dtype    # dtype of fully trained weights (fp32 master weights)
    mixed_precision: str        # what accelerate should autocast to: "no" | "bf16" | "fp16"


def choose_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device auto or cpu)")
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda" if on_cuda else "cpu")
    if dtype == "auto":
        dtype = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "fp16" and not on_cuda:
        raise UsageError("--dtype fp16 needs CUDA; use fp32 on the CPU")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[dtype]
    return Placement(dev, torch_dtype, torch.float32, mixed)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on (found again when its run moved: see
    runs.resolve_adapter_base)."""
    base = resolve_adapter_base(path)
    if not base:
        raise UsageError(f"{path}/adapter_config.json names no base_model_name_or_path")
    return base


def _check_source(name: str, option: str, marker: str = "config.json") -> None:
    """A path that does not exist is an error here; a hub id is left to the hub to answer. A local
    directory's weight files are checked whole, and an adapter's base must be there."""
    p = Path(name)
    if p.is_file():
        raise UsageError(f"{option} {name}: a file; expected a model directory or hub id")
    if p.exists():
        if p.is_dir() and not ((p / marker).exists() or is_adapter_dir(p)):
            raise UsageError(f"{option} {name}: the directory has no {marker} or adapter_config.json")
        check_model_directory(p, option)
        return
    if _looks_like_path(name):
        raise UsageError(f"{option} {name}: no such directory")


def check_model_directory(path: Path, option: str) -> None:
    """Before a library reads a local model, adapter or reward-model directory: its weights are
    whole safetensors files (nothing else is read: an adapter_model.bin alone is refused), its JSON
    files parse, and an adapter's base model exists."""
    check_weight_files(path, f"{option} {path}")
    for name in ("config.json", "adapter_config.json", "reward_config.json"):
        file = path / name
        if file.is_file():
            try:
                parsed = json.loads(file.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise UsageError(f"{option} {path}: {name} is not valid JSON ({exc})") from None
            if not isinstance(parsed, dict):
                raise UsageError(f"{option} {path}: {name} is not a JSON object")
    if is_adapter_dir(path):
        if not (path / "adapter_model.safetensors").is_file():
            raise UsageError(f"{option} {path}: an adapter without adapter_model.safetensors (rlhflab loads weights "
                             "from safetensors files only; a pickled adapter_model.bin is not read)")
        base = adapter_base(path)
        if _looks_like_path(base) and not Path(base).is_dir():
            raise UsageError(f"{option} {path}: an adapter whose base model {base} (its adapter_config.json's "
                             "base_model_name_or_path) is missing; put the base back there, or edit that field")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith((".json", ".safetensors"))


def load_tokenizer(name: str, trust_remote_code: bool = False, chat_template: str = "auto",
                   option: str = "--tokenizer"):
    """The tokenizer at `name`, with a chat template and a pad token; `option` names where the
    path came from in error messages (the model's own directory is the usual source)."""

    _check_source(name, option, marker="tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option} {name}: cannot load a tokenizer: {exc}") from None
    if chat_template == "default":
        tokenizer.chat_template = None
    grew = ensure_chat_template(tokenizer)
    grew = ensure_pad_token(tokenizer) or grew
    tokenizer.padding_side = "right"
    return tokenizer


def build_fresh(init_config: str, tokenizer, seed: int = 0):
    """A randomly initialised causal LM from a config.json path or a preset name."""

    special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if init_config in PRESETS:
        config = LlamaConfig(**PRESETS[init_config], num_key_value_heads=PRESETS[init_config]["num_attention_heads"],
                             max_position_embeddings=2048, tie_word_embeddings=True, **special)
    else:
        path = Path(init_config)
        if not path.exists():
            raise UsageError(f"--init-config {init_config}: no such file, and not a preset ({', '.join(PRESETS)})")
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--init-config {init_config}: not a model config.json ({exc})") from None
        for key, value in special.items():
            setattr(config, key, value)
    torch.manual_seed(seed)
    try:
        return AutoModelForCausalLM.from_config(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise UsageError(f"--init-config {init_config}: cannot build a model from it ({type(exc).__name__}: {exc})") from None


@contextlib.contextmanager
def _head_kept_quiet(name: str):
    """A full reward model's directory also holds its score head as `score.weight`, so that it loads
    as a sequence classifier; its body loaded as a causal LM leaves that key unused, and transformers
    prints a table calling it UNEXPECTED on every load. For such a directory that key is expected:
    the table is kept back (missing or mismatched weights still raise below)."""
    if not (Path(name) / "reward_config.json").is_file():
        yield
        return
    report = logging.getLogger("transformers.modeling_utils")   # it logs the load report
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report.setLevel(level)


def load_causal_lm(name: str, placement: Placement, trust_remote_code: bool = False, train_full: bool = False,
                   option: str = "--model", quantize_4bit: bool = False):
    """A causal LM from a local directory or hub id. Adapter directories are merged into their base.
    `quantize_4bit`: the linear layers in 4-bit NF4, frozen, for a LoRA adapter to train on (QLoRA)."""

    _check_source(name, option)
    dtype = placement.train_dtype if train_full else placement.dtype
    if is_adapter_dir(name):
        base = load_causal_lm(adapter_base(name), placement, trust_remote_code, train_full, option)

        return PeftModel.from_pretrained(base, name).merge_and_unload()
    extra = {}
    if quantize_4bit:
        # QLoRA (Dettmers et al. 2023, arXiv:2305.14314): NF4 weights, double quantisation, compute in
        # the placement's dtype (bf16 on CUDA, fp32 on the CPU).
        extra = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=placement.dtype),
            "device_map": {"": (placement.device.index or 0) if placement.device.type == "cuda" else "cpu"}}
    try:
        with _head_kept_quiet(name):
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **extra
            )
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option} {name}: cannot load the model: {exc}") from None
    except RuntimeError as exc:
        if "mismatch" not in str(exc):
            raise
        raise UsageError(f"{option} {name}: the weights do not have the shapes its config.json gives (a config.json "
                         "of another model?)") from None
    if quantize_4bit:
        for module in model.modules():
            # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight for its inference
            # kernel at the first no-grad forward in eval mode (a reference or evaluation pass). That
            # layout has no backward (torch warns that gemv_4bit has no autograd kernel, and the
            # gradient through the layer is lost) and fails on layers narrower than a quantisation
            # block of 64: a model that trains keeps the training layout.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return keep_narrow_4bit_layers_plain(model).to(placement.device)


def keep_narrow_4bit_layers_plain(model):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer for a faster kernel at its first
    no-grad forward in eval mode; the repacking fails on a layer whose input is not a whole number of
    quantisation blocks (64 weights), so such layers keep the plain layout. Other models pass as they are."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False) and module.in_features % 64:
            module.support_avx512bf16_for_cpu = False
    return model


def context_limit(model) -> int | None:
    """Longest sequence the model's positions allow (None: no fixed limit, e.g. ALiBi), read from
    the first Hugging Face config inside `model` (a wrapper such as a reward model holds one)."""
    for module in model.modules() if isinstance(model, torch.nn.Module) else [model]:
        model_config = getattr(module, "config", None)
        if model_config is not None:
            return getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    return None


def enable_gradient_checkpointing(module) -> int:
    """Activation checkpointing on every trainable HF model inside `module`; returns how many.

    Non-reentrant checkpointing, so a LoRA model with frozen embeddings needs no input-grad hook.
    Every pass that records gradients recomputes, in training mode or not: PPO and GRPO keep the
    policy in eval mode (no dropout in the log-probs they compare), where transformers' own
    checkpointing stands aside. Generation and no-grad passes run as before.
    """

    done, seen = 0, set()
    for sub in module.modules():
        if id(sub) in seen or not isinstance(sub, PreTrainedModel):
            continue
        seen.update(id(m) for m in sub.modules())
        if not any(p.requires_grad for p in sub.parameters()):
            continue
        if not sub.supports_gradient_checkpointing:
            raise UsageError(f"--gradient-checkpointing: {type(sub).__name__} does not support it")
        sub.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        sub.config.use_cache = False
        for layer in sub.modules():
            if isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing:
                layer.forward = types.MethodType(_checkpointed_in_eval_mode, layer)
        done += 1
    return done


def _checkpointed_in_eval_mode(self, *args, **kwargs):
    """A layer's forward (bound to the layer, so a copied model's copy runs its own weights),
    checkpointed also in eval mode when gradients are recorded: in training mode transformers' own
    wrapper checkpoints, and a pass with a KV cache, as generation's, is never checkpointed."""
    forward = type(self).forward
    if self.training or not torch.is_grad_enabled() or kwargs.get("past_key_values") is not None:
        return forward(self, *args, **kwargs)
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return torch.utils.checkpoint.checkpoint(functools.partial(forward, self, **kwargs), *args, use_reentrant=False)


def resize_for_tokenizer(model, tokenizer) -> bool:
    """Grow the embeddings when the tokenizer got new tokens (pad, chat markers)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
        return True
    return False


def apply_lora(model, config, extra_trainable: list[str] | None = None):
    """Wrap with a fresh trainable LoRA adapter (peft), named "default"."""

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_targets, task_type="CAUSAL_LM", modules_to_save=extra_trainable or None)
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise UsageError(f"--lora-target {config.lora_target}: {exc}") from None


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}


@dataclass
class Trainable:
    """What load_trainable gives a training stage."""

    model: torch.nn.Module   # every weight trainable, or a PeftModel whose adapter "default" trains
    tokenizer: object
    base: str | None         # what a saved adapter records as its base; None when every weight trains
    adapter: str | None      # the adapter directory whose training continues; None for a fresh adapter or none


def load_trainable(config, placement: Placement, source: str | None, option: str = "--model",
                   fresh: str | None = None, tokenizer=None) -> Trainable:
    """The model a training stage trains, and its tokenizer. Every stage (pretrain, SFT, RM, DPO,
    the PPO policy) loads through here, so the rules are the same everywhere:

    - no --lora: every weight trains, in fp32; an adapter directory is merged into its base first.
    - --lora on a model: a fresh adapter "default" (--lora-r, --lora-alpha, --lora-dropout,
      --lora-target); the embeddings and LM head train too when the tokenizer grew, or the new
      tokens' rows would stay random.
    - --lora on an adapter directory: that adapter keeps training, on its own base and with its
      own rank and targets, so that the stages after it can share that one base.
    - --qlora (with --lora): the same, with the frozen base in 4-bit NF4 (bitsandbytes).
    - `fresh` (a preset name or config.json, instead of `source`): a new random model, every
      weight trained.

    `source` is the model directory or hub id and `option` the option that named it; `tokenizer`,
    when the stage has loaded it already, saves loading it twice.
    """
    if config.qlora:
        raise_unless_qlora_possible()
    if source is None and fresh is None:
        raise UsageError(f"give {option} (a directory or hub id) or --init-config (a config.json or preset)")
    if source is not None and fresh is not None:
        raise UsageError(f"give {option} (a saved model) or --init-config (a fresh one), not both")
    if fresh is not None and config.lora:
        raise UsageError("--lora needs a saved base model to attach the adapter to; --init-config builds an unsaved one")
    if tokenizer is None:
        if config.tokenizer is None and source is None:
            raise UsageError("--init-config builds a fresh model: also give --tokenizer")
        tokenizer = load_tokenizer(config.tokenizer or source, config.trust_remote_code, config.chat_template,
                                   "--tokenizer" if config.tokenizer else option)
    if fresh is not None:
        model = build_fresh(fresh, tokenizer, config.seed).to(placement.device)
        return Trainable(model, tokenizer, None, None)
    if not config.lora:
        model = load_causal_lm(source, placement, config.trust_remote_code, train_full=True, option=option)
        if getattr(model, "is_quantized", False):
            raise UsageError(f"{option} {source}: its weights are quantized, which cannot train in full; "
                             "train a LoRA adapter on them with --lora")
        model.requires_grad_(True)   # an adapter merged into its base comes back frozen, as peft left the base
        resize_for_tokenizer(model, tokenizer)
        model.config.pad_token_id = tokenizer.pad_token_id
        return Trainable(model, tokenizer, None, None)
    adapter = source if is_adapter_dir(source) else None
    base_name = adapter_base(adapter) if adapter else source
    base = load_causal_lm(base_name, placement, config.trust_remote_code, option=option, quantize_4bit=config.qlora)
    grew = resize_for_tokenizer(base, tokenizer)
    base.config.pad_token_id = tokenizer.pad_token_id
    if adapter:
        model = PeftModel.from_pretrained(base, adapter, adapter_name="default", is_trainable=True)
    else:
        model = apply_lora(base, config, ["embed_tokens", "lm_head"] if grew else None)
    return Trainable(model, tokenizer, base_name, adapter)


def fit_context(model, max_length: int) -> int:
    """--max-length, or the model's own limit where its positions end sooner (learned position
    tables, as GPT-2's, index out of range past it)."""
    limit = context_limit(model)
    if limit and max_length > limit:
        print(f"note: --max-length {max_length} is more than the model's {limit} positions: using {limit}",
              file=sys.stderr)
        return limit
    return max_length


def raise_unless_qlora_possible() -> None:
    """--qlora holds the base in 4-bit through bitsandbytes, on CUDA or the CPU."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError("--qlora holds the frozen base in 4-bit with the bitsandbytes package, which is not "
                         "installed: pip install bitsandbytes, or train with --lora alone") from None


def save_model(model, tokenizer, out: Path, base_name: str | None = None, state_dict: dict | None = None) -> None:
    """Save the trained model (full weights or adapter) and tokenizer as safetensors into `out`.
    `state_dict`: the full weights gathered from the processes that each hold a slice (FSDP, ZeRO-3)."""
    out.mkdir(parents=True, exist_ok=True)
    unwrapped = getattr(model, "module", model)
    mark_end_of_turn(unwrapped, tokenizer)
    unwrapped.save_pretrained(str(out), safe_serialization=True,
                              **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(str(out))
    if is_adapter_dir(out):
        save_generation_config(unwrapped, out)
        if base_name is not None:
            record_adapter_base(out, base_name)


def mark_end_of_turn(model, tokenizer) -> None:
    """Name the chat template's end-of-turn marker (<|im_end|>, <|eot_id|> ...) beside EOS as the
    end token in the model's generation config, so that `model.generate`, `pipeline` and other
    trainers stop an answer where rlhflab's own engine stops it, not at the length limit."""
    generation = getattr(model, "generation_config", None)
    ids = stop_token_ids(tokenizer)
    if generation is None or not ids:
        return
    generation.eos_token_id = ids if len(ids) > 1 else ids[0]
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id


def save_generation_config(model, out: Path) -> None:
    """An adapter directory gets generation_config.json too: peft writes none, and it tells a
    reader of the adapter (or of its merged model) which tokens end a turn."""
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(out))


def record_adapter_base(out: Path, base_name: str) -> None:
    """Point an adapter at its base as the user named it, plus where it lies from the adapter, so
    it loads from any working directory and after its run directory moves."""
    runs.record_adapter_base(out, base_name)


def merge_command(config) -> int:
    """`rlhflab merge --adapter DIR --out DIR`: a plain HF model directory."""

    if not config.adapter or not config.out:
        raise UsageError("give --adapter (an adapter directory) and --out (where to write the merged model)")
    if not is_adapter_dir(config.adapter):
        raise UsageError(f"--adapter {config.adapter}: no adapter_config.json there")
    check_output_directory(config.out, config.adapter, "merged_from.json")
    placement = choose_placement("cpu", "fp32" if config.dtype == "auto" else config.dtype)
    model = load_causal_lm(config.adapter, placement, config.trust_remote_code, option="--adapter")
    tokenizer = load_tokenizer(config.adapter, config.trust_remote_code, option="--adapter")

    def fill(tmp: Path) -> None:
        head = Path(config.adapter) / "score_head.safetensors"
        if not head.is_file():
            save_model(model, tokenizer, tmp)
        else:   # a LoRA reward model: the merged body keeps its score head, and loads as a sequence classifier
            tensors = load_file(str(head))
            weight = next(t for t in tensors.values() if t.ndim == 2)
            offset = save_with_classifier_head(model, weight, next((t for t in tensors.values() if t.ndim == 1), None),
                                               tmp)
            tokenizer.save_pretrained(str(tmp))
            shutil.copyfile(head, tmp / "score_head.safetensors")
            info = json.loads((Path(config.adapter) / "reward_config.json").read_text(encoding="utf-8")) \
                if (Path(config.adapter) / "reward_config.json").is_file() else {}
            info = {**info, "lora": False, "base": None, "sequence_classifier": offset is not None}
            if offset:
                info["sequence_classifier_offset"] = offset
            atomic_write_json(tmp / "reward_config.json", info)
        atomic_write_json(tmp / "merged_from.json", {"adapter": str(Path(config.adapter).resolve()),
                                                      "base": adapter_base(config.adapter)})

    out = atomic_write_directory(config.out, fill, config.adapter, "merged_from.json")
    print(f"merged model written to {out}")
    return 0
