"""The agent's ears and mouth on the sound card: a microphone and a speaker on PortAudio (sounddevice).

PortAudio calls our callbacks on its own real-time thread, so they only move samples: the mic callback copies
a block into a queue, the speaker callback copies queued samples out of a buffer (zeros when there are none).
Everything else (conversion, counting, waiting) happens on the caller's side.

Both streams run as 16-bit PCM: that is what devices hold natively, and it makes the round trip exact
(int16 -> float32 by / 32768 loses nothing; float32 -> int16 happens once, in `SpeakerSink.write`, instead
of in PortAudio, which would dither).

A speaker `utterance` is one reply of the agent: `begin_utterance()`, any number of `write()`s, `end_of_stream()`.
Playback starts once `jitter_ms` of it is buffered (or at `end_of_stream()`), so the first chunks do not
stutter while the TTS is still ahead of the listener by only a few milliseconds.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Callable

import numpy as np

from agent.sinks import UtteranceCounts
from pipelines.audio import float_to_pcm16, to_mono_float32
from pipelines.errors import VoiceAgentError

REPLAY_HINT = "try `voice-agent replay SESSION` instead"


def _sounddevice():
    """Import sounddevice, which loads PortAudio on import (and raises OSError when the library is missing)."""
    try:
        import sounddevice
    except (OSError, ImportError) as exc:
        raise VoiceAgentError(f"audio devices unavailable: PortAudio could not be loaded ({exc}); install it "
                              f"(Debian/Ubuntu: `apt install libportaudio2`) or {REPLAY_HINT}") from None
    return sounddevice


def list_devices() -> str:
    """What PortAudio sees, one device a line; `>`/`<` mark the default input/output."""
    sd = _sounddevice()
    devices = sd.query_devices()
    if len(devices) == 0:
        return "no audio devices (PortAudio sees none)"
    return str(devices)


def _device_names(devices, channels_key: str) -> str:
    return ", ".join(f"{d['index']} {d['name']!r}" for d in devices if d[channels_key] > 0)


def _check_one(sd, kind: str, device: int | str | None) -> None:
    noun, key = ("microphone", "max_input_channels") if kind == "input" else ("speaker", "max_output_channels")
    devices = sd.query_devices()
    if not any(d[key] > 0 for d in devices):
        raise VoiceAgentError(f"no {noun} found (PortAudio sees no {kind} device); {REPLAY_HINT}")
    try:
        sd.query_devices(device, kind=kind)
    except (ValueError, sd.PortAudioError) as exc:
        which = f"no default {noun}" if device is None else f"{noun} {device!r} not usable"
        raise VoiceAgentError(f"{which} (PortAudio: {exc}); pick one of: {_device_names(devices, key)}") from None


def check_devices(need_input: bool, need_output: bool, *, input_device: int | str | None = None,
                  output_device: int | str | None = None) -> None:
    """Raise `VoiceAgentError` with one line saying what is missing, before any model is loaded."""
    sd = _sounddevice()
    if need_input:
        _check_one(sd, "input", input_device)
    if need_output:
        _check_one(sd, "output", output_device)


def probe_input(seconds: float = 1.0, device: int | str | None = None) -> str:
    """One line on whether the default (or given) microphone delivers sound: open it for `seconds`, read the
    level. Only zeros is what a muted mic or a denied permission (macOS) looks like."""
    try:
        with MicSource(16000, device=device) as mic:
            blocks, deadline = [], time.monotonic() + seconds + 2.0
            while mic.stream_time < seconds and time.monotonic() < deadline:
                block = mic.read(timeout=0.5)
                if block is not None:
                    blocks.append(block)
    except VoiceAgentError as exc:
        return f"microphone: cannot open ({exc})"
    if not blocks:
        return "microphone: opened, but delivered no audio in 3 s (the device is not running)"
    audio = np.concatenate(blocks)
    if not audio.any():
        return (f"microphone: delivers only zeros ({len(audio) / 16000:.1f} s read): muted, unplugged, or this "
                f"program may not use it (macOS: System Settings > Privacy & Security > Microphone)")
    peak = 20 * np.log10(max(float(np.abs(audio).max()), 1e-9))
    return f"microphone: ok, {len(audio) / 16000:.1f} s read, peak {peak:.0f} dBFS"


def _open_error(noun: str, device, sample_rate: int, exc: Exception) -> VoiceAgentError:
    where = "the default device" if device is None else repr(device)
    return VoiceAgentError(f"cannot open the {noun} ({where}, {sample_rate} Hz mono 16-bit): {exc}; "
                           f"pick another device or {REPLAY_HINT}")


class _PortAudioStream:
    """What both directions share: one PortAudio stream, released on close (or leaving a `with`)."""

    _stream = None

    def _open(self, noun: str, make) -> None:
        """Open and start the stream `make(sounddevice)` builds, unless one is open; a missing device or one that
        refuses is one clear error."""
        if self._stream is not None:
            return
        sd = _sounddevice()
        mic = noun == "microphone"
        check_devices(mic, not mic, input_device=self.device if mic else None,
                      output_device=None if mic else self.device)
        try:
            self._stream = make(sd)
            self._stream.start()
        except (sd.PortAudioError, ValueError) as exc:
            self.close()
            raise _open_error(noun, self.device, self.sample_rate, exc) from None

    def _stream_latency(self) -> float:
        return float(self._stream.latency) if self._stream is not None else 0.0

    def close(self) -> None:
        """Stop (an output stream plays out what it already has) and release the device."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop(ignore_errors=True)
            stream.close(ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class MicSource(_PortAudioStream):
    """Microphone blocks as float32 mono [block_size] arrays, in order, from a queue the PortAudio callback fills.

    When the reader falls more than `max_queued_s` behind, the oldest blocks are dropped (a live agent wants
    the newest audio) and `overflows` counts them, together with overflows PortAudio itself reports.
    """

    def __init__(self, sample_rate: int = 16000, block_ms: int = 30, device: int | str | None = None,
                 *, max_queued_s: float = 5.0, latency: str | float | None = None):
        self.sample_rate = sample_rate
        self.block_size = max(1, round(sample_rate * block_ms / 1000))
        self.device = device
        self.latency = latency
        self.overflows = 0
        max_blocks = max(1, round(max_queued_s * sample_rate / self.block_size))
        self._blocks: queue.Queue[np.ndarray] = queue.Queue(maxsize=max_blocks)
        self._delivered = 0  # samples handed out by read()
        self.zeros_s = 0.0  # seconds of exact digital silence up to the last block read (a muted or denied mic)
        self.name = "the default microphone" if device is None else repr(device)  # PortAudio's name once started

    def start(self) -> "MicSource":
        def make(sd):
            info = sd.query_devices(self.device, kind="input")
            self.name = f"{info['name']!r} (device {info['index']})"
            return sd.InputStream(samplerate=self.sample_rate, blocksize=self.block_size, device=self.device,
                                  channels=1, dtype="int16", latency=self.latency, callback=self._callback)

        self._open("microphone", make)
        return self

    def _callback(self, indata, frames, time_info, status) -> None:  # PortAudio's thread: copy, nothing else
        if status.input_overflow:
            self.overflows += 1
        block = indata[:, 0].copy()
        try:
            self._blocks.put_nowait(block)
        except queue.Full:
            try:
                self._blocks.get_nowait()
            except queue.Empty:
                pass
            self.overflows += 1
            self._blocks.put_nowait(block)

    def read(self, timeout: float) -> np.ndarray | None:
        """The next block ([block_size] float32 in [-1, 1)), or None if none came within `timeout` seconds."""
        try:
            block = self._blocks.get(timeout=timeout)
        except queue.Empty:
            return None
        self._delivered += len(block)
        self.zeros_s = 0.0 if block.any() else self.zeros_s + len(block) / self.sample_rate
        return block.astype(np.float32) / 32768.0

    @property
    def active(self) -> bool:
        """The stream is running (False once the device went away or PortAudio stopped it)."""
        return self._stream is not None and bool(self._stream.active)

    @property
    def stream_time(self) -> float:
        """Seconds of audio `read()` has returned: the audio clock at the end of the last block."""
        return self._delivered / self.sample_rate

class SpeakerSink(_PortAudioStream, UtteranceCounts):
    """Plays float32 mono audio through a PortAudio OutputStream, one utterance at a time.

    `write()` converts to int16 and appends to a buffer; the callback copies from it. Counters are for the
    current utterance: `played_samples` is how many samples were handed to PortAudio (they will all be
    heard, `output_latency` seconds later; `clear()` stops handing out more but cannot recall those).
    After a mid-utterance underrun the sink waits for `jitter_ms` (or what `set_prebuffer` said once it plays)
    again before resuming (re-buffering).
    """

    def __init__(self, sample_rate: int = 24000, device: int | str | None = None, jitter_ms: int = 120,
                 *, latency: str | float | None = None):
        self.sample_rate = sample_rate
        self.device = device
        self.latency = latency
        self.jitter_samples = max(1, round(sample_rate * jitter_ms / 1000))
        # called on PortAudio's thread with time.monotonic() when an utterance's first sample is handed over
        self.on_first_sample: Callable[[float], None] | None = None
        self.underruns = 0  # times an utterance ran dry before end_of_stream()
        self._lock = threading.Condition()
        self._chunks: collections.deque[np.ndarray] = collections.deque()  # int16 [n] each
        self._head = 0  # samples of _chunks[0] already played
        self._queued = 0  # samples in _chunks not yet played
        self._in_utterance = False
        self._flowing = False  # past the jitter buffer: the callback hands out samples
        self._eos = False
        self._first_pending = False
        self._played = 0
        self._prebuffer = self.jitter_samples  # samples buffered before this utterance starts playing
        self._rebuffer = self.jitter_samples  # ... and again after it ran dry

    # -- caller side ------------------------------------------------------------------------------------

    def start(self) -> "SpeakerSink":
        self._open("speaker", lambda sd: sd.OutputStream(
            samplerate=self.sample_rate, device=self.device, channels=1, dtype="int16", latency=self.latency,
            callback=self._callback))
        return self

    def begin_utterance(self) -> None:
        """Start a new utterance (`write()` does this when none is under way). Audio still queued keeps
        playing and counts toward the new one: call after `wait_idle()` or `clear()`."""
        with self._lock:
            self._start_utterance()

    def write(self, audio: np.ndarray) -> None:
        """Queue mono audio at `sample_rate` (floats in [-1, 1]); begins an utterance if none is under way."""
        pcm = np.frombuffer(float_to_pcm16(to_mono_float32(audio, what="speaker audio")), dtype="<i2")
        if pcm.size == 0:
            return
        with self._lock:
            if not self._in_utterance:
                self._start_utterance()
            self._chunks.append(pcm)
            self._queued += pcm.size
            if self._queued >= (self._prebuffer if self._played == 0 else self._rebuffer):
                self._flowing = True

    def set_prebuffer(self, seconds: float) -> None:
        """Before the utterance plays: it starts once `seconds` of it are buffered (the engine sizes it from the
        TTS's measured rate). Once it plays: after running dry it resumes once `seconds` are buffered again (the
        rate dropped mid-reply: one pause instead of many); `jitter_ms` at least."""
        samples = max(1, round(self.sample_rate * seconds))
        with self._lock:
            if self._played == 0:
                self._prebuffer = samples
                self._flowing = self._queued >= self._prebuffer
            else:
                self._rebuffer = max(self.jitter_samples, samples)

    def end_of_stream(self) -> None:
        """No more audio for this utterance: play what is buffered even if it is shorter than the jitter buffer."""
        with self._lock:
            if self._in_utterance:
                self._eos = True
                self._flowing = True
                self._finish_if_drained()

    def clear(self) -> int:
        """Barge-in: drop all queued audio now; return how many samples of the utterance were played."""
        with self._lock:
            played = self._played
            self._chunks.clear()
            self._head = self._queued = 0
            self._in_utterance = self._flowing = self._eos = self._first_pending = False
            self._lock.notify_all()
            return played

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the utterance's audio has all been handed to PortAudio (call `end_of_stream()` first)."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._in_utterance, timeout)

    @property
    def output_latency(self) -> float:
        """PortAudio's estimate of the time from hand-off to the speaker (0 before start)."""
        return self._stream_latency()

    # -- both sides, under the lock -----------------------------------------------------------------------

    def _start_utterance(self) -> None:
        self._in_utterance, self._eos, self._first_pending = True, False, True
        self._prebuffer = self._rebuffer = self.jitter_samples
        self._flowing = self._queued >= self.jitter_samples
        self._played = 0

    def _finish_if_drained(self) -> None:
        if self._eos and self._queued == 0:
            self._in_utterance = self._flowing = self._eos = False
            self._lock.notify_all()

    # -- PortAudio's thread -------------------------------------------------------------------------------

    def _callback(self, outdata, frames, time_info, status) -> None:
        if self._fill(outdata[:, 0]) and self.on_first_sample is not None:
            try:
                self.on_first_sample(time.monotonic())
            except Exception:  # an exception here would abort the stream; the listener's bug is not the speaker's
                pass

    def _fill(self, out: np.ndarray) -> bool:
        """Copy queued samples to `out` ([frames] int16), zeros after; True if it handed out the first sample."""
        n = 0
        first = False
        with self._lock:
            if self._flowing:
                while n < len(out) and self._chunks:
                    chunk = self._chunks[0]
                    take = min(len(out) - n, len(chunk) - self._head)
                    out[n:n + take] = chunk[self._head:self._head + take]
                    n += take
                    self._head += take
                    if self._head == len(chunk):
                        self._chunks.popleft()
                        self._head = 0
                self._queued -= n
                if self._in_utterance:
                    self._played += n
                    first = n > 0 and self._first_pending
                    self._first_pending = self._first_pending and n == 0
                    if self._eos:
                        self._finish_if_drained()
                    elif n < len(out):  # ran dry mid-utterance: count it once and re-buffer
                        self.underruns += 1
                        self._flowing = False
        out[n:] = 0
        return first
