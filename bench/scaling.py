"""Scaling curves: how the cost of SFT and DPO grows with the model and the sequence length,
rlhflab beside TRL 1.16 (bench/.venv-trl), one torch thread per side.

    .venv/bin/python bench/scaling.py                            # the whole grid: 36 runs, ~25 min on 2 cores
    .venv/bin/python bench/scaling.py --sizes 6m --lengths 128,512 --steps 5
    .venv/bin/python bench/scaling.py --sides rlhflab --threads 8  # one side, more threads
    .venv/bin/python bench/scaling.py --render bench/results/scaling.json   # redraw table and plots

The grid is stage (--stages) x model size (--sizes) x sequence length (--lengths). Each cell runs
each side (--sides) once, in its own process, on the same rows: conversations (SFT) or preference
pairs (DPO) from the toy world, joined turn after turn into rows of nearly the cell's length (the
last turn is cut to fit; no row is longer, so neither side truncates). A run takes one warm-up
step and then --steps timed steps; tokens/s counts the timed steps only (each side's own time per
optimizer step, data loading included, model load and the DPO reference pass not), and peak
memory is the process's peak RSS, read with wait4 exactly as bench/run.py reads it (model load,
the reference pass and saving included).

A step holds about --tokens-per-step tokens: rows per step = max(1, tokens / (length x sequences
per row)), a DPO pair being two sequences (prompt + chosen, prompt + rejected). Tokens are counted
the same way on both sides, from the rows as rlhflab's chat template renders them, a DPO pair as
both of its sequences whole (rlhflab runs the shared prompt once, TRL twice: that saving is part
of what the curves measure). The models are randomly initialised Llamas built by bench/fixtures.py
(llama-6m, llama-25m, llama-100m: vocabulary 4,096, positions 1,024); DPO starts from the same
model as its reference (speed does not depend on the weights), with the reference log-probs
precomputed on both sides.

A run that fails or takes longer than --timeout seconds is reported as "not run" with its reason.
Writes, under --out: scaling.json (every figure, step times and commands), scaling.md (the table)
and two plots, scaling-throughput.png and scaling-memory.png (matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rlhflab.data.template import encode_chat

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import fixtures  # noqa: E402  (bench/ is not a package: its modules are found through sys.path)
from run import PEERS, PYTHONS, RLHFLAB, ROOT, build_fixtures, environment, machine, result_line, run_process  # noqa: E402

SIZES = {"6m": ("llama-6m", 6e6), "25m": ("llama-25m", 25e6), "100m": ("llama-100m", 100e6)}  # name -> fixture, nominal
STAGES = ("sft", "dpo")
SIDES = {"rlhflab": "rlhflab", "trl": "TRL 1.16"}
LEARNING_RATES = {"sft": 5e-4, "dpo": 5e-5}  # as bench/run.py's rows
WORK = BENCH / "work" / "scaling"


def parameter_count(hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                    vocab_size: int = fixtures.VOCAB) -> int:
    """All parameters of a fixture Llama: untied embedding and LM head, q/k/v/o (as many key/value
    heads as query heads), a gated MLP, two RMSNorms per layer and a final one; no biases."""
    per_layer = 4 * hidden_size * hidden_size + 3 * hidden_size * intermediate_size + 2 * hidden_size
    return 2 * vocab_size * hidden_size + num_hidden_layers * per_layer + hidden_size


def rows_per_step(stage: str, length: int, tokens_per_step: int) -> int:
    return max(1, tokens_per_step // (length * (2 if stage == "dpo" else 1)))


# ---------------------------------------------------------------------------------------------
# Rows of exactly the cell's length.


def token_count(tokenizer, messages: list[dict]) -> int:
    """Tokens of a conversation as rlhflab's SFT and DPO encode it (the chat template, whole)."""
    return len(encode_chat(tokenizer, messages, max_length=1 << 30).input_ids)


