"""Speaking one reply, sentence by sentence, through any TTS stage (`pipelines.messages.TTSStage`).

Each sentence is cleaned for speech (no markdown or emoji read aloud), cut into the pieces one TTS call may
say whole (the stage's `max_chars`), and each piece is spoken with the conversation's context plus the
reply's earlier pieces, so the voice holds within a reply as it does across turns. `ReplyVoice` is the turn
engine's speak step and the synthesis of `voice-agent tts`; it keeps what one reply has spoken, when each
chunk was ready, the playback buffer chosen at the first chunk from this reply's own rate (the stage's
`prebuffer_s`), a re-buffer when the rate drops mid-reply, and the seconds
spent in the TTS. It knows no particular TTS: codes are kept when the stage gives them, never required.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from agent.metrics import audio_ahead, play, playback_stalls
from pipelines.llm.sentences import clean_for_speech, split_to_fit
from pipelines.messages import TIME_EPS, AudioChunk, Segment, TTSStage, VoiceReference


class ChunkSink(Protocol):
    """Where a reply's chunks go as they are made (every `agent.sinks.AudioSink` is one)."""

    def set_prebuffer(self, seconds: float) -> None: ...
    def write(self, audio: np.ndarray) -> None: ...


def _never() -> bool:
    return False


def _cut(audio: np.ndarray, codes: np.ndarray | None, samples: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The first `samples` of `audio`, and the codes of the frames that cover them (codes run evenly along the
    audio, one frame per `samples_per_frame`, so the share of frames is the share of samples, rounded up)."""
    n = max(0, min(samples, audio.size))
    if codes is None:
        return audio[:n], None
    frames = -(-n * codes.shape[1] // audio.size) if audio.size else 0
    return audio[:n], codes[:, :frames]


@dataclass(frozen=True, eq=False)
class Spoken:
    """One piece of a reply as spoken: its text, its audio, and the TTS's codes for it (None: it has none)."""

    text: str
    audio: np.ndarray
    codes: np.ndarray | None = None

    def cut(self, samples: int) -> Spoken:
        return Spoken(self.text, *_cut(self.audio, self.codes, samples))


def speech_pieces(tts: TTSStage, sentence: str, config) -> list[str]:
    """`sentence` as `tts` says it: markdown and emoji out, then cut (after a clause mark, else between words)
    into pieces that each fit one call, so no cap cuts a word off."""
    text = clean_for_speech(sentence)
    room = tts.max_chars(config)
    return [p for p in (split_to_fit(text, room) if room is not None else [text]) if p]


class ReplyVoice:
    """One reply spoken sentence by sentence: `say(sentence)` as each sentence is ready.

    `sink` plays the chunks as they come (None: only kept here). `cancelled()` is asked at every chunk (a
    barge-in, the session stopping): the piece stops there and nothing more is said. `most_s` caps the whole
    reply's audio (the last chunk is cut to it). `mark(stage, wall)` is told when the first piece starts and its
    first chunk is ready (a turn's waterfall), `said(text)` each piece as it starts. `clock` is the caller's
    clock for those times and for the timeline the stalls are counted on."""

    def __init__(self, tts: TTSStage, config, speaker: int, context: Sequence[Segment] = (), *,
                 sink: ChunkSink | None = None, voice: VoiceReference | None = None,
                 cancelled: Callable[[], bool] = _never, clock: Callable[[], float] = time.monotonic,
                 least_prebuffer_s: float = 0.0, most_s: float | None = None,
                 mark: Callable[[str, float], None] | None = None, said: Callable[[str], None] | None = None):
        self.tts, self.config, self.speaker = tts, config, speaker
        self.context = list(context)
        self.sink, self.voice = sink, voice
        self.cancelled, self.clock = cancelled, clock
        self.least_prebuffer_s = least_prebuffer_s
        self.most_samples = None if most_s is None else max(1, round(most_s * tts.sample_rate))
        self._mark = mark or (lambda stage, wall: None)
        self._said = said or (lambda text: None)
        self.spoken: list[Spoken] = []
        # (clock time a chunk was ready, its samples, the re-buffer threshold and the start buffer in force: see
        # agent.metrics.play)
        self.timeline: list[tuple[float, int, float, float | None]] = []
        self.prebuffer: float | None = None  # seconds buffered before playback: planned at the first chunk, then
        # planned again at each chunk while the listener waits, from the intervals this reply's frames have had
        self.prebuffer_first: float | None = None  # the first chunk's plan (from one interval)
        self.prebuffer_rtf: float | None = None  # the TTS's real-time factor it was sized from (this reply's)
        self.prebuffer_margin: float | None = None  # how much slower than that rate the buffer was planned for
        self.rebuffer = 0.0  # seconds a later piece re-buffers if the audio runs dry (the rate dropped mid-reply)
        self.rebuffers: list[float] = []  # each re-buffer threshold set at a piece boundary
        self.written = 0  # samples handed out (before any cut to what was played)
        self.tts_seconds = 0.0  # time spent in the TTS's stream, for the real-time factor the reply achieved
        self.stopped = False  # cancelled in the middle of a piece
        self.full = False  # `most_s` of audio is out
        self._replanning = False  # the first piece's buffer is planned again at each chunk until playback starts

    # ---- speaking ----------------------------------------------------------------------------------------

    def halted(self) -> bool:
        """Nothing more is to be said: a piece was cut short, or `cancelled()` says so now."""
        return self.stopped or self.cancelled()

    def say(self, sentence: str) -> None:
        for text in speech_pieces(self.tts, sentence, self.config):
            if self.full or self.halted():
                return
            self._say_piece(text)

    def _say_piece(self, text: str) -> None:
        self._mark("first_sentence", self.clock())
        self._said(text)
        # a later piece starts while the earlier ones still play: the TTS may make long chunks from the start
        audio, codes = [], []
        began = self.clock()
        # the first piece's buffer is planned over its chunks (`waiting`); a later one follows the audio queued
        waiting = self.waiting_s if self.prebuffer is None else None
        for n, chunk in enumerate(self.tts.stream(text, self.speaker, self.context + self.own_context(), self.voice,
                                                  self.config, self.cancelled, self.queued_s, waiting)):
            ready = self.clock()
            self._mark("first_tts_chunk", ready)
            if self.cancelled():
                self.stopped = True
                break
            chunk_audio, chunk_codes = self._within_cap(chunk)
            if n == 0:
                self._size_buffer(text)
            elif self._replanning:  # the first piece: what was handed out so far is all of it
                self._plan_again(text, (self.written + chunk_audio.size) / self.tts.sample_rate)
            self.timeline.append((ready, chunk_audio.size, self.rebuffer, self.prebuffer))
            if self._replanning and self.waiting_s() <= 0.0:
                self._replanning = False  # it plays (or this chunk starts it): the plan holds from here
            self.written += chunk_audio.size
            if self.sink is not None:
                self.sink.write(chunk_audio)
            audio.append(chunk_audio)
            codes.append(chunk_codes)
            if self.full:
                break  # no further chunk is asked of the TTS: it makes no more than the cap lets out
        self.tts_seconds += self.clock() - began
        self._replanning = False  # the plan is the first piece's: a later one re-buffers instead (`_size_buffer`)
        if audio:
            joined = None if any(c is None for c in codes) else np.concatenate(codes, axis=1)
            self.spoken.append(Spoken(text, np.concatenate(audio), joined))

    def _size_buffer(self, text: str) -> None:
        """At a piece's first chunk, from the rate the TTS measures in this very stream: the reply's first piece
        sets the playback buffer; a later one whose audio will run dry before it is out (the machine got busier)
        sets a re-buffer, so that playback pauses once at a piece boundary instead of stuttering through it."""
        need = self.tts.prebuffer_s(text, self.config, self.least_prebuffer_s)
        if self.prebuffer is None:
            self.prebuffer = self.prebuffer_first = need
            self.prebuffer_rtf = self.tts.rtf_now(self.config)
            self.prebuffer_margin = self.tts.rate_margin()  # how much slower the plan took the rate to be
            self._replanning = True
            if self.sink is not None:
                self.sink.set_prebuffer(need)
            return
        rtf = self.tts.rtf_now(self.config)
        short = need - self.queued_s()  # seconds this piece falls behind beyond what is queued
        if rtf is not None and rtf > 1.0 and short > self.least_prebuffer_s:
            threshold = short / rtf  # the audio made while it falls that far behind
            if threshold > self.rebuffer:
                self.rebuffer = threshold
                self.rebuffers.append(threshold)
                if self.sink is not None:
                    self.sink.set_prebuffer(threshold)

    def _plan_again(self, text: str, out_s: float) -> None:
        """While the listener still waits for the first piece: the buffer planned again from every interval the
        stream has measured so far (the first plan had one), with `out_s` of the piece out (the chunk at hand
        included), and lowered when that plan needs less while the stream makes audio faster than real time: a
        first interval slower than the frames after it then costs no more wait than those frames need. Not when
        it is slower than real time (a busy machine): a reply of several pieces then only moved its wait into the
        later pieces' re-buffers, stalls and all. Never raised here (a slowing stream's later pieces re-buffer at
        their boundary, `_size_buffer`): raised on the noisy margin of a few intervals, the wait grew by more than
        the stalls it saved (scripts/bench_buffer_plan.py, docs/performance.md §10). When what is out already
        suffices, playback starts with this chunk, and the buffer is what was queued then."""
        if out_s >= self.prebuffer - TIME_EPS:
            return  # this chunk starts playback as planned
        rtf = self.tts.rtf_now(self.config)
        if rtf is None or rtf >= 1.0:
            return  # slower than real time: a lower start only moves the wait into the later pieces' re-buffers
        need = self.tts.prebuffer_s(text, self.config, self.least_prebuffer_s, out_s)
        if need >= self.prebuffer - TIME_EPS:
            return
        self.prebuffer = out_s if need <= out_s + TIME_EPS else need
        self.prebuffer_rtf = rtf  # the rate the buffer in force was planned from
        if self.sink is not None:
            self.sink.set_prebuffer(self.prebuffer)

    def _within_cap(self, chunk: AudioChunk) -> tuple[np.ndarray, np.ndarray | None]:
        if self.most_samples is None:
            return chunk.audio, chunk.codes
        left = self.most_samples - self.written
        if chunk.audio.size >= left:
            self.full = True
        return _cut(chunk.audio, chunk.codes, left)

    def own_context(self) -> list[Segment]:
        """The reply's earlier pieces as context for the next. Not with a voice reference: that clip sets the
        voice, and the prompt keeps it next to the text."""
        if self.voice is not None:
            return []
        return [Segment(self.speaker, p.text, p.audio, self.tts.sample_rate, codes=p.codes) for p in self.spoken]

    def queued_s(self) -> float:
        """Seconds of this reply still queued for the listener (all of it while playback waits to start)."""
        return audio_ahead(self.timeline, self.tts.sample_rate, self.prebuffer or 0.0, self.clock())

    def waiting_s(self) -> float:
        """Seconds of audio the listener still waits for before this reply starts playing (0 once it has)."""
        if self.prebuffer is None:
            return 0.0
        heard = play(self.timeline, self.tts.sample_rate, self.prebuffer, complete=False)
        short = self.prebuffer - heard.waiting_s
        return 0.0 if heard.start is not None or short < TIME_EPS else short

    # ---- what was said -----------------------------------------------------------------------------------

    def keep_played(self, played_samples: int) -> None:
        """Keep only what the listener heard: whole pieces, and the played part of the one cut off."""
        kept, left = [], played_samples
        for piece in self.spoken:
            if left <= 0:
                break
            kept.append(piece.cut(left))
            left -= piece.audio.size
        self.spoken = kept

    @property
    def text(self) -> str:
        return " ".join(p.text for p in self.spoken)

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate([p.audio for p in self.spoken]) if self.spoken else np.zeros(0, np.float32)

    @property
    def codes(self) -> np.ndarray | None:
        """The reply's codes, when the TTS gave codes for every piece."""
        if not self.spoken or any(p.codes is None for p in self.spoken):
            return None
        return np.concatenate([p.codes for p in self.spoken], axis=1)

    def segment(self) -> Segment | None:
        """The reply as the conversation keeps it (None: nothing was said)."""
        if not self.spoken:
            return None
        return Segment(self.speaker, self.text, self.audio, self.tts.sample_rate, codes=self.codes)

    def playback(self) -> dict[str, float]:
        """How the reply played: stalls after the first sample, the buffer chosen, the TTS's real-time factor."""
        out = dict(playback_stalls(self.timeline, self.tts.sample_rate, self.prebuffer))
        out["prebuffer_ms"] = round(self.prebuffer * 1000.0, 1)
        if self.prebuffer_first is not None and abs(self.prebuffer_first - self.prebuffer) > 1e-6:
            out["prebuffer_first_ms"] = round(self.prebuffer_first * 1000.0, 1)  # planned again while waiting
        if self.prebuffer_rtf is not None:  # why: the rate this reply's first frames were made at
            out["prebuffer_rtf"] = round(self.prebuffer_rtf, 3)
        if self.prebuffer_margin is not None:
            out["prebuffer_margin"] = round(self.prebuffer_margin, 3)
        if self.rebuffers:
            out["rebuffer_ms"] = round(max(self.rebuffers) * 1000.0, 1)
        audio_s = sum(n for _, n, *_ in self.timeline) / self.tts.sample_rate
        out["tts_rtf"] = round(self.tts_seconds / audio_s, 3)
        return out
