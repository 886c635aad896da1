"""`voice-agent serve`: talk to the agent from a browser page, or from any OpenAI Realtime client.

The models load once, when the server starts; a conversation borrows them. One conversation at a time, one
WebSocket per conversation, through one of two adapters over the same session loop as `chat`:
- `/ws`: the page's own protocol (agent/web/page.py, `PageSession`);
- `/v1/realtime`: the OpenAI Realtime protocol (agent/web/realtime.py, `RealtimeSession`).
This module is the HTTP side: routes, who may connect, and moving messages between a socket and its adapter.
A third transport would be one more adapter and one more route.

Threads: the models are loaded and warmed on the server's one model thread, before it listens; aiohttp's event loop
(the main thread) hands each message to the adapter, whose session loop (agent/loop.py) runs turn-taking and
recording as in `chat` and replay; the loop's worker answers utterances on that same model thread and writes to
the sink, which hands chunks back to the event loop through a bounded outbox. Every conversation in
which something was said writes the same bundle as `chat`; one in which nothing was said leaves none.

Security of a local server that owns a microphone: it binds 127.0.0.1 unless told otherwise; a request whose
Host is not the app's own (DNS rebinding) or whose Origin is another site (cross-site WebSocket hijacking) is
refused; everything but the static files needs the random token of this run, which is in the URL `serve`
prints (a Realtime client sends it as its API key: `Authorization: Bearer TOKEN`); a second client is told
"busy" and may connect once the first has left; mic frames are bounded in size and rate (the page: no faster
than real time, plus a burst; Realtime: events a second); a client that does not read what it is sent is cut
off once `OUTBOX_LIMIT_BYTES` are waiting for it. The page's malformed messages close its connection with a
reason; a Realtime client gets an `error` event and goes on. Nothing a client sends stops the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from html import escape
from pathlib import Path

from aiohttp import WSCloseCode, WSMsgType, web

from agent.config import AgentConfig
from agent.web.page import (
    MAX_FRAME_SAMPLES,
    MAX_TEXT_BYTES,
    TEXT_BURST,
    TEXT_RATE,
    PageSession,
    ProtocolError,
    TextBudget,
    field,
    parse_message,
)
from agent.web.realtime import RealtimeSession
from pipelines.errors import VoiceAgentError

STATIC = Path(__file__).resolve().parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
HELLO_TIMEOUT_S = 10.0
OUTBOX_LIMIT_BYTES = 32 << 20  # a client with this much unsent is not reading: cut off
REALTIME_MAX_FRAME = 4 << 20  # the socket's own limit; events over 1 MiB get an error event below it
REALTIME_RATE, REALTIME_BURST = 400.0, 2000  # Realtime events a second (audio chunks of 10 ms and up), at once
CLOSE_NOT_READING = 4408
CLOSE_FLOOD = 4429
CLOSE_PROTOCOL = 4400  # our close code for a malformed message (the reason says what)
CLOSE_BUSY = 4409

Log = Callable[[str], None]


class Outbox:
    """Messages for one client, from any thread, sent in order by `run()` on the event loop. When more than
    `limit` bytes wait unsent (the client is not reading), `overflowed` is set and nothing more is queued."""

    def __init__(self, ws: web.WebSocketResponse, limit: int | None = None):
        self.ws, self.limit = ws, limit or OUTBOX_LIMIT_BYTES
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pending = 0
        self.overflowed = asyncio.Event()

    def put(self, message) -> None:  # any thread
        self.loop.call_soon_threadsafe(self._put, message)

    def _put(self, message) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message)
        if self.overflowed.is_set():
            return
        self.pending += len(data)
        if self.pending > self.limit:
            self.overflowed.set()
            return
        self.queue.put_nowait(data)

    async def run(self) -> None:
        while True:
            data = await self.queue.get()
            self.pending -= len(data)
            if self.ws.closed:
                continue
            try:
                if isinstance(data, bytes):
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_str(data)
            except ConnectionError:
                pass


class Server:
    """The aiohttp app and its state: the token, the allowed hosts, the models, the one conversation under way."""

    def __init__(self, cfg: AgentConfig, host: str = "127.0.0.1", port: int = 8765, log: Log = print,
                 token: str | None = None, stages=None, owner: ThreadPoolExecutor | None = None):
        self.cfg, self.host, self.port, self.log = cfg, host, port, log
        self.stages = stages  # loaded once by `serve()`; None: each conversation loads its own
        # the one thread the models run on, conversation after conversation (agent.loop.Worker's `owner`); `serve()`
        # loads and warms the models on it too
        self.owner = owner or (model_thread() if stages is not None else None)
        self.token = token or secrets.token_urlsafe(18)
        self.busy = False
        self.closing: asyncio.Event | None = None  # set while a finished conversation writes its bundle
        self.active: PageSession | RealtimeSession | None = None
        self.bundles: dict[str, Path] = {}  # bundle folders of this run, by name: the only ones served
        self.page_factory = PageSession
        self.realtime_factory = RealtimeSession
        self.app = web.Application(middlewares=[self._guard], client_max_size=MAX_TEXT_BYTES)
        self.app.add_routes([
            web.get("/", self._index),
            web.get("/api/state", self._state),
            web.get("/ws", self._websocket),
            web.get("/v1/realtime", self._realtime),
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
            bearer = request.headers.get("Authorization", "")
            token = bearer[7:] if bearer.startswith("Bearer ") else request.query.get("token", "")
            if not hmac.compare_digest(token, self.token):
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
        busy = {"type": "busy", "message": "another conversation is under way; try again when it has ended"}
        await self._one_at_a_time(ws, busy, self._converse)
        return ws

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=REALTIME_MAX_FRAME, heartbeat=30)
        await ws.prepare(request)
        busy = {"type": "error", "event_id": "event_busy", "error": {
            "type": "server_error", "code": "busy", "param": None, "event_id": None,
            "message": "another conversation is under way; try again when it has ended"}}
        await self._one_at_a_time(ws, busy, lambda ws: self._converse_realtime(ws, request.transport))
        return ws

    async def _one_at_a_time(self, ws: web.WebSocketResponse, busy: dict, converse) -> None:
        if self.closing is not None:  # the last conversation is still closing its bundle: not busy, just wait
            await self.closing.wait()
        if self.busy:
            await ws.send_json(busy)
            await ws.close(code=CLOSE_BUSY, message=b"busy: another conversation is under way")
            return
        self.busy = True
        try:
            await converse(ws)
        finally:
            self.busy = False
            if self.closing is not None:
                self.closing.set()
                self.closing = None

    async def _close_conversation(self, conversation) -> None:
        """Close the adapter off the event loop; keep its bundle if something was said, else remove it."""
        loop = asyncio.get_running_loop()
        self.closing = asyncio.Event()
        try:
            folder = await loop.run_in_executor(None, conversation.close)
        finally:
            self.active = None
        if folder is not None and not conversation.spoke:
            shutil.rmtree(folder, ignore_errors=True)
            self.bundles.pop(Path(folder).name, None)
            self.log("(nothing was said: no session bundle kept)")

    @staticmethod
    async def _hang_up(ws: web.WebSocketResponse, transport, code: int, why: bytes) -> None:
        """Close with a reason; a client that does not read never takes the close frame: then drop it."""
        try:
            await asyncio.wait_for(ws.close(code=code, message=why), 2.0)
        except asyncio.TimeoutError:
            if transport is not None:
                transport.abort()

    async def _converse_realtime(self, ws: web.WebSocketResponse, transport=None) -> None:
        loop = asyncio.get_running_loop()
        outbox = Outbox(ws)
        sending = asyncio.create_task(outbox.run())

        async def watch() -> None:  # a client with too much unsent is not reading: hang up (ends the loop below)
            await outbox.overflowed.wait()
            self.log("(a Realtime client stopped reading: cut off)")
            await self._hang_up(ws, transport, CLOSE_NOT_READING, b"not reading: too much unsent")

        watching = asyncio.create_task(watch())
        session: RealtimeSession | None = None
        try:
            session = self.realtime_factory(self.cfg, outbox.put, self.log, stages=self.stages, owner=self.owner)
            self.active = session
            await loop.run_in_executor(None, session.start)
            budget = TextBudget(REALTIME_RATE, REALTIME_BURST)
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break  # the socket's own limits (a frame over REALTIME_MAX_FRAME), or it failed
                if not budget.take():
                    self.log("(a Realtime client sent too many events a second: cut off)")
                    await self._hang_up(ws, transport, CLOSE_FLOOD, b"too many events a second")
                    break
                session.handle(msg.data)
        except Exception as exc:  # the agent failed (models...): tell the client, keep serving
            self.log(f"error: {exc}")
            if not ws.closed:
                await ws.send_json({"type": "error", "event_id": "event_failed", "error": {
                    "type": "server_error", "code": "agent_failed", "message": str(exc), "param": None,
                    "event_id": None}})
                await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"the agent failed")
        finally:
            if session is not None:
                await self._close_conversation(session)
            watching.cancel()
            deadline = loop.time() + 2.0
            while not outbox.queue.empty() and not ws.closed and not outbox.overflowed.is_set() \
                    and loop.time() < deadline:
                await asyncio.sleep(0.01)  # what the session said last (its response.done) goes out first
            sending.cancel()
            if not ws.closed:
                await self._hang_up(ws, transport, 1000, b"")

    async def _converse(self, ws: web.WebSocketResponse) -> None:
        loop = asyncio.get_running_loop()
        outbox = Outbox(ws)
        send = outbox.put
        sending = asyncio.create_task(outbox.run())
        conversation: PageSession | None = None
        try:
            hello = await self._hello(ws)
            if hello is None:
                return
            push_to_talk = field(hello, "mode", str) == "push-to-talk"
            full_duplex = bool(hello.get("full_duplex", self.cfg.audio.barge_in and not self.cfg.audio.half_duplex))
            conversation = self.page_factory(self.cfg, send, push_to_talk, full_duplex, self.log,
                                             stages=self.stages, owner=self.owner)
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
                await self._close_conversation(conversation)
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
        hello = parse_message(msg.data)
        if hello["type"] != "hello" or hello.get("mode") not in ("hands-free", "push-to-talk"):
            raise ProtocolError("the first message must be {type: hello, mode: hands-free|push-to-talk}")
        return hello

    async def _receive(self, ws: web.WebSocketResponse, conversation: PageSession) -> None:
        budget = TextBudget(TEXT_RATE, TEXT_BURST)
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                conversation.mic(msg.data)
            elif msg.type == WSMsgType.TEXT:
                if not budget.take():
                    raise ProtocolError("too many control messages")
                m = parse_message(msg.data)
                if m["type"] == "played":
                    conversation.sink.report_played(field(m, "id", int), field(m, "samples", int),
                                                    bool(m.get("final", False)))
                elif m["type"] == "key":
                    conversation.key(field(m, "down", bool))
                elif m["type"] == "duplex":
                    echo = m.get("echo_cancellation")
                    conversation.duplex(field(m, "full", bool), echo if isinstance(echo, bool) else None)
                else:
                    raise ProtocolError(f"unknown message type {m['type'][:40]!r}")
            elif msg.type == WSMsgType.ERROR:
                if isinstance(ws.exception(), Exception) and "size" in str(ws.exception()).lower():
                    raise ProtocolError(f"message too large (mic frames: at most {MAX_FRAME_SAMPLES} samples)")
                return


def model_thread() -> ThreadPoolExecutor:
    """The server's one model thread: an executor with one worker."""
    return ThreadPoolExecutor(1, thread_name_prefix="model-owner")