def cut_to(tokenizer, build, chars: int, target: int) -> int | None:
    """The number of characters c (1..chars) for which build(c), a conversation, is exactly
    `target` tokens: the most characters that do not pass it, None if those make fewer (a character
    that adds two tokens at once) or if even one character passes it."""
    low, high = 0, chars + 1  # the answer lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if token_count(tokenizer, build(middle)) <= target:
            low = middle
        else:
            high = middle
    return low if low and token_count(tokenizer, build(low)) == target else None


def fill(tokenizer, conversations, target: int, suffix: list[dict]) -> list[dict]:
    """Whole conversations from the (endless) iterator, then one whose last answer is lengthened
    (the answer again, repeated) and cut, so that they and `suffix` are exactly `target` tokens.
    Where the last one's question does not fit in what is left, the conversation before it goes."""
    whole: list[list[dict]] = []  # the conversations taken whole
    for conversation in conversations:
        turns = conversation["messages"]
        n = token_count(tokenizer, [m for c in whole for m in c] + turns + suffix)
        if n <= target:
            whole.append(turns)
            if n == target:
                return [m for c in whole for m in c]
            continue
        last = max(i for i, m in enumerate(turns) if m["role"] == "assistant")
        answer = (turns[last]["content"].strip() or "ok") + " "
        answer *= 1 + 8 * target // len(answer)  # more characters than any gap has tokens

        def build(chars: int) -> list[dict]:
            head = [m for c in whole for m in c] + turns[:last]
            return head + [{**turns[last], "content": answer[:chars]}] + suffix

        while whole and token_count(tokenizer, build(0)) > target:
            whole.pop()
        chars = cut_to(tokenizer, build, len(answer), target)
        if chars is not None:  # else a character that adds two tokens at once sits at the cut: next one
            return build(chars)[:len(build(chars)) - len(suffix)]
    raise ValueError("no conversation fits")  # unreachable with an endless iterator


def sft_rows(tokenizer, conversations: list[dict], length: int, count: int) -> tuple[list[dict], list[int]]:
    """`count` conversations of the toy world's turns, each exactly `length` tokens."""
    source = itertools.cycle(conversations)
    rows = [{"messages": fill(tokenizer, source, length, [])} for _ in range(count)]
    return rows, [token_count(tokenizer, row["messages"]) for row in rows]


def dpo_rows(tokenizer, conversations: list[dict], pairs: list[dict], length: int,
             count: int) -> tuple[list[dict], list[int]]:
    """`count` preference pairs, each prompt + answer exactly `length` tokens for both answers: the
    longer answer is cut to the shorter one's length, and the prompt is a long conversation (toy world
    turns) ending in the pair's question. Tokens per row: both sequences, 2 x length."""
    source, rows, tokens = itertools.cycle(conversations), [], []
    for pair in itertools.cycle(pairs):
        if len(rows) == count:
            break

        def sequence(answer: str, prompt=pair["prompt"]) -> list[dict]:
            return prompt + [{"role": "assistant", "content": answer}]

        short, long = sorted((pair["chosen"], pair["rejected"]), key=lambda a: token_count(tokenizer, sequence(a)))
        chars = cut_to(tokenizer, lambda c: sequence(long[:c]), len(long), token_count(tokenizer, sequence(short)))
        if chars is None or long[:chars] == short or token_count(tokenizer, sequence(short)) > length:
            continue  # no exact cut, the cut answer is the other one, or the pair alone is too long
        long = long[:chars]
        prompt = fill(tokenizer, source, length, sequence(short)) + pair["prompt"]
        chosen, rejected = (short, long) if pair["chosen"] == short else (long, short)
        n = [token_count(tokenizer, prompt + [{"role": "assistant", "content": a}]) for a in (chosen, rejected)]
        if n == [length, length]:  # so far always: an answer's tokens do not depend on what precedes it
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            tokens.append(sum(n))
    return rows, tokens


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# One side of one cell.


