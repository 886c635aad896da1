"""`/v1/realtime` with the official `openai` package's realtime client as a real third-party client.

The server runs as `voice-agent serve` (a subprocess) on the real Whisper tiny.en and SmolLM2-135M and a tiny
random Marvis; the client is `openai.AsyncOpenAI(...).realtime.connect(...)`, pointed at it with the server's
token as its API key. Asserted: a spoken WAV in (manual turns, then server turn detection) gives its
transcript and reply audio; a text message gives reply audio; a cancel mid-response ends it as cancelled and
the bundle keeps only what was sent before the cut; a second client is told the agent is busy; the models
load once for all of these connections.
"""

from __future__ import annotations

import asyncio
import base64
import re

import numpy as np
import pytest

from agent.session import read_events
from conftest import require_checkpoints
from served import Served

openai = pytest.importorskip("openai", reason="the openai package (scripts/bootstrap.sh installs it) is the client")
pytest.importorskip("websockets", reason="openai's realtime client needs websockets")

pytestmark = pytest.mark.slow
RATE = 24_000
WAIT_S = 240  # generous: two shared cores; nothing here asserts on speed


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> np.ndarray:
    from pipelines.audio import resample
    from virtual_audio import espeak_pcm16

    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    pcm = espeak_pcm16("What is the capital of France?", tmp_path_factory.mktemp("speech"))
    if pcm is None:
        pytest.skip("espeak-ng is not installed (Debian: apt install espeak-ng)")
    speech = resample(pcm.astype(np.float32) / 32768, 16000, RATE)
    return quiet_room(np.concatenate([np.zeros(RATE // 2, np.float32), 0.7 * speech, np.zeros(RATE // 2, np.float32)]))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_marvis):
    folder = tmp_path_factory.mktemp("serve")
    served = Served(["--tts.checkpoint", str(tiny_marvis), "--llm.max_tokens", "24",
                     "--tts.max_audio_length_ms", "2000", "--session.dir", str(folder / "runs")], folder)
    m = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", served.url)
    served.port, served.token, served.runs = int(m.group(1)), m.group(2), folder / "runs"
    yield served
    served.stop()


def quiet_room(audio: np.ndarray) -> np.ndarray:
    """A microphone's -66 dBFS room noise under the audio, as a real client sends (never digital zeros)."""
    return audio + (np.random.default_rng(0).standard_normal(audio.size) * 10 ** (-66 / 20)).astype(np.float32)


def b64(samples: np.ndarray) -> str:
    return base64.b64encode((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def client(server):
    return openai.AsyncOpenAI(api_key=server.token, base_url=f"http://127.0.0.1:{server.port}/v1", max_retries=0)


async def events_until(conn, kinds: set[str], timeout: float = WAIT_S) -> list:
    """Events received until one of `kinds` (inclusive)."""
    out = []

    async def read():
        async for event in conn:
            out.append(event)
            if event.type in kinds:
                return

    await asyncio.wait_for(read(), timeout)
    return out


def audio_bytes(events) -> int:
    return sum(len(base64.b64decode(e.delta)) for e in events if e.type == "response.output_audio.delta")


def by_type(events, kind):
    return [e for e in events if e.type == kind]


def test_spoken_wav_manual_turn_then_server_vad(server, question):
    async def main():
        async with client(server).realtime.connect(model="voice-agent") as conn:
            created = await events_until(conn, {"session.created"})
            assert created[-1].session.audio.output.format.rate == RATE
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            updated = await events_until(conn, {"session.updated"})
            assert updated[-1].session.audio.input.turn_detection is None
            for start in range(0, len(question), RATE // 5):
                await conn.input_audio_buffer.append(audio=b64(question[start:start + RATE // 5]))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            manual = await events_until(conn, {"response.done"})

            await conn.session.update(session={"type": "realtime",
                                               "audio": {"input": {"turn_detection": {"type": "server_vad"}}}})
            await events_until(conn, {"session.updated"})
            tail = quiet_room(np.zeros(RATE * 2, np.float32))
            stream = np.concatenate([question, tail])
            for start in range(0, len(stream), RATE // 10):
                await conn.input_audio_buffer.append(audio=b64(stream[start:start + RATE // 10]))
            vad = await events_until(conn, {"response.done"})
            return manual, vad

    manual, vad = asyncio.run(main())
    for events in (manual, vad):
        (heard,) = by_type(events, "conversation.item.input_audio_transcription.completed")
        assert "capital" in heard.transcript.lower() and "france" in heard.transcript.lower(), heard.transcript
        assert audio_bytes(events) > 0
        (said,) = by_type(events, "response.output_audio_transcript.done")
        assert said.transcript.strip()
        assert by_type(events, "response.done")[0].response.status == "completed"
        assert not by_type(events, "error"), by_type(events, "error")
    kinds = [e.type for e in vad]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_stopped") \
        < kinds.index("input_audio_buffer.committed") < kinds.index("response.created")


def test_text_message_in_audio_out_and_cancel_mid_response(server):
    async def main():
        async with client(server).realtime.connect(model="voice-agent") as conn:
            await events_until(conn, {"session.created"})
            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Hello! What is the capital of Italy?"}]})
            await conn.response.create()
            answered = await events_until(conn, {"response.done"})

            await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Tell me a long story about a dragon and a knight."}]})
            await conn.response.create()
            before_cut = await events_until(conn, {"response.output_audio.delta"})
            await conn.response.cancel()
            cut = await events_until(conn, {"response.done"})
            return answered, before_cut + cut

    answered, cancelled = asyncio.run(main())
    assert audio_bytes(answered) > 0 and by_type(answered, "response.done")[0].response.status == "completed"
    assert not by_type(answered, "conversation.item.input_audio_transcription.completed")  # typed, not heard
    assert by_type(cancelled, "response.done")[0].response.status == "cancelled"
    # the conversation keeps what the client could have heard: never more than was sent
    turns = [e for b in sorted(server.runs.iterdir()) for e in read_events(b / "events.jsonl")
             if e.get("type") == "turn"]
    last = turns[-1]
    assert last["interrupted"] is True and last["transcript"].startswith("Tell me a long story")


def test_a_second_client_is_told_busy_and_the_models_load_once(server):
    async def main():
        async with client(server).realtime.connect(model="voice-agent") as first:
            await events_until(first, {"session.created"})
            async with client(server).realtime.connect(model="voice-agent") as second:
                told = await events_until(second, {"error"}, timeout=30)
        async with client(server).realtime.connect(model="voice-agent") as third:  # the first has left
            return told, await events_until(third, {"session.created"}, timeout=30)

    told, took_over = asyncio.run(main())
    assert told[-1].error.code == "busy"
    assert took_over[-1].type == "session.created"
    log = "".join(server.lines)
    assert log.count("loading the models") == 1, log
    assert log.count("nothing was said") >= 1  # connections with nothing said leave no bundle
