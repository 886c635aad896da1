"""`voice-agent serve`: talk to the agent from a browser page, over the same turn engine as `chat`.

One conversation at a time, one WebSocket per conversation:
- up: the mic as binary frames of 16 kHz mono PCM16 (an AudioWorklet after the browser's own echo canceller and
  noise suppressor), and small JSON messages (push-to-talk key, what the page played, full duplex on/off);
- down: the agent's audio as binary frames (a little-endian uint32 utterance id, then 24 kHz PCM16) that an
  AudioWorklet plays through a jitter buffer, and JSON messages (transcript, reply text, turn with its waterfall).
The page reports how many samples of each reply it has actually played; `BrowserSink.clear()` returns that
count after a barge-in, so the conversation keeps only what the user heard, as with a speaker.

Threads: aiohttp's event loop (the main thread) moves mic frames into the session recorder and the turn-taking
rule (`agent.floor.Floor`, as in `chat` and replay); the MLX owner (`agent.modes._Worker`) answers utterances and
writes to the sink, which hands chunks back to the loop. Every conversation writes the same bundle as `chat`.

Security of a local server that owns a microphone: it binds 127.0.0.1 unless told otherwise; a request whose
Host is not the app's own (DNS rebinding) or whose Origin is another site (cross-site WebSocket hijacking) is
refused; everything but the static files needs the random token of this run, which is in the URL `serve`
prints; a second client is told "busy"; mic frames are bounded in size and rate (no faster than real time,
plus a burst); a malformed message closes that connection with a reason and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import struct
import threading
import time
from collections.abc import Callable
from html import escape
from pathlib import Path

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from agent.build import endpointer
from agent.config import AgentConfig
from agent.echo import guard_against_echo
from agent.floor import Floor
from agent.modes import _hand_over, _meta, _record_step, _Worker, finish
from agent.session import MIC_RATE, SessionRecorder, new_bundle_dir
from pipelines.audio import float_to_pcm16, pcm16_to_float
from pipelines.errors import VoiceAgentError

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
MAX_FRAME_SAMPLES = MIC_RATE // 10  # one mic frame: at most 100 ms (the page sends 20 ms)
MAX_TEXT_BYTES = 1024
MIC_BURST_S = 1.0  # mic audio may run this far ahead of the wall clock (network jitter), no further
TEXT_RATE, TEXT_BURST = 50.0, 200  # control messages a second, and how many may come at once
HELLO_TIMEOUT_S = 10.0
CLOSE_PROTOCOL = 4400  # our close code for a malformed message (the reason says what)
CLOSE_BUSY = 4409

Log = Callable[[str], None]


class ProtocolError(Exception):
    """A client broke the protocol: its connection is closed with this reason."""


class BrowserSink:
    """The page's audio player as the turn engine sees it (the `AudioSink` of agent/engine.py).

    The worker thread writes; the event loop delivers the page's reports (`report_played`) and barge-ins.
    `end_of_stream()` returns once the page has played the whole reply, or after a barge-in, or when the page
    is gone (or stalls for `STALL_S`). `clear()` returns the samples the page said it played.
    """

    STALL_S = 10.0
    CLEAR_WAIT_S = 1.0  # how long clear() waits for the page's count after telling it to stop

    def __init__(self, send: Callable[[object], None], sample_rate: int = 24_000):
        self.send = send  # thread-safe: queues a message for the page
        self.sample_rate = sample_rate
        self.on_first_sample: Callable[[float], None] | None = None
        self.output_latency = 0.0  # the page counts samples as its worklet outputs them
        self._cond = threading.Condition()
        self._id = 0
        self._written = self._played = 0
        self._in_utterance = self._ended = False
        self._cut = False  # a barge-in stopped this utterance
        self._final = False  # the page reported its count after being told to stop
        self._gone = False

    @property
    def speaker(self) -> "BrowserSink":
        return self  # `_Worker` reads the played count and latency from `sink.speaker`

    @property
    def played_samples(self) -> int:
        return self._played

    @property
    def is_playing(self) -> bool:
        return self._in_utterance

    def begin_utterance(self) -> None:
        with self._cond:
            self._id += 1
            self._written = self._played = 0
            self._in_utterance, self._ended, self._cut, self._final = True, False, False, False
            self.send({"type": "utterance", "id": self._id, "rate": self.sample_rate})

    def write(self, audio: np.ndarray) -> None:
        pcm = float_to_pcm16(audio)
        with self._cond:
            if self._cut or self._gone or not pcm:
                return  # a chunk on its way when the user barged in is dropped
            if not self._in_utterance:
                self.begin_utterance()
            self._written += len(pcm) // 2
            self.send(struct.pack("<I", self._id) + pcm)

    def end_of_stream(self) -> None:
        with self._cond:
            self._ended = True
            self.send({"type": "end", "id": self._id})
            played, progress = -1, time.monotonic()
            while not (self._cut or self._gone or self._played >= self._written):
                self._cond.wait(0.1)
                if self._played != played:
                    played, progress = self._played, time.monotonic()
                elif time.monotonic() - progress > self.STALL_S:
                    break
            if not self._cut:
                self._in_utterance = False

    def barge_in(self) -> None:
        """Stop the reply now (event loop): the page drops what it has buffered and reports its count."""
        with self._cond:
            if self._in_utterance and not self._cut:
                self._cut = True
                self.send({"type": "clear", "id": self._id})
            self._cond.notify_all()

    def clear(self) -> int:
        with self._cond:
            if not self._cut:
                self._cut = True
                self.send({"type": "clear", "id": self._id})
            self._cond.wait_for(lambda: self._final or self._gone, self.CLEAR_WAIT_S)
            self._in_utterance = False
            return min(self._played, self._written)

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self._in_utterance or self._gone, timeout)

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


class _PageRecorder(SessionRecorder):
    """The session bundle, whose transcript and turn events also go to the page as they are written."""

    def __init__(self, folder: Path, meta: dict, send: Callable[[object], None], log: Log):
        super().__init__(folder, meta, warn=log)
        self.send = send

    def event(self, kind: str, t: float | None = None, **data) -> None:
        super().event(kind, t, **data)
        if kind == "transcript":
            self.send({"type": "transcript", "text": data.get("text", "")})
        elif kind == "turn":
            self.send({"type": "turn", **{k: data[k] for k in ("index", "transcript", "reply", "interrupted",
                                                               "waterfall")}})


class _NarratedReply:
    """The reply stage, sending each piece of text to the page as it is generated (just before it is spoken).
    A reply started ahead on a speculation goes on in the turn that keeps it; a dropped one is replaced by the
    next reply, which starts afresh on the page."""

    def __init__(self, llm, send: Callable[[object], None]):
        self._llm, self.send = llm, send

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def stream(self, user_text: str):
        self.send({"type": "reply_start"})
        for delta in self._llm.stream(user_text):
            self.send({"type": "reply", "text": delta})
            yield delta


class Conversation:
    """One browser conversation: the turn-taking rules over mic frames, the MLX worker, the bundle."""

    def __init__(self, cfg: AgentConfig, send: Callable[[object], None], push_to_talk: bool, full_duplex: bool,
                 log: Log):
        self.cfg, self.send, self.log = cfg, send, log
        self.push_to_talk, self.full_duplex = push_to_talk, full_duplex
        self.mode = "push-to-talk" if push_to_talk else "hands-free"
        self.sink = BrowserSink(send)
        self.recorder: SessionRecorder | None = None
        self.floor = Floor(endpointer(cfg, endpointing=not push_to_talk),
                           push_to_talk=push_to_talk, half_duplex=not full_duplex, barge_in=full_duplex)
        self.in_speech = False
        self.keys: list[str] = []  # push-to-talk actions, applied on the next mic frame
        self.samples = 0
        self.started: float | None = None
        self._closed: Path | None | bool = False

        def make_recorder(stages):
            stages.llm = _NarratedReply(stages.llm, send)

            def on_echo(text: str) -> None:
                log(f"(echo of the agent's own reply: {text!r}; no turn)")
                send({"type": "echo", "text": text})

            guard_against_echo(stages, on_echo)
            if not cfg.session.record:
                return None
            folder = new_bundle_dir(cfg.resolve(cfg.session.dir), self.mode)
            meta = _meta(cfg, self.mode, stages, front_end="browser", full_duplex=full_duplex)
            self.recorder = _PageRecorder(folder, meta, send, log)
            return self.recorder

        self.worker = _Worker(cfg, self.sink, make_recorder, log)

    def start(self) -> None:
        """Build and warm up the models (blocking: call it off the event loop); raise what the worker raised."""
        self.worker.start()
        self.worker.wait_ready()
        self.sink.sample_rate = self.worker.engine.stages.tts.sample_rate
        self.started = time.monotonic()

    def ready(self) -> dict:
        """What the page needs to start: rates, mode, what the TTS is."""
        tts = self.worker.engine.stages.tts
        return {"type": "ready", "mode": self.mode, "full_duplex": self.full_duplex,
                "sample_rate": self.sink.sample_rate, "mic_rate": MIC_RATE, "bundle": None,
                "tts": {"untrained": bool(tts.untrained), "describe": str(tts.describe())}}

    def _record(self, kind: str, t: float, **data) -> None:
        if self.recorder is not None:
            self.recorder.event(kind, t=t, **data)

    def mic(self, payload: bytes) -> None:
        """One mic frame from the page, through the floor on mic-stream time; what it decided is recorded at the
        frame's time, so replay of the bundle decides the same."""
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
        if self.recorder is not None:
            self.recorder.write_mic(block)
        actions, self.keys = self.keys, []
        step = self.floor.step(t, block, actions, self.worker.speaking or self.sink.is_playing, MIC_RATE)
        _record_step(self.recorder, t, step)
        _hand_over(step, self.worker, self.recorder, t)
        if step.mute is not None:
            self.send({"type": "listening", "on": not step.mute})
        if self.floor.vad.in_speech != self.in_speech:
            self.in_speech = self.floor.vad.in_speech
            self.send({"type": "speech", "on": self.in_speech})

    def duplex(self, full: bool, echo_cancellation: bool | None) -> None:
        """Full duplex on/off (the page turns it on when the browser's echo canceller runs)."""
        self.full_duplex = self.floor.barge_in = full
        self.floor.half_duplex = not full
        extra = {} if echo_cancellation is None else {"echo_cancellation": echo_cancellation}
        self._record("duplex", self.samples / MIC_RATE, full=full, **extra)

    def key(self, down: bool) -> None:
        if not self.push_to_talk:
            raise ProtocolError("key messages are for push-to-talk")
        self.keys.append("press" if down else "release")

    def close(self) -> Path | None:
        """The page is gone (blocking: off the event loop): answer nothing more, write the bundle's summary."""
        if self._closed is not False:
            return self._closed
        self._closed = None
        self.sink.gone()
        self.worker.cancel()
        self.worker.stop()
        self.worker.join(timeout=60)
        if self.worker.engine is not None:
            finish(self.recorder, self.worker.engine.conversation, self.log, self.floor)
        self._closed = self.recorder.folder if self.recorder is not None else None
        return self._closed


