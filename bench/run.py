"""Benchmarks rlhflab against its peers, side by side: same data, model and hyper-parameters,
runs alternated (rlhflab, peer, rlhflab, peer, ...), medians and ratios written to
bench/RESULTS.md (by bench/report.py).

    .venv/bin/python bench/run.py                 # the CPU suite (and the GPU section when CUDA is there)
    .venv/bin/python bench/run.py --quick         # one short run per side: checks that everything runs
    .venv/bin/python bench/run.py --only sft,rm --repeats 5
    .venv/bin/python bench/run.py --setup         # only install the peers' environments

Standard library only; run it with rlhflab's own Python (.venv), which builds the fixtures. The
peers run in their own environments (bench/setup.sh installs them). Every command is a separate
process: model load is timed apart from training (each side reports its training time), and peak
RSS is the child's ru_maxrss from wait4, read the same way for every side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "work"
PEERS = BENCH / "peers"
RLHFLAB = Path(sys.executable).parent / "rlhflab"
PYTHONS = {"trl": BENCH / ".venv-trl" / "bin" / "python", "trl011": BENCH / ".venv-trl011" / "bin" / "python"}


@dataclass
class Side:
    """One contender of a workload: how to run it and where it leaves its figures."""

    label: str                  # "rlhflab", "TRL 1.16 precomputed ref", ...
    argv: list[str]             # with {out} and fixture names like {sft-6m} still to fill in
    python: str | None = None   # None: the rlhflab CLI; else a key of PYTHONS (peer script)


@dataclass
class Workload:
    name: str
    model: str                  # fixture the sizes refer to, for the table
    metric: str                 # tokens_per_s | pairs_per_s | seconds_per_step | peak_rss_mib
    target: float | None        # the ratio aimed for (speed-up, or memory share for peak_rss_mib)
    needs: list[str]            # fixtures
    rlhflab: Side
    peers: list[Side]
    targeted_peer: str = ""     # the peer the target is measured against (default: the first; "*": all)
    parity: bool = True         # final losses comparable (same loss on the same kind of batches)
    notes: str = ""
    data: dict = field(default_factory=dict)  # slices of the world's files: name -> (file, first row, rows)


def workloads(quick: bool) -> list[Workload]:
    """The CPU suite. Steps are small so that the whole suite, 3 repeats, fits in 30 minutes on
    2 cores; --quick shortens them further."""
    sft_steps, rm_steps, dpo_steps, rl_steps = (6, 6, 6, 1) if quick else (40, 30, 30, 4)
    quiet = ["--progress", "false", "--log-every", "1", "--seed", "0"]
    no_warmup = ["--warmup-ratio", "0"]  # the same schedule on both sides: rlhflab's 3% warm-up rounds differently
    rl_shape = ["--max-new-tokens", "32", "--min-new-tokens", "32", "--lr", "1e-5", "--kl-coef", "0.05",
                "--probe-every", "0"]
    peer = ["--out", "{out}", "--seed", "0"]
    dpo_rows = dpo_steps * 8
    return [
        Workload(
            "sft", "llama-6m", "tokens_per_s", 2.0, ["llama-6m"],
            Side("rlhflab", ["sft", "--model", "{llama-6m}", "--data", "{sft_train}", "--out", "{out}",
                             "--max-steps", str(sft_steps), "--batch-size", "8", "--lr", "5e-4", "--max-length", "256",
                             "--lora", "false", "--eval-fraction", "0", *no_warmup, *quiet]),
            [Side("TRL 1.16 SFTTrainer", ["trl_sft.py", "--model", "{llama-6m}", "--data", "{sft_train}",
                                          "--steps", str(sft_steps), "--batch-size", "8", "--lr", "5e-4",
                                          "--max-length", "256", *peer], "trl")],
            data={"sft_train": ("sft.jsonl", 0, sft_steps * 8)},
            notes=f"full fine-tuning from the random-init model, loss on assistant tokens, batches grouped by length; "
                  f"one epoch over the same {sft_steps * 8} conversations"),
        Workload(
            "rm", "llama-6m", "pairs_per_s", 2.0, ["sft-6m"],
            Side("rlhflab", ["rm", "--model", "{sft-6m}", "--data", "{rm_train}", "--eval-data", "{pairs_eval}",
                             "--out", "{out}", "--max-steps", str(rm_steps), "--batch-size", "8", "--lr", "1e-4",
                             "--max-length", "256", "--lora", "false", *no_warmup, *quiet]),
            [Side("TRL 1.16 RewardTrainer", ["trl_rm.py", "--model", "{sft-6m}", "--data", "{rm_train}",
                                             "--steps", str(rm_steps), "--batch-size", "8", "--lr", "1e-4",
                                             "--max-length", "256", *peer], "trl")],
            data={"rm_train": ("prefs.jsonl", 0, rm_steps * 8), "pairs_eval": ("prefs.jsonl", 7000, 1)},
            notes=f"pairwise Bradley-Terry, full fine-tuning from the SFT model; one epoch over the same "
                  f"{rm_steps * 8} pairs (pairs differ in length, so both sides must see the same ones)"),
        Workload(
            "dpo", "llama-6m", "pairs_per_s", 2.0, ["sft-6m"],
            Side("rlhflab", ["dpo", "--policy", "{sft-6m}", "--data", "{dpo_train}", "--eval-data", "{pairs_eval}",
                             "--out", "{out}", "--loss", "dpo", "--beta", "0.1", "--precompute-ref", "true",
                             "--max-steps", str(dpo_steps), "--batch-size", "8", "--lr", "5e-5", "--max-length", "256",
                             "--lora", "false", *no_warmup, *quiet]),
            [Side(f"TRL 1.16 DPOTrainer, ref {mode}", ["trl_dpo.py", "--model", "{sft-6m}", "--data", "{dpo_train}",
                                                      "--steps", str(dpo_steps), "--batch-size", "8", "--lr", "5e-5",
                                                      "--max-length", "256", "--precompute-ref", flag, *peer], "trl")
             for mode, flag in (("precomputed", "true"), ("live", "false"))],
            data={"dpo_train": ("prefs.jsonl", 0, dpo_rows), "pairs_eval": ("prefs.jsonl", 7000, 1)},
            notes=f"sigmoid loss, beta 0.1, full fine-tuning; one epoch over {dpo_rows} pairs, so pairs/s counts "
                  "the reference pass over them (reference_time_s) plus the training loop"),
        Workload(
            "grpo", "llama-6m", "seconds_per_step", 2.0, ["sft-6m", "rm-6m", "rm-6m-seqcls"],
            Side("rlhflab", ["ppo", "--estimator", "grpo", "--policy", "{sft-6m}", "--reward", "{rm-6m}",
                             "--prompts", "{world}/prompts.jsonl", "--out", "{out}", "--n-samples", "4",
                             "--rollout-prompts", "4", "--mini-batch", "4", "--ppo-epochs", "4",
                             "--max-steps", str(rl_steps), *rl_shape, *quiet]),
            [Side("TRL 1.16 GRPOTrainer", ["trl_grpo.py", "--policy", "{sft-6m}", "--reward", "{rm-6m-seqcls}",
                                           "--prompts", "{world}/prompts.jsonl", "--steps", str(rl_steps),
                                           "--prompts-per-step", "4", "--samples", "4", "--mini-batch", "4",
                                           "--epochs", "4", "--new-tokens", "32", "--lr", "1e-5", "--beta", "0.05",
                                           *peer], "trl")],
            parity=False,
            notes="a step = 4 prompts x 4 samples of exactly 32 tokens, reward model, 4 epochs of mini-batches of 4 "
                  "(16 optimizer steps), k3 KL loss with beta 0.05 against a reference"),
        *[Workload(
            name, "llama-6m", "seconds_per_step", 2.0, ["sft-6m", "rm-6m"],
            Side("rlhflab", ["ppo", "--estimator", "gae", "--policy", "{sft-6m}", "--reward", "{rm-6m}",
                             "--prompts", "{world}/prompts.jsonl", "--out", "{out}", "--rollout-prompts", "16",
                             "--mini-batch", "4", "--ppo-epochs", "4", "--max-steps", str(rl_steps), *extra,
                             *rl_shape, *quiet]),
            [Side("TRL 0.11.4 PPOTrainer.step", ["trl011_ppo.py", "--mode", "full", "--policy", "{sft-6m}",
                                                 "--reward", "{rm-6m}", "--prompts", "{world}/prompts.jsonl",
                                                 "--steps", str(rl_steps), "--batch", "16", "--mini-batch", "4",
                                                 "--epochs", "4", "--new-tokens", "32", "--lr", "1e-5",
                                                 "--kl-coef", "0.05", *peer], "trl011")],
            parity=False,
            notes="a step = 16 prompts, one sample each of exactly 32 tokens, reward model, GAE, 4 epochs of "
                  "mini-batches of 4; full fine-tuning" + note)
          for name, extra, note in (
              ("ppo", [], "; rlhflab's default critic: a value head on the policy's body, TRL 0.11.4's own design"),
              ("ppo-separate-critic", ["--critic", "separate"],
               "; rlhflab with `--critic separate`: a critic model of its own, started from the reward model "
               "(InstructGPT)"))],
        *[Workload(
            name, "llama-100m", "peak_rss_mib", 0.6, ["sft-100m-lora", "rm-100m-lora"],
            Side("rlhflab", ["ppo", "--lora", "true", "--estimator", "gae", "--policy", "{sft-100m-lora}",
                             "--reward", "{rm-100m-lora}", "--prompts", "{world}/prompts.jsonl", "--out", "{out}",
                             "--rollout-prompts", "16", "--mini-batch", "4", "--ppo-epochs", "1", "--max-steps", "1",
                             *extra, *rl_shape, *quiet]),
            [Side(f"TRL 0.11.4 PPO, {label}", ["trl011_ppo.py", "--mode", mode, "--policy", "{sft-100m-lora}",
                                               "--reward", "{rm-100m-lora}", "--prompts", "{world}/prompts.jsonl",
                                               "--steps", "1", "--batch", "16", "--mini-batch", "4", "--epochs", "1",
                                               "--new-tokens", "32", "--lr", "1e-5", "--kl-coef", "0.05", *peer],
                  "trl011")
             for mode, label in (("peft", "peft LoRA + separate RM"), ("marl", "Multi-Adapter RL"))],
            parity=False, targeted_peer="*",
            notes="LoRA r16 on all linear layers; one PPO step (16 prompts x 32 tokens, one epoch of mini-batches "
                  "of 4): peak memory is reached inside the first step" + note)
          for name, extra, note in (
              ("ppo-lora-memory", [], ""),
              ("ppo-lora-memory-release", ["--release-memory", "true"],
               "; rlhflab with `--release-memory` (glibc returns freed blocks: lower peak, slower step)"))],
    ]


# ---------------------------------------------------------------------------------------------
# Running one side once.


def environment(threads: int) -> dict:
    """The same environment for every side: offline, the same torch thread count, no progress bars."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
               PYTHONUNBUFFERED="1", HF_DATASETS_CACHE=str(WORK / "hf-datasets-cache"))
    return env


