"""Voice activity detection and endpointing: when did the user's turn start, and when did it end.

webrtcvad labels 10/20/30 ms frames of 16 kHz PCM16 as voiced or not. On its own it calls steady
hiss at -40 dBFS speech (the jfk fixture's pauses), so a frame also needs `energy_margin_db` above
the noise floor: the quietest frame of the last few seconds. A small state machine turns the labels
into turns: a start needs most of a short window voiced, an end needs a run of silence,
a turn with too little voiced audio (cough, click) is dropped without a word, and pre-roll audio
before the start is kept so first syllables survive. `SpeechStarted` is only sent once a turn has
`min_speech_ms` of voiced audio, so a dropped burst never needs taking back.

For speculative work while the endpoint is still undecided: `SpeechPaused` comes once a started turn has
been silent for the tail an utterance keeps (`pre_roll_ms`), carrying the utterance so far: exactly the
samples the endpoint will give if no speech comes back (an earlier cut would lose quiet word endings, and
Whisper hears the difference). `SpeechResumed` follows if a voiced frame comes back before the turn ends.

End of turn from the words (`words`): the caller reads the utterance so far that `SpeechPaused` carries (the
agent transcribes it and asks its reply model whether the words are a finished message) and gives the answer back
with `judge(end_s, probability)`. At or above `words_threshold` the turn ends right there (reason 'words'), cut
exactly where the pause's utterance was, so the work started on it is kept; below `words_unfinished` the turn
waits for `hold_ms` of silence instead of `silence_ms` ("Can you recommend a book about |"). A turn the words ended
is not closed at once: speech that starts within `reopen_ms` continues it (`SpeechReopened`; a word shorter than
`min_speech_ms` is enough), and the utterance it
ends with runs from the first piece's start, the pause included. `pause_ms` sets when `SpeechPaused` comes (and
the tail an utterance keeps); 0 keeps it at `pre_roll_ms`.

Semantic end of turn (`smart_turn`, given a `turn_model`: any callable 16 kHz audio -> probability
that the speaker has finished, e.g. pipelines.smart_turn.SmartTurn.predict): at that same first silent frame the
model is asked once about the utterance so far. Above `smart_turn_threshold` the turn ends after
`complete_silence_ms` (reason 'complete'); otherwise after `silence_ms` as without it (reason
'silence'). The probability rides on the Utterance. The model sees exactly the audio the stream
delivered, so the same audio gives the same decisions (replay reproduces them).

Input of any rate is resampled to 16 kHz as it streams. Stream time is 16 kHz samples consumed /
16000: for 16 kHz input exactly the input time; otherwise it lags the input by the resampler's
~20 ms delay. With endpointing off (push-to-talk) the caller's `begin()`/`end()` decide the turn.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import soxr
import webrtcvad

from pipelines.audio import float_to_pcm16, to_mono_float32
from pipelines.errors import AudioInputError

VAD_RATE = 16000  # webrtcvad also takes 8/32/48 kHz; one rate keeps frames and clocks simple
START_RATIO = 0.7  # share of the start window that must be voiced to open a turn
NOISE_WINDOW_S = 5.0  # the noise floor is the quietest frame this far back
NOISE_FLOOR_MIN_DB = -70.0  # quieter frames (digital silence) never set the floor


@dataclass(frozen=True)
class VADConfig:
    frame_ms: int = 30
    aggressiveness: int = 2
    pre_roll_ms: int = 300
    start_ms: int = 90
    silence_ms: int = 700
    min_speech_ms: int = 250
    max_utterance_ms: int = 30000
    enabled_endpointing: bool = True
    energy_margin_db: float = 10.0  # 0 turns the noise-floor gate off
    smart_turn: bool = False  # on: ask the Endpointer's turn model (off by default: see configs/default.toml)
    smart_turn_threshold: float = 0.5  # Smart Turn's own cut (pipecat's); its output is a probability
    complete_silence_ms: int = 200  # a "complete" turn still needs this much silence: a breath, not a word
    speculate: bool = True  # SpeechPaused/SpeechResumed at a pause, so the agent can start the turn ahead
    pause_ms: int = 0  # silence before SpeechPaused, and the tail an utterance keeps (0: pre_roll_ms)
    words: bool = False  # `judge` may end the turn at a pause (the caller's text end-of-turn score)
    words_threshold: float = 0.1  # a score at or above this ends the turn at the pause
    words_unfinished: float = 0.0  # a score below this waits for hold_ms of silence (0: never)
    hold_ms: int = 1500  # the silence that ends a turn whose words are unfinished
    reopen_ms: int = 0  # speech starting this soon after a turn the words ended continues that turn (0: never)

    def __post_init__(self):
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"vad.frame_ms must be 10, 20 or 30 (webrtcvad's frame sizes), got {self.frame_ms}")
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"vad.aggressiveness must be 0, 1, 2 or 3, got {self.aggressiveness}")
        for name in ("pre_roll_ms", "start_ms", "min_speech_ms", "energy_margin_db"):
            if getattr(self, name) < 0:
                raise ValueError(f"vad.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("pause_ms", "reopen_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"vad.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("words_threshold", "words_unfinished"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"vad.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.pause_ms and not self.frame_ms <= self.pause_ms < self.silence_ms:
            raise ValueError(f"vad.pause_ms must be from one frame to below vad.silence_ms, got {self.pause_ms}")
        if not 0.0 < self.smart_turn_threshold < 1.0:
            raise ValueError(f"vad.smart_turn_threshold must be in (0, 1), got {self.smart_turn_threshold}")
        for name in ("silence_ms", "max_utterance_ms", "complete_silence_ms", "hold_ms"):
            if (value := getattr(self, name)) < self.frame_ms:
                raise ValueError(f"vad.{name} must be at least one frame ({self.frame_ms} ms), got {value}")


@dataclass(frozen=True, kw_only=True, eq=False)
class Utterance:
    audio: np.ndarray  # [T] float32 at sample_rate: pre-roll + speech + a pre-roll-long tail
    sample_rate: int = VAD_RATE
    start_s: float  # first speech frame (manual: when begin() was called)
    end_s: float  # end of the last voiced frame (manual: when end() was called)
    decided_s: float  # stream time when the end was decided
    reason: str  # 'silence' | 'words' | 'complete' (turn model) | 'max_length' | 'flush' | 'manual' | 'pause' (SpeechPaused)
    audio_start_s: float  # stream time of audio[0]
    turn_probability: float | None = None  # the turn model's answer at the last pause, if it was asked
    words_probability: float | None = None  # the words' end-of-turn score at the last pause, if one was judged

    @property
    def duration_s(self) -> float:
        return self.audio.size / self.sample_rate


@dataclass(frozen=True)
class SpeechStarted:
    t: float  # stream time of the first speech frame


@dataclass(frozen=True)
class SpeechEnded:
    utterance: Utterance


@dataclass(frozen=True)
class SpeechPaused:
    utterance: Utterance  # so far: reason 'pause'; decided_s = this silent frame's end


@dataclass(frozen=True)
class SpeechResumed:
    t: float  # stream time of the voiced frame that ended the pause


@dataclass(frozen=True)
class SpeechReopened:
    """Speech started soon after a turn the words ended: it continues that turn (the utterance ended there is
    withdrawn; the one this turn ends with holds both pieces)."""

    t: float  # stream time of the first speech frame of the continuation
    start_s: float  # the reopened turn's start


@dataclass(frozen=True)
class _Reopenable:
    start: int  # the ended turn's first speech sample
    stop: int  # the end of its audio: a turn that does not continue it starts after this
    until: int  # speech starting before this sample continues it


VADEvent = SpeechStarted | SpeechPaused | SpeechResumed | SpeechEnded | SpeechReopened


class _AudioHistory:
    """16 kHz samples addressed by absolute index; nothing before `floor` is kept or returned."""

    def __init__(self):
        self._chunks: deque[np.ndarray] = deque()
        self._chunks_start = 0
        self.floor = 0
        self.end = 0

    def append(self, audio: np.ndarray) -> None:
        if audio.size:
            self._chunks.append(audio)
            self.end += audio.size

    def drop_before(self, index: int) -> None:
        self.floor = max(self.floor, min(index, self.end))
        while self._chunks and self._chunks_start + self._chunks[0].size <= self.floor:
            self._chunks_start += self._chunks.popleft().size

    def slice(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(start, self.floor), min(stop, self.end)
        if stop <= start:
            return np.zeros(0, np.float32)
        joined = np.concatenate(self._chunks)
        return joined[start - self._chunks_start : stop - self._chunks_start].copy()


class Endpointer:
    """Feed float32 audio chunks with `process`; get `SpeechStarted` / `SpeechEnded` events back."""

    def __init__(
        self,
        config: VADConfig | None = None,
        input_rate: int = VAD_RATE,
        turn_model: Callable[[np.ndarray], float] | None = None,
    ):
        if input_rate <= 0:
            raise AudioInputError(f"VAD input sample rate must be positive, got {input_rate}")
        self.config = config or VADConfig()
        self.input_rate = input_rate
        self._vad = webrtcvad.Vad(self.config.aggressiveness)
        ms = VAD_RATE // 1000
        self._frame = self.config.frame_ms * ms
        self._pre_roll = self.config.pre_roll_ms * ms
        self._start_frames = max(1, self.config.start_ms // self.config.frame_ms)
        self._start_needed = math.ceil(START_RATIO * self._start_frames)
        self._silence_frames = self.config.silence_ms // self.config.frame_ms
        self._hold_frames = max(self._silence_frames, self.config.hold_ms // self.config.frame_ms)
        self._complete_frames = min(self._silence_frames, self.config.complete_silence_ms // self.config.frame_ms)
        tail_ms = self.config.pause_ms or self.config.pre_roll_ms
        self._tail_frames = max(1, tail_ms // self.config.frame_ms)  # silence before SpeechPaused
        self._tail = self._tail_frames * self._frame if self.config.pause_ms else self._pre_roll  # kept after speech
        self._reopen_samples = self.config.reopen_ms * ms
        self._turn_model = turn_model if self.config.smart_turn else None
        self._min_voiced_frames = math.ceil(self.config.min_speech_ms / self.config.frame_ms)
        self._max_len = self.config.max_utterance_ms * ms
        self.reset()

    def reset(self) -> None:
        self._resampler = self._new_resampler()
        self._history = _AudioHistory()
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples not yet cut into frames
        self._levels: deque[float] = deque(maxlen=round(NOISE_WINDOW_S * 1000 / self.config.frame_ms))  # dBFS
        self._muted = False
        self._reopenable: _Reopenable | None = None
        self._frames_end = 0  # the end of the last frame labelled
        self._drop_turn()

    def _new_resampler(self):
        if self.input_rate == VAD_RATE:
            return None
        return soxr.ResampleStream(self.input_rate, VAD_RATE, 1, dtype="float32")

    def _drop_turn(self) -> None:
        self._ring: deque[tuple[int, bool]] = deque(maxlen=self._start_frames)  # (frame start, voiced)
        self._start: int | None = None  # first speech sample of the open (maybe unconfirmed) turn
        self._confirmed = False
        self._voiced = 0
        self._silence = 0
        self._last_voiced_end = 0
        self._paused = False
        self._turn_probability: float | None = None
        self._words_probability: float | None = None
        self._need = self._silence_frames  # silent frames that end the turn (hold_frames when the words are unfinished)
        self._manual_start: int | None = None

    @property
    def in_speech(self) -> bool:
        return self._confirmed or self._manual_start is not None

    @property
    def time_s(self) -> float:
        return self._history.end / VAD_RATE

    @property
    def reopenable(self) -> bool:
        """A turn the words ended may still be continued (`reopen_ms` has not passed since)."""
        return self._reopenable is not None

    def close_reopening(self) -> None:
        """The turn the words ended can no longer be continued (the agent's voice is playing: speech from now on
        is a new turn, or a barge-in, or the agent's own echo, never more of the user's last message)."""
        if self._reopenable is not None and self._start is None:
            self._history.drop_before(self._reopenable.stop)
            self._reopenable = None

    def judge(self, end_s: float, probability: float) -> list[VADEvent]:
        """The words' verdict on the pause whose utterance ended at `end_s` (the `SpeechPaused` utterance's):
        the probability that they are a finished message. Ends the turn now when it is high enough and the user
        is still silent in that pause; a verdict on a pause that is over is ignored."""
        if (not self.config.words or self._start is None or not self._paused
                or abs(self._last_voiced_end / VAD_RATE - end_s) > 1e-6):
            return []
        self._words_probability = probability
        if probability >= self.config.words_threshold:
            return self._finish(self._frames_end, "words")
        if probability < self.config.words_unfinished:
            self._need = self._hold_frames
        return []

    def mute(self, flag: bool) -> None:
        """Half-duplex: while muted audio only advances the clock; an open turn is dropped silently."""
        self._muted = flag
        if flag:
            self._drop_turn()
            self._reopenable = None
            self._pending = np.zeros(0, np.float32)
            self._history.drop_before(self._history.end)

    def process(self, samples: np.ndarray) -> list[VADEvent]:
        audio = to_mono_float32(samples, what="VAD input")
        if self._resampler is not None:
            audio = self._resampler.resample_chunk(audio)
        return self._consume(audio)

    def flush(self) -> list[VADEvent]:
        """End of input: drain the resampler and end the open turn if it is long enough."""
        events = []
        if self._resampler is not None:
            events += self._consume(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
            self._resampler = self._new_resampler()
        self._pending = np.zeros(0, np.float32)
        if self._manual_start is not None:
            events.append(SpeechEnded(self._manual_utterance("flush")))
        elif self._start is not None:
            events += self._finish(self._history.end, "flush")
        self._drop_turn()
        self._reopenable = None
        return events

    def begin(self) -> SpeechStarted:
        """Push-to-talk: start recording now (pre-roll included)."""
        self._require_manual("begin")
        if self._muted:
            raise RuntimeError("Endpointer.begin() while muted: unmute first")
        if self._manual_start is None:
            self._manual_start = self._history.end
        return SpeechStarted(t=self._manual_start / VAD_RATE)

    def end(self) -> Utterance | None:
        """Push-to-talk: stop recording; None when nothing was being recorded."""
        self._require_manual("end")
        return None if self._manual_start is None else self._manual_utterance("manual")

    def _require_manual(self, name: str) -> None:
        if self.config.enabled_endpointing:
            raise RuntimeError(f"Endpointer.{name}() is for push-to-talk: set enabled_endpointing = false")

    def _consume(self, audio: np.ndarray) -> list[VADEvent]:
        self._history.append(audio)
        if self._muted:
            self._history.drop_before(self._history.end)
            return []
        if not self.config.enabled_endpointing:
            if self._manual_start is None:
                self._history.drop_before(self._history.end - self._pre_roll)
            return []
        self._pending = np.concatenate([self._pending, audio])
        first = self._history.end - self._pending.size  # absolute index of _pending[0]
        n = self._pending.size // self._frame
        events = []
        for i in range(n):
            frame = self._pending[i * self._frame : (i + 1) * self._frame]
            events += self._step(frame, first + i * self._frame)
        self._pending = self._pending[n * self._frame :].copy()
        if self._start is None:  # idle: keep only what a turn starting now could reach back to (or continue)
            keep = first + n * self._frame - self._start_frames * self._frame - self._pre_roll
            if self._reopenable is not None:
                keep = min(keep, self._reopenable.start - self._pre_roll)
            self._history.drop_before(keep)
        return events

    def _is_voiced(self, frame: np.ndarray) -> bool:
        speech = self._vad.is_speech(float_to_pcm16(frame), VAD_RATE)
        if self.config.energy_margin_db <= 0:
            return speech
        level = 10.0 * math.log10(float(np.mean(np.square(frame, dtype=np.float64))) + 1e-12)
        if level >= NOISE_FLOOR_MIN_DB:
            self._levels.append(level)
        return speech and level >= min(self._levels, default=NOISE_FLOOR_MIN_DB) + self.config.energy_margin_db

    def _step(self, frame: np.ndarray, at: int) -> list[VADEvent]:
        voiced = self._is_voiced(frame)
        end = self._frames_end = at + self._frame
        if self._start is None:
            if self._reopenable is not None and at - self._start_frames * self._frame >= self._reopenable.until:
                self._history.drop_before(self._reopenable.stop)  # too late now for a turn opening to continue it
                self._reopenable = None
            self._ring.append((at, voiced))
            if len(self._ring) < self._start_frames or sum(v for _, v in self._ring) < self._start_needed:
                return []
            # open a turn at the ring's first voiced frame and replay the ring's labels into it
            frames = list(self._ring)
            self._ring.clear()
            self._start = began = next(a for a, v in frames if v)
            for a, v in frames:
                if a >= self._start:
                    self._count(v, a + self._frame)
            reopen, self._reopenable = self._reopenable, None
            if reopen is not None and began < reopen.until:
                # the turn goes on: even a short word ("for") continues it, so no min_speech_ms is asked
                self._start, self._confirmed = reopen.start, True
                return [SpeechReopened(t=began / VAD_RATE, start_s=reopen.start / VAD_RATE)]
            return self._confirm()
        self._count(voiced, end)
        if self._silence >= self._need:
            return self._finish(end, "silence")
        if end - self._start >= self._max_len:
            return self._finish(end, "max_length")
        events = self._confirm()
        if self._confirmed and voiced:
            self._turn_probability = self._words_probability = None  # speech again: the next pause is asked afresh
            self._need = self._silence_frames
            if self._paused:
                self._paused = False
                events.append(SpeechResumed(t=at / VAD_RATE))
        elif self._confirmed and not voiced and self._silence == 1 and self._turn_model is not None:
            self._turn_probability = float(self._turn_model(self._so_far(end, tail=False).audio))
        if (self.config.speculate and self._confirmed and not voiced and self._silence == self._tail_frames
                and not self._paused):
            # the tail a silence-ended utterance keeps is complete now: the utterance so far is, sample for
            # sample, the one the endpoint will give if no speech comes back
            self._paused = True
            events.append(SpeechPaused(self._so_far(end, tail=True)))
        if self._complete and self._silence >= self._complete_frames:
            return events + self._finish(end, "complete")
        return events

    @property
    def _complete(self) -> bool:
        return self._turn_probability is not None and self._turn_probability > self.config.smart_turn_threshold

    def _so_far(self, decided: int, tail: bool) -> Utterance:
        first = max(self._start - self._pre_roll, self._history.floor)
        stop = min(self._last_voiced_end + self._tail, decided) if tail else self._last_voiced_end
        return Utterance(
            audio=self._history.slice(first, stop),
            start_s=self._start / VAD_RATE,
            end_s=self._last_voiced_end / VAD_RATE,
            decided_s=decided / VAD_RATE,
            reason="pause",
            audio_start_s=first / VAD_RATE,
        )

    def _count(self, voiced: bool, end: int) -> None:
        if voiced:
            self._voiced += 1
            self._silence = 0
            self._last_voiced_end = end
        else:
            self._silence += 1

    def _confirm(self) -> list[VADEvent]:
        if self._confirmed or self._voiced < self._min_voiced_frames:
            return []
        self._confirmed = True
        return [SpeechStarted(t=self._start / VAD_RATE)]

    def _finish(self, decided: int, reason: str) -> list[VADEvent]:
        events = []
        start, stop = self._start, min(self._last_voiced_end + self._tail, decided)
        if self._confirmed:
            events.append(SpeechEnded(self._cut(self._start, self._last_voiced_end, stop, decided, reason)))
        self._drop_turn()
        if events and reason == "words" and self._reopen_samples:
            self._reopenable = _Reopenable(start, stop, decided + self._reopen_samples)
        return events

    def _manual_utterance(self, reason: str) -> Utterance:
        now = self._history.end
        utterance = self._cut(self._manual_start, now, now, now, reason)
        self._manual_start = None
        return utterance

    def _cut(self, start: int, end: int, stop: int, decided: int, reason: str) -> Utterance:
        """The turn's audio from pre-roll before `start` to `stop` (absolute 16 kHz sample indices)."""
        first = max(start - self._pre_roll, self._history.floor)
        utterance = Utterance(
            audio=self._history.slice(first, stop),
            start_s=start / VAD_RATE,
            end_s=end / VAD_RATE,
            decided_s=decided / VAD_RATE,
            reason=reason,
            audio_start_s=first / VAD_RATE,
            turn_probability=self._turn_probability,
            words_probability=self._words_probability,
        )
        if reason != "words" or not self._reopen_samples:  # a turn that may be continued keeps its audio
            self._history.drop_before(stop)  # the next turn's pre-roll must not repeat this audio
        return utterance
