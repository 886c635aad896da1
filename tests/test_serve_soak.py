"""`voice-agent serve` over many connections: the models stay loaded, memory stays flat, bundles stay whole.

    bash scripts/test.sh -m soak -k serve                  # 100 connect/disconnect cycles (~3 min here)
    SOAK_CYCLES=200 bash scripts/test.sh -m soak -k serve  # longer (fewer than ~80 still see the caches fill)

Each cycle is one OpenAI Realtime client (the `openai` package) against one server process: a third of them
leave at once without a word, a third ask something and leave in the middle of the reply, a third wait for
the whole reply. Sampled per cycle: the server's memory (a leak is judged on its anonymous part) and how
long the connection took to be ready (`session.created`). Printed, not asserted: timing on a shared machine is not a test.
"""

from __future__ import annotations

import asyncio
import os
import re
import time

import numpy as np
import pytest

from agent.session import read_events
from conftest import proc_status_mb
from served import Served

openai = pytest.importorskip("openai", reason="the openai package (scripts/bootstrap.sh installs it) is the client")

pytestmark = [pytest.mark.soak, pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's memory from /proc (Linux)")]


def test_connections_leave_memory_flat_and_whole_bundles(tmp_path, tiny_marvis):
    cycles = int(os.environ.get("SOAK_CYCLES", "100"))
    runs = tmp_path / "runs"
    served = Served(["--tts.checkpoint", str(tiny_marvis), "--llm.max_tokens", "16",
                     "--tts.max_audio_length_ms", "1200", "--session.dir", str(runs)], tmp_path)
    port, token = re.search(r"127\.0\.0\.1:(\d+)/\?token=(\S+)", served.url).groups()
    client = openai.AsyncOpenAI(api_key=token, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    ready_s, rss, anon, spoke = [], [], [], 0

    async def cycle(i: int) -> None:
        nonlocal spoke
        t0 = time.monotonic()
        async with client.realtime.connect(model="voice-agent") as conn:
            async for event in conn:
                if event.type == "session.created":
                    break
            ready_s.append(time.monotonic() - t0)
            if i % 3 == 0:
                return  # nothing said: no bundle
            spoke += 1
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": f"Please tell me about the number {i}."}]})
            await conn.response.create()
            stop = "response.output_audio.delta" if i % 3 == 1 else "response.done"
            async for event in conn:
                assert event.type != "error", event
                if event.type == stop:
                    break  # i % 3 == 1: leave in the middle of the reply

    async def main() -> None:
        for i in range(cycles):
            await asyncio.wait_for(cycle(i), 120)
            await asyncio.sleep(0.05)
            # resident, and anonymous: where a leak shows (the resident size also counts the pages of mapped weight
            # files as they are first read, tests/test_soak.py)
            resident, anonymous = proc_status_mb(served.proc.pid, "VmRSS", "RssAnon")
            rss.append(resident)
            anon.append(anonymous)

    try:
        asyncio.run(main())
        time.sleep(2)  # the last conversation closes its bundle
    finally:
        log = served.stop()
    # judged over the second half: a leak grows all along, while the server's caches fill over the first few dozen
    # connections and level off (anonymous memory, one 100-connection run: +53 MB over the first ten, +3 MB from
    # the 60th to the 100th; a 60-connection run measured 0.49 MB a connection over its second half)
    warm = max(5, cycles // 2)
    slope = np.polyfit(np.arange(len(anon) - warm), anon[warm:], 1)[0]
    print(f"\nserve soak: {cycles} connections, ready p50 {np.median(ready_s) * 1000:.0f} ms / max "
          f"{max(ready_s) * 1000:.0f} ms, RSS {rss[0]:.0f} -> {rss[-1]:.0f} MB (peak {max(rss):.0f}), anonymous slope "
          f"after {warm}: {slope * 1000:.1f} KB/connection")
    assert log.count("loading the models") == 1
    assert slope < 0.5, f"anonymous memory grows {slope:.2f} MB a connection"
    bundles = sorted(runs.iterdir())
    assert len(bundles) == spoke  # one per conversation in which something was said, none for the silent ones
    for bundle in bundles:  # each is complete: closed with its summary, and its turns recorded
        assert (bundle / "summary.json").is_file(), bundle
        assert any(e.get("type") == "turn" for e in read_events(bundle / "events.jsonl")), bundle
