"""A Hugging Face sequence classifier (what TRL's RewardTrainer and most published reward models
save) as the reward model: `rm score`, `rm audit` and `ppo --reward` read the answer as text with
the classifier's own tokenizer, pooled where the classifier pools."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLES, sample_texts, tiny_config

from rlhflab.cli.main import main


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A GPT-2 sequence classifier with its own tokenizer (another vocabulary than the policy's)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhflab.models.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("seqcls")
    train_tokenizer(sample_texts(), 450, root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))

    def build(labels: int):
        out = root / f"labels-{labels}"
        config = tiny_config("gpt2", tokenizer)
        config.num_labels = labels
        config.architectures = ["GPT2ForSequenceClassification"]
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_config(config).save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        return out

    return build


@pytest.fixture(scope="module")
def other_vocab_rm(classifier, tmp_path_factory):
    """A reward model from `rlhflab rm` on a causal LM whose tokenizer is not the policy's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("other-vocab")
    tokenizer = AutoTokenizer.from_pretrained(str(classifier(1)))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", tokenizer)).save_pretrained(str(root / "lm"))
    tokenizer.save_pretrained(str(root / "lm"))
    assert main(["rm", "--model", str(root / "lm"), "--data", str(SAMPLES / "pairs.jsonl"), "--out", str(root / "rm"),
                 "--max-steps", "3", "--lr", "5e-3", "--progress", "false", "--eval-fraction", "0"]) == 0
    return root / "rm"


def alone_scores(path, conversations) -> list[float]:
    """Each conversation scored on its own (a batch of one: no padding to get wrong)."""
    from transformers import AutoModelForSequenceClassification

    from rlhflab.data.template import encode_chat
    from rlhflab.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([encode_chat(tokenizer, c, 512).input_ids])).logits[0, 0].item()
                for c in conversations]


