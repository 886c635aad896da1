"""Streamed LLM text -> speakable sentences, as early as they are certain.

`SentenceSplitter` decides a boundary only once it has seen what follows the terminator: a dot
followed by a digit is a decimal, one followed by a lowercase word is an abbreviation, "Dr." and
initials never end a sentence, and an ellipsis is a pause, not an end. A newline always ends one
(list items, headings). `clean_for_speech` strips markdown and emoji so TTS never reads symbols.

With `first_clause_words`, the reply's first unit may end at a clause break (`,` `;` `:` or a dash, then a
space) once it has that many words: a long first sentence then starts speaking sooner. Sentences stay the
unit afterwards, for prosody.
"""

from __future__ import annotations

import re

_TERMINATORS = ".!?…"
# what may trail a terminator and still belong to the sentence: quotes, brackets, markdown emphasis
_CLOSERS = "\"'”’)]*_`"
# words that end in a dot but (almost) never end a sentence; compared lowercased, without the last dot
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt vs e.g i.e u.s u.k cf approx dept fig vol"
    " jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_OPENERS = "\"'“‘([*_`"


_CLAUSE_BREAK = re.compile(r"(?:[,;:]|\s[-–—])(?=\s)")


class SentenceSplitter:
    """Incremental: `push` deltas, get finished sentences; `flush` at the end of the reply."""

    def __init__(self, first_clause_words: int = 0) -> None:
        self._buffer = ""
        self.first_clause_words = first_clause_words
        self._first = True  # nothing emitted yet

    def push(self, delta: str) -> list[str]:
        self._buffer += delta
        return self._drain(final=False)

    def flush(self) -> list[str]:
        sentences = self._drain(final=True)
        rest, self._buffer = self._buffer.strip(), ""
        return sentences + ([rest] if rest else [])

    def reset(self) -> None:
        self._buffer = ""
        self._first = True

    def _drain(self, final: bool) -> list[str]:
        sentences = []
        if self._first and self.first_clause_words > 0 and _first_boundary(self._buffer, final) is None:
            end = _first_clause(self._buffer, self.first_clause_words)
            if end is not None:
                sentences.append(self._buffer[:end].strip())
                self._buffer = self._buffer[end:]
        while (end := _first_boundary(self._buffer, final)) is not None:
            sentence, self._buffer = self._buffer[:end].strip(), self._buffer[end:]
            if sentence:
                sentences.append(sentence)
        self._buffer = self._buffer.lstrip()
        self._first = self._first and not sentences
        return sentences


def _first_clause(text: str, min_words: int) -> int | None:
    """End of the first clause of `text` that has at least `min_words` words and is followed by a space."""
    for m in _CLAUSE_BREAK.finditer(text):
        if len(text[: m.start()].split()) >= min_words:
            return m.end()
    return None


def _first_boundary(text: str, final: bool) -> int | None:
    """End index of the first complete sentence in `text`, or None while undecided."""
    n = len(text)
    i = 0
    while i < n:
        char = text[i]
        if char == "\n":
            if text[:i].strip():
                return i + 1
            i += 1
            continue
        if char not in _TERMINATORS:
            i += 1
            continue
        end = i
        while end < n and text[end] in _TERMINATORS:
            end += 1
        while end < n and text[end] in _CLOSERS:
            end += 1
        if end == n:
            return None  # the next char decides; flush takes the rest
        if not text[end].isspace():
            i = end  # 3.14, e.g, U.S.A, "?!x"
            continue
        following = end
        while following < n and text[following] in " \t\r":
            following += 1
        if following == n:
            return end if final else None  # wait for the next visible char
        if text[following] == "\n" or _ends_sentence(text, i, text[i:end], text[following]):
            return end
        i = end
    return None


