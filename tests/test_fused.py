"""The leaner SwiGLU and RMSNorm backward: the same losses and gradients as the models' own code on
every architecture, fewer saved activations, left alone where a block computes something else."""

import copy
import json

import pytest
import torch
import transformers as tf
from conftest import SAMPLES
from peft import LoraConfig, get_peft_model

from rlhflab.cli.main import main
from rlhflab.models.fused import fuse_layers

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**SMALL),
    "qwen2": lambda: tf.Qwen2Config(**SMALL),
    "qwen3": lambda: tf.Qwen3Config(**SMALL, head_dim=8),   # RMSNorms on the heads' queries and keys too
    "mistral": lambda: tf.MistralConfig(**SMALL),
    "gemma": lambda: tf.GemmaConfig(**SMALL, head_dim=8),   # (1 + weight) norm, GELU MLP: not fused
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4),
}
# fused modules per model: 2 layers x (MLP + 2 norms) + the final norm (+ 2 head norms a layer in qwen3)
EXPECTED = {"llama": 7, "qwen2": 7, "mistral": 7, "qwen3": 11, "gemma": 0, "gpt2": 0, "gpt_neox": 0}


def build(arch: str, lora: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    with torch.no_grad():   # norms away from their initial ones, so that their weight matters
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.add_(0.3 * torch.randn_like(param))
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
    return model.eval()


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids).logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_same_loss_and_gradients_as_the_models_own_code(arch, lora):
    ids = torch.randint(3, VOCAB, (3, 11))
    plain, fused = build(arch, lora), build(arch, lora)
    assert fuse_layers(fused) == EXPECTED[arch]
    expected_loss, expected = loss_and_grads(plain, ids)
    loss, grads = loss_and_grads(fused, ids)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert grads.keys() == expected.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():   # generation and scoring: the same figures without gradients
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)


def saved_bytes(model, ids) -> int:
    """Bytes of the activations autograd keeps for the backward pass (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=ids).logits.sum()
    return sum(seen.values())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fewer_activations_kept(lora):
    ids = torch.randint(3, VOCAB, (4, 40))
    plain, fused = build("llama", lora), build("llama", lora)
    fuse_layers(fused)
    before, after = saved_bytes(plain, ids), saved_bytes(fused, ids)
    # per layer at least one (B, T, intermediate) tensor fewer: silu(gate) is recomputed
    assert before - after >= 2 * 4 * 40 * 64 * 4, (before, after)


def test_a_zero_in_a_frozen_norm_weight_keeps_the_input():
    """The frozen-weight norm recovers its input as output / weight; a zero weight must not use it."""
    ids = torch.randint(3, VOCAB, (2, 9))
    plain, fused = build("llama", lora=True), build("llama", lora=True)
    for model in (plain, fused):
        with torch.no_grad():
            model.base_model.model.model.layers[1].input_layernorm.weight[3] = 0.0
    fuse_layers(fused)
    expected_loss, expected = loss_and_grads(plain, ids)
    loss, grads = loss_and_grads(fused, ids)
    assert all(torch.isfinite(g).all() for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_deep_copy_runs_its_own_weights_and_fusing_twice_changes_nothing():
    ids = torch.randint(3, VOCAB, (2, 9))
    model = build("llama", lora=False)
    assert fuse_layers(model) == 7 and fuse_layers(model) == 0
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in twin.model.layers:
            layer.mlp.up_proj.weight.mul_(2.0)
            layer.post_attention_layernorm.weight.mul_(0.5)
    assert not torch.allclose(twin(input_ids=ids).logits, model(input_ids=ids).logits)
    reference = build("llama", lora=False)
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_every_training_stage_fuses(tiny_model, tmp_path):
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(tiny_model("llama")), "--data", str(SAMPLES / "sft_messages.jsonl"),
                 "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--progress", "false"]) == 0
    assert json.loads((out / "summary.json").read_text())["fused_modules"] == 7   # 2 layers x (MLP + 2 norms) + the final norm
    out = tmp_path / "gpt2"
    assert main(["sft", "--model", str(tiny_model("gpt2")), "--data", str(SAMPLES / "sft_messages.jsonl"),
                 "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--progress", "false"]) == 0
    assert json.loads((out / "summary.json").read_text())["fused_modules"] == 0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_as_on_a_gpu(lora):
    """In bf16 the norms keep their input (the frozen norm's output / weight would lose precision)."""
    ids = torch.randint(3, VOCAB, (2, 9))
    plain, fused = build("llama", lora).to(torch.bfloat16), build("llama", lora).to(torch.bfloat16)
    assert fuse_layers(fused) == EXPECTED["llama"]
    expected_loss, expected = loss_and_grads(plain, ids)
    loss, grads = loss_and_grads(fused, ids)
    assert loss == pytest.approx(expected_loss, rel=1e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.float(), expected[name].float(), rtol=5e-2, atol=5e-3, msg=name)
