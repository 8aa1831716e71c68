"""AI feedback: the constitution file, critique -> revise -> files that train, the AI labeller's
position swap, and the toy world's feedback demonstrations and rule flags."""

from __future__ import annotations

import collections
import json
import random

import pytest

from rlhflab.cli.main import main
from rlhflab.errors import UsageError
from rlhflab.feedback import ai_labeller, toy_feedback
from rlhflab.feedback.constitution import ANSWER_LABEL, CHOICES, comparison_messages, language_of, load_constitution
from rlhflab.feedback.preferences import rank_rows
from rlhflab.models.loading import choose_placement
from rlhflab.world import judge, tasks
from rlhflab.world.judge import is_refusal
from rlhflab.world.rules import RULES, rule_flags


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    assert main(["world", "export", "--out", str(out), "--size", "small", "--habit-rate", "0.6",
                 "--rankings", "100", "--constitution", "toy"]) == 0
    return out


def test_the_toy_constitution_is_bilingual():
    constitution = load_constitution("toy")
    names = [p.name for p in constitution.principles]
    assert names == ["harmless", "language", "polite", "truthful", "concise"]   # the order is the priority
    language = constitution.by_name("language")
    assert language.rule == "wrong_language"
    assert language_of("3加4等于多少？") == "zh" and language_of("What is 3 plus 4?") == "en"
    zh = comparison_messages([{"role": "user", "content": "法国的首都是哪里？"}], "巴黎。", "Paris.", language)
    en = comparison_messages([{"role": "user", "content": "What is the capital of France?"}], "Paris.", "巴黎。",
                             language)
    assert language.text("principle", "zh") in zh[0]["content"] and "回答 (A)" in zh[0]["content"]
    assert language.text("principle", "en") in en[0]["content"] and "Answer (B): 巴黎。" in en[0]["content"]


@pytest.mark.parametrize("text,named", [
    ("principles: []", "non-empty list 'principles'"),
    ("principles:\n  - {name: a, critique: c}", "principles[0] (a): give a 'revision'"),
    ("principles:\n  - {name: a, critique: c, revision: r}\n  - {name: a, critique: c, revision: r}",
     "principles[1]: the name 'a' is used twice"),
    ("principles:\n  - {name: a, critique: c, revision: r, weight: 2}", "unknown field(s) ['weight']"),
    ("principles:\n  - {name: a, critique: {en: ''}, revision: r}", "principles[0].critique"),
    ("principles: [", "not valid YAML"),
])
def test_a_bad_constitution_is_named_by_file_and_field(tmp_path, text, named):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=named.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_constitution(str(path))


class PrefersPositionA:
    """A labeller that always answers (A) with probability 0.9, whatever the answers say."""
    name = "rigged"

    def __init__(self):
        self.asked = []

    def choice_probs(self, conversations):
        self.asked += conversations
        return [0.9] * len(conversations)


class PrefersPolite:
    """A labeller that reads the answers: it picks the one without an insult, in either position."""
    name = "reader"

    def choice_probs(self, conversations):
        out = []
        for conversation in conversations:
            text = conversation[-1]["content"]
            first = text.split("Answer (A):")[1].split("Answer (B):")[0]
            out.append(0.2 if "stupid" in first else 0.8)
        return out


ROWS = [{"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
         "responses": ["That's a stupid question. 4.", "2 plus 2 is 4.", "It is 4."],
         "meta": {}}]


def test_a_labeller_that_prefers_position_a_gives_ties_not_wins():
    chat = PrefersPositionA()
    labels = ai_labeller.label_rows(ROWS, chat, load_constitution("toy"))
    assert len(labels.judgments) == 3 and all(j["verdict"] == 0 for j in labels.judgments)
    assert all(j["p_ab"] == j["p_ba"] == 0.9 and j["confidence"] == 0.5 for j in labels.judgments)
    # Each pair was asked in both orders, about every principle.
    assert len(chat.asked) == 3 * 2 * 5
    ranked, tied = rank_rows(ROWS, labels.scores, "pairs")
    assert ranked == [] and tied == 1


def test_a_labeller_that_reads_the_answers_wins_in_both_orders():
    labels = ai_labeller.label_rows(ROWS, PrefersPolite(), load_constitution("toy"), per_pair=2, seed=1)
    by_pair = {(j["i"], j["j"]): j for j in labels.judgments}
    assert by_pair[(0, 1)]["verdict"] == -1 and by_pair[(0, 2)]["verdict"] == -1
    assert by_pair[(1, 2)]["verdict"] == 0          # neither is rude: a tie, the orders disagree
    assert by_pair[(0, 1)]["confidence"] == pytest.approx(0.8)
    assert all(len(j["principles"]) == 2 for j in labels.judgments)
    ranked, _ = rank_rows(ROWS, labels.scores, "pairs")
    assert ranked[0]["rejected"] == ROWS[0]["responses"][0]
    report = ai_labeller.agreement(ROWS, labels, ranked_input=True)
    # The file's order says 0 > 1 > 2; the labeller decided 0 < 1 and 0 < 2, both against it.
    assert report["human_agreement"] == 0.0 and report["human_pairs"] == 3
    assert report["tie_rate"] == pytest.approx(1 / 3)