def _ends_sentence(text: str, start: int, run: str, next_char: str) -> bool:
    if "…" in run or ".." in run:
        return False  # "Well... I think": a pause
    if next_char.islower():
        return False  # "e.g. the", "approx. five"
    if run[0] != ".":
        return True
    word = text[:start].rsplit(None, 1)[-1] if text[:start].strip() else ""
    word = word.lstrip(_OPENERS)
    if word.lower() in _ABBREVIATIONS:
        return False
    if len(word) == 1 and word.isupper():
        return False  # an initial: "J. R. R. Tolkien"
    if re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", word):
        return False  # dotted acronym: "U.S.", "a.k.a."
    if text[:start].strip().isdigit():
        return False  # a list marker: "1. First"
    return True


# --- speech cleanup -----------------------------------------------------------------------------

_EMOJI = re.compile(
    "["
    "\U0001f000-\U0001faff"  # pictographs, emoticons, transport, flags (regional indicators), ...
    "\u2600-\u27bf"  # misc symbols and dingbats
    "\u2b00-\u2bff"  # arrows and stars used as emoji
    "\u2300-\u23ff"  # technical: watch, hourglass...
    "\ufe0e\ufe0f\u200d\u20e3"  # variation selectors, zero-width joiner, keycap
    "\U000e0020-\U000e007f"  # tag sequences (subdivision flags)
    "]+"
)
_CODE_FENCE = re.compile(r"^\s*```[^\n]*$", re.MULTILINE)
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s*", re.MULTILINE)
_BULLET = re.compile(r"^\s*(?:[-*+•]|\d{1,2}[.)])\s+", re.MULTILINE)
_QUOTE = re.compile(r"^\s*>+\s?", re.MULTILINE)
_RULE = re.compile(r"^\s*(?:[-*_]\s*){3,}$", re.MULTILINE)
_BOLD = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_ITALIC_STAR = re.compile(r"\*(?=\S)(.+?)(?<=\S)\*")
_ITALIC_UNDERSCORE = re.compile(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)")
_STRIKE = re.compile(r"~~(.+?)~~")
_INLINE_CODE = re.compile(r"`+([^`]*)`+")
_TIMES = re.compile(r"(?<=\d)\s*\*\s*(?=\d)")
_LEFTOVER = re.compile(r"[*_`#|~]+")


MIN_PIECE_CHARS = 12  # a cap with room for less than a short clause is a deliberate limit, not worth splitting for


def split_to_fit(sentence: str, room: int) -> list[str]:
    """`sentence` in pieces of at most `room` characters, cut after the last clause mark (, ; :) that leaves no
    stub, else between words; a single word longer than `room` stays whole. A room under MIN_PIECE_CHARS: the
    sentence as it is (the caller says that its cap may cut it)."""
    if room < MIN_PIECE_CHARS or len(sentence) <= room:
        return [sentence]
    pieces, piece = [], ""
    for word in sentence.split():
        if piece and len(piece) + 1 + len(word) > room:
            clause = max(piece.rfind(c + " ") for c in ",;:")
            cut = clause + 1 if clause >= room // 2 else len(piece)
            pieces.append(piece[:cut])
            piece = piece[cut:].strip()
        piece = f"{piece} {word}".strip()
    pieces.append(piece)
    return pieces


def clean_for_speech(text: str) -> str:
    """Markdown and emoji out, words in: what TTS should say for `text`, on one line."""
    text = _EMOJI.sub("", text)
    text = _CODE_FENCE.sub("", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _RULE.sub("", text)
    text = _HEADING.sub("", text)
    text = _QUOTE.sub("", text)
    text = _BULLET.sub("", text)
    text = _INLINE_CODE.sub(r"\1", text)
    text = _BOLD.sub(r"\2", text)
    text = _STRIKE.sub(r"\1", text)
    text = _ITALIC_STAR.sub(r"\1", text)
    text = _ITALIC_UNDERSCORE.sub(r"\1", text)
    text = _TIMES.sub(" times ", text)
    text = _LEFTOVER.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([,.;:!?])", r"\1", text)