def fill(argv: list[str], paths: dict, out: Path) -> list[str]:
    values = {**{k: str(v) for k, v in paths.items()}, "out": str(out)}
    return [a.format(**values) for a in argv]


def command_of(side: Side, paths: dict, out: Path) -> list[str]:
    argv = fill(side.argv, paths, out)
    if side.python is None:
        return [str(RLHFLAB), *argv]
    return [str(PYTHONS[side.python]), str(PEERS / argv[0]), *argv[1:]]


def run_process(argv: list[str], env: dict, log: Path, cwd: Path, timeout: float) -> dict:
    """Run to completion; stdout+stderr to `log`. Returns exit code, wall time and peak RSS (wait4)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        handle.write("$ " + shlex.join(argv) + "\n")
        handle.flush()
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"exit": proc.returncode, "process_s": time.perf_counter() - started,
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def tail_mean(values: list):
    """Mean of the last quarter (at least 5) of the logged values; the peers use the same rule."""
    values = [v for v in values if v is not None]
    n = max(5, len(values) // 4)
    return sum(values[-n:]) / len(values[-n:]) if values else None


def rlhflab_figures(out: Path) -> dict:
    """The figures of an rlhflab run, from its summary.json and metrics.jsonl."""
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    figures = {k: summary.get(k) for k in ("tokens_per_s", "pairs_per_s", "seconds_per_step", "train_time_s",
                                           "reference_time_s", "steps") if summary.get(k) is not None}
    if "seconds_per_step" in figures:  # RL: loss = policy loss (+ 0.5 x value loss, TRL's vf_coef here too)
        figures["train_time_s"] = sum(r.get("step_time_s", 0.0) for r in rows)
        losses = [r["pg_loss"] + 0.5 * r.get("vf_loss", 0.0) for r in rows if "pg_loss" in r]
        figures["final_reward"] = tail_mean([r.get("reward") for r in rows])
    else:
        losses = [r["loss"] for r in rows if "loss" in r]
    if "reference_time_s" in figures:
        figures["loop_pairs_per_s"] = summary["train_pairs"] / summary["train_time_s"]
    figures["final_loss"] = tail_mean(losses)
    figures["own_peak_rss_mib"] = summary.get("peak_rss_mib")
    return figures


def result_line(log: Path) -> dict:
    """A peer's one JSON line, whole (the last line of its output that parses as a JSON object)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON result line in {log}")


