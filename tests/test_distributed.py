"""Several processes: two CPU processes over gloo, started with torchrun as a user would, against
one process at the same global batch and seed; DeepSpeed ZeRO-2/3 and FSDP2 through accelerate's
environment switches (its CPU launcher starts one process only); the launch configs in
configs/accelerate/; the refusal of a launch that would run one process where two were asked for."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from conftest import ROOT, SAMPLES, free_port
from safetensors.torch import load_file

from rlhflab.cli.main import main
from rlhflab.runs import read_metrics

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
QUIET = ["--progress", "false", "--log-every", "1"]


def launch(processes: int, *args, env: dict | None = None, script: list[str] | None = None,
           timeout: int = 300) -> subprocess.CompletedProcess:
    """`rlhflab ...` in one process, or under `torchrun --nproc_per_node N`; fails the test unless
    every process exits 0 (torchrun's own exit code says so)."""
    target = script or ["-m", "rlhflab"]
    if processes == 1:
        command = [sys.executable, *target, *map(str, args)]
    else:
        runner = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command = [sys.executable, *runner, *(target if script else ["-m", "rlhflab"]), *map(str, args)]
    result = subprocess.run(command, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def steps_of(out: Path) -> list[dict]:
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "exactly one metrics line per step"
    return rows


def assert_same_run(one: Path, two: Path, tol: float = 1e-4) -> None:
    a, b = steps_of(one), steps_of(two)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], abs=tol), (x, y)
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-6, abs=1e-12), (x, y)
    assert len({r["lr"] for r in a}) > 2, "the schedule must move for the comparison to mean something"
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["engine"] == "ddp"


SCHEDULE = ["--scheduler", "linear", "--warmup-ratio", "0.25", "--max-grad-norm", "1.0"]


def sft_args(tiny_model) -> list:
    # 6 rows per micro-batch, two micro-batches a step: each process takes 3 rows of different
    # lengths, so its own token count differs from the other's and only a global divisor agrees.
    return ["sft", "--model", tiny_model("llama"), "--data", SAMPLES / "sft_messages.jsonl", "--max-steps", 4,
            "--batch-size", 6, "--grad-accum", 2, "--lr", "3e-3", *SCHEDULE, *QUIET]


@pytest.fixture(scope="module")
def sft_one(tiny_model, tmp_path_factory) -> Path:
    """SFT in one process: what every multi-process SFT run here must reproduce."""
    out = tmp_path_factory.mktemp("sft") / "one"
    launch(1, *sft_args(tiny_model), "--out", out)
    return out


def test_sft_in_two_processes_trains_as_one(tiny_model, sft_one, tmp_path):
    launch(2, *sft_args(tiny_model), "--out", tmp_path / "two")
    assert_same_run(sft_one, tmp_path / "two")
    one, two = (json.loads((d / "summary.json").read_text()) for d in (sft_one, tmp_path / "two"))
    assert one["train_tokens"] == two["train_tokens"], "throughput counts both processes' tokens"


# dpo: 5 pairs a micro-batch, 3 and 2 per process, so a plain mean of the two processes' means
# would not be the mean over the pairs.
@pytest.mark.parametrize("stage,model_option,batch_size", [("rm", "--model", 4), ("dpo", "--policy", 5)],
                         ids=["rm", "dpo"])
def test_pair_stage_in_two_processes_trains_as_one(stage, model_option, batch_size, tiny_model, tmp_path):
    args = [stage, model_option, tiny_model("llama"), "--data", SAMPLES / "pairs.jsonl", "--max-steps", 4,
            "--batch-size", batch_size, "--lr", "3e-3", *SCHEDULE, *QUIET]
    launch(1, *args, "--out", tmp_path / "one")
    launch(2, *args, "--out", tmp_path / "two")
    assert_same_run(tmp_path / "one", tmp_path / "two")


