"""`rlhflab quantize MODEL --bits 4|8 --out DIR`: a model directory with 4-bit or 8-bit weights.

bitsandbytes does the work: 4-bit is NF4 with double quantisation (Dettmers et al. 2023,
arXiv:2305.14314), 8-bit is LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339); both run on CUDA
and on the CPU. The linear layers of the transformer blocks are quantised; the embeddings, norms
and output head keep their dtype, as bitsandbytes leaves them. The written directory records its
quantisation in config.json, so `serve`, `chat`, `eval` and `sample` load it as any other model
directory (transformers reads the quantisation back), with bitsandbytes installed.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from rlhflab.config import opt
from rlhflab.errors import UsageError
from rlhflab.models.loading import (
    Placement,
    check_model_directory,
    choose_placement,
    is_adapter_dir,
    keep_narrow_4bit_layers_plain,
    load_causal_lm,
    load_tokenizer,
    save_model,
)
from rlhflab.runs import atomic_write_directory, atomic_write_json, resolve_adapter_base

MARKER = "quantized_from.json"


@dataclass
class QuantizeConfig:
    """Write a copy of a model with its linear layers in 4-bit NF4 or 8-bit int8 (bitsandbytes)."""

    stage = "quantize"
    model: str | None = opt(None, "model directory or LoRA adapter (merged onto its base first)")
    bits: int = opt(4, "weight bits: 4 (NF4) or 8 (int8)", (4, 8))
    out: str = opt("", "directory to write the quantized model into")
    device: str = opt("auto", "where to quantize (the written weights load on either)", ("auto", "cpu", "cuda"))
    trust_remote_code: bool = opt(False, "allow the model repo's own Python code to run")

    def check(self) -> None:
        if not self.model:
            raise UsageError("give a model: `rlhflab quantize DIR --bits 4 --out DIR`")
        if not self.out:
            raise UsageError("--out: give a directory for the quantized model")


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError("4-bit and 8-bit weights need the bitsandbytes package: pip install bitsandbytes") from None


def quantization_config(bits: int, placement: Placement) -> BitsAndBytesConfig:
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=placement.dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_quantized(name: str, bits: int, placement: Placement, trust_remote_code: bool = False,
                   option: str = "--model"):
    """A causal LM quantised as it loads, for inference. An adapter is merged onto its base first."""
    require_bitsandbytes()
    if is_adapter_dir(name):
        merged = load_causal_lm(name, choose_placement("cpu", "fp32"), trust_remote_code, option=option)
        with tempfile.TemporaryDirectory() as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            del merged
            return load_quantized(tmp, bits, placement, trust_remote_code, option)
    device = (placement.device.index or 0) if placement.device.type == "cuda" else "cpu"
    if Path(name).is_dir():   # whole weight files, named when broken
        check_model_directory(Path(name), option)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=placement.dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
            quantization_config=quantization_config(bits, placement), device_map={"": device})
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option} {name}: cannot load the model in {bits}-bit: {exc}") from None
    # Not `ready_for_inference` here: a repacked model saves re-quantized scales (the repacking
    # does not round-trip bit for bit); `serve` calls it once the model is complete.
    return keep_narrow_4bit_layers_plain(model).eval()


def ready_for_inference(model):
    """A loaded model, ready to generate; only a 4-bit model on the CPU changes.

    Layers narrower than a quantisation block keep the plain layout (`keep_narrow_4bit_layers_plain`).
    On a CPU with AVX512-BF16, bitsandbytes repacks the other 4-bit layers at their first no-grad
    forward: a new copy of each weight, while the memory-mapped checkpoint whose pages the repacking
    read stays mapped, and resident, as long as any tensor still points into it (a norm, the
    embeddings, a quantisation code table): the 4-bit weights were held twice (bench/RESULTS.md,
    serving). So the repacking is done here, and what still lives in the checkpoint is copied out.
    """
    keep_narrow_4bit_layers_plain(model)
    to_repack = [module for module in model.modules() if getattr(module, "support_avx512bf16_for_cpu", False)
                 and module.weight.device.type == "cpu"
                 and not getattr(module.weight.quant_state, "packing_format_for_cpu", False)]
    if not to_repack:
        return model
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long))
    seen = set()
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            in_new_layout = getattr(getattr(tensor, "quant_state", None), "packing_format_for_cpu", False)
            if id(tensor) not in seen and not in_new_layout:
                seen.add(id(tensor))
                tensor.data = tensor.data.clone()
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        for part in (state, getattr(state, "state2", None)):
            for name in ("absmax", "code"):
                if isinstance(getattr(part, name, None), torch.Tensor):
                    setattr(part, name, getattr(part, name).clone())
    return model


def quantize_command(config: QuantizeConfig) -> int:
    if not Path(config.model).exists():
        raise UsageError(f"--model {config.model}: no such directory")
    source = Path(config.model)
    placement = choose_placement(config.device, "auto")
    model = load_quantized(config.model, config.bits, placement, config.trust_remote_code)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)

    def fill(tmp: Path) -> None:
        save_model(model, tokenizer, tmp)
        atomic_write_json(tmp / MARKER, {"source": str(source.resolve()), "bits": config.bits,
                                         "method": "nf4" if config.bits == 4 else "int8"})

    out = atomic_write_directory(config.out, fill, config.model, MARKER)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    before = sum(f.stat().st_size for f in _weights_of(source))
    ratio = f" ({size / before:.2f}x of {before / 2**20:.1f} MiB)" if before else ""
    print(f"{config.bits}-bit model written to {out}: weights {size / 2**20:.1f} MiB{ratio}")
    return 0


def _weights_of(source: Path) -> list[Path]:
    """The safetensors files of a model directory, or of an adapter's base."""
    if is_adapter_dir(source):
        base = resolve_adapter_base(source)
        return _weights_of(Path(base)) if base and Path(base).is_dir() else []
    return sorted(source.glob("*.safetensors"))
