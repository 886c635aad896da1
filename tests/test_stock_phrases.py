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