DRIVER = """
import json, os, sys
from rlhflab.train import rl
collect = rl.collect
def recording(roles, tokenizer, records, config, step, *args, **kwargs):
    rollout, stats, texts = collect(roles, tokenizer, records, config, step, *args, **kwargs)
    with open(os.path.join(sys.argv[1], f"rank-{os.environ.get('RANK', '0')}.jsonl"), "a") as handle:
        handle.write(json.dumps({"step": step, "prompts": [r.messages[-1]["content"] for r in records],
                                 "texts": texts, "reward": stats["reward"]}) + "\\n")
    return rollout, stats, texts
rl.collect = recording
from rlhflab.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def world_prompts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    assert main(["world", "export", "--out", str(out), "--size", "small"]) == 0
    return out / "prompts.jsonl"


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_rl_processes_sample_their_own_rollouts_and_metrics_count_both(estimator, tiny_model, world_prompts,
                                                                        tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    record = tmp_path / "rollouts"
    record.mkdir()
    out = tmp_path / "ppo"
    launch(2, record, "ppo", "--policy", tiny_model("llama"), "--reward", "judge", "--prompts", world_prompts,
           "--estimator", estimator, "--n-samples", 2, "--rollout-prompts", 4, "--mini-batch", 4, "--max-steps", 2,
           "--max-new-tokens", 6, "--probe-every", 0, "--out", out, *QUIET, script=[str(driver)])
    ranks = [[json.loads(line) for line in (record / f"rank-{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for step, row in enumerate(rows):
        mine, theirs = ranks[0][step], ranks[1][step]
        assert len(mine["prompts"]) == len(theirs["prompts"]) == 4, "each process takes half of the 4x2 rollouts"
        assert not set(mine["prompts"]) & set(theirs["prompts"]), "the processes must roll out different prompts"
        assert mine["texts"] != theirs["texts"]
        assert row["rollouts"] == 8
        assert row["reward"] == pytest.approx((mine["reward"] + theirs["reward"]) / 2, abs=1e-5)


def test_killed_two_process_run_resumes_to_the_uninterrupted_result(tiny_model, tmp_path):
    args = ["sft", "--model", tiny_model("llama"), "--data", SAMPLES / "sft_messages.jsonl", "--max-steps", 30,
            "--batch-size", 4, "--lr", "3e-3", "--save-every", 2, "--lora-dropout", 0.1, *SCHEDULE, *QUIET]
    launch(2, *args, "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rlhflab", *map(str, args), "--out", str(killed)]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((killed / "checkpoints").glob("step-*")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((killed / "checkpoints").glob("step-*")), "no checkpoint was written before the kill"
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    result = launch(2, *args, "--out", killed, "--resume", "auto")
    assert "resumed from" in result.stderr
    assert [r["loss"] for r in steps_of(killed)] == pytest.approx([r["loss"] for r in steps_of(tmp_path / "whole")],
                                                                  abs=1e-5)


def test_accelerate_cpu_launcher_that_starts_one_process_is_refused(tiny_model, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "--cpu", "-m", "rlhflab", "sft",
                             "--model", str(tiny_model("llama")), "--data", str(SAMPLES / "sft_messages.jsonl"),
                             "--out", str(tmp_path / "one"), "--max-steps", "1"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "started ONE process" in result.stderr and "torchrun --nproc_per_node" in result.stderr
    assert not (tmp_path / "one" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Sharding engines on two CPU processes. accelerate's launcher runs them on CPUs in one process only,
# so the test sets the switches `accelerate launch --config_file configs/accelerate/...` sets.

ENGINES = {
    "deepspeed-zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "deepspeed-zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
}
FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
         "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_deepspeed_trains_sft_as_one_process_does(engine, tiny_model, sft_one, tmp_path):
    pytest.importorskip("deepspeed", reason="the test extra installs deepspeed (pip install -e '.[test]')")
    result = launch(2, *sft_args(tiny_model), "--out", tmp_path / "two", env=ENGINES[engine])
    assert "Setting accelerator to CPU" not in result.stderr, "the CPU backend is named, not guessed, without CUDA"
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["engine"] == engine and summary["processes"] == 2
    a, b = steps_of(sft_one), steps_of(tmp_path / "two")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-4)
    assert [r["lr"] for r in b] == pytest.approx([r["lr"] for r in a], rel=1e-6)
    one, two = load_file(sft_one / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:   # the saved model is whole (gathered from the slices) and trained alike
        assert two[name].shape == one[name].shape
        assert (two[name].float() - one[name].float()).abs().max() < 1e-3, name


FSDP_DRIVER = """
import json, os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from rlhflab.data.formats import load_records
from rlhflab.models.loading import Placement, load_causal_lm, load_tokenizer
from rlhflab.train.sft import collate, encode_dataset, nll_sum
from rlhflab.train.optim import adamw
model_dir, data, out = sys.argv[1:4]
sharded = "RANK" in os.environ
if sharded:
    dist.init_process_group("gloo")
rank, n = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
tokenizer = load_tokenizer(model_dir)
model = load_causal_lm(model_dir, Placement(torch.device("cpu"), torch.float32, torch.float32, "no"), train_full=True)
if sharded:   # FSDP2: each decoder layer and the rest of the model split over the processes
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
records, _ = load_records(data, "sft")
examples, _ = encode_dataset(records, tokenizer, 128)
optimizer, losses = adamw(model.parameters(), lr=3e-3), []
for step in range(3):
    rows = examples[4 * step: 4 * step + 4]
    mine = collate(rows[rank::n], tokenizer.pad_token_id, "cpu")
    total, count = nll_sum(model, mine)
    tokens = torch.tensor(float(count))
    if sharded:
        dist.all_reduce(tokens)
    (total * n / tokens).backward()   # FSDP averages gradients over the processes
    optimizer.step()
    optimizer.zero_grad()
    summed = torch.tensor(total.item())
    if sharded:
        dist.all_reduce(summed)
    losses.append(summed.item() / tokens.item())
