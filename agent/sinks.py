"""Where the agent's voice goes: the one contract every audio sink keeps, and the sinks that are not a page.

The turn engine writes a reply into a sink chunk by chunk; the session loop asks it whether the agent is
still audible (half-duplex mutes the VAD until then) and tells it when the user barged in. Every sink keeps
the whole `AudioSink` contract below, so a mode or a transport never reaches behind it:

- `ReplaySink`: no device; each write is "played" at once (replay, benchmarks, tests).
- `PlaybackSink`: a speaker (agent/devices.py `SpeakerSink`, or the echo canceller's variant) as the engine
  sees it: `end_of_stream()` returns once the reply has been played out.
- agent/web/page.py `BrowserSink`: a browser's audio player, which reports what it has played.

Barge-in is the same for all of them (`CutSink`): `barge_in()` (any thread, never blocks) stops the reply and
drops every chunk of it written after; `clear()` (the engine's thread) returns how many samples of the reply the
listener heard, so the conversation keeps only that. A reply that stops making progress for `STALL_S` (the
device or the page went quiet) is given up rather than waited on for ever.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from pipelines.audio import to_mono_float32
from pipelines.errors import VoiceAgentError

STALL_S = 10.0  # playback that makes no progress for this long is given up (the device or the page stopped)


@runtime_checkable
class AudioSink(Protocol):
    sample_rate: int
    # called with time.monotonic() when an utterance's first sample reaches the listener (any thread)
    on_first_sample: Callable[[float], None] | None

    @property
    def played_samples(self) -> int:
        """Samples of the current utterance handed to the listener so far."""

    @property
    def is_playing(self) -> bool:
        """An utterance is under way: written or begun, and neither played out nor cut."""

    @property
    def output_latency(self) -> float:
        """Seconds from hand-off to the listener's ear (a device's buffer); 0 when counted at the ear."""

    def set_sample_rate(self, rate: int) -> None:
        """Speak at `rate` (the TTS's) from now on; a sink that cannot raises `VoiceAgentError`, naming why."""
    def begin_utterance(self) -> None: ...
    def set_prebuffer(self, seconds: float) -> None:
        """Before the utterance plays: it starts once `seconds` of it are buffered (sized from the TTS's rate).
        Once it plays: if it runs dry, it resumes once `seconds` are buffered again (a sink that does not pause
        for that may ignore it)."""
    def write(self, audio: np.ndarray) -> None: ...
    def end_of_stream(self) -> None:
        """No more audio for this utterance; returns once it has been played out, cut, or stalled."""
    def barge_in(self) -> None:
        """Stop the reply now (any thread, never blocks); later writes of this utterance are dropped."""
    def clear(self) -> int:
        """Stop the reply; return how many samples of it the listener heard."""
    def close(self) -> None: ...


def wait_until_played(done: Callable[[float], bool], played: Callable[[], int], stall_s: float = STALL_S) -> bool:
    """Wait until `done(timeout)` says so, asking in 0.1 s steps; give up (False) once `played()` has not moved
    for `stall_s`."""
    last, progress = -1, time.monotonic()
    while not done(0.1):
        now, n = time.monotonic(), played()
        if n != last:
            last, progress = n, now
        elif now - progress > stall_s:
            return False
    return True


class UtteranceCounts:
    """`played_samples` and `is_playing` of a sink that counts `_played` and keeps `_in_utterance` itself."""

    _played = 0
    _in_utterance = False

    @property
    def played_samples(self) -> int:
        return self._played

    @property
    def is_playing(self) -> bool:
        """An utterance is under way: written or begun, and neither played out after end_of_stream() nor cut."""
        return self._in_utterance


class CutSink(UtteranceCounts, ABC):
    """The barge-in bookkeeping every sink shares. Subclasses play; this remembers that the reply was cut.

    Subclasses provide `_begin()`, `_write(audio)`, `_halt()` (stop now without blocking; may return the
    samples heard, or None when only `_heard()` can tell) and `_heard()` (samples of the reply heard)."""

    def __init__(self, lock=None) -> None:
        self._cut_lock = lock or threading.RLock()  # a subclass may share its own (a Condition it waits on)
        self._cut = False
        self._cut_at: int | None = None

    def begin_utterance(self) -> None:
        with self._cut_lock:
            self._cut, self._cut_at = False, None
            self._begin()

    def write(self, audio: np.ndarray) -> None:
        with self._cut_lock:
            if not self._cut:  # a chunk that was on its way when the user barged in is dropped
                self._write(audio)

    def barge_in(self) -> None:
        with self._cut_lock:
            if not self._cut:
                self._cut = True
                self._cut_at = self._halt()

    def clear(self) -> int:
        """Stop the reply; return the samples of it heard. After a barge-in the cut holds until the next
        `begin_utterance` (chunks still on their way are dropped); without one, the next write starts afresh."""
        with self._cut_lock:
            was_cut = self._cut
            self.barge_in()
            heard = self._cut_at if self._cut_at is not None else self._heard()
            if was_cut:
                self._cut_at = heard  # asked again, the same answer
            else:
                self._cut, self._cut_at = False, None
            return heard

    @abstractmethod
    def _begin(self) -> None:
        """A new utterance: reset the counts."""

    @abstractmethod
    def _write(self, audio: np.ndarray) -> None:
        """Play (or send) a chunk of the utterance."""

    @abstractmethod
    def _halt(self) -> int | None:
        """Stop now without blocking; the samples heard if known here, else None (`_heard` tells)."""

    @abstractmethod
    def _heard(self) -> int:
        """The samples of the utterance the listener heard (may wait for the listener to say)."""


class ReplaySink(CutSink):
    """No device: every write is "played" at once and, with `keep`, kept in memory."""

    output_latency = 0.0

    def __init__(self, sample_rate: int = 24000, keep: bool = True):
        super().__init__()
        self.sample_rate = sample_rate
        self.keep = keep  # replay does not keep: the bundle has each turn's audio, memory stays flat
        self.on_first_sample: Callable[[float], None] | None = None
        self._written: list[np.ndarray] = []
        self._in_utterance = False
        self._played = 0
        self._prebuffer = 1
        self._started = False

    def set_sample_rate(self, rate: int) -> None:
        self.sample_rate = rate

    def _begin(self) -> None:
        self._in_utterance = True
        self._played = 0
        self._prebuffer = 1
        self._started = False

    def set_prebuffer(self, seconds: float) -> None:
        """Playback (the first sample's time) starts once `seconds` of the utterance are written, as on a speaker;
        after that nothing waits here (the engine counts a re-buffer's pause on its own timeline)."""
        if not self._started:
            self._prebuffer = max(1, round(self.sample_rate * seconds))

    def _write(self, audio: np.ndarray) -> None:
        audio = to_mono_float32(audio, what="speaker audio")
        if audio.size == 0:
            return
        if not self._in_utterance:
            self._begin()
        if self.keep:
            self._written.append(audio.copy())
        self._played += audio.size
        if self._played >= self._prebuffer:
            self._start()

    def _start(self) -> None:
        if not self._started and self._played:
            self._started = True
            if self.on_first_sample is not None:
                self.on_first_sample(time.monotonic())

    def end_of_stream(self) -> None:
        if not self._cut:
            self._start()  # a reply shorter than the buffer plays once it is all there
        self._in_utterance = False

    def _halt(self) -> int:
        self._in_utterance = False
        return self._played  # what was written so far is what was heard

    def _heard(self) -> int:
        return self._played

    @property
    def is_playing(self) -> bool:
        return False  # "played" at once: nothing is left to hear once a write returns

    def audio(self) -> np.ndarray:
        """Everything written, [T] float32."""
        return np.concatenate(self._written) if self._written else np.zeros(0, np.float32)

    def close(self) -> None:
        pass


class PlaybackSink(CutSink):
    """A speaker as the turn engine sees it: `end_of_stream()` returns once the reply has been played out
    (or cut by a barge-in), like `ReplaySink`, whose writes are "played" at once. So the engine's check for an
    interruption after the reply sees a barge-in during playback and keeps only what was heard, and
    `first_sample_played` is in the turn's waterfall even when the TTS was done before the speaker started.
    `speaker` is an agent/devices.py `SpeakerSink` (or one like it), started; `reopen(rate)`, when given, opens
    the same device at another rate (a TTS that does not speak at the speaker's)."""

    def __init__(self, speaker, reopen: Callable[[int], object] | None = None):
        super().__init__()
        self.on_first_sample: Callable[[float], None] | None = None  # set by the engine for each turn
        self._first = threading.Event()
        self.reopen = reopen
        self._use(speaker)

    @property
    def sample_rate(self) -> int:
        return self.speaker.sample_rate

    def set_sample_rate(self, rate: int) -> None:
        if rate == self.speaker.sample_rate:
            return
        if self.reopen is None:
            raise VoiceAgentError(f"the speaker was opened at {self.speaker.sample_rate} Hz and cannot play {rate} Hz")
        self.speaker.close()
        self._use(self.reopen(rate))

    def _use(self, speaker) -> None:
        self.speaker = speaker
        speaker.on_first_sample = self._first_sample

    def _first_sample(self, wall: float) -> None:  # PortAudio's thread
        listener = self.on_first_sample
        try:
            if listener is not None:
                listener(wall)
        finally:
            self._first.set()

    def _begin(self) -> None:
        self._first.clear()
        self.speaker.begin_utterance()

    def set_prebuffer(self, seconds: float) -> None:
        self.speaker.set_prebuffer(seconds)

    def _write(self, audio: np.ndarray) -> None:
        self.speaker.write(audio)

    def _halt(self) -> int:
        return self.speaker.clear()

    def _heard(self) -> int:
        return self.speaker.clear()

    def end_of_stream(self) -> None:
        self.speaker.end_of_stream()
        if wait_until_played(self.speaker.wait_idle, lambda: self.speaker.played_samples) and \
                self.speaker.played_samples:
            self._first.wait(0.5)  # the callback reports the first sample just after handing it out

    @property
    def played_samples(self) -> int:
        return self.speaker.played_samples

    @property
    def is_playing(self) -> bool:
        return self.speaker.is_playing

    @property
    def output_latency(self) -> float:
        return self.speaker.output_latency

    def close(self) -> None:
        self.speaker.close()
