"""What a spoken reply must look like (pipelines/llm/form.py) and how the engine cuts a reply to it."""

from __future__ import annotations

import pytest

from agent.engine import spoken_reply
from pipelines.llm.form import complete_sentences, reply_problems, sentences


@pytest.mark.parametrize("reply, problem", [
    ("The capital of France is Paris.", None),
    ("Sure! Penguins can't fly, but they swim very well.", None),
    ("", "empty"),
    ("A: \"Penguins\" B: \"Pirates\"", "dialogue label"),
    ("1. Boil water. 2. Add the tea.", "numbered list"),
    ("The answer is 8. A spider has 8 legs.", None),
    ("* Boil the water", "markup"),
    ('He said "she said "hi"" to me.', "quotes in quotes"),
    ("One. Two. Three.", "3 sentences"),
    (" ".join(["word"] * 41) + ".", "41 words"),
    ("I'm sorry I couldn't help you. I'm sorry I couldn't help you.", "repeats itself"),
])
def test_reply_problems(reply, problem):
    found = reply_problems(reply)
    assert (not found) if problem is None else any(problem in p for p in found), found


def test_a_stock_phrase_from_an_earlier_reply_is_a_problem():
    earlier = ["I'm sorry for your loss, but as a helpful AI, I can't help."]
    assert any("repeats an earlier reply" in p for p in reply_problems(
        "I'm sorry for your loss, but I can tell you a joke.", earlier))
    assert not reply_problems("Here is a joke about penguins.", earlier)


def test_sentence_counts():
    assert sentences("Hello there. How are you") == 2 and complete_sentences("Hello there. How are you") == 1
    assert sentences("Wait... what?!") == 2 and sentences("") == 0


def test_the_engine_speaks_at_most_max_sentences_and_stops_reading_the_llm():
    read = []

    def deltas():
        for word in "Paris is the capital. It is in France. It has the Eiffel Tower. And more.".split(" "):
            read.append(word)
            yield word + " "

    assert spoken_reply(deltas(), 0, 2) == "Paris is the capital. It is in France."
    assert read[-2:] == ["France.", "It"]  # one word of look-ahead ends a sentence; nothing more was generated
    read.clear()
    assert spoken_reply(deltas(), 0, 0).endswith("And more.")


def test_no_repeated_ngrams_bans_the_token_that_would_complete_one():
    from pipelines.llm.reply import banned_tokens

    reply = [5, 6, 7, 8, 5, 6, 7]
    assert banned_tokens(reply, 4) == [8]  # "5 6 7 8" again is not allowed
    assert banned_tokens(reply, 0) == [] and banned_tokens(reply[:3], 4) == []
    assert banned_tokens([1, 1, 1], 2) == [1]


def test_example_exchanges_are_checked_when_the_config_loads(tmp_path):
    from agent.config import load_config
    from pipelines.errors import ConfigError

    cfg = load_config("default")
    assert len(cfg.llm.examples) >= 2 and all(len(e) == 2 for e in cfg.llm.examples)
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "%s"\n[llm]\nexamples = [["only a question"]]\n' % (
        __import__("agent.config", fromlist=["CONFIG_DIR"]).CONFIG_DIR / "default.toml"))
    with pytest.raises(ConfigError, match="llm.examples"):
        load_config(str(bad))
