"""`/v1/realtime` on the server, without models: who may connect, one conversation at a time, and the clients
that would otherwise hold the server (one that floods it, one that never reads) are cut off."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time

import aiohttp
import pytest

import served
from agent.web import server as server_module
from agent.web.realtime import RealtimeSession
from agent.web.server import CLOSE_BUSY, CLOSE_FLOOD, REALTIME_BURST
from served import TOKEN, serve_in_process


class NoModels(RealtimeSession):
    """The adapter with its protocol handling, greeting without loading models; `{"type": "spam"}` makes it send
    `SPAM_BYTES` at once (to fill a client that never reads)."""

    SPAM_BYTES = 256 * 1024

    def start(self) -> None:
        self.send("session.created", session=self._session())

    def handle(self, raw) -> None:
        if raw == '{"type": "spam"}':
            self.send("spam", data="x" * self.SPAM_BYTES)
            return
        super().handle(raw)

    def close(self):
        return None


def scenario(body):
    serve_in_process(body, realtime_factory=NoModels)


async def connect(http, port, token=TOKEN, headers=None, **kw):
    auth = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await http.ws_connect(f"http://127.0.0.1:{port}/v1/realtime?model=x", headers={**auth, **(headers or {})},
                                 **kw)


async def greeted(ws) -> dict:
    return await ws.receive_json(timeout=10)


async def still_serving(http, port) -> None:
    await served.still_serving(http, port, connect, lambda ws: _is_greeting(ws))


async def _is_greeting(ws) -> bool:
    return (await greeted(ws))["type"] == "session.created"


async def closed_with(ws) -> int:
    return (await served.closed_with(ws))[0]


@pytest.mark.parametrize("case", ["wrong token", "no token", "another site's page"])
def test_refused_without_the_token_or_from_another_site(case):
    async def body(http, port, server):
        token = {"wrong token": "nope", "no token": None}.get(case, TOKEN)
        headers = {"Origin": "http://evil.example"} if case == "another site's page" else None
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await connect(http, port, token=token, headers=headers)
        assert exc.value.status == 403
        await still_serving(http, port)  # the right token, no Origin (not a browser): served

    scenario(body)


def test_a_second_client_is_told_busy_and_takes_over_when_the_first_leaves():
    async def body(http, port, server):
        first = await connect(http, port)
        await greeted(first)
        second = await connect(http, port)
        told = await greeted(second)
        assert told["type"] == "error" and told["error"]["code"] == "busy"
        assert await closed_with(second) == CLOSE_BUSY
        await first.close()
        await still_serving(http, port)  # the first has left: the next one takes over

    scenario(body)


def test_a_client_that_floods_is_cut_off_and_the_next_one_is_served():
    async def body(http, port, server):
        ws = await connect(http, port)
        await greeted(ws)
        event = json.dumps({"type": "input_audio_buffer.clear"})
        for _ in range(REALTIME_BURST * 2):
            if ws.closed:
                break
            await ws.send_str(event)
        assert await closed_with(ws) == CLOSE_FLOOD
        await still_serving(http, port)

    scenario(body)


def never_reading_client(port: int, frames: int = 200) -> socket.socket:
    """A raw WebSocket client (a small receive buffer) that asks for a great deal and never reads a byte past
    the handshake: what aiohttp's or websockets' clients cannot be, since they read in the background."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /v1/realtime HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {TOKEN}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    payload = b'{"type": "spam"}'
    for _ in range(frames):
        mask = os.urandom(4)
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return sock


def test_a_client_that_never_reads_is_cut_off_and_the_next_one_is_served(monkeypatch):
    monkeypatch.setattr(server_module, "OUTBOX_LIMIT_BYTES", 2 * NoModels.SPAM_BYTES)

    async def body(http, port, server):
        said: list[str] = []
        server.log = said.append
        sock = await asyncio.to_thread(never_reading_client, port)
        try:
            # the server says when it cuts a client off; polling `busy` alone could miss a cut-off quicker than a
            # poll and pass without one
            deadline = time.monotonic() + 60
            while (not any("stopped reading: cut off" in line for line in said) or server.busy) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert any("stopped reading: cut off" in line for line in said), said
            assert not server.busy  # cut off, though it still has not read a byte
            await still_serving(http, port)
        finally:
            sock.close()

    scenario(body)
