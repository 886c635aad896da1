"""The OpenAI Realtime protocol over the session loop: `/v1/realtime` for clients that already speak it.

One `RealtimeSession` per WebSocket. It has no socket: agent/web/server.py hands it each message
(`handle`) and sends what it gives `send`, so a test can drive it directly. The protocol is the one of the
`openai` package's realtime client (GA event names); audio is PCM16 mono at 24 kHz both ways, base64 in JSON.

What it speaks:
- client: `session.update` (instructions, voice, turn detection `server_vad`/`semantic_vad` or null, audio
  format), `input_audio_buffer.append`/`commit`/`clear`, `conversation.item.create` (a user text message),
  `response.create`, `response.cancel`, `conversation.item.truncate` (what the client really played);
- server: `session.created`/`updated`, `input_audio_buffer.speech_started`/`speech_stopped`/`committed`/
  `cleared`, `conversation.item.added`/`done`, `conversation.item.input_audio_transcription.completed`,
  `response.created`, `response.output_item.added`, `response.content_part.added`,
  `response.output_audio.delta`, `response.output_audio_transcript.delta` (each sentence as it starts to be
  spoken), the matching `.done` events, `response.done` (status `cancelled` after a barge-in or cancel),
  `conversation.item.truncated` and `error`.

With server turn detection the agent's own VAD (the same `Floor` as every front end) ends turns, and speech
that starts while a response is under way cuts it (barge-in). Without it, `commit` ends the turn. Either way
the reply starts at once unless `create_response` is false; then `response.create` starts it. After a cut,
the conversation keeps what the client heard: what it says it played (`conversation.item.truncate`) or, if it
says nothing within a second, what real-time playback could have reached since the first delta.

Bad input (not JSON, an unknown or malformed event, base64 that is not PCM16, a message over 1 MiB, an
event out of order) gets an `error` event and the session goes on.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import itertools
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soxr

from agent.config import AgentConfig
from agent.engine import Stages
from agent.events import Event, Said, SpeechChanged, Transcribed, TurnEnded, TurnWithdrawn, UtteranceEnded
from agent.loop import OwnThread, SharedThread, open_session
from agent.session import MIC_RATE
from agent.sinks import CutSink
from pipelines.audio import float_to_pcm16, pcm16_to_float
from pipelines.errors import VoiceAgentError

RATE = 24_000  # the protocol's PCM16 rate, in and out
MAX_MESSAGE_BYTES = 1 << 20  # larger events get an error (the socket itself refuses far larger ones)
TRUNCATE_WAIT_S = 1.0  # after a cut, how long the reply waits for the client to say what it played

Log = Callable[[str], None]


class ProtocolError(Exception):
    """A client event the session cannot take: sent back as an `error` event; the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


class RealtimeSink(CutSink):
    """Reply audio as `response.output_audio.delta` events. The client plays what it receives; after a cut,
    `_heard` is what it says it played, or what real time allows since the first delta."""

    output_latency = 0.0

    def __init__(self, delta: Callable[[bytes], None]):
        self._lock = threading.Condition()
        super().__init__(lock=self._lock)
        self.delta = delta
        self.sample_rate = RATE
        self.on_first_sample: Callable[[float], None] | None = None
        self._first_wall: float | None = None
        self._truncated: int | None = None  # samples the client said it played

    def _begin(self) -> None:
        self._played, self._in_utterance = 0, True
        self._first_wall, self._truncated = None, None

    def set_sample_rate(self, rate: int) -> None:
        if rate != RATE:
            raise VoiceAgentError(f"the TTS speaks at {rate} Hz; the Realtime protocol carries {RATE} Hz")

    def set_prebuffer(self, seconds: float) -> None:
        pass  # the client keeps its own playback buffer

    def _write(self, audio: np.ndarray) -> None:
        pcm = float_to_pcm16(audio)
        if not pcm:
            return
        if not self._in_utterance:
            self._begin()
        if self._first_wall is None:
            self._first_wall = time.monotonic()
            if self.on_first_sample is not None:
                self.on_first_sample(self._first_wall)
        self._played += len(pcm) // 2
        self.delta(pcm)

    def end_of_stream(self) -> None:
        self._in_utterance = False

    def _halt(self) -> None:
        self._lock.notify_all()
        return None

    def truncate(self, samples: int) -> None:
        """The client played `samples` of the current reply (conversation.item.truncate)."""
        with self._lock:
            self._truncated = max(0, samples)
            self._lock.notify_all()

    def _heard(self) -> int:
        with self._lock:
            self._lock.wait_for(lambda: self._truncated is not None, TRUNCATE_WAIT_S)
            self._in_utterance = False
            if self._truncated is not None:
                return min(self._truncated, self._played)
            if self._first_wall is None:
                return 0
            return min(self._played, int((time.monotonic() - self._first_wall) * self.sample_rate))

    @property
    def is_playing(self) -> bool:
        return False  # the client plays; the agent's "speaking" is its worker answering

    def close(self) -> None:
        with self._lock:
            self._truncated = self._truncated if self._truncated is not None else 0
            self._lock.notify_all()


