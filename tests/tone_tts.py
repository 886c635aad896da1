"""A model-free TTS stage for fast tests of the speak step: each character of the text is 10 ms of a tone.

It keeps the whole `TTSStage` Protocol with numbers easy to check by hand: 1000 samples a second, 100-sample
chunks, optional codes (a frame per 50 samples), a `max_chars` of its choosing, and it counts the chunks it
made, so a test can tell that a stream was closed early.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.messages import AudioChunk, Segment, VoiceReference

RATE = 1000
CHUNK = 100
FRAME = 50


@dataclass(frozen=True)
class ToneConfig:
    """The fields the engine reads of a TTS config (pipelines.messages.VoiceConfig), nothing else."""

    seed: int = 0
    speaker: int = 0
    user_speaker: int = 1
    context_segments: int = 4


class ToneTTS:
    sample_rate = RATE
    untrained = False

    def __init__(self, codes: bool = False, max_chars: int | None = None, prebuffer_extra_s: float = 0.0):
        self.codes, self.room, self.extra = codes, max_chars, prebuffer_extra_s
        self.calls: list[tuple[str, list[tuple[int, str, int]]]] = []  # text, context (speaker, text, samples)
        self.made = 0  # chunks handed out
        self.prepared: list[list[Segment]] = []

    def warmup(self) -> None:
        pass

    def describe(self) -> str:
        return "tone (test stage)"

    def audio_for(self, text: str) -> np.ndarray:
        t = np.arange(len(text) * RATE // 100) / RATE
        return (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)

    def stream(self, text: str, speaker: int = 0, context: Sequence[Segment] = (),
               voice: VoiceReference | None = None, config=None, cancelled: Callable[[], bool] = lambda: False,
               ahead: Callable[[], float] | None = None,
               waiting: Callable[[], float] | None = None) -> Iterator[AudioChunk]:
        self.calls.append((text, [(s.speaker, s.text, 0 if s.audio is None else s.audio.size) for s in context]))
        audio = self.audio_for(text)
        for first in range(0, audio.size, CHUNK):
            if cancelled():
                return
            part = audio[first:first + CHUNK]
            codes = np.full((2, -(-part.size // FRAME)), first // FRAME, np.int32) if self.codes else None
            self.made += 1
            yield AudioChunk(part, codes, first // FRAME, RATE, FRAME)

    def prepare_context(self, context: Sequence[Segment]) -> int:
        self.prepared.append(list(context))
        return 0

    def max_chars(self, config) -> int | None:
        return self.room

    def prebuffer_s(self, text: str, config, least_s: float, out_s: float = 0.0) -> float:
        return least_s + self.extra

    def rtf_now(self, config) -> float | None:
        return None  # no model: nothing measured

    def rate_margin(self) -> float | None:
        return None
