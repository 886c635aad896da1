"""What crosses a stage boundary, and what a stage promises: plain data and small Protocols.

Nothing here imports a model, torch or MLX, so the agent can hold a conversation's `Segment`s (and type its
stages) without loading one. The stages' own inputs and outputs live here too, grouped by pipeline edge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

TTS_SAMPLE_RATE = 24_000  # Mimi's rate: everything the TTS says is at 24 kHz


# ---- conversation -> TTS -----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Segment:
    """One turn of speech: who spoke, what was said, and how it sounded."""

    speaker: int
    text: str
    audio: np.ndarray | None = None  # mono float32 at `sample_rate`
    sample_rate: int = TTS_SAMPLE_RATE
    codes: np.ndarray | None = None  # [K, F] Mimi codes when already known (skips encoding)


@dataclass(frozen=True, eq=False)
class VoiceReference:
    """A reference clip and its transcript, for voice match."""

    audio: np.ndarray
    text: str
    sample_rate: int = TTS_SAMPLE_RATE


# ---- TTS -> speaker ----------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class AudioChunk:
    audio: np.ndarray  # [n * samples_per_frame] float32 at sample_rate
    codes: np.ndarray  # [K, n]
    first_frame: int
    sample_rate: int = TTS_SAMPLE_RATE
    samples_per_frame: int = 1920

    @property
    def num_frames(self) -> int:
        return self.codes.shape[1]


@dataclass(frozen=True, eq=False)
class Speech:
    audio: np.ndarray
    codes: np.ndarray  # [K, F]
    sample_rate: int = TTS_SAMPLE_RATE
    stopped_on_eos: bool = False


# ---- the stage contracts the agent composes -------------------------------------------------------------------

class TranscriptLike(Protocol):
    text: str


class ASRStage(Protocol):
    def warmup(self) -> None: ...
    def transcribe(self, audio: np.ndarray, sample_rate: int = 16_000) -> TranscriptLike: ...


class ReplyStage(Protocol):
    def warmup(self) -> None: ...
    def stream(self, user_text: str) -> Iterator[str]: ...
    def commit(self, user_text: str, reply: str) -> None: ...


class TTSStage(Protocol):
    sample_rate: int
    samples_per_frame: int
    untrained: bool

    def warmup(self) -> None: ...
    def describe(self) -> str: ...
    def stream(self, text: str, speaker: int = 0, context: Sequence[Segment] = (), voice: VoiceReference | None = None,
               config=None, cancelled: Callable[[], bool] = lambda: False,
               ahead: Callable[[], float] | None = None) -> Iterator[AudioChunk]: ...
    def prepare_context(self, context: Sequence[Segment]) -> int: ...
