"""bench/mfu.py: the matmul-parameter count, the FLOPs each stage needs, and the MFU column of the
bench report (arithmetic only: no training, no timing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))

import mfu
import report

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, tie_word_embeddings=False, max_position_embeddings=64, **TINY)
    return LlamaForCausalLM(config)


def test_matmul_params_by_hand_and_against_the_model():
    params = mfu.matmul_params(**TINY, vocab_size=50)
    # per layer: q 32x32, k and v 32x16 (2 key/value heads of 8), o 32x32; gate, up 32x64, down 64x32
    assert params["attention"] == 2 * (1024 + 512 + 512 + 1024)
    assert params["mlp"] == 2 * 3 * 2048
    assert params["trunk"] == 18432
    assert params["lm_head"] == 32 * 50
    model = tiny_model()
    linear = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert params["trunk"] == sum(v for k, v in linear.items() if k != "lm_head")
    assert params["lm_head"] == linear["lm_head"]
    assert mfu.lora_params(params, 4) == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)


def test_two_and_six_flops_per_parameter_per_token():
    """Forward: 2 FLOPs per matmul parameter per token; forward + backward: 6 (torch's own count
    of the model's matrix products; attention's score products are batched products, not counted)."""
    model = tiny_model()
    params = mfu.matmul_params(**TINY, vocab_size=50)
    ids = torch.randint(0, 50, (2, 8))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.sum().backward()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counts.items() if "addmm" in str(op) or str(op).startswith("aten.mm"))
    assert matmuls == 6 * (params["trunk"] + params["lm_head"]) * 2 * 8
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    counts = counter.get_flop_counts()["Global"]
    assert sum(v for op, v in counts.items() if "addmm" in str(op) or str(op).startswith("aten.mm")) == \
        2 * (params["trunk"] + params["lm_head"]) * 2 * 8


def test_stage_formulas_on_the_6m_fixture():
    nt = 4 * (4 * 256 * 256 + 3 * 256 * 1024)   # 4,194,304
    nh = 256 * 4096                              # 1,048,576
    stats = {"sft": {"tokens": 100, "labelled": 40}, "rm": {"prompt": 10, "answers": 20, "labelled": 18},
             "dpo": {"prompt": 10, "answers": 20, "labelled": 18}, "prompts": {"prompt": 10}}
    assert mfu.flops_per_unit("sft", "rlhflab", "llama-6m", stats) == pytest.approx((6 * nt + 6 * nh * 0.4, "token"))
    assert mfu.flops_per_unit("rm", "x", "llama-6m", stats) == (6 * nt * 30 + 6 * 256 * 2, "pair")
    assert mfu.flops_per_unit("dpo", "x", "llama-6m", stats) == (8 * nt * 30 + 8 * nh * 18, "pair")
    # GRPO: 4 prompts x 4 samples x 32 tokens, 4 epochs; per group T = 10 + 128 tokens, 128 answer tokens
    forward = 2 * nt * 138 + 2 * nh * 128
    grpo = 4 * (3 * forward + (2 * nt * 138 + 2 * 256 * 4) + 4 * (6 * nt * 138 + 6 * nh * 128))
    assert mfu.flops_per_unit("grpo", "rlhflab", "llama-6m", stats) == (grpo, "step")
    # PPO: 16 prompts x 1 sample; the peer's value head against rlhflab's default (the same head) and
    # its separate critic model
    head = mfu.flops_per_unit("ppo", "TRL 0.11.4 PPOTrainer.step", "llama-6m", stats)[0]
    shared = mfu.flops_per_unit("ppo", "rlhflab", "llama-6m", stats)[0]
    own = mfu.flops_per_unit("ppo-separate-critic", "rlhflab", "llama-6m", stats)[0]
    assert shared == head
    assert own - head == 16 * (2 * nt * 42 + 4 * 6 * nt * 42)
    # LoRA: the frozen base costs 4 per trained token, the adapters 6
    lora = mfu.rl_step_flops(mfu.fixture_params("llama-100m"), 10, 16, 1, 32, 1, 16, None)
    full = mfu.rl_step_flops(mfu.fixture_params("llama-100m"), 10, 16, 1, 32, 1, 0, None)
    p = mfu.fixture_params("llama-100m")
    assert full["policy_training"] - lora["policy_training"] == \
        16 * (2 * p["trunk"] * 42 + 2 * p["lm_head"] * 32 - 6 * mfu.lora_params(p, 16) * 42)


def test_mfu_from_throughput_and_peak():
    stats = {"sft": {"tokens": 100, "labelled": 40}, "prompts": {"prompt": 10}}
    per_token = mfu.flops_per_unit("sft", "rlhflab", "llama-6m", stats)[0]
    got = mfu.mfu("sft", "rlhflab", "llama-6m", "tokens_per_s", 1000.0, None, stats, 100.0)
    assert got["mfu"] == pytest.approx(per_token * 1000 / 100e9)
    per_step = mfu.flops_per_unit("ppo-lora-memory", "rlhflab", "llama-100m", stats)[0]
    got = mfu.mfu("ppo-lora-memory", "rlhflab", "llama-100m", "peak_rss_mib", 1600.0, 20.0, stats, 100.0)
    assert got["gflops"] == pytest.approx(per_step / 20 / 1e9)
    assert mfu.mfu("sft", "rlhflab", "llama-6m", "tokens_per_s", 1000.0, None, {}, 100.0) is None
    assert mfu.mfu("sft", "rlhflab", "llama-6m", "tokens_per_s", 1000.0, None, stats, None) is None


def test_report_has_an_mfu_column_and_says_when_it_cannot():
    runs = [{"side": side, "repeat": 0, "command": "c", "peak_rss_mib": 500.0, "tokens_per_s": value,
             "final_loss": 1.0} for side, value in (("rlhflab", 2000.0), ("peer", 1000.0))]
    results = {"workloads": [{"name": "sft", "model": "llama-6m", "metric": "tokens_per_s", "target": 1.5,
                              "parity": True, "sides": ["rlhflab", "peer"], "targeted_peer": "peer", "runs": runs}],
               "peak": {"gflops": 100.0, "runs": [99.0, 100.0, 101.0], "size": 2048, "threads": 1},
               "work_stats": {"sft": {"tokens": 100, "labelled": 40}}}
    per_token = mfu.flops_per_unit("sft", "rlhflab", "llama-6m", results["work_stats"])[0]
    row = report.table(results).splitlines()[-1]
    assert row.endswith(f"| {per_token * 2000 / 100e9:.0%} / {per_token * 1000 / 100e9:.0%} |")
    assert "100.0 GFLOP/s" in report.mfu_note(results)
    del results["peak"]
    assert report.table(results).splitlines()[-1].endswith("| — / — |")
    assert "not measured" in report.mfu_note(results)


def test_per_side_rows_of_a_written_table():
    text = """### Per side

