"""Data layer: every format in both languages, label masks, and bad rows named by file and line."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLES

from rlhflab.data.formats import load_records
from rlhflab.data.template import IGNORE_INDEX, encode_chat
from rlhflab.errors import UsageError


@pytest.mark.parametrize("name,kind,fmt", [
    ("sft_messages.jsonl", "sft", "messages"), ("sft_sharegpt.jsonl", "sft", "sharegpt"),
    ("sft_alpaca.json", "sft", "alpaca"), ("sft_prompt_completion.jsonl", "sft", "prompt_completion"),
    ("hc3_zh.jsonl", "sft", "hc3"), ("pairs.jsonl", "preference", "pairs"),
    ("rankings.jsonl", "preference", "rankings"), ("prompts.jsonl", "prompts", "prompts"),
])
def test_every_sample_format_loads_and_is_detected(name, kind, fmt):
    auto, stats = load_records(str(SAMPLES / name), kind)
    given, _ = load_records(str(SAMPLES / name), kind, fmt=fmt)
    assert len(auto) == len(given) > 0 and stats.rows_skipped == 0
    assert [r.messages for r in auto] == [r.messages for r in given]
    for record in auto:
        assert record.messages and record.messages[-1]["role"] == ("assistant" if kind == "sft" else "user")
        if kind == "preference":
            assert len(record.responses) >= 2


def test_chinese_and_english_round_trip_exactly(tmp_path):
    text = "法国的首都是巴黎。“引号”、emoji 🙂 and English."
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": text},
                                             {"role": "assistant", "content": text}]}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    records, _ = load_records(str(path), "sft")
    assert records[0].messages[0]["content"] == text


def test_parquet_and_json_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "把“苹果”翻译成英文。", "input": "", "output": "apple"}] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    records, _ = load_records(str(tmp_path / "d.parquet"), "sft")
    assert len(records) == 3 and records[0].messages[1]["content"] == "apple"


def test_hc3_answer_choice():
    chatgpt, _ = load_records(str(SAMPLES / "hc3_zh.jsonl"), "sft", hc3_answers="chatgpt")
    both, _ = load_records(str(SAMPLES / "hc3_zh.jsonl"), "sft", hc3_answers="both")
    assert len(both) == 2 * len(chatgpt)


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}', "messages[1].role"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "messages[0].content must be a string"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, line, message):
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(UsageError) as err:
        load_records(str(path), "sft")
    assert f"{path}:2" in str(err.value) and message in str(err.value)
    records, stats = load_records(str(path), "sft", skip_bad_rows=True)
    assert len(records) == 1 and stats.rows_skipped == 1


def test_missing_pair_field_and_empty_dataset(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a"}\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"pairs.jsonl:1.*'rejected'"):
        load_records(str(path), "preference", fmt="pairs")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UsageError, match="no usable rows"):
        load_records(str(empty), "sft")
    with pytest.raises(UsageError, match="not found"):
        load_records(str(tmp_path / "nope.jsonl"), "sft")


def test_wrong_kind_of_data_is_named(tmp_path):
    with pytest.raises(UsageError, match="looks like 'pairs'"):
        load_records(str(SAMPLES / "pairs.jsonl"), "sft")


def test_label_mask_covers_every_assistant_turn_and_its_end_marker(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好!"}, {"role": "user", "content": "12 plus 7?"},
                {"role": "assistant", "content": "19."}]
    encoded = encode_chat(tokenizer, messages, 512)
    trained = tokenizer.decode([t for t, l in zip(encoded.input_ids, encoded.labels) if l != IGNORE_INDEX])
    assert trained == "你好!<|im_end|>19.<|im_end|>"
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(encoded.input_ids, encoded.labels))
    short = encode_chat(tokenizer, messages, 10)
    assert short.truncated and len(short.input_ids) == 10
