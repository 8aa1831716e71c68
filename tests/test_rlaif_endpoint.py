"""The AI labeller and `critique` against an OpenAI-compatible endpoint: `rlhflab serve`'s app on
127.0.0.1, driven through the official `openai` client."""

from __future__ import annotations

import pytest
from test_serve import Scripted, serving

from rlhflab.data.template import IM_END
from rlhflab.errors import UsageError
from rlhflab.feedback import ai_labeller
from rlhflab.feedback.constitution import load_constitution
from rlhflab.feedback.critique import CritiqueConfig, revise
from rlhflab.infer.server import ServedModels
from rlhflab.models.loading import load_tokenizer

ROWS = [{"prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
         "responses": ["2 plus 2 is 4.", "That's a stupid question. 4.", "4."], "meta": {}}]


@pytest.fixture(scope="module")
def always_a(tiny_model):
    """A served model that answers "(A)" to anything."""
    tokenizer = load_tokenizer(str(tiny_model("llama")))
    script = tokenizer("(A)", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(IM_END)]
    with serving(ServedModels(Scripted(script, len(tokenizer)), tokenizer, "always-a", {})) as (url, _):
        yield url


def test_an_endpoint_that_always_answers_a_gives_ties_not_wins(always_a):
    chat = ai_labeller.chat_backend(f"openai:{always_a}/v1", placement=None)
    assert chat.model == "always-a"   # the endpoint's own model list names it
    labels = ai_labeller.label_rows(ROWS, chat, load_constitution("toy"), per_pair=1)
    # `rlhflab serve` returns no log-probs: the reply decides, (A) in both orders.
    assert [(j["p_ab"], j["p_ba"], j["verdict"]) for j in labels.judgments] == [(1.0, 1.0, 0)] * 3
    assert labels.scores == [[1.0, 1.0, 1.0]]


def test_critique_runs_against_an_endpoint(always_a):
    chat = ai_labeller.chat_backend(f"openai:{always_a}/v1#always-a", placement=None)
    config = CritiqueConfig(model="openai", prompts="-", out="-", max_new_tokens=8, critique_tokens=8)
    first, final, trace = revise(chat, [ROWS[0]["prompt"]], load_constitution("toy").principles, 2, config)
    assert first == ["(A)"] and final == ["(A)"]
    assert [t["critique"] for t in trace] == ["(A)", "(A)"] and [t["round"] for t in trace] == [1, 2]


def test_an_unreachable_endpoint_is_a_named_error():
    with pytest.raises(UsageError, match="cannot list the endpoint's models"):
        ai_labeller.chat_backend("openai:http://127.0.0.1:9/v1", placement=None)