class _TextBudget:
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


def _message(raw: str) -> dict:
    if len(raw.encode()) > MAX_TEXT_BYTES:
        raise ProtocolError(f"control message too large (at most {MAX_TEXT_BYTES} bytes)")
    try:
        msg = json.loads(raw)
    except json.JSONDecodeError:
        raise ProtocolError("control message is not JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("control message must be a JSON object with a string 'type'")
    return msg


def _field(msg: dict, name: str, kind: type):
    value = msg.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"'{msg['type']}' message needs '{name}' ({kind.__name__})")
    return value


class Server:
    """The aiohttp app and its state: the token, the allowed hosts, the one conversation under way."""

    def __init__(self, cfg: AgentConfig, host: str = "127.0.0.1", port: int = 8765, log: Log = print,
                 token: str | None = None):
        self.cfg, self.host, self.port, self.log = cfg, host, port, log
        self.token = token or secrets.token_urlsafe(18)
        self.busy = False
        self.closing: asyncio.Event | None = None  # set while a finished conversation writes its bundle
        self.active: Conversation | None = None
        self.bundles: dict[str, Path] = {}  # bundle folders of this run, by name: the only ones served
        self.conversation_factory = Conversation
        self.app = web.Application(middlewares=[self._guard], client_max_size=MAX_TEXT_BYTES)
        self.app.add_routes([
            web.get("/", self._index),
            web.get("/api/state", self._state),
            web.get("/ws", self._websocket),
            web.get("/bundle/{name}/", self._bundle_index),
            web.get("/bundle/{name}/{path:.+}", self._bundle_file),
            web.static("/static", STATIC, follow_symlinks=False),
        ])

    # -- who may ask ---------------------------------------------------------------------------------------

    def allowed_hosts(self, port: int) -> set[str]:
        names = set(LOOPBACK) | {f"[{self.host}]" if ":" in self.host else self.host}
        return {f"{name}:{port}" for name in names}

    def url(self, port: int) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/?token={self.token}"

    def _bound_port(self, request: web.Request) -> int:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        return sockname[1] if sockname else self.port

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        hosts = self.allowed_hosts(self._bound_port(request))
        if request.headers.get("Host", "") not in hosts:
            return web.Response(status=403, text="forbidden: this server only answers to its own address "
                                                 "(Host header mismatch)\n")
        origin = request.headers.get("Origin")
        if origin is not None and origin not in {f"http://{h}" for h in hosts}:
            return web.Response(status=403, text="forbidden: request from another site (Origin mismatch)\n")
        if not request.path.startswith("/static/"):
            if not hmac.compare_digest(request.query.get("token", ""), self.token):
                return web.Response(status=403, text="forbidden: missing or wrong token; open the URL that "
                                                     "`voice-agent serve` printed\n")
        response = await handler(request)
        response.headers.setdefault("Referrer-Policy", "no-referrer")  # the token is in the URL
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # -- pages -------------------------------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        response = web.FileResponse(STATIC / "index.html")
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; connect-src 'self'; script-src 'self'; style-src 'self'; "
            "img-src 'self' data:; frame-ancestors 'none'")
        return response

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response({"busy": self.busy, "bundles": sorted(self.bundles)})

    def _bundle(self, name: str) -> Path:
        folder = self.bundles.get(name)
        if folder is None or not folder.is_dir():
            raise web.HTTPNotFound(text="no such session bundle in this run\n")
        return folder

    async def _bundle_index(self, request: web.Request) -> web.Response:
        folder = self._bundle(request.match_info["name"])
        token = self.token
        names = [escape(p.relative_to(folder).as_posix()) for p in sorted(folder.rglob("*")) if p.is_file()]
        rows = "".join(f'<li><a href="{name}?token={token}">{name}</a></li>' for name in names)
        title = escape(folder.name)
        return web.Response(text=f"<!doctype html><title>{title}</title><h1>{title}</h1>"
                                 f"<p>{escape(str(folder))}</p><ul>{rows}</ul>", content_type="text/html")

    async def _bundle_file(self, request: web.Request) -> web.StreamResponse:
        folder = self._bundle(request.match_info["name"]).resolve()
        path = (folder / request.match_info["path"]).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise web.HTTPNotFound(text="no such file in the bundle\n")
        return web.FileResponse(path)

    # -- the conversation --------------------------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if "Origin" not in request.headers:
            return web.Response(status=403, text="forbidden: a WebSocket needs an Origin header\n")
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_SAMPLES * 2 + 64, heartbeat=30)
        await ws.prepare(request)
        if self.closing is not None:  # the last conversation is still closing its bundle: not busy, just wait
            await self.closing.wait()
        if self.busy:
            await ws.send_json({"type": "busy", "message": "another conversation is under way; close it first"})
            await ws.close(code=CLOSE_BUSY, message=b"busy: another conversation is under way")
            return ws
        self.busy = True
        try:
            await self._converse(ws)
        finally:
            self.busy = False
            if self.closing is not None:
                self.closing.set()
                self.closing = None
        return ws

    async def _converse(self, ws: web.WebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue = asyncio.Queue()

        def send(message) -> None:  # any thread
            loop.call_soon_threadsafe(outbox.put_nowait, message)

        async def sender() -> None:
            while True:
                message = await outbox.get()
                if ws.closed:
                    continue
                try:
                    if isinstance(message, bytes):
                        await ws.send_bytes(message)
                    else:
                        await ws.send_json(message)
                except ConnectionError:
                    pass

        sending = asyncio.create_task(sender())
        conversation: Conversation | None = None
        try:
            hello = await self._hello(ws)
            if hello is None:
                return
            push_to_talk = _field(hello, "mode", str) == "push-to-talk"
            full_duplex = bool(hello.get("full_duplex", self.cfg.audio.barge_in and not self.cfg.audio.half_duplex))
            conversation = self.conversation_factory(self.cfg, send, push_to_talk, full_duplex, self.log)
            self.active = conversation
            await ws.send_json({"type": "loading"})
            await loop.run_in_executor(None, conversation.start)
            ready = conversation.ready()
            if conversation.recorder is not None:
                folder = conversation.recorder.folder
                self.bundles[folder.name] = folder
                ready["bundle"] = f"/bundle/{folder.name}/?token={self.token}"
            await ws.send_json(ready)
            await self._receive(ws, conversation)
        except ProtocolError as exc:
            await ws.close(code=CLOSE_PROTOCOL, message=str(exc).encode()[:120])
        except Exception as exc:  # the agent failed (models, device...): tell the page, keep serving
            self.log(f"error: {exc}")
            if not ws.closed:
                await ws.send_json({"type": "error", "message": str(exc)})
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"the agent failed")
        finally:
            if conversation is not None:
                self.closing = asyncio.Event()
                await loop.run_in_executor(None, conversation.close)
                self.active = None
            sending.cancel()
            if not ws.closed:
                await ws.close()

    async def _hello(self, ws: web.WebSocketResponse) -> dict | None:
        try:
            msg = await ws.receive(timeout=HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ProtocolError("no hello message") from None
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            return None
        if msg.type != WSMsgType.TEXT:
            raise ProtocolError("the first message must be the JSON hello")
        hello = _message(msg.data)
        if hello["type"] != "hello" or hello.get("mode") not in ("hands-free", "push-to-talk"):
            raise ProtocolError("the first message must be {type: hello, mode: hands-free|push-to-talk}")
        return hello

    async def _receive(self, ws: web.WebSocketResponse, conversation: Conversation) -> None:
        budget = _TextBudget(TEXT_RATE, TEXT_BURST)
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                conversation.mic(msg.data)
            elif msg.type == WSMsgType.TEXT:
                if not budget.take():
                    raise ProtocolError("too many control messages")
                m = _message(msg.data)
                if m["type"] == "played":
                    conversation.sink.report_played(_field(m, "id", int), _field(m, "samples", int),
                                                    bool(m.get("final", False)))
                elif m["type"] == "key":
                    conversation.key(_field(m, "down", bool))
                elif m["type"] == "duplex":
                    echo = m.get("echo_cancellation")
                    conversation.duplex(_field(m, "full", bool), echo if isinstance(echo, bool) else None)
                else:
                    raise ProtocolError(f"unknown message type {m['type'][:40]!r}")
            elif msg.type == WSMsgType.ERROR:
                if isinstance(ws.exception(), Exception) and "size" in str(ws.exception()).lower():
                    raise ProtocolError(f"message too large (mic frames: at most {MAX_FRAME_SAMPLES} samples)")
                return


def _say(message: str) -> None:
    print(message, flush=True)


def serve(cfg: AgentConfig, host: str = "127.0.0.1", port: int = 8765, log: Log = _say) -> None:
    """Run until Ctrl-C; prints the URL (with this run's token) to open."""
    server = Server(cfg, host, port, log)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: serving on {host}: anyone who can reach this address and has the URL can use your "
            f"microphone through the agent; prefer the default 127.0.0.1")

    async def main() -> None:
        runner = web.AppRunner(server.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise VoiceAgentError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                                  f"pick another --port (0: any free one)") from None
        bound = site._server.sockets[0].getsockname()[1]
        log(f"voice-agent serve: open {server.url(bound)}")
        log("(one conversation at a time; Ctrl-C stops)")
        try:
            await asyncio.Event().wait()
        finally:
            if server.active is not None:  # Ctrl-C mid-conversation: its bundle is closed like chat's
                await asyncio.get_running_loop().run_in_executor(None, server.active.close)
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        log("stopped")