def peer_figures(log: Path) -> dict:
    """The peer's figures for the table: its JSON line less the per-step lists."""
    figures = result_line(log)
    figures["own_peak_rss_mib"] = figures.pop("peak_rss_mib", None)
    figures.pop("losses", None)
    figures.pop("step_times", None)
    return figures


def run_side(workload: Workload, side: Side, index: int, paths: dict, env: dict, timeout: float) -> dict:
    slug = side.label.split(",")[-1].strip().replace(" ", "-").replace(".", "").replace("+", "")
    out = WORK / "runs" / workload.name / f"{slug}-{index}"
    log = WORK / "logs" / workload.name / f"{slug}-{index}.log"
    shutil.rmtree(out, ignore_errors=True)
    argv = command_of(side, paths, out)
    result = {"side": side.label, "repeat": index, "command": shlex.join(argv), "log": str(log.relative_to(ROOT))}
    result.update(run_process(argv, env, log, cwd=PEERS if side.python else ROOT, timeout=timeout))
    try:
        if result["exit"] != 0:
            raise RuntimeError(f"exit code {result['exit']}")
        figures = rlhflab_figures(out) if side.python is None else peer_figures(log)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        tail = log.read_text(errors="replace").splitlines()[-3:]
        result["error"] = f"{exc}; log {result['log']}: " + " | ".join(tail)[-400:]
        print(f"    {side.label}: FAILED ({result['error']})", flush=True)
        return result
    result.update(figures)
    result["outside_training_s"] = result["process_s"] - figures.get("train_time_s", 0.0) - \
        figures.get("reference_time_s", 0.0)
    shown = result.get(workload.metric) if workload.metric != "peak_rss_mib" else result["peak_rss_mib"]
    loss = result.get("final_loss")
    print(f"    {side.label}: {workload.metric} {shown:.4g}, peak RSS {result['peak_rss_mib']:.0f} MiB, final loss "
          f"{'—' if loss is None else f'{loss:.4f}'}, {result['process_s']:.0f} s", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# The suite.


def write_data_files(workload: Workload, paths: dict) -> None:
    """Slices of the toy world's files that a workload trains on: both sides get the same rows, one
    epoch's worth, so they see the same lengths (rlhflab's eval split comes from a separate slice)."""
    for name, (source, first, count) in workload.data.items():
        rows = (paths["world"] / source).read_text(encoding="utf-8").splitlines()[first:first + count]
        path = WORK / "data" / f"{name}-{first}-{count}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        paths[name] = path


def available(command: str, env: dict) -> bool:
    """Whether this rlhflab has the stage at all (a stage being written may not have landed)."""
    return subprocess.run([str(RLHFLAB), command, "--help"], env=env, capture_output=True).returncode == 0


def build_fixtures(names: list[str], env: dict) -> dict:
    argv = [sys.executable, str(BENCH / "fixtures.py"), *names]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"building fixtures failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    paths = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(": ")
        if value and Path(value).exists():
            paths[key] = Path(value)
    return paths


def run_workload(workload: Workload, repeats: int, env: dict, timeout: float) -> dict:
    print(f"== {workload.name} ({workload.model}, {workload.metric})", flush=True)
    record = {"name": workload.name, "model": workload.model, "metric": workload.metric, "target": workload.target,
              "parity": workload.parity, "notes": workload.notes, "sides": [workload.rlhflab.label] +
              [p.label for p in workload.peers], "targeted_peer": workload.targeted_peer or workload.peers[0].label,
              "runs": []}
    command = workload.rlhflab.argv[0]
    if not available(command, env):
        record["pending"] = f"`rlhflab {command}` is not available in this checkout"
        print(f"    pending: {record['pending']}", flush=True)
        return record
    paths = build_fixtures(workload.needs, env)
    write_data_files(workload, paths)
    record["files"] = {**{name: str(paths[name]) for name in workload.data},
                       "prompts": str(paths["world"] / "prompts.jsonl")}  # for the MFU's token counts
    record["commit"] = commit()  # rlhflab may change under a long run: say what each workload measured
    for index in range(repeats):  # A B A B ...: drift on a shared machine hits every side alike
        for side in [workload.rlhflab, *workload.peers]:
            record["runs"].append(run_side(workload, side, index, paths, env, timeout))
    return record


def gpu_section(env: dict, timeout: float) -> dict:
    """SFT and one PPO step on a ~0.5B Llama in bf16, when CUDA is at hand (see gpu.py)."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           env=env, capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        return {"measured": False, "reason": "no GPU on this machine (torch.cuda.is_available() is False)"}
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py")], env=env, capture_output=True, text=True,
                          timeout=timeout * 4)
    try:
        return {"measured": True, **json.loads(done.stdout.strip().splitlines()[-1])}
    except (IndexError, json.JSONDecodeError):
        return {"measured": False, "reason": f"gpu.py failed: {done.stderr[-1500:]}"}


def mfu_inputs(what: list[str], env: dict) -> dict:
    """bench/mfu.py run with the suite's environment (its thread count): the fp32 matmul peak
    (`["peak"]`) or the data's token counts (`["stats", ...]`); {"error": ...} if it fails."""
    done = subprocess.run([sys.executable, str(BENCH / "mfu.py"), *what], env=env, capture_output=True, text=True)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"bench/mfu.py {what[0]} failed: {done.stderr[-800:]}"}


