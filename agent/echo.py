"""Acoustic echo cancellation, so the agent can be interrupted on laptop speakers.

`EchoCanceller` runs WebRTC's AEC3 locally through the `livekit` package's `rtc.AudioProcessingModule`:
what the speaker plays is the far end (`far_end`, fed as it is played, from any thread: `EchoReferenceSpeaker`
does it from PortAudio's callback), the microphone is the near end (`near_end`, which returns the mic with the
echo removed). AEC3 works on 10 ms frames and finds
the echo path's delay itself; `delay_ms` is only its starting hint (PortAudio's input + output latency).
Far-end audio is queued and handed to the module on the mic's thread, just before the mic frames it can
echo into, so the module only ever sees one caller and render and capture stay in real-time order.

`is_echo` is the second line of defence: a "barge-in" whose transcript is mostly what the agent is saying
is the agent hearing itself, not the user. `guard_against_echo(stages)` applies it to a turn engine's stages:
such an utterance is no turn (the ASR "heard no words"). The barge-in itself has already stopped the reply by
then (it is decided at the start of speech, long before a transcript exists); the guard keeps the agent from
answering itself.
"""

from __future__ import annotations

import collections
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from difflib import SequenceMatcher

import numpy as np

from agent.devices import SpeakerSink
from pipelines.audio import float_to_pcm16
from pipelines.errors import VoiceAgentError

FRAME_MS = 10  # the only frame length the audio processing module takes


def _pcm16(audio: np.ndarray) -> np.ndarray:
    return np.frombuffer(float_to_pcm16(np.asarray(audio, np.float32)), dtype="<i2")


class EchoCanceller:
    """Mic minus what the speaker played. Not thread-safe except `far_end`, which only queues."""

    def __init__(self, mic_rate: int = 16_000, delay_ms: int = 0, noise_suppression: bool = False):
        try:
            from livekit import rtc
        except ImportError as exc:
            raise VoiceAgentError(f"echo cancellation needs the `livekit` package ({exc}); install it "
                                  f"(`pip install livekit`) or set audio.echo_cancellation false") from None
        self._rtc = rtc
        self._apm = rtc.AudioProcessingModule(echo_cancellation=True, high_pass_filter=True,
                                              noise_suppression=noise_suppression)
        self.mic_rate = mic_rate
        self.delay_ms = int(delay_ms)
        self._near_frame = mic_rate * FRAME_MS // 1000
        self._near = np.zeros(0, np.int16)  # mic samples short of a whole frame
        self._far = np.zeros(0, np.int16)
        self._far_rate = 0
        self._far_queue: collections.deque[tuple[np.ndarray, int]] = collections.deque()
        self._far_lock = threading.Lock()

    def far_end(self, audio: np.ndarray, rate: int) -> None:
        """Audio as it is played ([n] float32, or int16 as PortAudio has it); safe from the speaker's thread."""
        pcm = audio.copy() if audio.dtype == np.int16 else _pcm16(audio)
        with self._far_lock:
            self._far_queue.append((pcm, rate))

    def near_end(self, block: np.ndarray) -> np.ndarray:
        """The mic block ([n] float32 at `mic_rate`) with the echo removed. Whole 10 ms frames go through at
        once; a remainder waits for the next block, so blocks of a multiple of 10 ms come back the same length."""
        self._feed_far()
        near = np.concatenate([self._near, _pcm16(block)])
        whole = len(near) // self._near_frame * self._near_frame
        out = near[:whole].copy()
        for start in range(0, whole, self._near_frame):
            frame = self._rtc.AudioFrame(out[start:start + self._near_frame].tobytes(), self.mic_rate, 1,
                                         self._near_frame)
            self._apm.set_stream_delay_ms(self.delay_ms)  # AEC3 wants it before every capture frame
            self._apm.process_stream(frame)
            out[start:start + self._near_frame] = np.frombuffer(frame.data, dtype=np.int16)
        self._near = near[whole:]
        return out.astype(np.float32) / 32768.0

    def _feed_far(self) -> None:
        with self._far_lock:
            parts, self._far_queue = list(self._far_queue), collections.deque()
        for pcm, rate in parts:
            if rate != self._far_rate:  # a speaker at another rate: start its frames afresh
                self._far, self._far_rate = np.zeros(0, np.int16), rate
            size = rate * FRAME_MS // 1000
            far = np.concatenate([self._far, pcm])
            whole = len(far) // size * size
            for start in range(0, whole, size):
                self._apm.process_reverse_stream(self._rtc.AudioFrame(far[start:start + size].tobytes(), rate, 1, size))
            self._far = far[whole:]


class EchoReferenceSpeaker(SpeakerSink):
    """A speaker whose every block, as PortAudio takes it, is also the canceller's far end (one copy)."""

    def __init__(self, canceller: EchoCanceller, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.canceller = canceller

    def _callback(self, outdata, frames, time_info, status) -> None:
        super()._callback(outdata, frames, time_info, status)
        self.canceller.far_end(outdata[:, 0], self.sample_rate)


def _letters(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("'", "")))


def is_echo(transcript: str, agent_text: str, threshold: float = 0.8) -> bool:
    """True when at least `threshold` of the transcript's letters lie in runs (4+ characters, in order) of what
    the agent is saying: the mic heard the agent's own reply, an echo the canceller let through, not the user.
    Letters rather than words, so the ASR's slips on an echo ("talking through the lap top") still match."""
    heard, said = _letters(transcript), _letters(agent_text)
    if not heard or not said:
        return False
    blocks = SequenceMatcher(None, heard, said, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks if b.size >= 4) / len(heard) >= threshold


@dataclass(frozen=True)
class _NoWords:
    text: str = ""


class _RememberedReply:
    """The reply stage, remembering the last reply committed to the conversation (what the user heard of it)."""

    def __init__(self, llm):
        self._llm = llm
        self.said = ""

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def commit(self, user_text: str, reply: str) -> None:
        self.said = reply
        self._llm.commit(user_text, reply)


class _GuardedASR:
    def __init__(self, asr, reply: _RememberedReply, on_echo: Callable[[str], None]):
        self._asr, self._reply, self._on_echo = asr, reply, on_echo

    def __getattr__(self, name):
        return getattr(self._asr, name)

    def transcribe(self, audio: np.ndarray, sample_rate: int = 16_000):
        return self._guarded(self._asr.transcribe(audio, sample_rate))

    def transcribe_forced(self, audio: np.ndarray, sample_rate: int, words: str):  # stand-ins (agent/scripted.py)
        return self._guarded(self._asr.transcribe_forced(audio, sample_rate, words))

    def _guarded(self, heard):
        if is_echo(heard.text, self._reply.said):
            self._on_echo(heard.text.strip())
            return _NoWords()
        return heard


def guard_against_echo(stages, on_echo: Callable[[str], None]) -> None:
    """Wrap a turn engine's `Stages` in place: an utterance whose transcript is the agent's last reply heard back
    calls `on_echo(transcript)` and is no turn."""
    reply = _RememberedReply(stages.llm)
    stages.llm, stages.asr = reply, _GuardedASR(stages.asr, reply, on_echo)
