"""The browser page's protocol over the session loop: one page session per WebSocket.

- up: the mic as binary frames of 16 kHz mono PCM16 (an AudioWorklet after the browser's own echo canceller and
  noise suppressor), and small JSON messages (push-to-talk key, what the page played, full duplex on/off);
- down: the agent's audio as binary frames (a little-endian uint32 utterance id, then 24 kHz PCM16) that an
  AudioWorklet plays through a jitter buffer, and JSON messages (transcript, reply text, turn with its waterfall).
The page reports how many samples of each reply it has actually played; `BrowserSink.clear()` returns that
count after a barge-in, so the conversation keeps only what the user heard, as with a speaker.

`PageSession` is the transport: it checks each message, feeds mic frames to an `agent.loop.SessionLoop`
(the same loop as `chat` and replay) and provides the sink. It has no socket: agent/web/server.py moves
messages between the WebSocket and it, so a test can drive it directly. Malformed input raises
`ProtocolError`, whose text is the close reason.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.config import AgentConfig
from agent.engine import Stages
from agent.events import (
    EchoHeard,
    Event,
    MuteChanged,
    ReplyStarted,
    ReplyText,
    SpeechChanged,
    Transcribed,
    TurnEnded,
    TurnWithdrawn,
)
from agent.loop import OwnThread, SharedThread, open_session
from agent.session import MIC_RATE, SessionRecorder
from agent.sinks import CutSink, wait_until_played
from pipelines.audio import float_to_pcm16, pcm16_to_float

MAX_FRAME_SAMPLES = MIC_RATE // 10  # one mic frame: at most 100 ms (the page sends 20 ms)
MAX_TEXT_BYTES = 1024
MIC_BURST_S = 1.0  # mic audio may run this far ahead of the wall clock (network jitter), no further
TEXT_RATE, TEXT_BURST = 50.0, 200  # control messages a second, and how many may come at once

Log = Callable[[str], None]


class ProtocolError(Exception):
    """A client broke the protocol: its connection is closed with this reason."""


class BrowserSink(CutSink):
    """The page's audio player as the turn engine sees it (an `agent.sinks.AudioSink`).

    The worker thread writes; the event loop delivers the page's reports (`report_played`) and barge-ins.
    `end_of_stream()` returns once the page has played the whole reply, or after a barge-in, or when the page
    is gone (or stalls for `agent.sinks.STALL_S`). `clear()` returns the samples the page said it played.
    """

    CLEAR_WAIT_S = 1.0  # how long clear() waits for the page's count after telling it to stop
    output_latency = 0.0  # the page counts samples as its worklet outputs them

    def __init__(self, send: Callable[[object], None], sample_rate: int = 24_000):
        self._cond = threading.Condition()
        super().__init__(lock=self._cond)  # one lock for the cut and the counts
        self.send = send  # thread-safe: queues a message for the page
        self.sample_rate = sample_rate
        self.on_first_sample: Callable[[float], None] | None = None
        self._id = 0
        self._written = self._played = 0
        self._in_utterance = self._ended = False
        self._final = False  # the page reported its count after being told to stop
        self._gone = False

    def _begin(self) -> None:
        self._id += 1
        self._written = self._played = 0
        self._in_utterance, self._ended, self._final = True, False, False
        self.send({"type": "utterance", "id": self._id, "rate": self.sample_rate})

    def set_sample_rate(self, rate: int) -> None:
        self.sample_rate = rate  # each utterance tells the page its rate

    def set_prebuffer(self, seconds: float) -> None:
        pass  # the page's worklet keeps its own jitter buffer

    def _write(self, audio: np.ndarray) -> None:
        pcm = float_to_pcm16(audio)
        if self._gone or not pcm:
            return
        if not self._in_utterance:
            self._begin()
        self._written += len(pcm) // 2
        self.send(struct.pack("<I", self._id) + pcm)

    def end_of_stream(self) -> None:
        with self._cond:
            self._ended = True
            self.send({"type": "end", "id": self._id})
            wait_until_played(
                lambda timeout: self._cond.wait_for(
                    lambda: self._cut or self._gone or self._played >= self._written, timeout),
                lambda: self._played)
            if not self._cut:
                self._in_utterance = False

    def _halt(self) -> None:
        """Stop the reply now (event loop or worker): the page drops what it has buffered and reports its count."""
        if self._in_utterance:
            self.send({"type": "clear", "id": self._id})
        self._cond.notify_all()
        return None  # only the page knows how much it played: `_heard` waits for its count

    def _heard(self) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._final or self._gone, self.CLEAR_WAIT_S)
            self._in_utterance = False
            return min(self._played, self._written)

    def report_played(self, utterance: int, samples: int, final: bool) -> None:
        """The page's count for an utterance (event loop). Counts only grow; stale utterances are ignored."""
        first = None
        with self._cond:
            if utterance != self._id:
                return
            if samples > self._played:
                if self._played == 0:
                    first = self.on_first_sample
                self._played = samples
            self._final = self._final or (final and self._cut)
            if self._ended and not self._cut and self._played >= self._written:
                self._in_utterance = False
            self._cond.notify_all()
        if first is not None:
            first(time.monotonic())

    def gone(self) -> None:
        """The page disconnected: nothing more will be played."""
        with self._cond:
            self._gone = True
            self._in_utterance = False
            self._cond.notify_all()

    def close(self) -> None:
        self.gone()


