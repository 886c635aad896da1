"""No run of five words of an earlier reply is said again: banned while the reply is decoded (`pipelines.llm.reply.Bans`),
not only kept out of the history after it was heard. On the real offline reply model, with the conversation that
made SmolLM2-135M say "No, no, no, you can't. You can't come out of ..." twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.llm.form import word_runs, words

ROOT = Path(__file__).resolve().parent.parent
SMOLLM = ROOT / "checkpoints" / "smollm2-135m-instruct"
# misheard as the ASR heard them; the third reply copied the first's stock phrase
TURNS = ["Good morning, can you recommend I will come out the ocean?", "Tell me a short joke I'm out penguins.",
         "Thank you very much. Goodbye.", "Tell me another joke.", "Tell me another joke."]

pytestmark = pytest.mark.skipif(not SMOLLM.is_dir(), reason="the offline reply model is not in checkpoints/ "
                                                            "(scripts/bootstrap.sh puts it there)")


def runs(text: str) -> set[tuple[str, ...]]:
    return set(word_runs(words(text)))


def converse(llm, avoid: bool) -> list[str]:
    """The turns as the agent takes them: the earlier replies are avoided (or not); every reply is committed."""
    llm.reset()
    said: list[str] = []
    for text in TURNS:
        reply = "".join(llm.stream(text, avoid=said if avoid else ()))
        llm.commit(text, reply)
        said.append(reply)
    return said


def repeats(replies: list[str]) -> list[tuple[int, tuple[str, ...]]]:
    return [(i, gram) for i, reply in enumerate(replies) for gram in runs(reply)
            if any(gram in runs(before) for before in replies[:i])]


@pytest.fixture(scope="module")
def default_llm():
    from agent.build import build_llm
    from agent.config import load_config

    return build_llm(load_config("default"))


def test_the_conversation_provokes_a_stock_phrase_and_the_ban_stops_it(default_llm):
    free = converse(default_llm, avoid=False)
    assert repeats(free), free  # without the ban the model says an earlier reply's words again
    banned = converse(default_llm, avoid=True)
    assert not repeats(banned), banned
    assert all(words(r) for r in banned), banned  # every turn still got a reply
    assert banned[:2] == free[:2]  # nothing to avoid yet: the same replies


@pytest.mark.parametrize("backend, temperature", [("mlx", 0.0), ("onnx", 0.7)])
def test_the_ban_holds_on_mlx_and_when_sampling(default_llm, backend, temperature):
    from pipelines.llm.reply import ReplyLLM
    from pipelines.ortgraph import Placement

    llm = ReplyLLM(SMOLLM, default_llm.system_prompt, max_history_turns=default_llm.max_history_turns,
                   max_tokens=default_llm.max_tokens, temperature=temperature, seed=0,
                   placement=Placement(backend) if backend == "mlx" else default_llm.placement,
                   ort_cache=ROOT / "checkpoints" / ".ort", examples=default_llm.examples,
                   no_repeat_ngram=default_llm.no_repeat_ngram)
    replies = converse(llm, avoid=True)
    assert not repeats(replies), replies
    assert all(words(r) for r in replies), replies


def test_a_token_that_finishes_an_earlier_run_is_banned_whatever_its_apostrophe(default_llm):
    from pipelines.llm.reply import Bans

    tok = default_llm.tokenizer
    bans = Bans(tok, 0, ["No, no, no, you can't come out."])
    for ending in ("'t", "\u2019t"):
        *reply, token = tok.encode("No no no you can" + ending, add_special_tokens=False)
        logits = np.zeros(len(tok.get_vocab()), np.float32)
        logits[token] = 10.0
        assert bans(reply, logits) == [token], ending  # "... you can't" said again: banned
        other = tok.encode("not", add_special_tokens=False)[0]
        logits[other] = 20.0
        assert bans(reply, logits) == []  # the likeliest token is something else: greedy checks no further
    assert not Bans(tok, 0, []) and Bans(tok, 0, ["one two three four five"]) and Bans(tok, 4, [])


def test_a_reply_said_before_is_not_said_again_another_candidate_is(default_llm):
    """Too short for the five-word ban, "You're welcome." is still the same as an earlier reply: the first piece
    is checked before it is spoken, and the model is asked for a reply that starts otherwise."""
    from agent.engine import checked_reply
    from pipelines.llm.form import reply_problems

    default_llm.reset()
    before = "".join(default_llm.stream("Thanks!"))
    assert reply_problems(before, [before]) == ["the same as an earlier reply"], before
    rejected = []
    reply = "".join(checked_reply(default_llm, "Thanks!", [before], first_clause_words=6, candidates=3,
                                  fallback_reply="", rejected=lambda text, why: rejected.append((text, why))))
    assert rejected == [(before.strip(), ["the same as an earlier reply"])], rejected
    assert reply.strip() and not reply_problems(reply, [before]), reply
    assert words(reply)[0] != words(before)[0]  # it starts otherwise


def test_a_whole_short_sentence_said_before_is_not_said_again(default_llm):
    """"That's a classic one." has four words, too few for the five-word ban, and came back turn after turn, also
    as "That's a classic one, but ...": a whole sentence of an earlier reply from three to four words long is
    banned anywhere, the token that would finish it is not chosen; other words after the same start are, and a
    sentence of one or two words ("Sure.") is not banned."""
    from pipelines.llm.form import reply_problems, short_sentences
    from pipelines.llm.reply import Bans

    tok = default_llm.tokenizer
    earlier = ["Ha! That's a classic one. Why did the penguin cross the ice?"]
    assert short_sentences(earlier[0]) == {("that's", "a", "classic", "one")}
    bans = Bans(tok, 0, earlier)
    assert bans and not Bans(tok, 0, ["Sure."])
    vocab = len(tok.get_vocab())

    def leading(text: str) -> np.ndarray:
        logits = np.zeros(vocab, np.float32)
        logits[tok.encode(text, add_special_tokens=False)[0]] = 10.0
        return logits

    one = tok.encode(" one", add_special_tokens=False)[0]
    for start in ("That's a classic", "Oh, that's a classic"):
        reply = tok.encode(start, add_special_tokens=False)
        assert bans(reply, leading(" one")) == [one], start  # the earlier sentence again, wherever it starts
        assert bans(reply, leading(" joke")) == []  # another word: another sentence
        assert Bans(tok, 0, ["That was a good one."])(reply, leading(" one")) == []  # never said
    assert reply_problems("Oh, that's a classic one!", earlier) == ["says an earlier sentence again: that's a classic one"]
    assert reply_problems("That's a classic one, but a new one.", earlier)[0].startswith("says an earlier sentence")
    assert reply_problems("Sure. That's a classic joke.", earlier) == []
