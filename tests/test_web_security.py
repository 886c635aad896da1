"""`voice-agent serve` refuses what it must, and keeps serving: real sockets on 127.0.0.1 only.

The server is the real aiohttp app; its conversations are the real ones (frame checks, VAD, keys) except that
no model is loaded (the worker thread is never started), since no test here is about the models.
"""

from __future__ import annotations

import json
import threading
import time

import aiohttp
import numpy as np
import pytest

import served
from agent.web.page import MAX_FRAME_SAMPLES, BrowserSink, PageSession
from agent.web.server import CLOSE_BUSY, CLOSE_PROTOCOL
from served import TOKEN, closed_with, serve_in_process


class NoModels(PageSession):
    def start(self) -> None:
        self.started = time.monotonic()

    def ready(self) -> dict:
        return {"type": "ready", "mode": self.mode, "full_duplex": self.full_duplex, "sample_rate": 24000,
                "mic_rate": 16000, "bundle": None, "tts": {"untrained": True, "describe": "none"}}

    def close(self):
        self.sink.gone()


def scenario(body):
    """Run `body(http, port, server)` against a fresh server on 127.0.0.1 (any free port)."""
    serve_in_process(body, page_factory=NoModels)


def origin(port: int) -> dict:
    return {"Origin": f"http://127.0.0.1:{port}"}


async def connect(http, port, token=TOKEN, headers=None):
    return await http.ws_connect(f"http://127.0.0.1:{port}/ws?token={token}",
                                 headers=origin(port) if headers is None else headers)


async def hello(ws, mode="hands-free") -> dict:
    await ws.send_json({"type": "hello", "mode": mode})
    while True:
        msg = await ws.receive_json(timeout=10)
        if msg["type"] == "ready":
            return msg


async def still_serving(http, port) -> None:
    await served.still_serving(http, port, connect, lambda ws: _is_ready(ws))


async def _is_ready(ws) -> bool:
    return (await hello(ws))["type"] == "ready"