@dataclasses.dataclass
class _Response:
    id: str
    item_id: str
    said: bool = False  # a sentence of it has been narrated


class RealtimeSession:
    """One Realtime conversation: the client's events in, the protocol's events out, over a session loop."""

    def __init__(self, cfg: AgentConfig, send: Callable[[dict], None], log: Log, stages: Stages | None = None,
                 owner=None):
        self.cfg, self.log = cfg, log
        self._send = send  # thread-safe: queues an event for the client
        self._ids = itertools.count(1)
        self._lock = threading.RLock()  # events come from the socket's loop and the worker's thread
        self.voice = "marvis"
        self.instructions = cfg.llm.system_prompt
        self.server_vad, self.create_response = True, True
        self.sink = RealtimeSink(self._audio_delta)
        self._resampler = soxr.ResampleStream(RATE, MIC_RATE, 1, dtype="float32")
        self.samples = 0  # 16 kHz samples fed to the session: mic-stream time
        self._buffered = 0  # samples appended since the last commit/clear (manual turn detection)
        self._speech_item: str | None = None  # the user item of the speech under way
        self._transcribing: collections.deque[tuple[str, bool]] = collections.deque()  # (user item, is audio)
        self._pending: tuple[str, object] | None = None  # user input waiting for response.create
        self._response: _Response | None = None
        self._answering = 0  # user inputs handed to the worker whose response has not ended
        self._last_item: str | None = None
        self.spoke = False  # did the user say or type anything (a session with nothing in it keeps no bundle)
        # no echo guard: the client plays the reply and cancels its own echo (a user who repeats the last reply
        # after it ended is a turn, which the guard would take for an echo)
        self.loop = open_session(cfg, "realtime", self.sink, listeners=[self._event], push_to_talk=False,
                                 half_duplex=False, barge_in=True, echo_guard=False, stages=stages,
                                 run=SharedThread(owner) if owner is not None else OwnThread(), log=log,
                                 meta={"front_end": "openai-realtime"})

    @property
    def now(self) -> float:
        return self.samples / MIC_RATE

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}"

    def send(self, kind: str, **data) -> None:
        self._send({"type": kind, "event_id": self._id("event"), **data})

    def error(self, code: str, message: str, param: str | None = None, event_id: str | None = None) -> None:
        self.send("error", error={"type": "invalid_request_error", "code": code, "message": message,
                                  "param": param, "event_id": event_id})

    # -- the session ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Ready the models (blocking: off the event loop), then greet the client with `session.created`."""
        self.loop.start()
        self.send("session.created", session=self._session())

    def _session(self) -> dict:
        fmt = {"type": "audio/pcm", "rate": RATE}
        detection = ({"type": "server_vad", "create_response": self.create_response, "interrupt_response": True,
                      "silence_duration_ms": self.cfg.vad.silence_ms, "prefix_padding_ms": self.cfg.vad.pre_roll_ms}
                     if self.server_vad else None)
        return {"type": "realtime", "object": "realtime.session", "id": "sess_local", "model": "voice-agent",
                "output_modalities": ["audio"], "instructions": self.instructions,
                "audio": {"input": {"format": fmt, "turn_detection": detection,
                                    "transcription": {"model": self.cfg.asr.model}},
                          "output": {"format": fmt, "voice": self.voice}}}

    def close(self) -> Path | None:
        """The client left (blocking: off the event loop): stop what is under way, write the bundle (its folder
        is returned)."""
        self.sink.close()
        self.loop.close(abandon=True)
        return self.loop.bundle

    # -- client events --------------------------------------------------------------------------------------

    def handle(self, raw: str | bytes) -> None:
        """One client message. Anything wrong with it is answered with an `error` event."""
        event_id = None
        try:
            if isinstance(raw, bytes):
                raise ProtocolError("invalid_message", "binary frames are not part of the protocol: send JSON text")
            if len(raw) > MAX_MESSAGE_BYTES:
                raise ProtocolError("message_too_large", f"an event may be at most {MAX_MESSAGE_BYTES} bytes")
            try:
                event = json.loads(raw)
            except json.JSONDecodeError:
                raise ProtocolError("invalid_json", "the message is not JSON") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ProtocolError("invalid_event", "an event is a JSON object with a string 'type'")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            handler = self.HANDLERS.get(event["type"])
            if handler is None:
                raise ProtocolError("unknown_event", f"unknown event type {event['type'][:60]!r}", "type")
            with self._lock:
                handler(self, event)
        except ProtocolError as exc:
            self.error(exc.code, str(exc), exc.param, event_id)

    def _session_update(self, event: dict) -> None:
        session = _object(event, "session")
        if "instructions" in session:
            self.instructions = _string(session, "instructions", "session.instructions")
        audio = session.get("audio") or {}
        if not isinstance(audio, dict):
            raise ProtocolError("invalid_value", "session.audio must be an object", "session.audio")
        inp, out = audio.get("input") or {}, audio.get("output") or {}
        for part, name in ((inp, "input"), (out, "output")):
            fmt = part.get("format") if isinstance(part, dict) else None
            if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm"
                                    or fmt.get("rate", RATE) != RATE):
                raise ProtocolError("unsupported_format", f"audio {name} must be audio/pcm at {RATE} Hz",
                                    f"session.audio.{name}.format")
        if "voice" in out:
            self.voice = _string(out, "voice", "session.audio.output.voice")  # one voice: the name is kept
        if isinstance(inp, dict) and "turn_detection" in inp:
            detection = inp["turn_detection"]
            if detection is not None and (not isinstance(detection, dict)
                                          or detection.get("type") not in ("server_vad", "semantic_vad")):
                raise ProtocolError("invalid_value", "turn_detection is null, server_vad or semantic_vad",
                                    "session.audio.input.turn_detection")
            server_vad = detection is not None
            self.create_response = bool((detection or {}).get("create_response", True))
            if server_vad != self.server_vad:
                if self.loop.in_speech or self._buffered:
                    raise ProtocolError("invalid_state", "turn detection can change only between turns")
                self.server_vad = server_vad
                self.loop.set_turn_detection(self.now, server_vad)
        self.loop.set_instructions(self.instructions)
        self.send("session.updated", session=self._session())

    def _append(self, event: dict) -> None:
        audio = _pcm16(event)
        block = self._resampler.resample_chunk(pcm16_to_float(audio))
        if block.size == 0:
            return
        keys = []
        if not self.server_vad and not self.loop.in_speech:
            keys = ["press"]  # manual turns: the buffer opens with the first audio after a commit or clear
            self._speech_item = self._id("item")
        self.loop.feed(self.now, block, keys, answer=False)  # what it decides comes back as events (`_event`)
        self.samples += block.size
        self._buffered += block.size

    def _committed(self, utterance) -> None:
        """The floor ended a user turn (the VAD, or a commit): announce it and answer it (or hold it)."""
        item = self._speech_item or self._id("item")
        self._speech_item = None
        if self.server_vad:
            self.send("input_audio_buffer.speech_stopped", audio_end_ms=int(utterance.end_s * 1000), item_id=item)
        self.send("input_audio_buffer.committed", item_id=item, previous_item_id=self._last_item)
        self._add_item({"id": item, "type": "message", "role": "user", "status": "completed",
                        "content": [{"type": "input_audio", "transcript": None}]})
        self.spoke = True
        if self.server_vad and self.create_response:
            self._start_response(("audio", item, utterance))
        else:  # without turn detection (or create_response off) the client asks for the response
            self._pending = ("audio", (item, utterance))

    def _commit(self, event: dict) -> None:
        if self.server_vad and not self.loop.in_speech:
            raise ProtocolError("input_audio_buffer_commit_empty", "no speech in the input audio buffer")
        if not self.server_vad and not self._buffered:
            raise ProtocolError("input_audio_buffer_commit_empty", "the input audio buffer is empty")
        self._buffered = 0
        self.loop.commit(self.now, answer=False)  # the speech so far is the turn

    def _clear(self, event: dict) -> None:
        self._buffered = 0
        self._speech_item = None
        self.loop.clear(self.now)
        self.send("input_audio_buffer.cleared")

    def _item_create(self, event: dict) -> None:
        item = _object(event, "item")
        content = item.get("content")
        if (item.get("type") != "message" or item.get("role") != "user" or not isinstance(content, list)
                or not content or not all(isinstance(c, dict) and c.get("type") == "input_text"
                                          and isinstance(c.get("text"), str) for c in content)):
            raise ProtocolError("unsupported_item", "only a user message of input_text parts can be added", "item")
        text = " ".join(c["text"].strip() for c in content).strip()
        if not text:
            raise ProtocolError("invalid_value", "the message has no text", "item.content")
        item_id = item.get("id") if isinstance(item.get("id"), str) else self._id("item")
        self._add_item({"id": item_id, "type": "message", "role": "user", "status": "completed",
                        "content": [{"type": "input_text", "text": text}]})
        self._pending = ("text", (item_id, text))
        self.spoke = True

    def _response_create(self, event: dict) -> None:
        if self._answering:
            raise ProtocolError("conversation_already_has_active_response", "a response is already under way")
        if self._pending is None:
            raise ProtocolError("no_input", "nothing to respond to: add a user message or commit audio first")
        kind, (item, payload) = self._pending
        self._pending = None
        self._start_response((kind, item, payload))

    def _start_response(self, work: tuple) -> None:
        kind, item, payload = work
        self._transcribing.append((item, kind == "audio"))
        self._answering += 1
        if kind == "audio":
            self.loop.answer(payload)
        else:
            self.loop.answer_text(payload, self.now)

    def _response_cancel(self, event: dict) -> None:
        if not self._answering:
            raise ProtocolError("response_cancel_not_active", "there is no response to cancel")
        self.loop.interrupt(self.now)

    def _truncate(self, event: dict) -> None:
        item = _string(event, "item_id", "item_id")
        ms = event.get("audio_end_ms")
        if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
            raise ProtocolError("invalid_value", "audio_end_ms must be a non-negative integer", "audio_end_ms")
        response = self._response
        if response is None or response.item_id != item:
            raise ProtocolError("item_not_playing", f"{item!r} is not the response being played", "item_id")
        self.sink.truncate(ms * RATE // 1000)
        self.send("conversation.item.truncated", item_id=item, content_index=0, audio_end_ms=ms)

    HANDLERS = {
        "session.update": _session_update,
        "input_audio_buffer.append": _append,
        "input_audio_buffer.commit": _commit,
        "input_audio_buffer.clear": _clear,
        "conversation.item.create": _item_create,
        "response.create": _response_create,
        "response.cancel": _response_cancel,
        "conversation.item.truncate": _truncate,
    }

    def _add_item(self, item: dict) -> None:
        self.send("conversation.item.added", item=item, previous_item_id=self._last_item)
        self.send("conversation.item.done", item=item, previous_item_id=self._last_item)
        self._last_item = item["id"]

    # -- the session's events become the protocol's ------------------------------------------------------

    def _event(self, event: Event) -> None:
        """A session listener: the floor's events (the socket's thread, inside `handle`) and the engine's (the
        worker's thread)."""
        with self._lock:
            if isinstance(event, SpeechChanged) and event.on and self.server_vad:
                self._speech_item = self._id("item")
                self.spoke = True
                self.send("input_audio_buffer.speech_started", audio_start_ms=int(event.t * 1000),
                          item_id=self._speech_item)
            elif isinstance(event, UtteranceEnded):
                self._committed(event.utterance)
            elif isinstance(event, Transcribed):
                self._transcribed(event.text, event.end_s - event.start_s)
            elif isinstance(event, Said) and self._response is not None:
                text = (" " if self._response.said else "") + event.text
                self._response.said = True
                self.send("response.output_audio_transcript.delta", response_id=self._response.id,
                          item_id=self._response.item_id, output_index=0, content_index=0, delta=text)
            elif isinstance(event, TurnEnded) and self._response is not None:
                self._finish_response(event.turn.reply, event.turn.interrupted)
            elif isinstance(event, TurnWithdrawn) and self._response is not None:  # the user went on: cancelled
                self._finish_response(event.said, True)

    def _transcribed(self, text: str, seconds: float) -> None:
        item, audio = self._transcribing.popleft() if self._transcribing else (self._id("item"), True)
        if audio:
            self.send("conversation.item.input_audio_transcription.completed", item_id=item, content_index=0,
                      transcript=text, usage={"type": "duration", "seconds": round(max(0.0, seconds), 3)})
        if not text:
            self._answering = max(0, self._answering - 1)
            return  # no words heard: no response
        response = self._response = _Response(self._id("resp"), self._id("item"))
        assistant = {"id": response.item_id, "type": "message", "role": "assistant", "object": "realtime.item",
                     "status": "in_progress", "content": []}
        self.send("response.created", response={"id": response.id, "object": "realtime.response",
                                                "status": "in_progress", "output": [],
                                                "output_modalities": ["audio"]})
        self.send("response.output_item.added", response_id=response.id, output_index=0, item=assistant)
        self.send("response.content_part.added", response_id=response.id, item_id=response.item_id,
                  output_index=0, content_index=0, part={"type": "audio", "transcript": ""})

    def _audio_delta(self, pcm: bytes) -> None:
        response = self._response
        if response is not None:
            self.send("response.output_audio.delta", response_id=response.id, item_id=response.item_id,
                      output_index=0, content_index=0, delta=base64.b64encode(pcm).decode())

    def _finish_response(self, reply: str, interrupted: bool) -> None:
        response, self._response = self._response, None
        self._answering = max(0, self._answering - 1)
        ids = {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}
        status = "incomplete" if interrupted else "completed"
        part = {"type": "audio", "transcript": reply}
        item = {"id": response.item_id, "type": "message", "role": "assistant", "object": "realtime.item",
                "status": status, "content": [{"type": "output_audio", "transcript": reply}]}
        self.send("response.output_audio.done", **ids)
        self.send("response.output_audio_transcript.done", **ids, transcript=reply)
        self.send("response.content_part.done", **ids, part=part)
        self.send("response.output_item.done", response_id=response.id, output_index=0, item=item)
        self._last_item = response.item_id
        self.send("response.done", response={
            "id": response.id, "object": "realtime.response", "status": "cancelled" if interrupted else "completed",
            "output": [item], "output_modalities": ["audio"],
            "status_details": {"type": "cancelled", "reason": "turn_detected"} if interrupted else None})


def _object(event: dict, name: str) -> dict:
    value = event.get(name)
    if not isinstance(value, dict):
        raise ProtocolError("missing_field", f"'{event['type']}' needs an object '{name}'", name)
    return value


def _string(obj: dict, name: str, param: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ProtocolError("invalid_value", f"{param} must be a string", param)
    return value


def _pcm16(event: dict) -> bytes:
    audio = event.get("audio")
    if not isinstance(audio, str):
        raise ProtocolError("missing_field", "input_audio_buffer.append needs 'audio': base64 PCM16", "audio")
    try:
        pcm = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("invalid_audio", "'audio' is not base64", "audio") from None
    if len(pcm) % 2:
        raise ProtocolError("invalid_audio", "'audio' is not PCM16: an odd number of bytes", "audio")
    return pcm
