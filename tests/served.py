"""`voice-agent serve` for the tests that talk to it: as a subprocess (`Served`: a browser, an OpenAI Realtime
client) or in this process without models (`serve_in_process`: guards, busy, protocol limits)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
LOAD_S = 300  # the server loads every model before it prints its URL: generous on two shared cores


class Served:
    """`python -m agent.cli serve --port 0 ...` as a subprocess; `url` is what it printed."""

    def __init__(self, args: list[str], folder: Path):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "serve", "--port", "0", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.url_ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self.url_ready.wait(LOAD_S):
            self.stop()
            raise AssertionError("serve printed no URL:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"open (http://\S+)", line)
            if m:
                self.url = m.group(1)
                self.url_ready.set()

    def wait_for_line(self, needle: str, timeout: float) -> bool:
        event = threading.Event()

        def look():
            while not event.is_set():
                if any(needle in line for line in self.lines) or self.proc.poll() is not None:
                    event.set()
                event.wait(0.1)

        threading.Thread(target=look, daemon=True).start()
        event.wait(timeout)
        return any(needle in line for line in self.lines)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # Ctrl-C
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return "".join(self.lines)


def serve_in_process(body, **factories) -> None:
    """Run `await body(http, port, server)` against a fresh `Server` on 127.0.0.1 (any free port), its adapters
    replaced by `factories` (e.g. page_factory=..., realtime_factory=...: stand-ins without models)."""
    import asyncio

    import aiohttp
    from aiohttp import web

    from agent.config import load_config
    from agent.web.server import Server

    async def main():
        server = Server(load_config("default"), "127.0.0.1", 0, log=lambda m: None, token=TOKEN)
        for name, factory in factories.items():
            setattr(server, name, factory)
        runner = web.AppRunner(server.app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as http:
                await body(http, port, server)
        finally:
            await runner.cleanup()

    asyncio.run(main())


async def closed_with(ws, timeout: float = 30) -> tuple[int, str]:
    """Read until the server closes the WebSocket; its close code and reason."""
    from aiohttp import WSMsgType

    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            return ws.close_code, (msg.extra or "") if msg.type == WSMsgType.CLOSE else ""


async def still_serving(http, port, connect, greeting) -> None:
    """A new client is served: `connect(http, port)` gets a socket, `greeting(ws)` its first answer."""
    ws = await connect(http, port)
    assert await greeting(ws)
    await ws.close()