def command(stage: str, side: str, model: Path, data: Path, out: Path, length: int, batch: int,
            steps: int) -> list[str]:
    """The run of `steps` optimizer steps in all (warm-up included), as bench/run.py runs each side."""
    lr = str(LEARNING_RATES[stage])
    if side == "rlhflab":
        model_option = "--model" if stage == "sft" else "--policy"
        extra = ["--loss", "dpo", "--beta", "0.1", "--precompute-ref", "true"] if stage == "dpo" else []
        return [str(RLHFLAB), stage, model_option, str(model), "--data", str(data), "--out", str(out), *extra,
                "--max-steps", str(steps), "--batch-size", str(batch), "--lr", lr, "--max-length", str(length),
                "--lora", "false", "--eval-fraction", "0", "--warmup-ratio", "0", "--progress", "false",
                "--log-every", "1", "--seed", "0"]
    extra = ["--beta", "0.1", "--precompute-ref", "true"] if stage == "dpo" else []
    return [str(PYTHONS["trl"]), str(PEERS / f"trl_{stage}.py"), "--model", str(model), "--data", str(data),
            "--steps", str(steps), "--batch-size", str(batch), "--lr", lr, "--max-length", str(length),
            *extra, "--out", str(out), "--seed", "0"]


def rlhflab_step_times(out: Path, stage: str, per_step: float) -> list[float]:
    """Seconds of each step of an rlhflab run logged every step. metrics.jsonl holds the loop's
    rate so far (count so far / training time so far) in its unit, tokens (SFT) or pairs (DPO);
    `per_step` is that count in one step (every row of a cell has the same length)."""
    unit = "tokens" if stage == "sft" else "pairs"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ends = [row["step"] * per_step / row[f"{unit}_per_s"] for row in rows if f"{unit}_per_s" in row]
    return [b - a for a, b in zip([0.0, *ends], ends)]


def run_side(stage: str, side: str, model: Path, data: Path, batch: int, tokens_per_row: float, length: int,
             steps: int, work: Path, env: dict, timeout: float) -> dict:
    """One warm-up step and `steps` timed ones. Returns tokens_per_s (timed steps), peak_rss_mib
    (wait4), step_times and the command, or not_run with the reason."""
    name = f"{stage}-{model.name}-{length}-{side}"
    out, log = work / "runs" / name, work / "logs" / f"{name}.log"
    shutil.rmtree(out, ignore_errors=True)
    argv = command(stage, side, model, data, out, length, batch, steps + 1)
    figures = {"command": shlex.join(argv).replace(f"{ROOT}/", ""), "log": str(log).replace(f"{ROOT}/", ""),
               "load_before": round(os.getloadavg()[0], 2)}
    figures.update(run_process(argv, env, log, cwd=PEERS if side != "rlhflab" else ROOT, timeout=timeout))
    if figures["process_s"] >= timeout:
        return {**figures, "not_run": f"stopped at the {timeout:.0f} s limit (--timeout)"}
    try:
        if figures["exit"] != 0:
            raise RuntimeError(f"exit code {figures['exit']}")
        per_step = batch * (tokens_per_row if stage == "sft" else 1)
        times = rlhflab_step_times(out, stage, per_step) if side == "rlhflab" else result_line(log)["step_times"]
        if len(times) != steps + 1:
            raise RuntimeError(f"{len(times)} steps timed, {steps + 1} expected")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        tail = " | ".join(log.read_text(errors="replace").splitlines()[-2:])[-300:]
        return {**figures, "not_run": f"failed ({exc}): {tail}"}
    timed = sum(times[1:])
    figures.update(step_times=[round(t, 4) for t in times], timed_s=timed,
                   tokens_per_s=steps * batch * tokens_per_row / timed)
    return figures


# ---------------------------------------------------------------------------------------------
# Table and plots.


