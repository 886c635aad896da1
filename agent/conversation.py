"""The conversation: every turn's user and agent speech as `Segment`s, bounded in memory.

The TTS gets the most recent segments as context (its own window trims them further); the LLM keeps
its own bounded text history. Old turns keep their text but drop their audio, so memory stays flat over
hundreds of turns (the session bundle on disk has everything).
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

    def new_turn(self, transcript: str) -> Turn:
        return Turn(index=len(self.turns), transcript=transcript)

    def append(self, turn: Turn) -> None:
        self.turns.append(turn)
        for old in self.turns[: -self.keep_audio_turns]:
            old.user = old.agent = None  # text stays; audio and codes go

    def context(self, max_segments: int) -> tuple[list[Segment], list[int]]:
        """The last `max_segments` segments, oldest first, and the turns they came from."""
        segments: list[tuple[int, Segment]] = []
        for turn in reversed(self.turns):
            for seg in (turn.agent, turn.user):
                if seg is not None and len(segments) < max_segments:
                    segments.append((turn.index, seg))
        segments.reverse()
        return [s for _, s in segments], sorted({i for i, _ in segments})
