"""rlhflab's outputs and inputs as the Hugging Face ecosystem has them: saved policies that stop
under `model.generate`, reward-model directories that load as a working sequence classifier or
not at all, chat templates with assistant masks, public datasets in their published layouts,
adapters that find their base after a move, and commands that say what they did."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SAMPLES
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhflab import memory
from rlhflab.cli.main import build_parser, main
from rlhflab.config import SFTConfig
from rlhflab.data.formats import load_records
from rlhflab.data.template import IM_END, encode_chat, render
from rlhflab.infer.chat import resolve_model
from rlhflab.models.loading import adapter_base, choose_placement, load_causal_lm
from rlhflab.rewards.model import load_reward_model, score_texts
from rlhflab.train import skeleton


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


QUIET = ["--progress", "false", "--device", "cpu"]


# ---------------------------------------------------------------------------------------------
# 1. generation_config.json names the end of turn.


def test_hf_generate_on_a_saved_sft_model_stops_at_the_end_of_turn(tiny_model, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}] * 8
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(tiny_model("llama")), "--data", str(write_jsonl(tmp_path / "d.jsonl", rows)),
                 "--out", str(out), "--max-steps", "40", "--lr", "1e-2", "--eval-fraction", "0", *QUIET]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert im_end in (eos if isinstance(eos, list) else [eos])

    model = AutoModelForCausalLM.from_pretrained(out)   # as a user of transformers loads it
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=40, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert tokenizer.decode(generated) == "ok" + IM_END   # the answer, its end of turn, and nothing after


# ---------------------------------------------------------------------------------------------
# 2. The reward-model directory as AutoModelForSequenceClassification.

CONVERSATIONS = [[{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": answer}]
                 for answer in ("5", "It is 6.", "")]


def assert_classifier_scores_as_rlhflab(out: Path) -> None:
    reward, tokenizer = load_reward_model(str(out), choose_placement("cpu", "fp32"))
    ours = score_texts(reward, tokenizer, CONVERSATIONS)
    classifier = AutoModelForSequenceClassification.from_pretrained(out)   # as TRL loads a reward model
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [hf_tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    batch = hf_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        theirs = classifier(**batch).logits[:, 0].tolist()
    assert len(set(round(s, 4) for s in ours)) == 3   # three different scores: a real comparison
    assert theirs == pytest.approx(ours, abs=1e-4)
    assert json.loads((out / "reward_config.json").read_text())["sequence_classifier"] is True


def test_a_full_reward_model_directory_is_a_working_sequence_classifier(tiny_model, tmp_path, capfd):
    out = tmp_path / "rm"
    assert main(["rm", "--model", str(tiny_model("qwen2")), "--data", str(SAMPLES / "pairs.jsonl"), "--out", str(out),
                 "--max-steps", "3", "--lr", "5e-3", *QUIET]) == 0
    assert_classifier_scores_as_rlhflab(out)
    # rlhflab reading it back says nothing about the classifier's head it does not use
    capfd.readouterr()
    load_reward_model(str(out), choose_placement("cpu", "fp32"))
    printed = capfd.readouterr()
    assert "UNEXPECTED" not in printed.err + printed.out


def test_a_lora_reward_model_directory_refuses_to_load_as_a_sequence_classifier(sft_and_rm, tmp_path):
    _, rm = sft_and_rm
    with pytest.raises((ValueError, KeyError, OSError)) as caught:
        AutoModelForSequenceClassification.from_pretrained(rm)
    assert "rlhflab" in str(caught.value)   # the message names what the directory is
    reward, tokenizer = load_reward_model(str(rm), choose_placement("cpu", "fp32"))   # rlhflab still loads it
    assert len(score_texts(reward, tokenizer, CONVERSATIONS)) == 3
    # Merged into its base, it is a full reward model: a working classifier again.
    assert main(["merge", "--adapter", str(rm), "--out", str(tmp_path / "merged")]) == 0
    assert_classifier_scores_as_rlhflab(tmp_path / "merged")


# ---------------------------------------------------------------------------------------------
# 3. Assistant masks from the chat template.


def test_the_chat_template_marks_assistant_tokens_as_rlhflabs_labels_do(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and 2+2?"},
                {"role": "assistant", "content": "4"}]
    out = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "hello" + IM_END + "4" + IM_END
    ours = encode_chat(tokenizer, messages, 512)
    assert ours.input_ids == out["input_ids"]
    assert [label != -100 for label in ours.labels] == [bool(m) for m in out["assistant_masks"]]


# ---------------------------------------------------------------------------------------------
# 4. Public datasets in their published layouts.

HH = [{"chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?"
                 "\n\nAssistant: Rome.",
       "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.\n\nHuman: And of Italy?"
                   "\n\nAssistant: I would rather not say."}] * 4
RM_STATIC = [{"prompt": "\n\nHuman: Name a colour.\n\nAssistant:", "response": " Blue.", "chosen": " Blue.",
              "rejected": " A dog."}] * 4
ULTRAFEEDBACK = [{"prompt": "Say hello.", "prompt_id": "0" * 64,
                  "chosen": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
                  "rejected": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "No."}],
                  "messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}],
                  "score_chosen": 8.0, "score_rejected": 3.0}] * 4
TRL_CONVERSATIONAL = [{"prompt": [{"role": "user", "content": "What color is the sky?"}],
                       "completion": [{"role": "assistant", "content": "It is blue."}]}] * 4
MAPPED = [{"question": "Name a colour.", "good": "Blue.", "bad": "A dog.", "id": 1}] * 4


def rendered(tokenizer, record, answer: int | None = 0) -> str:
    messages = record.messages + ([{"role": "assistant", "content": record.responses[answer]}]
                                  if answer is not None else [])
    return render(tokenizer, messages)


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)


@pytest.mark.parametrize("layout, rows, columns, chosen, rejected", [
    ("hh-rlhf", HH, None,
     chatml(("user", "What is the capital of France?"), ("assistant", "Paris."), ("user", "And of Italy?"),
            ("assistant", "Rome.")), "I would rather not say."),
    ("rm-static", RM_STATIC, None, chatml(("user", "Name a colour."), ("assistant", "Blue.")), "A dog."),
    ("ultrafeedback-binarized", ULTRAFEEDBACK, None, chatml(("user", "Say hello."), ("assistant", "Hello!")), "No."),
    ("mapped columns", MAPPED, "prompt=question,chosen=good,rejected=bad",
     chatml(("user", "Name a colour."), ("assistant", "Blue.")), "A dog."),
])
def test_public_preference_layouts_load_with_no_option_and_train(layout, rows, columns, chosen, rejected,
                                                                  tiny_model, tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    records, _ = load_records(str(data), "preference", columns=columns)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert rendered(tokenizer, records[0]) == chosen
    assert records[0].responses[1] == rejected
    out = tmp_path / "rm"
    extra = ["--columns", columns] if columns else []
    assert main(["rm", "--model", str(tiny_model("llama")), "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", *extra, *QUIET]) == 0
    assert json.loads((out / "summary.json").read_text())["rows_used"] == 4


def test_trl_conversational_prompt_completion_trains_sft(tiny_model, tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", TRL_CONVERSATIONAL)
    records, _ = load_records(str(data), "sft")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert rendered(tokenizer, records[0], None) == chatml(("user", "What color is the sky?"),
                                                           ("assistant", "It is blue."))
    out = tmp_path / "sft"
    assert main(["sft", "--model", str(tiny_model("llama")), "--data", str(data), "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", *QUIET]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


# ---------------------------------------------------------------------------------------------
# 5. An adapter's base, as the user named it, found again after the run moves.


def test_an_adapter_records_its_base_as_given_and_finds_it_after_the_run_moves(tiny_model, tmp_path, monkeypatch):
    shutil.copytree(tiny_model("llama"), tmp_path / "run" / "base")
    monkeypatch.chdir(tmp_path)
    assert main(["sft", "--model", "run/base", "--data", str(SAMPLES / "sft_messages.jsonl"), "--out", "run/sft",
                 "--lora", "--lora-r", "2", "--max-steps", "1", *QUIET]) == 0
    config = json.loads(Path("run/sft/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "run/base"
    shutil.move("run", "moved")
    assert Path(adapter_base("moved/sft")).resolve() == (tmp_path / "moved" / "base").resolve()
    model = load_causal_lm("moved/sft", choose_placement("cpu", "fp32"))
    assert model.config.hidden_size == 32


# ---------------------------------------------------------------------------------------------
# 6. What a command says: one line on success, no shared-tensor notice, a readable --help.


def test_sft_with_progress_off_prints_one_summary_line_and_no_shared_tensor_notice(tiny_model, tmp_path, capsys,
                                                                                   caplog):
    out = tmp_path / "sft"
    with caplog.at_level(logging.WARNING):
        assert main(["sft", "--model", str(tiny_model("gpt2")), "--data", str(SAMPLES / "sft_messages.jsonl"),
                     "--out", str(out), "--max-steps", "2", "--save-every", "1", *QUIET]) == 0
    assert (out / "checkpoints").is_dir()   # a checkpoint of a model with tied embeddings was written
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sft: wrote {out} (2 steps, loss ")
    assert "peak RSS" in lines[0]
    assert not [r for r in caplog.records if "Removed shared tensor" in r.getMessage()]


def test_help_shows_real_metavars_defaults_once_and_the_stages_own_options_first():
    text = build_parser("sft", SFTConfig).format_help().split("\n\n", 1)[1]   # the options, after the usage line
    assert not re.search(r"--[a-z-]+ VALUE", text)
    assert re.search(r"--model PATH", text) and re.search(r"--max-steps INT", text) and re.search(r"--lr FLOAT", text)
    assert "(default: the model's)" in text and "(default: None)" not in text
    assert all(action.help.count("(default") <= 1 for action in build_parser("sft", SFTConfig)._actions
               if action.help)
    assert text.index("--init-config") < text.index("--model PATH") < text.index("--lora-r")


# ---------------------------------------------------------------------------------------------
# 7. `rlhflab chat RUN_DIR` picks the best policy by the run's evaluation.


def test_chat_on_a_run_picks_the_policy_its_evaluation_scores_best(tmp_path):
    run = tmp_path / "run"
    for stage in ("sft", "dpo", "ppo"):
        (run / stage).mkdir(parents=True)
        (run / stage / "config.json").write_text("{}")
        (run / stage / "summary.json").write_text("{}")
    (run / "eval").mkdir()
    (run / "eval" / "figures.json").write_text(json.dumps({"models": {
        "sft": {"gold": 0.65}, "dpo": {"gold": 0.70}, "ppo": {"gold": 0.60}, "best-of-8": {"gold": 0.9}}}))
    chosen, message = resolve_model(str(run))
    assert Path(chosen) == run / "dpo"
    assert "gold score" in message and "0.700" in message and "sft 0.650" in message
    (run / "eval" / "figures.json").unlink()   # not evaluated: the fixed order, and it says so
    chosen, message = resolve_model(str(run))
    assert Path(chosen) == run / "ppo" and "no evaluation" in message


# ---------------------------------------------------------------------------------------------
# 8 (memory) and 9. Per-stage peak memory; trackers and metrics from the main process only.


def test_peak_memory_is_counted_from_the_stage_start():
    memory.reset_peak_memory()
    block = bytearray(200 * 2**20)   # 200 MiB, touched
    block[::4096] = b"x" * len(block[::4096])
    high = memory.peak_memory()["peak_rss_mib"]
    del block
    memory.reset_peak_memory()
    low = memory.peak_memory()["peak_rss_mib"]
    assert high - low > 150


class FakeAccelerator:
    def __init__(self, main_process: bool):
        self.is_main_process, self.trackers, self.logged, self.inits = main_process, ["t"], [], []
        self.log_with = ["wandb"]

    def wait_for_everyone(self):
        pass

    def log(self, values, step):
        self.logged.append((step, values))

    def init_trackers(self, project, config=None, init_kwargs=None):
        self.inits.append((project, init_kwargs))


def test_metrics_and_trackers_are_written_by_the_main_process_only(tmp_path):
    for main_process in (True, False):
        accelerator = FakeAccelerator(main_process)
        out = tmp_path / str(main_process)
        config = SFTConfig(report_to="wandb", wandb_project="my-project", run="exp1")
        setup = skeleton.Setup(out, choose_placement("cpu", "fp32"), accelerator, None)
        log = skeleton.start_outputs(setup, config)
        log.log(1, {"loss": 1.0})
        assert (out / "metrics.jsonl").exists() == main_process
        assert len(accelerator.logged) == len(accelerator.inits) == int(main_process)
        if main_process:
            assert accelerator.inits == [("my-project", {"wandb": {"name": "exp1/sft"}})]
    named = SFTConfig(report_to="wandb", wandb_project="p", wandb_name="custom")
    assert skeleton.tracker_names(named) == ("p", "custom")
    assert skeleton.tracker_names(SFTConfig(report_to="wandb", run="exp1")) == ("rlhflab", "exp1/sft")