def work_stats(records: list[dict], env: dict) -> dict:
    """Token counts of the files the workloads read (the MFU's work per token, pair or step)."""
    files = {}
    for record in records:
        files.update(record.get("files", {}))
    options = {"sft_train": "--sft", "rm_train": "--rm", "dpo_train": "--dpo", "prompts": "--prompts"}
    argv = [arg for name, path in files.items() if name in options for arg in (options[name], path)]
    return mfu_inputs(["stats", *argv], env) if argv else {}


def commit() -> str:
    """The checked-out commit, and whether rlhflab/ differs from it."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "rlhflab"], capture_output=True,
                           text=True).stdout.strip()
    return head + (" (rlhflab/ has uncommitted changes)" if dirty else "")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    versions = {}
    for name, python in [("rlhflab venv", Path(sys.executable)), *[(k, v) for k, v in PYTHONS.items()]]:
        done = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' "
                               "for p in ('torch', 'transformers', 'peft', 'accelerate', 'trl') "
                               "if __import__('importlib').util.find_spec(p)))"], capture_output=True, text=True)
        versions[name] = done.stdout.strip() or done.stderr.strip()[-200:]
    load = os.getloadavg()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1), "python": sys.version.split()[0],
            "commit": commit(), "versions": versions,
            "load_at_start": [round(x, 2) for x in load]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short run per side (a smoke test, not a result)")
    parser.add_argument("--only", default="", help="comma-separated workloads: sft,rm,dpo,grpo,ppo,"
                                                   "ppo-separate-critic,ppo-lora-memory,ppo-lora-memory-release")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (medians are reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every side (see RESULTS.md)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    parser.add_argument("--setup", action="store_true", help="install the peers' environments and stop")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section even when CUDA is there")
    parser.add_argument("--results", default=None,
                        help="where to write the report (default: bench/RESULTS.md; bench/work/RESULTS-quick.md with --quick)")
    args = parser.parse_args()

    subprocess.run(["bash", str(BENCH / "setup.sh")], check=True)
    if args.setup:
        return
    repeats = 1 if args.quick else args.repeats
    env = environment(args.threads)
    chosen = [w for w in workloads(args.quick) if not args.only or w.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {w.name for w in workloads(args.quick)}
    if unknown:
        sys.exit(f"--only: unknown workload(s) {', '.join(sorted(unknown))}")
    started = time.perf_counter()
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": args.quick,
               "repeats": repeats, "threads": args.threads, "machine": machine(), "workloads": []}
    results["peak"] = mfu_inputs(["peak", "--runs", "3"], env)  # fp32 matmul, the rows' thread count
    for workload in chosen:
        results["workloads"].append(run_workload(workload, repeats, env, args.timeout))
    results["work_stats"] = work_stats(results["workloads"], env)
    results["gpu"] = {"measured": False, "reason": "skipped (--no-gpu)"} if args.no_gpu else gpu_section(env, args.timeout)
    results["suite_s"] = time.perf_counter() - started
    results["machine"]["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    saved = WORK / "results" / f"{results['date'].replace(':', '')}.json"
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=1))

    sys.path.insert(0, str(BENCH))
    import report

    target = Path(args.results or (WORK / "RESULTS-quick.md" if args.quick else BENCH / "RESULTS.md"))
    target.write_text(report.render(results, report.kept_notes(target), report.kept_gpu(target)), encoding="utf-8")
    print(f"\n{report.table(results)}\n\nwrote {target} (raw figures: {saved.relative_to(ROOT)}); "
          f"suite took {results['suite_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