def test_the_page_needs_the_token_and_the_apps_own_host(tmp_path):
    async def body(http, port, server):
        base = f"http://127.0.0.1:{port}"
        async with http.get(f"{base}/?token={TOKEN}") as r:
            assert r.status == 200 and "voice-agent" in await r.text()
            assert r.headers["Referrer-Policy"] == "no-referrer" and "frame-ancestors 'none'" in r.headers[
                "Content-Security-Policy"]
        for url in (f"{base}/", f"{base}/?token=wrong", f"{base}/api/state"):
            async with http.get(url) as r:
                assert r.status == 403 and "token" in await r.text()
        async with http.get(f"{base}/static/app.js") as r:  # static files hold no secret
            assert r.status == 200
        # DNS rebinding: a page on evil.example whose name now points at 127.0.0.1
        async with http.get(f"{base}/?token={TOKEN}", headers={"Host": f"evil.example:{port}"}) as r:
            assert r.status == 403 and "Host" in await r.text()
        async with http.get(f"{base}/static/app.js", headers={"Host": f"evil.example:{port}"}) as r:
            assert r.status == 403
        async with http.get(f"{base}/api/state?token={TOKEN}", headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403 and "Origin" in await r.text()
        async with http.get(f"http://localhost:{port}/api/state?token={TOKEN}") as r:
            assert r.status == 200 and (await r.json())["busy"] is False

    scenario(body)


@pytest.mark.parametrize("case", ["wrong origin", "no origin", "wrong token", "no token"])
def test_websocket_refused_without_origin_and_token(case):
    async def body(http, port, server):
        headers = {"Origin": "http://evil.example"} if case == "wrong origin" else {} if case == "no origin" else None
        token = {"wrong token": "nope", "no token": ""}.get(case, TOKEN)
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await connect(http, port, token=token, headers=headers)
        assert exc.value.status == 403
        await still_serving(http, port)

    scenario(body)


def test_a_second_client_is_told_busy():
    async def body(http, port, server):
        first = await connect(http, port)
        await hello(first)
        second = await connect(http, port)
        msg = await second.receive_json(timeout=10)
        assert msg["type"] == "busy" and "another conversation" in msg["message"]
        code, reason = await closed_with(second)
        assert code == CLOSE_BUSY and reason.startswith("busy")
        await first.send_bytes(np.zeros(320, "<i2").tobytes())  # the first conversation goes on
        await first.close()
        await still_serving(http, port)

    scenario(body)


@pytest.mark.parametrize("send, reason", [
    (lambda ws: ws.send_bytes(b"\0" * (2 * MAX_FRAME_SAMPLES + 2)), "mic frame too large"),
    (lambda ws: ws.send_bytes(b"\0" * 641), "whole number of 16-bit samples"),
    (lambda ws: ws.send_str("not json"), "not JSON"),
    (lambda ws: ws.send_str("[1, 2]"), "JSON object"),
    (lambda ws: ws.send_str(json.dumps({"type": "launch"})), "unknown message type"),
    (lambda ws: ws.send_str(json.dumps({"type": "played", "id": "1", "samples": 5})), "'id'"),
    (lambda ws: ws.send_str(json.dumps({"type": "key", "down": True})), "push-to-talk"),
    (lambda ws: ws.send_str(json.dumps({"type": "duplex", "pad": "x" * 2000})), "too large"),
])
def test_malformed_messages_close_that_connection_with_a_reason(send, reason):
    async def body(http, port, server):
        ws = await connect(http, port)
        await hello(ws)
        await send(ws)
        code, why = await closed_with(ws)
        assert code == CLOSE_PROTOCOL and reason in why, (code, why)
        await still_serving(http, port)

    scenario(body)


def test_frames_beyond_the_websocket_limit_and_a_bad_hello_are_refused():
    async def body(http, port, server):
        ws = await connect(http, port)
        await hello(ws)
        await ws.send_bytes(b"\0" * 100_000)
        code, _ = await closed_with(ws)
        assert code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        ws = await connect(http, port)
        await ws.send_bytes(b"\0" * 640)  # mic audio before the hello
        code, why = await closed_with(ws)
        assert code == CLOSE_PROTOCOL and "hello" in why
        await still_serving(http, port)

    scenario(body)


def test_mic_audio_faster_than_real_time_is_refused():
    async def body(http, port, server):
        ws = await connect(http, port)
        await hello(ws)
        frame = np.zeros(320, "<i2").tobytes()  # 20 ms
        for _ in range(100):  # 2 s of audio at once: more than the 1 s burst allowed
            await ws.send_bytes(frame)
        code, why = await closed_with(ws)
        assert code == CLOSE_PROTOCOL and "faster than real time" in why
        await still_serving(http, port)

    scenario(body)


def test_sink_reports_what_the_page_played():
    """After a barge-in the engine keeps what the page says it played, not what was sent."""
    sent = []
    sink = BrowserSink(sent.append)
    heard = []
    sink.on_first_sample = heard.append
    sink.begin_utterance()
    sink.write(np.full(2400, 0.25, np.float32))
    utterance = sent[0]["id"]
    assert isinstance(sent[1], bytes) and len(sent[1]) == 4 + 2 * 2400
    sink.report_played(utterance, 480, final=False)
    assert len(heard) == 1 and sink.is_playing
    sink.barge_in()
    assert sent[-1] == {"type": "clear", "id": utterance}
    sink.write(np.full(2400, 0.25, np.float32))  # on its way when the user spoke: dropped
    assert not any(isinstance(m, bytes) for m in sent[3:])
    threading.Timer(0.05, sink.report_played, (utterance, 960, True)).start()
    assert sink.clear() == 960 and not sink.is_playing
    sink.report_played(utterance - 1, 10_000, final=False)  # a stale report changes nothing
    assert sink.played_samples == 960

    sink.begin_utterance()  # a reply played to the end: end_of_stream returns once the page says so
    sink.write(np.full(1000, 0.25, np.float32))
    utterance = sent[-2]["id"]
    threading.Timer(0.05, sink.report_played, (utterance, 1000, False)).start()
    sink.end_of_stream()
    assert sink.played_samples == 1000 and not sink.is_playing


def test_serve_on_a_port_in_use_is_one_line(tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--port", str(port)],
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in proc.stderr
    assert "loading the models" not in proc.stdout  # said at once, not after the models load
