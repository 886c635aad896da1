"""Scripted words for stand-in models: what the real models cost, with a conversation that stays readable.

A stand-in (pipelines/standins.py) has the published shape and random weights: every matmul costs what the real
model's does, but its words mean nothing. So a session with a script (`script` events: mic time, duration, text)
is replayed teacher-forced: the ASR runs its encoder and one decoder step per token of the words the script says
the utterance holds (`Script.words`), and the LLM its prefill and one forward per token of a scripted reply
(`ScriptedReply`). The end-of-turn verdict cannot come from random weights either (it would end turns at
random): the stand-in LLM still reads the user's words (its cost is counted) and the offline reply model, the
default configuration's own detector, gives the verdict, so both configurations end the same turns the same way
and what differs between them is the compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pipelines.vad import Utterance

# Two-sentence replies of a typical spoken length (12-22 words; the fetched configuration asks for one or two short
# sentences), no five words in common, so none is refused as a repeat of an earlier one.
REPLIES = (
    "Paris is the capital of France. It sits on the river Seine.",
    "On a clear day the sky looks blue. Sunlight scatters in the air above us.",
    "You are very welcome. Have a lovely evening and take care.",
    "Sure, I can help with that. Which evening works best for you?",
    "Italian food sounds like a great choice. Shall I look for a place near you?",
    "A soft boiled egg takes about six minutes. A hard one needs closer to ten.",
    "That will be fun for both of you. Do you have plans for the weekend yet?",
    "Biscuit would suit a small brown dog. Pepper and Mocha are cute as well.",
    "I will remind you at six o'clock. Say hello to your mother from me.",
    "Happy to help anytime. Goodbye for now!",
    "Good question. Most people find that a short walk clears the mind.",
    "Let me think about that. Tomorrow morning should be dry and mild.",
)


@dataclass(frozen=True)
class ScriptedTurn:
    start_s: float
    end_s: float
    text: str


class Script:
    """The words of a session's scripted turns, by mic time, and a scripted reply for each."""

    def __init__(self, events: Sequence[dict], replies: Sequence[str] = REPLIES):
        self.turns = [ScriptedTurn(float(e["t"]), float(e["t"]) + float(e["duration_s"]), str(e["text"]))
                      for e in events if e.get("type") == "script"]
        self.replies = tuple(replies)
        self._turn_of: dict[str, int] = {}  # words given out -> the index of the scripted turn they end in

    def __bool__(self) -> bool:
        return bool(self.turns)

    def words(self, utterance: Utterance) -> str:
        """The words said between the utterance's start and end: every scripted turn it covers, and of a turn it
        ends inside, the share of its words that its time covers (a pause inside a sentence ends an utterance
        there)."""
        said, last = [], None
        for i, turn in enumerate(self.turns):
            if turn.end_s <= utterance.start_s - 0.05 or turn.start_s >= utterance.end_s:
                continue
            words = turn.text.split()
            if utterance.end_s < turn.end_s - 0.05:  # stopped inside this turn
                share = (utterance.end_s - turn.start_s) / max(turn.end_s - turn.start_s, 1e-6)
                words = words[: max(1, round(len(words) * share))]
            said += words
            last = i
        text = " ".join(said)
        if last is not None:
            self._turn_of[text] = last
        return text

    def reply(self, user_text: str) -> str:
        """The scripted reply to words `words()` gave out: the one for the scripted turn they end in."""
        return self.replies[self._turn_of.get(user_text.strip(), len(self._turn_of)) % len(self.replies)]


class ScriptedReply:
    """A reply stage on a stand-in LLM: its replies are teacher-forced to the script's (`ReplyLLM.stream(forced=)`),
    its end-of-turn verdict is `judge`'s (the offline reply model) after its own network has read the words."""

    def __init__(self, llm, reply: Callable[[str], str], judge):
        self.llm, self.reply, self.judge = llm, reply, judge

    def __getattr__(self, name: str):  # anything else (history, max_history_turns, untrained ...) is the LLM's
        return getattr(self.llm, name)

    @property
    def system_prompt(self) -> str:
        return self.llm.system_prompt

    @system_prompt.setter
    def system_prompt(self, value: str) -> None:
        self.llm.system_prompt = value

    def warmup(self) -> None:
        self.llm.warmup()
        self.judge.warmup()

    def stream(self, user_text: str, avoid: Sequence[str] = (), unlike: Sequence[str] = ()) -> Iterator[str]:
        return self.llm.stream(user_text, avoid, unlike, forced=self.reply(user_text))

    def end_of_turn(self, user_text: str) -> float:
        self.llm.end_of_turn(user_text)  # what reading the words costs the stand-in; its verdict means nothing
        return self.judge.end_of_turn(user_text)

    def prepare_next_turn(self) -> int:
        self.judge.prepare_next_turn()
        return self.llm.prepare_next_turn()

    def commit(self, user_text: str, reply: str) -> None:
        self.llm.commit(user_text, reply)
        self.judge.commit(user_text, reply)

    def reset(self) -> None:
        self.llm.reset()
        self.judge.reset()
