"""Shared fixtures: a tiny tokenizer and tiny models of several architectures, built locally."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "rlhflab" / "samples"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ARCHS = ("llama", "qwen2", "gpt2", "opt", "bloom", "gpt_neox")


def sample_texts() -> list[str]:
    texts = [d for d in (SAMPLES / "corpus.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
    for line in (SAMPLES / "sft_messages.jsonl").read_text(encoding="utf-8").splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts + ["user", "assistant", "system"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from rlhflab.models.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(sample_texts(), 600, out)
    return out


def tiny_config(arch: str, tokenizer):
    import transformers as tf

    special = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False, **special)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, **special)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **special)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=32, **special)
    if arch == "bloom":
        return tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **special)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=256, **special)
    raise ValueError(arch)


def build_tiny_model(arch: str, tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir):
    """tiny_model(arch) -> directory of a saved random model of that architecture."""
    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = build_tiny_model(arch, tokenizer_dir, tmp_path_factory.mktemp(f"model-{arch}"))
        return made[arch]

    return make


@pytest.fixture(scope="session")
def sft_and_rm(tiny_model, tmp_path_factory):
    """An SFT model (plain dir) and a LoRA reward model on it, for the RL tests."""
    from rlhflab.cli.main import main

    root = tmp_path_factory.mktemp("rl")
    sft = root / "sft"
    assert main(["sft", "--model", str(tiny_model("llama")), "--data", str(SAMPLES / "sft_messages.jsonl"),
                 "--out", str(sft), "--max-steps", "10", "--lr", "3e-3", "--progress", "false"]) == 0
    rm = root / "rm"
    assert main(["rm", "--model", str(sft), "--data", str(SAMPLES / "pairs.jsonl"), "--out", str(rm), "--lora",
                 "--max-steps", "10", "--lr", "5e-3", "--progress", "false"]) == 0
    return sft, rm


def run_cli(*args, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `rlhflab ...` as a user would: a new process, real files, real exit codes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "rlhflab.cli.main", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def uvicorn_in_thread(app):
    """An ASGI app served by uvicorn in a thread on a free 127.0.0.1 port, as the `serve` commands run
    it; yields its base URL and stops the server afterwards."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"   # Debian's; .ci/run installs it
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright (the system browser: nothing is downloaded)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium (Debian: apt-get install chromium)")
    from playwright import sync_api

    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield chromium
        chromium.close()