| workload | side | runs (metric) | training s | reference pass s | outside training s | peak RSS MiB | s/step | final reward |
|---|---|---|---|---|---|---|---|---|
| sft | rlhflab | 3006, 3164, 3062 | 3.57 | — | 3.41 | 569 | — | — |
| ppo-lora-memory | rlhflab | 1590, 1610, 1726 | 18.9 | — | 3.8 | 1610 | 18.9 | -0.286 |

## GPU
"""
    rows = mfu.per_side_rows(text)
    assert rows == [{"workload": "sft", "side": "rlhflab", "median": 3062.0, "seconds_per_step": None},
                    {"workload": "ppo-lora-memory", "side": "rlhflab", "median": 1610.0, "seconds_per_step": 18.9}]


def test_a_run_without_a_gpu_keeps_the_gpu_figures_of_an_earlier_one(tmp_path):
    earlier = tmp_path / "RESULTS.md"
    measured = "Device: H200, dtype bf16.\n\n| workload | trained tokens/s |\n|---|---|\n| sft (full) | 2360 |"
    earlier.write_text(f"# B\n\n## GPU (bf16)\n\n{measured}\n\n## Settings and exact commands\n\nx\n", encoding="utf-8")
    kept = report.kept_gpu(earlier)
    assert kept == measured
    section = report.gpu({"gpu": {"measured": False, "reason": "no GPU here"}}, kept)
    assert section.startswith("Not measured in this run: no GPU here.") and section.endswith(measured)
    # a second run without a GPU keeps the same figures, not the first one's note around them
    earlier.write_text(f"## GPU (bf16)\n\n{section}\n\n## Settings and exact commands\n", encoding="utf-8")
    assert report.kept_gpu(earlier) == measured
    # nothing measured before: nothing kept, the section says so
    earlier.write_text("## GPU (bf16)\n\nNot measured: no GPU.\n\n## Settings and exact commands\n", encoding="utf-8")
    assert report.kept_gpu(earlier) == "" and report.kept_gpu(tmp_path / "missing.md") == ""
    assert report.gpu({"gpu": {"measured": False, "reason": "no GPU here"}}, "") == "Not measured: no GPU here."
    # a run with a GPU writes its own figures, whatever was kept
    fresh = {"gpu": {"measured": True, "device": "H100", "model": "llama", "parameters": 5e8, "workloads": {}}}
    assert report.gpu(fresh, kept).startswith("Device: H100")
