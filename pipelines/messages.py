"""What crosses a stage boundary, and what a stage promises: plain data and small Protocols.

Nothing here imports a model, torch or MLX, so the agent can hold a conversation's `Segment`s (and type its
stages) without loading one. The stages' own inputs and outputs live here too, grouped by pipeline edge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

TTS_SAMPLE_RATE = 24_000  # Mimi's rate: all Marvis says; another TTS stage tells its own (`TTSStage.sample_rate`)
TIME_EPS = 1e-9  # seconds: a float sum of chunk lengths may fall this short of a whole number of frames


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
    codes: np.ndarray | None  # [K, n] codec codes (Marvis' Mimi); None for a TTS that has none
    first_frame: int
    sample_rate: int = TTS_SAMPLE_RATE
    samples_per_frame: int = 1920

    @property
    def num_frames(self) -> int:
        if self.codes is not None:
            return self.codes.shape[1]
        return -(-self.audio.size // self.samples_per_frame)


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
    max_history_turns: int  # the past exchanges the LLM is shown: a reply that copies one is kept out of them

    def warmup(self) -> None: ...
    # avoid: the earlier replies (none of their 5-word runs again); unlike: replies rejected, not to start as they did
    def stream(self, user_text: str, avoid: Sequence[str] = (), unlike: Sequence[str] = ()) -> Iterator[str]: ...
    def commit(self, user_text: str, reply: str) -> None: ...
    def end_of_turn(self, user_text: str) -> float: ...  # P(the user's words are a finished message)
    def prepare_next_turn(self) -> int: ...  # the next prompt up to the user's words, run now (tokens run; 0: none)


class VoiceConfig(Protocol):
    """What the turn engine reads of the config a TTS stage takes (Marvis': `pipelines.tts.load.TTSConfig`).

    A frozen dataclass with at least these fields: the engine gives each turn its own `seed` with
    `dataclasses.replace`, and passes the config to the stage's methods without reading anything else."""

    seed: int
    speaker: int  # the agent's voice
    user_speaker: int  # the speaker id of the user's turns in the context
    context_segments: int  # most conversation segments passed as context


class TTSStage(Protocol):
    """A TTS the turn engine can speak a reply with. Everything the engine needs of it is here: the engine
    never imports a TTS package, and a second TTS needs no change in it."""

    sample_rate: int
    untrained: bool  # random weights: the audio is noise (said in the session's meta and on the page)

    def warmup(self) -> None: ...
    def describe(self) -> str: ...
    def stream(self, text: str, speaker: int = 0, context: Sequence[Segment] = (), voice: VoiceReference | None = None,
               config=None, cancelled: Callable[[], bool] = lambda: False,
               ahead: Callable[[], float] | None = None,
               waiting: Callable[[], float] | None = None) -> Iterator[AudioChunk]:
        """`text` spoken as `speaker`, chunk by chunk; stops when `cancelled()`. `ahead()`, when given, is how
        much audio of the same reply the listener still has queued, `waiting()` how much more the listener waits
        for before playback starts (a TTS may size its chunks by them)."""
    def prepare_context(self, context: Sequence[Segment]) -> int:
        """Get ready for a next `stream` whose context is `context` (0: nothing to do)."""
    def max_chars(self, config) -> int | None:
        """The longest text one `stream` call says whole under `config`; the engine says a longer sentence in
        pieces that fit (None: any length)."""
    def prebuffer_s(self, text: str, config, least_s: float, out_s: float = 0.0) -> float:
        """Audio to buffer before `text` (a piece of a reply, the stream under way) plays, at least `least_s`:
        more when this TTS makes audio slower than real time now, so that the piece plays without a gap.
        `out_s`: seconds of `text` already made (0: its first chunk's); asked again while the listener waits."""
    def rtf_now(self, config) -> float | None:
        """Seconds of work per second of audio as measured now, in the stream under way (None: not measured)."""
    def rate_margin(self) -> float | None:
        """How much slower than measured `prebuffer_s` takes the rate to be (None: it plans no rate)."""