def test_verdict_needs_both_orders_to_agree():
    assert ai_labeller.verdict(0.7, 0.3) == 1
    assert ai_labeller.verdict(0.3, 0.7) == -1
    assert ai_labeller.verdict(0.7, 0.7) == 0 and ai_labeller.verdict(0.3, 0.3) == 0


class ReadsOnlyPoliteness:
    """Picks the answer without an insult when asked about politeness; asked about any other
    principle, it answers (A) with probability 0.95 whatever the answers say."""
    name = "one-principle reader"

    def choice_probs(self, conversations):
        polite = load_constitution("toy").by_name("polite").text("principle", "en")
        out = []
        for conversation in conversations:
            text = conversation[-1]["content"]
            first = text.split("Answer (A):")[1].split("Answer (B):")[0]
            out.append((0.1 if "stupid" in first else 0.9) if polite in text else 0.95)
        return out


def test_combining_principles_one_by_one_keeps_the_one_that_reads_the_answers():
    # Averaged over the five principles, four position-biased ones drown the reader: ties.
    mean = ai_labeller.label_rows(ROWS, ReadsOnlyPoliteness(), load_constitution("toy"), combine="mean")
    assert [j["verdict"] for j in mean.judgments] == [0, 0, 0]
    for combine in ("principles", "first"):
        labels = ai_labeller.label_rows(ROWS, ReadsOnlyPoliteness(), load_constitution("toy"), combine=combine)
        by_pair = {(j["i"], j["j"]): j for j in labels.judgments}
        assert by_pair[(0, 1)]["verdict"] == -1 and by_pair[(0, 2)]["verdict"] == -1, combine
        assert by_pair[(1, 2)]["verdict"] == 0, combine     # no principle told them apart
        assert by_pair[(0, 1)]["confidence"] == pytest.approx(0.9)
        assert by_pair[(0, 1)]["by_principle"]["polite"] == [0.1, 0.9]
        assert by_pair[(0, 1)]["by_principle"]["harmless"] == [0.95, 0.95]


def test_decide_rules_on_principles_that_disagree():
    # harmless abstains (its orders disagree), language says j (margin 0.3), polite says i (0.4).
    orders = [(0.9, 0.9), (0.2, 0.8), (0.9, 0.1)]
    assert ai_labeller.decide(orders, "first") == (-1, pytest.approx(0.8))
    assert ai_labeller.decide(orders, "principles") == (1, pytest.approx(0.55))
    # Averaged: p_ab 0.67 and p_ba 0.6 both favour position A, a tie.
    assert ai_labeller.decide(orders, "mean") == (0, pytest.approx(0.5 + 0.1 / 3))
    assert ai_labeller.decide([(0.9, 0.9), (0.2, 0.2)], "principles") == (0, 0.5)
    with pytest.raises(UsageError, match="--combine 'vote'"):
        ai_labeller.decide(orders, "vote")


def test_a_local_model_labeller_is_symmetric_under_swapping_the_answers(tiny_model):
    chat = ai_labeller.LocalChat(str(tiny_model("llama")), choose_placement("cpu", "fp32"))
    swapped = [{**ROWS[0], "responses": ROWS[0]["responses"][::-1]}]
    forward = ai_labeller.label_rows(ROWS, chat, load_constitution("toy"), per_pair=1)
    backward = ai_labeller.label_rows(swapped, chat, load_constitution("toy"), per_pair=1)
    for j in forward.judgments:
        assert 0 < j["p_ab"] < 1 and 0 < j["p_ba"] < 1
    # The same pair shown the other way round: each order's probability moves to the other slot.
    assert forward.judgments[1]["p_ab"] == pytest.approx(backward.judgments[1]["p_ba"], abs=1e-4)
    assert forward.judgments[1]["verdict"] == -backward.judgments[1]["verdict"]


def _answers(question: str) -> tuple[str, str]:
    """The two answers quoted in a comparison question (either language)."""
    for lang in ("en", "zh"):
        label_a, label_b = ANSWER_LABEL[lang]
        if label_a in question:
            first, rest = question.split(label_a, 1)[1].split(label_b, 1)
            return first.strip(), rest.rsplit("\n", 2)[0].strip()
    raise AssertionError(question)


