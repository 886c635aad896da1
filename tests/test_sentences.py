"""SentenceSplitter (incremental, decided only once the following char is seen) and clean_for_speech."""

import pytest

from pipelines.llm.sentences import SentenceSplitter, clean_for_speech


def split_streamed(text: str, step: int = 1) -> tuple[list[str], list[str]]:
    """Feed `text` in `step`-char deltas: (sentences from push, sentences from flush)."""
    splitter = SentenceSplitter()
    pushed = []
    for i in range(0, len(text), step):
        pushed += splitter.push(text[i : i + step])
    return pushed, splitter.flush()


def split_all(text: str, step: int = 1) -> list[str]:
    pushed, flushed = split_streamed(text, step)
    return pushed + flushed


def test_three_sentences_char_by_char():
    pushed, flushed = split_streamed("Hello! How are you? Fine.")
    assert pushed == ["Hello!", "How are you?"]  # each as soon as the next word starts
    assert flushed == ["Fine."]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 100])
def test_same_sentences_for_any_delta_size(step):
    text = "Dr. Smith paid $3.50 on Jan. 5. Well... I think so! Is it e.g. cheap? Yes. U.S. Army. End"
    assert split_all(text, step) == split_all(text, 1)


@pytest.mark.parametrize(
    "text",
    [
        "It costs $3.50 today.",
        "Pi is 3.14 or so.",
        "Dr. Smith is here.",
        "Mr. and Mrs. Jones came.",
        "Use a fruit, e.g. an apple.",
        "Use a fruit, i.e. an apple.",
        "He moved to the U.S. in May.",
        "Well... I think so.",
        "Hmm… let me see.",
        "J. R. R. Tolkien wrote it.",
    ],
)
def test_one_sentence(text):
    assert split_all(text) == [text]


def test_abbreviation_at_end_of_delta_is_not_a_split():
    splitter = SentenceSplitter()
    assert splitter.push("Ask Dr.") == []
    assert splitter.push(" ") == []  # still undecided: the next visible char decides
    assert splitter.push("Smith. He") == ["Ask Dr. Smith."]
    assert splitter.flush() == ["He"]


def test_terminator_waits_for_next_char():
    splitter = SentenceSplitter()
    assert splitter.push("It is 3.") == []  # could be 3.14
    assert splitter.push("14 now.") == []
    assert splitter.push(" Next") == ["It is 3.14 now."]


def test_ellipsis_at_end_flushes():
    pushed, flushed = split_streamed("Wait...")
    assert pushed == []
    assert flushed == ["Wait..."]


def test_newline_ends_a_sentence_and_list_markers_do_not():
    text = "Here are two:\n1. Paris\n2. Rome\n\nDone."
    assert split_all(text) == ["Here are two:", "1. Paris", "2. Rome", "Done."]


def test_emphasis_after_terminator_stays_with_sentence():
    assert split_all("It is **Paris.** It is big.") == ["It is **Paris.**", "It is big."]


def test_flush_resets_and_empty_input():
    splitter = SentenceSplitter()
    assert splitter.flush() == []
    assert splitter.push("   ") == []
    assert splitter.flush() == []
    assert splitter.push("One. Two") == ["One."]
    assert splitter.flush() == ["Two"]
    assert splitter.flush() == []


@pytest.mark.parametrize(
    "raw, spoken",
    [
        ("This is **bold** and __strong__.", "This is bold and strong."),
        ("An *italic* and _emphasised_ word.", "An italic and emphasised word."),
        ("Run `pip install x` now.", "Run pip install x now."),
        ("# Heading", "Heading"),
        ("### A smaller heading", "A smaller heading"),
        ("- first item", "first item"),
        ("* second item", "second item"),
        ("1. numbered item", "numbered item"),
        ("See [the docs](https://example.com/x) please.", "See the docs please."),
        ("![a cat](cat.png)", "a cat"),
        ("Great job! 🎉😀 Keep going 👍🏽.", "Great job! Keep going."),
        ("I ❤️ Paris ⭐", "I Paris"),
        ("> quoted text", "quoted text"),
        ("~~old~~ new", "old new"),
        ("snake_case_name stays words", "snake case name stays words"),
        ("2 * 3 is 6", "2 times 3 is 6"),
        ("It is 25°C and 3.14 wide.", "It is 25°C and 3.14 wide."),
        ("Line one\nline two", "Line one line two"),
        ("```python\nprint(1)\n```", "print(1)"),
        ("", ""),
    ],
)
def test_clean_for_speech(raw, spoken):
    assert clean_for_speech(raw) == spoken


def test_clean_for_speech_leaves_no_markdown_symbols():
    raw = "## Tips\n- **Drink** water 💧\n- Read [books](http://x.y)\n`code` __done__ #1"
    spoken = clean_for_speech(raw)
    assert not set(spoken) & set("*_`#[]()💧")
    assert spoken.startswith("Tips Drink water Read books code done")


def test_first_clause_of_a_long_first_sentence_goes_early():
    split = SentenceSplitter(first_clause_words=4)
    out = []
    for word in "The sky on a clear day, as you may know, is usually blue. It is, indeed, nice. Done".split(" "):
        out += split.push(word + " ")
    out += split.flush()
    # only the first unit may be a clause; the rest are whole sentences
    assert out == ["The sky on a clear day,", "as you may know, is usually blue.", "It is, indeed, nice.", "Done"]
    short = SentenceSplitter(first_clause_words=4)
    assert short.push("Yes, it is blue. It") == ["Yes, it is blue."]  # too few words before the comma
    assert SentenceSplitter(first_clause_words=2).push("It costs 1,000 dollars") == []  # a digit comma is no break
    assert SentenceSplitter().push("The sky on a clear day, as you know ") == []  # off by default


def test_split_to_fit_keeps_every_word_and_prefers_clause_breaks():
    from pipelines.llm.sentences import split_to_fit

    text = "Well, I think that the answer, which is long, is forty two."
    pieces = split_to_fit(text, 20)
    assert " ".join(pieces) == text and all(len(p) <= 20 for p in pieces), pieces
    assert pieces[1].endswith(",")  # "I think that the answer," breaks at its comma... if it fits
    assert split_to_fit(text, 200) == [text] and split_to_fit(text, 0) == [text]
    assert split_to_fit("Supercalifragilisticexpialidocious word", 12) == ["Supercalifragilisticexpialidocious", "word"]
    assert split_to_fit(text, 11) == [text]  # a cap too small to split for is the caller's to report
