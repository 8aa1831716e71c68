"""The generation engine on tiny models: padding, caching, guards and stop conditions."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhflab.data.template import stop_token_ids
from rlhflab.errors import NonFiniteError
from rlhflab.infer.engine import SamplingParams, generate, generate_text


def load(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_batched_left_padded_greedy_equals_single_prompt(arch, tiny_model):
    model, tok = load(tiny_model(arch))
    prompts = [tok("The capital of France")["input_ids"], tok("你好")["input_ids"], tok("12 plus 7 is")["input_ids"]]
    params = SamplingParams(max_new_tokens=6, do_sample=False)
    batched = generate(model, tok, prompts, params)
    for i, prompt in enumerate(prompts):
        single = generate(model, tok, [prompt], params)
        n = int(single.response_mask.sum())
        assert batched.response_ids[i, :n].tolist() == single.response_ids[0, :n].tolist()


def test_greedy_matches_hf_generate(tiny_model):
    model, tok = load(tiny_model("llama"))
    ids = tok("The capital of France", return_tensors="pt")["input_ids"]
    ours = generate(model, tok, [ids[0].tolist()], SamplingParams(max_new_tokens=8, do_sample=False))
    theirs = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                            eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert ours.response_ids[0].tolist() == theirs[0, ids.shape[1]:].tolist()


def test_min_new_tokens_suppresses_an_eager_stop(tiny_model):
    model, tok = load(tiny_model("llama"))
    stop = stop_token_ids(tok)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.01)
        model.lm_head.weight[stop[-1]] = model.model.norm.weight.sign() * 5.0
    prompts = [tok("hello")["input_ids"]] * 2
    eager = generate(model, tok, prompts, SamplingParams(max_new_tokens=6, do_sample=False, stop_token_ids=tuple(stop)))
    assert eager.response_lengths().tolist() == [1, 1] and eager.texts == ["", ""] and eager.finished.all()
    guarded = generate(model, tok, prompts, SamplingParams(max_new_tokens=6, min_new_tokens=3, do_sample=False,
                                                           stop_token_ids=tuple(stop)))
    assert (guarded.response_lengths() >= 3).all()
    assert all(t not in stop for t in guarded.response_ids[0, :3].tolist())
    # the guard a policy was trained under, in its generation config, holds when nobody asks for it
    model.generation_config.min_new_tokens = 2
    kept = generate(model, tok, prompts, SamplingParams(max_new_tokens=6, do_sample=False, stop_token_ids=tuple(stop)))
    assert (kept.response_lengths() >= 2).all() and all(kept.texts)


def test_max_length_cut_and_masks(tiny_model):
    model, tok = load(tiny_model("llama"))
    out = generate(model, tok, [tok("hi")["input_ids"]], SamplingParams(max_new_tokens=4, do_sample=False))
    assert not out.finished[0] and out.response_mask.tolist() == [[1, 1, 1, 1]]
    ids, mask = out.sequences()
    assert ids.shape == mask.shape == (1, out.prompt_ids.shape[1] + 4)


def test_seeded_sampling_is_reproducible(tiny_model):
    model, tok = load(tiny_model("llama"))
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    a = generate(model, tok, [tok("hi")["input_ids"]] * 3, params)
    b = generate(model, tok, [tok("hi")["input_ids"]] * 3, params)
    assert torch.equal(a.response_ids, b.response_ids)


def test_non_finite_logits_name_the_step_and_prompt(tiny_model):
    model, tok = load(tiny_model("llama"))
    model.lm_head.register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.raises(NonFiniteError, match=r"step 7.*prompt 0: 'What is 2\+2\?'"):
        generate_text(model, tok, [[{"role": "user", "content": "What is 2+2?"}]], SamplingParams(max_new_tokens=3),
                      step=7)


def test_stop_strings_and_lora_model(tiny_model):
    from peft import LoraConfig, get_peft_model

    model, tok = load(tiny_model("llama"))
    lora = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    out = generate(lora, tok, [tok("hi")["input_ids"]], SamplingParams(max_new_tokens=5, do_sample=False))
    text = out.texts[0]
    assert out.response_lengths()[0] == 5
    if text.strip():
        cut = generate(lora, tok, [tok("hi")["input_ids"]],
                       SamplingParams(max_new_tokens=5, do_sample=False, stop_strings=(text.strip()[0],)))
        assert cut.finished[0] and text.strip()[0] not in cut.texts[0]