def _say(message: str) -> None:
    print(message, flush=True)


def _can_listen(host: str, port: int) -> None:
    """One clear error now, before the models load, if `host:port` cannot be listened on (a port in use): the
    same bind the server makes (SO_REUSEADDR, as asyncio sets it on POSIX), on every address `host` names."""
    import socket

    def refused(exc: OSError) -> VoiceAgentError:
        return VoiceAgentError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                               f"pick another --port (0: any free one)")

    try:
        addresses = {info[:3] + (info[4],) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except OSError as exc:
        raise refused(exc) from None
    for family, kind, proto, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise refused(exc) from None


def serve(cfg: AgentConfig, host: str = "127.0.0.1", port: int = 8765, log: Log = _say) -> None:
    """Load the models, then run until Ctrl-C; prints the URL (with this run's token) to open. A port that
    cannot be listened on is one error before anything loads."""
    from agent.build import build_stages
    from agent.engine import TurnEngine

    _can_listen(host, port)

    def load():
        stages = build_stages(cfg, log=log)
        TurnEngine(stages, log=log).warmup()
        return stages

    log("voice-agent serve: loading the models (once: every conversation uses them)...")
    owner = model_thread()
    try:  # on the model thread, as every conversation's turns are later: no MLX/ONNX call on the main thread
        stages = owner.submit(load).result()
    except BaseException:
        owner.shutdown(wait=False, cancel_futures=True)
        raise
    server = Server(cfg, host, port, log, stages=stages, owner=owner)
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
        log(f"OpenAI Realtime clients: ws://{server.url(bound).split('//')[1].split('/')[0]}/v1/realtime "
            f"with the token as API key")
        log("(one conversation at a time; Ctrl-C stops)")
        try:
            await asyncio.Event().wait()
        finally:
            if server.active is not None:  # Ctrl-C mid-conversation: its bundle is closed like chat's
                await server._close_conversation(server.active)
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        log("stopped")