class PageSession:
    """One browser conversation: checks the page's messages, feeds its mic frames to the session loop, and
    narrates the conversation to the page (`narrate`, a session listener like the bundle)."""

    def __init__(self, cfg: AgentConfig, send: Callable[[object], None], push_to_talk: bool, full_duplex: bool,
                 log: Log, stages: Stages | None = None, owner=None):
        self.cfg, self.send, self.log = cfg, send, log
        self.push_to_talk, self.full_duplex = push_to_talk, full_duplex
        self.mode = "push-to-talk" if push_to_talk else "hands-free"
        self.sink = BrowserSink(send)
        self.keys: list[str] = []  # push-to-talk actions, applied on the next mic frame
        self.samples = 0
        self.started: float | None = None
        self._closed: Path | None | bool = False
        # the page always guards against its own echo: the browser's canceller may leave some of the reply in
        self.loop = open_session(cfg, self.mode, self.sink, listeners=[self.narrate], push_to_talk=push_to_talk,
                                 half_duplex=not full_duplex, barge_in=full_duplex, echo_guard=True, stages=stages,
                                 run=SharedThread(owner) if owner is not None else OwnThread(), log=log,
                                 meta={"front_end": "browser", "full_duplex": full_duplex})

    def narrate(self, event: Event) -> None:
        """The conversation as the page shows it (the worker's thread or the event loop's; `send` queues)."""
        if isinstance(event, Transcribed):
            self.send({"type": "transcript", "text": event.text})
        elif isinstance(event, ReplyStarted):
            self.send({"type": "reply_start"})
        elif isinstance(event, ReplyText):
            self.send({"type": "reply", "text": event.text})
        elif isinstance(event, TurnEnded):
            row = event.row()
            self.send({"type": "turn", **{k: row[k] for k in ("index", "transcript", "reply", "interrupted",
                                                              "waterfall")}})
        elif isinstance(event, TurnWithdrawn):  # the user went on: that transcript and reply are no turn
            self.send({"type": "withdrawn"})
        elif isinstance(event, EchoHeard):
            self.send({"type": "echo", "text": event.text})
        elif isinstance(event, MuteChanged):
            self.send({"type": "listening", "on": not event.on})
        elif isinstance(event, SpeechChanged):
            self.send({"type": "speech", "on": event.on})

    @property
    def recorder(self) -> SessionRecorder | None:
        return self.loop.recorder

    def start(self) -> None:
        """Build and warm up the models (blocking: call it off the event loop); raise what the worker raised."""
        self.loop.start()
        self.started = time.monotonic()

    def ready(self) -> dict:
        """What the page needs to start: rates, mode, what the TTS is."""
        tts = self.loop.engine.stages.tts
        return {"type": "ready", "mode": self.mode, "full_duplex": self.full_duplex,
                "sample_rate": self.sink.sample_rate, "mic_rate": MIC_RATE, "bundle": None,
                "tts": {"untrained": bool(tts.untrained), "describe": str(tts.describe())}}

    def mic(self, payload: bytes) -> None:
        """One mic frame from the page, through the session loop on mic-stream time."""
        if self.started is None:
            raise ProtocolError("mic audio before the agent was ready")
        if len(payload) % 2 or not payload:
            raise ProtocolError("a mic frame must be a whole number of 16-bit samples")
        n = len(payload) // 2
        if n > MAX_FRAME_SAMPLES:
            raise ProtocolError(f"mic frame too large ({n} samples; at most {MAX_FRAME_SAMPLES})")
        if self.samples + n > ((time.monotonic() - self.started) + MIC_BURST_S) * MIC_RATE:
            raise ProtocolError("mic audio is arriving faster than real time")
        block = pcm16_to_float(payload)
        t = self.samples / MIC_RATE
        self.samples += n
        actions, self.keys = self.keys, []
        self.loop.feed(t, block, actions)

    def duplex(self, full: bool, echo_cancellation: bool | None) -> None:
        """Full duplex on/off (the page turns it on when the browser's echo canceller runs)."""
        self.full_duplex = full
        self.loop.set_duplex(self.samples / MIC_RATE, full, echo_cancellation)

    def key(self, down: bool) -> None:
        if not self.push_to_talk:
            raise ProtocolError("key messages are for push-to-talk")
        self.keys.append("press" if down else "release")

    @property
    def spoke(self) -> bool:
        """Did the user say anything? (A conversation with nothing in it keeps no bundle.)"""
        return self.loop.spoke

    def close(self) -> Path | None:
        """The page is gone (blocking: off the event loop): answer nothing more, write the bundle's summary."""
        if self._closed is not False:
            return self._closed
        self._closed = None
        self.sink.gone()
        self.loop.close(abandon=True)
        self._closed = self.loop.bundle
        return self._closed


class TextBudget:
    """Token bucket for control messages."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def parse_message(raw: str) -> dict:
    if len(raw.encode()) > MAX_TEXT_BYTES:
        raise ProtocolError(f"control message too large (at most {MAX_TEXT_BYTES} bytes)")
    try:
        msg = json.loads(raw)
    except json.JSONDecodeError:
        raise ProtocolError("control message is not JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("control message must be a JSON object with a string 'type'")
    return msg


def field(msg: dict, name: str, kind: type):
    value = msg.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"'{msg['type']}' message needs '{name}' ({kind.__name__})")
    return value