def test_rm_score_equals_the_classifier_on_each_answer_alone(classifier, tmp_path, cli):
    path = classifier(1)
    out = tmp_path / "scores.jsonl"
    result = cli("rm", "score", "--model", path, "--data", SAMPLES / "pairs.jsonl", "--out", out)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()][:12]
    conversations = [r["prompt"] + [{"role": "assistant", "content": r["response"]}] for r in rows]
    expected = alone_scores(path, conversations)
    assert len(set(round(x, 4) for x in expected)) > 1, "a constant classifier would prove nothing"
    torch.testing.assert_close(torch.tensor([r["score"] for r in rows]), torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_audit_runs_on_a_classifier(classifier, tmp_path, cli):
    result = cli("rm", "audit", "--model", classifier(1), "--reference", SAMPLES / "pairs.jsonl",
                 "--out", tmp_path / "audit.json", "--max-rows", 8)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["prompts"] == 8 and set(report["kinds"]) >= {"empty", "prompt_copy"}


def test_a_classifier_with_two_labels_is_refused(classifier, tmp_path, cli):
    result = cli("rm", "score", "--model", classifier(2), "--data", SAMPLES / "pairs.jsonl",
                 "--out", tmp_path / "s.jsonl")
    assert result.returncode == 2 and "2 labels" in result.stderr, result.stderr
    assert not (tmp_path / "s.jsonl").exists()


def rm_scores(path, conversations) -> list[float]:
    from rlhflab.models.loading import choose_placement
    from rlhflab.rewards.model import load_reward_model, score_texts

    return score_texts(*load_reward_model(str(path), choose_placement("cpu", "fp32")), conversations)


@pytest.mark.parametrize("mode,reward", [("--lora", "classifier"), ("--no-lora", "classifier"),
                                         ("--lora", "other vocabulary"), ("--no-lora", "other vocabulary")])
def test_ppo_scores_the_answer_text_when_the_reward_model_reads_other_tokens(mode, reward, classifier, other_vocab_rm,
                                                                              sft_and_rm, tmp_path):
    """The policy's tokenizer is not the reward model's: every probe's logged reward must be the
    reward model's score of that prompt and answer, read as text with its own tokenizer."""
    sft, _ = sft_and_rm
    path, out = (classifier(1) if reward == "classifier" else other_vocab_rm), tmp_path / "ppo"
    code = main(["ppo", "--policy", str(sft), "--reward", str(path), "--prompts", str(SAMPLES / "prompts.jsonl"),
                 "--out", str(out), "--max-new-tokens", "8", "--rollout-prompts", "4", "--mini-batch", "4",
                 "--max-steps", "2", "--probe-every", "1", "--progress", "false", "--judge-rm", str(path), mode])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the same classifier as --judge-rm: the monitors' gold signal is the mean raw reward
    assert all(abs(r["gold"] - r["reward"]) < 1e-4 for r in logged if "reward" in r), logged
    probes = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    conversations = [[{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]
                     for p in probes]
    expected = alone_scores(path, conversations) if reward == "classifier" else rm_scores(path, conversations)
    torch.testing.assert_close(torch.tensor([p["reward"] for p in probes]), torch.tensor(expected),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch,lora", [("llama", True), ("gpt2", False)])
def test_rm_export_scores_as_the_reward_model_less_its_bias(arch, lora, tiny_model, tmp_path, cli):
    rm, exported = tmp_path / "rm", tmp_path / "exported"
    assert main(["rm", "--model", str(tiny_model(arch)), "--data", str(SAMPLES / "pairs.jsonl"), "--out", str(rm),
                 "--max-steps", "3", "--lr", "5e-3", "--progress", "false", "--eval-fraction", "0",
                 "--lora" if lora else "--no-lora"]) == 0
    # Bradley-Terry never moves the bias (it cancels in r_chosen - r_rejected): give it one to drop.
    from safetensors.torch import load_file, save_file

    head = load_file(str(rm / "score_head.safetensors"))
    save_file({k: (torch.full_like(t, 0.75) if t.ndim == 1 else t) for k, t in head.items()},
              str(rm / "score_head.safetensors"))
    result = cli("rm", "export", "--model", rm, "--out", exported)
    assert result.returncode == 0, result.stderr
    bias = json.loads((exported / "exported_from.json").read_text())["dropped_bias"]
    assert bias == pytest.approx(0.75)
    scores = {}
    for name, path in (("rm", rm), ("exported", exported)):
        assert cli("rm", "score", "--model", path, "--data", SAMPLES / "pairs.jsonl",
                   "--out", tmp_path / f"{name}.jsonl").returncode == 0
        scores[name] = torch.tensor([json.loads(line)["score"] for line in
                                     (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()])
    torch.testing.assert_close(scores["exported"], scores["rm"] - bias, rtol=1e-4, atol=1e-4)
    again = cli("rm", "export", "--model", exported, "--out", tmp_path / "twice")
    assert again.returncode == 2 and "already" in again.stderr and not (tmp_path / "twice").exists()


def test_rm_export_never_overwrites_its_source_or_other_files(tiny_model, tmp_path, cli):
    rm = tmp_path / "rm"
    assert main(["rm", "--model", str(tiny_model("llama")), "--data", str(SAMPLES / "pairs.jsonl"), "--out", str(rm),
                 "--max-steps", "1", "--progress", "false"]) == 0
    before = sorted(p.name for p in rm.iterdir())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    for out, message in ((rm, "would overwrite"), (rm / "inner", "would overwrite"),
                         (tmp_path / "busy", "other files"), (SAMPLES / "pairs.jsonl", "a file")):
        result = cli("rm", "export", "--model", rm, "--out", out)
        assert result.returncode == 2 and message in result.stderr, (out, result.stderr)
        assert "Loading weights" not in result.stderr, "checked before any work"
    assert sorted(p.name for p in rm.iterdir()) == before and (tmp_path / "busy" / "keep.txt").exists()
    assert cli("rm", "export", "--model", rm, "--out", tmp_path / "x").returncode == 0
    assert cli("rm", "export", "--model", rm, "--out", tmp_path / "x").returncode == 0, "its own output: replaced"


def test_chat_refuses_a_classifier(classifier, cli):
    result = cli("chat", classifier(1))
    assert result.returncode == 2 and "is a reward model" in result.stderr, result.stderr
