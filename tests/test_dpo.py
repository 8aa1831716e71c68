"""DPO end to end on tiny models: the reference at step 0, every loss, online rounds, sample/rank, resume."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import SAMPLES

from rlhflab.cli.main import main
from rlhflab.runs import read_metrics

PAIRS = SAMPLES / "pairs.jsonl"


def dpo(out, *extra):
    code = main(["dpo", "--data", str(PAIRS), "--out", str(out), "--log-every", "1", "--progress", "false",
                 "--batch-size", "4", "--eval-fraction", "0.1", *map(str, extra)])
    assert code == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def sft_adapter(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "adapter"
    code = main(["sft", "--model", str(tiny_model("llama")), "--data", str(SAMPLES / "sft_messages.jsonl"),
                 "--out", str(out), "--lora", "--max-steps", "3", "--lr", "1e-2", "--progress", "false"])
    assert code == 0
    return out


@pytest.mark.parametrize("mode", ["lora-on-adapter", "lora-on-full", "full-precomputed", "full-live"])
def test_reference_equals_the_sft_model_at_step_zero(mode, sft_adapter, tiny_model, tmp_path):
    policy = sft_adapter if mode == "lora-on-adapter" else tiny_model("llama")
    extra = {"lora-on-adapter": ["--lora"], "lora-on-full": ["--lora"], "full-precomputed": [],
             "full-live": ["--precompute-ref", "false"]}[mode]
    summary = dpo(tmp_path / mode, "--policy", policy, "--max-steps", 2, "--lr", "1e-2", *extra)
    first = read_metrics(tmp_path / mode / "metrics.jsonl")[0]
    assert first["step"] == 1
    # The first loss is computed before any update, so the implicit rewards are zero up to float
    # summation order (precomputed reference batches are padded to other widths than training ones).
    assert abs(first["rewards/margin"]) < 1e-5 and abs(first["rewards/chosen"]) < 1e-5
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-6)  # -log sigmoid(0)
    expected = {"lora-on-adapter": "adapter", "lora-on-full": "adapters-off", "full-precomputed": "precomputed",
                "full-live": "live"}[mode]
    assert summary["reference"] == expected


@pytest.mark.parametrize("loss", ["dpo", "ipo", "cdpo", "simpo", "rpo"])
def test_each_loss_learns_the_preferences(loss, tiny_model, tmp_path):
    beta = 2.0 if loss == "simpo" else 0.1
    summary = dpo(tmp_path / loss, "--policy", tiny_model("llama"), "--loss", loss, "--beta", beta,
                  "--max-steps", 15, "--lr", "5e-3", "--eval-data", PAIRS, "--eval-every", 15)
    rows = read_metrics(tmp_path / loss / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]
    assert summary["eval_accuracy"] >= 0.8, summary
    assert summary["loss_type"] == loss and summary["pairs_per_s"] > 0


def test_lora_dpo_saves_an_adapter_on_the_sft_base(sft_adapter, tmp_path):
    from rlhflab.models.loading import adapter_base

    out = tmp_path / "dpo"
    dpo(out, "--policy", sft_adapter, "--lora", "--max-steps", 2)
    assert (out / "adapter_model.safetensors").exists()
    assert adapter_base(out) == adapter_base(sft_adapter)


def test_resume_continues_exactly(tiny_model, tmp_path):
    common = ["--policy", tiny_model("llama"), "--max-steps", 6, "--lr", "5e-3", "--seed", 3]
    dpo(tmp_path / "whole", *common)
    dpo(tmp_path / "cut", *common, "--save-every", 3)
    (tmp_path / "cut" / "summary.json").unlink()
    checkpoint = tmp_path / "cut" / "checkpoints" / "step-3"
    assert checkpoint.is_dir()
    dpo(tmp_path / "cut", *common, "--resume", checkpoint)
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    cut = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in cut] == [r["step"] for r in whole]
    assert [r["loss"] for r in cut] == pytest.approx([r["loss"] for r in whole], abs=1e-6)


def test_chosen_drop_warning(tiny_model, tmp_path, capsys):
    # A threshold below any possible shift makes the warning fire; the mechanism, not the threshold, is tested.
    summary = dpo(tmp_path / "w", "--policy", tiny_model("llama"), "--max-steps", 2, "--warn-chosen-drop", -1e9)
    assert summary["chosen_drop_warning"] is True
    assert "--loss rpo" in capsys.readouterr().err


def test_sample_and_rank_make_pairs(tiny_model, tmp_path, cli):
    from rlhflab.feedback.preferences import rank_rows

    samples, ranked = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    result = cli("sample", "--model", tiny_model("llama"), "--prompts", SAMPLES / "prompts.jsonl", "--k", 3,
                 "--max-rows", 4, "--max-new-tokens", 8, "--out", samples)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["responses"]) == 3 for r in rows)
    rows = [{"prompt": [{"role": "user", "content": "What is 2 plus 3?"}], "responses": ["7", "5", "2 plus 3 is 5."]}]
    pairs, tied = rank_rows(rows, [[0.1, 0.5, 0.9]], "pairs")
    assert pairs[0]["chosen"] == "2 plus 3 is 5." and pairs[0]["rejected"] == "7" and tied == 0
    rankings, _ = rank_rows(rows, [[0.1, 0.5, 0.9]], "rankings")
    assert rankings[0]["responses"] == ["2 plus 3 is 5.", "5", "7"]
    assert rank_rows(rows, [[0.3, 0.3, 0.3]], "pairs") == ([], 1)
    samples.write_text(json.dumps({"prompt": "What is 2 plus 3?", "responses": ["I refuse.", "2 plus 3 is 5."]}) + "\n")
    result = cli("rank", "--data", samples, "--by", "judge", "--out", ranked)
    assert result.returncode == 0, result.stderr
    assert json.loads(ranked.read_text())["chosen"] == "2 plus 3 is 5."


def test_annotators_rank_through_noise_seeded_and_skip_what_the_judge_ties(tmp_path, cli):
    """--by annotators: the judge's order through the world's annotator noise, the same for the same
    seed; a prompt whose answers the judge scores alike gives no pair (as in the world's own data)."""
    good, bad = "2 plus 3 is 5.", "2 plus 3 is 7."
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in
                               [{"prompt": "What is 2 plus 3?", "responses": [bad, good]}] * 200
                               + [{"prompt": "What is 2 plus 3?", "responses": [good, good]}]))

    def chosen(seed):
        out = tmp_path / f"pairs-{seed}.jsonl"
        result = cli("rank", "--data", samples, "--by", "annotators", "--seed", seed, "--out", out)
        assert result.returncode == 0, result.stderr
        assert "1 prompts dropped" in result.stderr
        return [json.loads(line)["chosen"] for line in out.read_text().splitlines()]

    first = chosen(0)
    assert len(first) == 200 and first == chosen(0) and first != chosen(1)
    assert 0.6 < first.count(good) / 200 < 0.9        # sigmoid(0.35 / 0.34) = 0.74: noisy, not random
    samples.write_text(json.dumps({"prompt": "Write a poem about rain.", "responses": ["Rain.", "Drops."]}) + "\n")
    result = cli("rank", "--data", samples, "--by", "annotators", "--out", tmp_path / "poem.jsonl")
    assert result.returncode == 2 and "knows no task in the prompt 'Write a poem" in result.stderr
    assert not (tmp_path / "poem.jsonl").exists()


