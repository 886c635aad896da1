"""The conversation: every turn's user and agent speech as `Segment`s, bounded in memory.

The TTS gets recent segments as context. The window is append-only and trimmed in large steps: it grows
turn by turn up to `max_segments`, then drops its oldest turns down to half of that. So the next turn's
context usually extends the previous one, and the TTS reuses its backbone cache for the shared rows instead
of prefilling the whole context again (a rolling window would share no prefix at all). Note that a trimmed
window is prefilled afresh: dropping rows from the front of a KV cache would leave the kept rows' keys and
values computed with the dropped rows visible, which is not what a prompt without them gives.
The LLM keeps its own bounded text history. Old turns keep their text but drop their audio, so memory stays
flat over hundreds of turns (the session bundle on disk has everything).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.messages import Segment


@dataclass
class Turn:
    index: int
    transcript: str
    reply: str = ""  # what the agent actually said (truncated on barge-in)
    user: Segment | None = None
    agent: Segment | None = None
    interrupted: bool = False
    waterfall: dict[str, float] = field(default_factory=dict)  # stage -> ms after the end of user speech
    context_turns: list[int] = field(default_factory=list)  # the turns whose segments the TTS got


class Conversation:
    def __init__(self, keep_audio_turns: int = 16):
        self.turns: list[Turn] = []
        self.keep_audio_turns = keep_audio_turns
        self.window_start = 0  # the oldest turn the TTS context may hold

    def new_turn(self, transcript: str) -> Turn:
        return Turn(index=len(self.turns), transcript=transcript)

    def append(self, turn: Turn) -> None:
        self.turns.append(turn)
        for old in self.turns[: -self.keep_audio_turns]:
            old.user = old.agent = None  # text stays; audio and codes go

    def context(self, max_segments: int) -> tuple[list[Segment], list[int]]:
        """The context window's segments, oldest first, and the turns they came from."""

        def window() -> list[tuple[int, Segment]]:
            return [(t.index, seg) for t in self.turns[self.window_start:] for seg in (t.user, t.agent) if seg is not None]

        segments = window()
        if len(segments) > max_segments:
            while len(segments) > max_segments // 2 and self.window_start < len(self.turns):
                self.window_start += 1
                segments = window()
        return [s for _, s in segments], sorted({i for i, _ in segments})