def _figure(value, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table(results: dict) -> str:
    """The markdown table: one line per cell, each side's tokens/s and peak RSS, and with two sides
    their ratios (first side over second); a side not run says so, with the reason under the table."""
    sides = results["sides"]
    names = [SIDES[s] for s in sides]
    head = ["stage", "model", "seq len", "rows/step", "tokens/step"]
    for what, ratio in (("tokens/s", "speed"), ("peak RSS MiB", "memory")):
        head += [f"{name} {what}" for name in names] + ([f"{ratio} {names[0]} / {names[1]}"] if len(sides) == 2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for cell in results["cells"]:
        size = results["sizes"][cell["size"]]
        row = [cell["stage"].upper(), f"{cell['size']} ({size['params'] / 1e6:.1f}M)", str(cell["length"]),
               str(cell["batch"]), _figure(cell["batch"] * cell["tokens_per_row"])]
        runs = [cell["sides"].get(side, {"not_run": "not asked for"}) for side in sides]
        notes += [f"{cell['stage'].upper()} {cell['size']} x {cell['length']}, {name}: not run, {figures['not_run']}"
                  for name, figures in zip(names, runs) if "not_run" in figures]
        for key in ("tokens_per_s", "peak_rss_mib"):
            values = [None if "not_run" in figures else figures[key] for figures in runs]
            row += ["not run" if v is None else _figure(v) for v in values]
            if len(sides) == 2:
                row.append(f"{values[0] / values[1]:.2f}x" if values[0] and values[1] else "—")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


def plot(results: dict, out_dir: Path) -> list[Path]:
    """Two PNGs, one panel per stage and model size, every side on the same axes: tokens/s against
    sequence length, and peak RSS against sequence length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(c["stage"] for c in results["cells"]))
    sizes = list(dict.fromkeys(c["size"] for c in results["cells"]))
    written = []
    for key, what, filename in (("tokens_per_s", "tokens/s (timed steps)", "scaling-throughput.png"),
                                ("peak_rss_mib", "peak RSS (MiB)", "scaling-memory.png")):
        fig, axes = plt.subplots(len(stages), len(sizes), figsize=(4 * len(sizes), 3.2 * len(stages)),
                                 squeeze=False, sharex=True)
        for (i, stage), (j, size) in itertools.product(enumerate(stages), enumerate(sizes)):
            ax = axes[i][j]
            cells = sorted((c for c in results["cells"] if c["stage"] == stage and c["size"] == size),
                           key=lambda c: c["length"])
            for side, marker in zip(results["sides"], "os"):
                points = [(c["length"], c["sides"][side][key]) for c in cells
                          if key in c["sides"].get(side, {})]
                if points:
                    ax.plot(*zip(*points), marker=marker, label=SIDES[side])
            ax.set_xscale("log", base=2)
            ax.set_xticks([c["length"] for c in cells], [str(c["length"]) for c in cells])
            ax.set_ylim(bottom=0)
            ax.set_title(f"{stage.upper()}, {size} ({results['sizes'][size]['params'] / 1e6:.1f}M parameters)",
                         fontsize=10)
            ax.grid(alpha=0.3)
            if i == len(stages) - 1:
                ax.set_xlabel("sequence length (tokens)")
            if j == 0:
                ax.set_ylabel(what)
            ax.legend(fontsize=8)
        fig.suptitle(f"{what}, one thread per side ({results['date'][:10]})", fontsize=11)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    """scaling.json, scaling.md and the two plots, under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "scaling.json"
    raw.write_text(json.dumps(results, indent=1), encoding="utf-8")
    markdown = out_dir / "scaling.md"
    markdown.write_text(f"# Scaling curves, {results['date'][:10]}\n\n`{results['command']}`\n\n{table(results)}\n",
                        encoding="utf-8")
    return [raw, markdown, *plot(results, out_dir)]


# ---------------------------------------------------------------------------------------------
# The grid.


def choices(text: str, allowed, option: str) -> list[str]:
    chosen = [x for x in text.split(",") if x]
    unknown = [x for x in chosen if x not in allowed]
    if unknown or not chosen:
        sys.exit(f"{option}: {', '.join(unknown) or 'nothing given'}; choose from {', '.join(allowed)}")
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="6m,25m,100m", help=f"model sizes, from {', '.join(SIZES)} (default: all)")
    parser.add_argument("--lengths", default="128,512,1024",
                        help="sequence lengths in tokens, at most the fixtures' 1024 positions (default: 128,512,1024)")
    parser.add_argument("--stages", default="sft,dpo", help="sft, dpo or both (default: both)")
    parser.add_argument("--sides", default="rlhflab,trl", help="rlhflab, trl or both (default: both)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after one warm-up step (default: 3)")
    parser.add_argument("--tokens-per-step", type=int, default=1024,
                        help="about this many tokens per optimizer step: sets rows per step (default: 1024)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every side (default: 1)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take (default: 600)")
    parser.add_argument("--out", default=str(BENCH / "results"),
                        help="folder for scaling.json, scaling.md and the plots (default: bench/results)")
    parser.add_argument("--render", metavar="JSON", help="only redraw the table and plots from a scaling.json")
    args = parser.parse_args(argv)

    if args.render:
        results = json.loads(Path(args.render).read_text(encoding="utf-8"))
        print("\n".join(str(p) for p in write_outputs(results, Path(args.out))))
        return
    sizes = choices(args.sizes, SIZES, "--sizes")
    stages = choices(args.stages, STAGES, "--stages")
    sides = choices(args.sides, SIDES, "--sides")
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if not lengths or min(lengths) < 32 or max(lengths) > fixtures.MAX_POSITIONS or args.steps < 1:
        sys.exit(f"--lengths: each in 32..{fixtures.MAX_POSITIONS}; --steps: at least 1")
    if "trl" in sides and not PYTHONS["trl"].exists():
        subprocess.run(["bash", str(BENCH / "setup.sh")], check=True)

    from transformers import AutoTokenizer

    env = environment(args.threads)
    paths = build_fixtures([SIZES[s][0] for s in sizes], env)
    tokenizer = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    world = paths["world"]
    conversations = [json.loads(line) for line in (world / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    pairs = [json.loads(line) for line in (world / "prefs.jsonl").read_text(encoding="utf-8").splitlines()]

    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
               "command": shlex.join([".venv/bin/python", "bench/scaling.py", *(argv or sys.argv[1:])]),
               "machine": machine(), "threads": args.threads, "steps": args.steps,
               "tokens_per_step": args.tokens_per_step, "sides": sides,
               "sizes": {s: {"fixture": SIZES[s][0], "params": parameter_count(**fixtures.MODELS[SIZES[s][0]])}
                         for s in sizes},
               "cells": []}
    started = time.perf_counter()
    for stage, size, length in itertools.product(stages, sizes, lengths):
        batch = rows_per_step(stage, length, args.tokens_per_step)
        count = (args.steps + 1) * batch  # one epoch over exactly the rows trained on, as bench/run.py's rows
        rows, tokens = (sft_rows(tokenizer, conversations, length, count) if stage == "sft" else
                        dpo_rows(tokenizer, conversations, pairs, length, count))
        data = write_rows(WORK / "data" / f"{stage}-{length}-{len(rows)}.jsonl", rows)
        cell = {"stage": stage, "size": size, "length": length, "batch": batch,
                "tokens_per_row": sum(tokens) / len(tokens), "row_tokens": [min(tokens), max(tokens)], "sides": {}}
        for side in sides:  # rlhflab, then TRL: the same rows, one after the other
            figures = run_side(stage, side, paths[SIZES[size][0]], data, batch, cell["tokens_per_row"], length,
                               args.steps, WORK, env, args.timeout)
            cell["sides"][side] = figures
            shown = figures.get("not_run") or (f"{figures['tokens_per_s']:,.0f} tokens/s, "
                                               f"peak RSS {figures['peak_rss_mib']:,.0f} MiB")
            print(f"{stage} {size} x {length} (batch {batch}) {SIDES[side]}: {shown} "
                  f"[{figures['process_s']:.0f} s]", flush=True)
        results["cells"].append(cell)
        raw = Path(args.out) / "scaling.json"  # after every cell: a grid stopped halfway can still be --render'ed
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(results, indent=1), encoding="utf-8")
    results["grid_s"] = time.perf_counter() - started
    results["machine"]["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    written = write_outputs(results, Path(args.out))
    print(f"\n{table(results)}\n\nwrote {', '.join(str(p) for p in written)}; "
          f"grid took {results['grid_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
