"""Serving figures, measured in one run, appended to bench/RESULTS.md as a dated section.

    .venv/bin/python bench/serve_load.py --model runs/quickstart/sft

1. Load: `rlhflab serve MODEL` in its own process; 64 clients x 4 requests each (distinct toy-world
   prompts, greedy, max_tokens 32). Every answer must come back complete and equal to the answer
   of the naive server a user would write: transformers `generate`, one request at a time
   (measured in the same run, and its tokens/s is the baseline). p50/p95 latency, aggregate
   tokens/s, and the server still answering afterwards.
2. 4-bit memory: a ~100M-parameter Llama (toy tokenizer) in fp32 and NF4: weights on disk,
   resident memory attributable to the model (each in a fresh process, after the imports: RSS after
   loading and generating minus RSS before loading), greedy tokens/s.
3. 4-bit quality: greedy answers of MODEL (the toy SFT model) in fp32 and NF4 on held-out
   toy-world prompts, scored by the gold judge.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from rlhflab.cli.main import main as rlhflab
from rlhflab.data.formats import load_prompts
from rlhflab.data.template import encode_prompt, stop_token_ids
from rlhflab.models.loading import choose_placement, load_causal_lm, load_tokenizer

CLIENTS, PER_CLIENT, MAX_TOKENS = 64, 4, 32


def post(conn: http.client.HTTPConnection, body: dict) -> dict:
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {data}")
    return data


def naive_answers(model_dir: str, prompts: list[list[dict]]) -> tuple[list[str], float, int]:
    """transformers `generate`, one request at a time: (answers, seconds, tokens)."""
    model = load_causal_lm(model_dir, choose_placement("cpu", "fp32")).eval()
    tokenizer = load_tokenizer(model_dir)
    stops = stop_token_ids(tokenizer)
    answers, tokens, start = [], 0, time.perf_counter()
    with torch.no_grad():
        for messages in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, messages)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                 do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            new = out[0, ids.shape[1]:].tolist()
            tokens += len(new)
            if new and new[-1] in stops:
                new = new[:-1]
            answers.append(tokenizer.decode(new, skip_special_tokens=True).rstrip("\ufffd"))
    return answers, time.perf_counter() - start, tokens


def load_test(model_dir: str, prompts: list[list[dict]]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "rlhflab.cli.main", "serve", model_dir, "--name", "toy",
                               "--port", str(port), "--device", "cpu", "--max-batch-size", "64"],
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        results: dict[int, dict] = {}
        latencies: list[float] = []
        failures: list[str] = []

        def client(index: int):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            for k in range(PER_CLIENT):
                i = index * PER_CLIENT + k
                start = time.perf_counter()
                try:
                    results[i] = post(conn, {"model": "toy", "messages": prompts[i], "max_tokens": MAX_TOKENS,
                                             "temperature": 0})
                except Exception as exc:   # noqa: BLE001 - counted as lost
                    failures.append(f"request {i}: {exc}")
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                    continue
                latencies.append(time.perf_counter() - start)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        after = post(http.client.HTTPConnection("127.0.0.1", port, timeout=60),
                     {"model": "toy", "messages": prompts[0], "max_tokens": 4})
    finally:
        server.terminate()
        server.wait(30)
    tokens = sum(r["usage"]["completion_tokens"] for r in results.values())
    complete = sum(1 for r in results.values() if r["choices"][0]["finish_reason"] in ("stop", "length"))
    latencies.sort()
    return {"requests": CLIENTS * PER_CLIENT, "answered": len(results), "complete": complete,
            "failures": failures[:5], "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
            "answers": [results[i]["choices"][0]["message"]["content"] if i in results else None
                        for i in range(len(prompts))],
            "answers_after": bool(after["choices"])}


MEASURE = """
import json, sys, time, psutil, torch
sys.path.insert(0, {root!r})
from rlhflab.infer import engine
from rlhflab.infer.quantize import ready_for_inference
from rlhflab.models.loading import choose_placement, load_causal_lm, load_tokenizer
process = psutil.Process()
before = process.memory_info().rss
model = ready_for_inference(load_causal_lm({model!r}, choose_placement("cpu", "auto"))).eval()
tokenizer = load_tokenizer({model!r})
prompts = [engine.encode_prompt(tokenizer, [dict(role="user", content=f"{{i}} + {{i}} = ?")]) for i in range(8)]
params = engine.SamplingParams(max_new_tokens=32, do_sample=False, stop_token_ids=())
engine.generate(model, tokenizer, prompts[:1], engine.SamplingParams(max_new_tokens=2, do_sample=False))
start = time.perf_counter()
out = engine.generate(model, tokenizer, prompts, params)
seconds = time.perf_counter() - start
# Safetensors weights are mapped lazily: resident memory is read after a generation has touched them all.
used = process.memory_info().rss
print(json.dumps(dict(rss_mb=(used - before) / 2**20, tokens_per_s=int(out.response_mask.sum()) / seconds)))
"""


def measure(model_dir: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE.format(root=str(ROOT), model=str(model_dir))],
                          capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def four_bit_memory(tokenizer_dir: str, tmp: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
                         num_key_value_heads=12, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(tmp / "fp32"))
    tokenizer.save_pretrained(str(tmp / "fp32"))
    del model
    assert rlhflab(["quantize", str(tmp / "fp32"), "--bits", "4", "--out", str(tmp / "nf4")]) == 0
    disk = {name: sum(f.stat().st_size for f in (tmp / name).glob("*.safetensors")) for name in ("fp32", "nf4")}
    fp32, nf4 = measure(tmp / "fp32"), measure(tmp / "nf4")
    return {"parameters_m": parameters / 1e6, "disk_mb": {k: v / 2**20 for k, v in disk.items()},
            "disk_ratio": disk["nf4"] / disk["fp32"], "rss_mb": {"fp32": fp32["rss_mb"], "nf4": nf4["rss_mb"]},
            "rss_ratio": nf4["rss_mb"] / fp32["rss_mb"],
            "tokens_per_s": {"fp32": fp32["tokens_per_s"], "nf4": nf4["tokens_per_s"]}}


def four_bit_gold(model_dir: str, eval_prompts: str, tmp: Path) -> dict:
    from rlhflab.infer.engine import greedy_answers
    from rlhflab.infer.quantize import ready_for_inference
    from rlhflab.world import judge as gold

    records = load_prompts(eval_prompts)
    assert rlhflab(["quantize", model_dir, "--bits", "4", "--out", str(tmp / "sft-nf4")]) == 0
    scores = {}
    for name, path in (("fp32", model_dir), ("nf4", str(tmp / "sft-nf4"))):
        model = ready_for_inference(load_causal_lm(path, choose_placement("cpu", "auto"))).eval()
        rows = greedy_answers(model, load_tokenizer(path), records, 64, 16)
        scores[name] = statistics.mean(gold(r["messages"], r["response"], r.get("meta")).score for r in rows)
    return {"prompts": len(records), "gold": scores, "kept": scores["nf4"] / scores["fp32"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the toy SFT model (e.g. runs/quickstart/sft)")
    parser.add_argument("--world", help="a `rlhflab world export` directory (default: a small one made here)")
    parser.add_argument("--no-write", action="store_true", help="print, do not append to bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        world = args.world or str(tmp / "world")
        if not args.world:
            assert rlhflab(["world", "export", "--size", "small", "--out", world]) == 0
        pool = [r.messages for name in ("prompts.jsonl", "sft.jsonl", "eval_prompts.jsonl")
                for r in load_prompts(f"{world}/{name}")]
        prompts = [pool[i % len(pool)] for i in range(CLIENTS * PER_CLIENT)]
        if len(pool) < len(prompts):
            print(f"note: {len(pool)} distinct prompts for {len(prompts)} requests", file=sys.stderr)
        naive, naive_s, naive_tokens = naive_answers(args.model, prompts)
        load = load_test(args.model, prompts)
        same = sum(a == b for a, b in zip(load.pop("answers"), naive))
        memory = four_bit_memory(args.model, tmp)
        quality = four_bit_gold(args.model, f"{world}/eval_prompts.jsonl", tmp)

    naive_rate = naive_tokens / naive_s
    lines = [
        f"## Serving ({datetime.date.today().isoformat()})", "",
        f"`{' '.join(['.venv/bin/python', 'bench/serve_load.py', *sys.argv[1:]])}` on {os.cpu_count()} CPU "
        f"cores, torch {torch.__version__}, model {args.model}.", "",
        "| what | figure |", "|---|---|",
        f"| load: requests answered / complete / lost | {load['answered']} / {load['complete']} / "
        f"{load['requests'] - load['answered']} of {load['requests']} ({CLIENTS} clients x {PER_CLIENT}) |",
        f"| load: answers equal to transformers `generate` (greedy) | {same} of {len(prompts)} |",
        f"| load: latency p50 / p95 | {load['p50_s']:.2f} s / {load['p95_s']:.2f} s |",
        f"| load: aggregate tokens/s, batched server | {load['tokens_per_s']:.0f} ({load['tokens']} tokens in "
        f"{load['wall_s']:.1f} s) |",
        f"| naive: transformers `generate`, one request at a time | {naive_rate:.0f} tokens/s ({naive_tokens} tokens "
        f"in {naive_s:.1f} s) |",
        f"| batched / naive | {load['tokens_per_s'] / naive_rate:.1f}x (target >= 3x) |",
        f"| server answers after the load | {'yes' if load['answers_after'] else 'no'} |",
        f"| 4-bit, {memory['parameters_m']:.0f}M-parameter Llama: weights on disk | {memory['disk_mb']['nf4']:.0f} MiB "
        f"vs {memory['disk_mb']['fp32']:.0f} MiB fp32 = {memory['disk_ratio']:.2f}x (target <= 0.35x) |",
        f"| 4-bit: resident memory after loading | {memory['rss_mb']['nf4']:.0f} MiB vs {memory['rss_mb']['fp32']:.0f} "
        f"MiB fp32 = {memory['rss_ratio']:.2f}x (target <= 0.35x) |",
        f"| 4-bit: greedy tokens/s (batch 8) | {memory['tokens_per_s']['nf4']:.0f} vs "
        f"{memory['tokens_per_s']['fp32']:.0f} fp32 |",
        f"| 4-bit toy SFT model: mean gold score on {quality['prompts']} held-out prompts | "
        f"{quality['gold']['nf4']:.3f} vs {quality['gold']['fp32']:.3f} fp32 = {quality['kept']:.1%} kept "
        f"(target >= 95%) |",
    ]
    if load["failures"]:
        lines += ["", "First failures: " + "; ".join(load["failures"])]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        results = ROOT / "bench" / "RESULTS.md"
        results.write_text(results.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