def test_online_rounds_sample_rank_and_train(tiny_model, tmp_path):
    model = tiny_model("llama")
    rm = tmp_path / "rm"
    assert main(["rm", "--model", str(model), "--data", str(PAIRS), "--out", str(rm), "--max-steps", "2",
                 "--progress", "false"]) == 0
    out = tmp_path / "online"
    summary = dpo(out, "--policy", model, "--rounds", 2, "--prompts", SAMPLES / "prompts.jsonl",
                  "--rank-by", f"rm:{rm}", "--round-prompts", 6, "--k", 2, "--max-new-tokens", 6, "--max-steps", 2)
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["steps"] == 4
    info = json.loads((out / "round-2" / "round.json").read_text())
    assert info["prompts"] == 6 and info["pairs"] >= 1
    assert len((out / "round-2" / "samples.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("args,message", [
    (["--data", PAIRS], "give --policy"),
    (["--policy", "MODEL"], "give --data"),
    (["--policy", "MODEL", "--data", PAIRS, "--rounds", "2"], "give --prompts"),
    (["--policy", "MODEL", "--data", SAMPLES / "sft_messages.jsonl"], "looks like"),
    (["--policy", "MODEL", "--data", PAIRS, "--loss", "kto"], "--loss: 'kto' is not one of"),
    (["--policy", "/no/such/model", "--data", PAIRS], "--policy /no/such/model: no such directory"),
    (["--policy", "MODEL", "--data", PAIRS, "--rounds", "2", "--prompts", SAMPLES / "prompts.jsonl",
      "--rank-by", "rm:/no/such/rm"], "--rank-by /no/such/rm: no such directory"),
    (["--policy", "MODEL", "--data", PAIRS, "--rounds", "2", "--prompts", SAMPLES / "prompts.jsonl",
      "--rank-by", "rm:MODEL"], "not a reward model (no score_head.safetensors"),
    (["--policy", "MODEL", "--data", PAIRS, "--rounds", "2", "--prompts", SAMPLES / "prompts.jsonl",
      "--round-prompts", "0"], "--round-prompts: must be at least 1"),
    (["--policy", "MODEL", "--data", PAIRS, "--rounds", "2", "--prompts", SAMPLES / "prompts.jsonl"],
     "without a toy-world meta.family"),
    (["--policy", "MODEL", "--data", PAIRS, "--rounds", "2", "--prompts", SAMPLES / "prompts.jsonl",
      "--rank-by", "annotators"], "--rank-by annotators ranks answers with the toy world's judge"),
    (["--policy", "MODEL", "--data", PAIRS, "--rank-by", "people"], "--rank-by 'people': expected 'judge', 'annotators', 'rm:DIR'"),
])
def test_bad_input_exits_2_and_writes_nothing(args, message, tiny_model, tmp_path, cli):
    args = [a.replace("MODEL", str(tiny_model("llama"))) if isinstance(a, str) else a for a in args]
    out = tmp_path / "out"
    result = cli("dpo", *args, "--out", out)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_reference_is_computed_only_for_the_pairs_training_visits(tiny_model, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "few"
    summary = dpo(out, "--policy", tiny_model("llama"), "--max-steps", 2)
    cached = load_file(str(out / "ref_logps_round1.safetensors"))["chosen"]
    assert int(cached.isfinite().sum()) == summary["train_pairs"] == 2 * 4


def test_grad_accum_logs_the_whole_step(tiny_model, tmp_path):
    """--batch-size 2 --grad-accum 2 logs what --batch-size 4 does (it logged the last micro-batch)."""
    logged = {}
    for name, extra in (("one", []), ("two", ["--batch-size", 2, "--grad-accum", 2])):   # dpo(): batch 4
        dpo(tmp_path / name, "--policy", tiny_model("llama"), "--max-steps", 1, "--group-by-length", "false", *extra)
        logged[name] = read_metrics(tmp_path / name / "metrics.jsonl")[0]
    for key in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen"):
        assert logged["two"][key] == pytest.approx(logged["one"][key], abs=1e-4), key



def test_online_rounds_are_reused_only_as_made(tiny_model, tmp_path, capsys):
    """A failed round leaves no pairs behind; a resumed run reuses a round's files only when its
    sampling options are the ones they were made with; a fresh start samples anew."""
    from rlhflab.world import tasks

    out, prompts = tmp_path / "online", tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in tasks.make_prompts("train", 4, seed=0)))

    def run(*extra):
        return main(["dpo", "--policy", str(tiny_model("llama")), "--data", str(PAIRS), "--out", str(out),
                     "--rounds", "2", "--prompts", str(prompts), "--round-prompts", "4",
                     "--k", "2", "--max-new-tokens", "6", "--max-steps", "1", "--rank-by", "judge",
                     "--progress", "false", *extra])

    assert run("--temperature", "0") == 2             # greedy: two identical answers per prompt
    assert "every prompt's samples tied" in capsys.readouterr().err
    assert not (out / "round-2" / "pairs.jsonl").exists()
    assert run("--save-every", "1") == 0
    whole = json.loads((out / "summary.json").read_text())
    made = json.loads((out / "round-2" / "round.json").read_text())
    assert made["options"]["temperature"] == 1.0 and made["options"]["rank_by"] == "judge"

    def resume_in_round_one(*extra):   # from the checkpoint before round 2 sampled
        for later in (out / "checkpoints").glob("step-[2-9]*"):
            shutil.rmtree(later)
        (out / "summary.json").unlink()
        capsys.readouterr()
        assert run("--save-every", "1", "--resume", "auto", *extra) == 0
        return capsys.readouterr().err

    assert "sampling" not in resume_in_round_one()     # the same options: round 2's files are reused
    resumed = json.loads((out / "summary.json").read_text())   # and the summary covers the whole run
    assert [r["round"] for r in resumed["rounds"]] == [1, 2] and resumed["train_pairs"] == whole["train_pairs"]
    assert "round 2's samples were made with other --rank-by; sampling again" in resume_in_round_one(
        "--rank-by", "annotators")
    assert json.loads((out / "round-2" / "round.json").read_text())["options"]["rank_by"] == "annotators"
    assert run("--rank-by", "annotators", "--resume", "never") == 0 and "sampling" in capsys.readouterr().err   # fresh: anew
