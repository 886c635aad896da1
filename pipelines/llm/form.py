"""What a spoken reply must look like: a sentence or two, no written-text markup, nothing said before.

`reply_problems` names what is wrong with a reply (empty list: fine). The agent keeps a reply with problems
out of the LLM's history, so a small model does not copy its own slip into every later turn, and
`voice-agent bench replies` counts replies that pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_SENTENCES = 2
MAX_WORDS = 40
REPEAT_WORDS = 5  # a run of this many words said in an earlier reply of the conversation is a stock phrase
# and so is a whole sentence of an earlier reply, shorter than that but at least this long ("That's a classic one.";
# "Yes." or "Sure thing!" may come again)
SHORT_SENTENCE_WORDS = 3

_MARKUP = [
    (re.compile(r"(^|\s)[A-Z]\s?:\s"), "dialogue label (A:)"),
    (re.compile(r"(^|\n)\s*\d+[.)]\s|(^|\s)1[.)]\s.*\s2[.)]\s", re.S), "numbered list"),  # not "has 8. It"
    (re.compile(r"[*#_`|<>\[\]{}]"), "markup characters"),
    (re.compile(r"\"[^\"]*\"[^\"]*\""), "quotes in quotes"),
    (re.compile(r"https?://|www\."), "a link"),
]
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def words(text: str) -> list[str]:
    """Lower-case words; a typographic apostrophe is the plain one ("can’t" is "can't")."""
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'").replace("\u2018", "'"))


def word_runs(w: list[str], size: int = REPEAT_WORDS) -> list[tuple[str, ...]]:
    """Every run of `size` consecutive words of `w`, in order."""
    return [tuple(w[i:i + size]) for i in range(len(w) - size + 1)]


def short_sentences(text: str) -> set[tuple[str, ...]]:
    """The words of each sentence of `text` from `SHORT_SENTENCE_WORDS` to `REPEAT_WORDS` - 1 words long (longer
    ones are stock phrases by their runs already)."""
    found = (tuple(words(piece)) for piece in _SENTENCE_END.split(text))
    return {w for w in found if SHORT_SENTENCE_WORDS <= len(w) < REPEAT_WORDS}


def stock_runs(earlier: Sequence[str]) -> set[tuple[str, ...]]:
    """What a reply may not say again, given the earlier replies: every run of `REPEAT_WORDS` words of them, and
    every shorter sentence of them whole, anywhere ("That's a classic one." said once: "That's a classic one, but"
    is that again)."""
    return {run for text in earlier for run in (*word_runs(words(text)), *short_sentences(text))}


def complete_sentences(text: str) -> int:
    """Sentences that have ended (a full stop, question or exclamation mark before a space or the end)."""
    return len(_SENTENCE_END.findall(text.strip()))


def sentences(text: str) -> int:
    """How many sentences `text` holds (a last one without its full stop counts)."""
    text = text.strip()
    if not text:
        return 0
    ends = len(_SENTENCE_END.findall(text))
    return ends + (0 if _SENTENCE_END.search(text[-1:] + " ") else 1)


def reply_problems(reply: str, earlier: list[str] = ()) -> list[str]:
    """What makes `reply` a poor spoken answer, given the replies said before it in the conversation."""
    problems = []
    text = reply.strip()
    if not words(text):
        return ["empty"]
    n = sentences(text)
    if n > MAX_SENTENCES:
        problems.append(f"{n} sentences (at most {MAX_SENTENCES})")
    if len(words(text)) > MAX_WORDS:
        problems.append(f"{len(words(text))} words (at most {MAX_WORDS})")
    problems += [what for pattern, what in _MARKUP if pattern.search(text)]
    own = words(text)
    runs = word_runs(own)
    grams = set(runs)
    if len(grams) < len(runs):
        problems.append("repeats itself")
    for before in earlier:
        w = words(before)
        if w == own:
            problems.append("the same as an earlier reply")
            break
        said = set(word_runs(w))
        if grams & said:
            problems.append("repeats an earlier reply: " + " ".join(sorted(grams & said)[0]))
            break
        again = sorted(s for s in short_sentences(before) if s in set(word_runs(own, len(s))))
        if again:
            problems.append("says an earlier sentence again: " + " ".join(again[0]))
            break
    return problems