if rank == 0:
    json.dump(losses, open(out, "w"))
"""


def test_fsdp2_trains_rlhflab_sft_loss_on_two_cpu_processes(tiny_model, tmp_path):
    """accelerate runs FSDP on GPUs only, so this calls torch's FSDP2 (fully_shard) directly with
    rlhflab's loader, batching and SFT loss, against one unsharded process."""
    driver = tmp_path / "fsdp.py"
    driver.write_text(FSDP_DRIVER)
    args = [tiny_model("llama"), SAMPLES / "sft_messages.jsonl"]
    launch(1, *args, tmp_path / "one.json", script=[str(driver)])
    launch(2, *args, tmp_path / "two.json", script=[str(driver)])
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert len(one) == 3 and one[0] != one[-1]
    assert two == pytest.approx(one, abs=1e-4)


def test_fsdp_on_cpus_and_sharding_engines_for_ppo_are_refused(tiny_model, world_prompts, tmp_path):
    def refused(env: dict, *args) -> str:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "rlhflab", *map(str, args)], env={**ENV, **env}, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode != 0
        return result.stderr

    err = refused(FSDP2, "sft", "--model", tiny_model("llama"), "--data", SAMPLES / "sft_messages.jsonl",
                  "--out", tmp_path / "sft", "--max-steps", 1)
    assert "accelerate runs FSDP on GPUs only" in err
    if importlib.util.find_spec("deepspeed"):
        err = refused(ENGINES["deepspeed-zero2"], "ppo", "--policy", tiny_model("llama"), "--reward", "judge",
                      "--prompts", world_prompts, "--out", tmp_path / "ppo", "--max-steps", 1)
        assert "does not run under DeepSpeed ZeRO-2" in err and "DDP" in err


# ---------------------------------------------------------------------------------------------
# The launch configs.

CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {   # file -> (distributed_type, zero stage or fsdp version, offloaded)
    "ddp.yaml": ("MULTI_GPU", None, False),
    "fsdp2.yaml": ("FSDP", 2, False), "fsdp2-offload.yaml": ("FSDP", 2, True),
    "zero2.yaml": ("DEEPSPEED", 2, False), "zero2-offload.yaml": ("DEEPSPEED", 2, True),
    "zero3.yaml": ("DEEPSPEED", 3, False), "zero3-offload.yaml": ("DEEPSPEED", 3, True),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_launch_configs_load_as_accelerate_reads_them(name):
    path = CONFIGS / name
    raw = yaml.safe_load(path.read_text())
    config = ClusterConfig.from_yaml_file(path)   # accelerate's own reader: unknown keys are an error
    kind, level, offloaded = EXPECTED[name]
    assert getattr(config.distributed_type, "value", config.distributed_type) == kind
    assert config.num_processes == 8 and config.num_machines == 1 and not config.use_cpu
    assert getattr(config.mixed_precision, "value", config.mixed_precision) == "bf16"
    if kind == "DEEPSPEED":
        ds = raw["deepspeed_config"]
        assert ds["zero_stage"] == level
        assert (ds["offload_optimizer_device"] == "cpu") == offloaded
        assert ds["offload_param_device"] == ("cpu" if offloaded and level == 3 else "none")
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds, \
            "rlhflab sets these from --grad-accum and --max-grad-norm"
    if kind == "FSDP":
        fsdp = raw["fsdp_config"]
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert fsdp["fsdp_offload_params"] is offloaded
    assert f"--config_file configs/accelerate/{name}" in path.read_text(), "the file says how to launch with it"


def test_every_launch_config_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def test_a_command_closes_its_process_group_before_exiting():
    """A process group left open is torn down by static destructors while its threads run, which
    can abort a rank; the command line closes it on the way out, also after an error."""
    code = ("import os, sys, torch.distributed as dist\n"
            "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(%d))\n"
            "dist.init_process_group('gloo', rank=0, world_size=1)\n"
            "from rlhflab.cli.main import main\n"
            "sys.argv = ['rlhflab', 'sft', '--no-such-option', '1']\n"
            "code = main()\n"
            "print('exit', code, 'open', dist.is_initialized())") % free_port()
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exit 2 open False" in done.stdout, done.stdout + done.stderr