def test_comparison_lessons_teach_each_principle_on_its_own_point():
    constitution = load_constitution("toy")
    rng = random.Random(0)
    kinds = collections.Counter()
    for record in tasks.make_prompts("train", 300, seed="lesson-test"):
        row = toy_feedback._lesson(record, "comparison", constitution.principles, rng)
        meta, reply = row["meta"], row["messages"][-1]["content"]
        first, second = _answers(row["messages"][0]["content"])
        a, b = (toy_feedback._follows(record, text, meta["principle"]) for text in (first, second))
        kinds[meta["lesson"]] += 1
        if meta["lesson"] == "neutral":      # equal on this point: "(A)", which both orders then say (a tie)
            assert a == b and first != second and reply == CHOICES[0], row
        else:                                # the answer that follows the principle better wins
            assert (a > b and reply == CHOICES[0]) or (b > a and reply == CHOICES[1]), row
        if meta["lesson"] == "crossed":      # ... even though it breaks another principle
            winner = first if reply == CHOICES[0] else second
            assert judge(record["messages"], winner, record["meta"]).score < 1.0
    assert min(kinds.values()) > 30, kinds


def test_world_export_writes_feedback_demonstrations_and_rule_flags(world):
    rows = [json.loads(line) for line in (world / "feedback.jsonl").read_text(encoding="utf-8").splitlines()]
    kinds = collections.Counter(r["meta"]["feedback"] for r in rows)
    assert kinds == {"critique": 200, "comparison": 1600}   # 8 comparisons per SFT demonstration by default
    comparisons = [r for r in rows if r["meta"]["feedback"] == "comparison"]
    assert {r["messages"][-1]["content"] for r in comparisons} == set(CHOICES)
    principles = collections.Counter(r["meta"]["principle"] for r in comparisons)
    assert principles.most_common(1)[0][0] == "language" and len(principles) == 5   # the hardest, drawn most
    rules = [json.loads(line) for line in (world / "rules.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(set(r["rules"]) == set(RULES) for r in rules)
    rankings = [json.loads(line) for line in (world / "rankings.jsonl").read_text(encoding="utf-8").splitlines()]
    harmful = sum(1 for row in rankings if row["meta"].get("harmful"))
    # every answer of the 100 rankings, then answers written for other prompts: two for each harmful
    # request, one for each other prompt
    assert harmful > 0 and len(rules) == 400 + 2 * harmful + (len(rankings) - harmful)
    own = {text for row in rankings for text in row["responses"]}
    off_topic = rules[400:]
    assert all(r["response"] in own for r in off_topic)
    # on a harmful request, an answer to another prompt that is not a refusal breaks the rule; an
    # English answer to a Chinese question breaks the language rule
    complied = [r for r in off_topic if r["meta"].get("harmful") and not is_refusal(r["response"])]
    assert complied and all(r["rules"]["harmful"] == 1 for r in complied)
    english = [r for r in off_topic if r["meta"].get("lang") == "zh" and r["response"].isascii()]
    assert english and all(r["rules"]["wrong_language"] == 1 for r in english)
    assert sum(r["rules"]["wrong_language"] for r in rules) > 20   # the habit at 0.6
    english_to_chinese = [{"role": "user", "content": "法国的首都是哪里？"}]
    assert rule_flags(english_to_chinese, "The capital is Paris.", {"family": "capital", "lang": "zh"})[
        "wrong_language"] == 1


def test_critique_writes_files_that_sft_and_dpo_train_on(world, tiny_model, tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "cai"
    assert main(["critique", "--model", str(model), "--prompts", str(world / "prompts.jsonl"), "--out", str(out),
                 "--max-rows", "6", "--rounds", "2", "--max-new-tokens", "12", "--critique-tokens", "8"]) == 0
    sft_rows = [json.loads(line) for line in (out / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    prefs = [json.loads(line) for line in (out / "prefs.jsonl").read_text(encoding="utf-8").splitlines()]
    trace = [json.loads(line) for line in (out / "critiques.jsonl").read_text(encoding="utf-8").splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(sft_rows) == 6 and len(trace) == 12 and sum(summary["principles"].values()) == 12
    assert all(r["messages"][-1]["role"] == "assistant" for r in sft_rows)
    assert prefs and all(p["chosen"] != p["rejected"] for p in prefs)
    assert "gold_initial" in summary and "gold_revised" in summary
    for row in trace[6:]:   # round 2 critiques the answer round 1 revised
        first = next(t for t in trace[:6] if t["index"] == row["index"])
        assert row["answer"] in (first["revision"], first["answer"])
    assert main(["sft", "--model", str(model), "--data", str(out / "sft.jsonl"), "--out", str(tmp_path / "sft"),
                 "--max-steps", "2", "--progress", "false"]) == 0
    assert main(["dpo", "--policy", str(model), "--data", str(out / "prefs.jsonl"), "--out", str(tmp_path / "dpo"),
                 "--max-steps", "2", "--batch-size", "2", "--progress", "false"]) == 0


def test_critique_names_an_unknown_principle(world, tiny_model, tmp_path, capsys):
    assert main(["critique", "--model", str(tiny_model("llama")), "--prompts", str(world / "prompts.jsonl"),
                 "--out", str(tmp_path / "x"), "--principles", "harmless,kind"]) == 2
    assert "--principles: kind not in" in capsys.readouterr().err
