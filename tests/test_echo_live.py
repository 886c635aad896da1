"""Barge-in on speakers: `voice-agent chat` on a virtual card whose mic hears its own speaker.

The card is tests/virtual_audio.py's (real ALSA -> PortAudio -> sounddevice streams), with a loopback: a thread
writes the mic in real time as the user's speech plus what the speaker played, 50 ms later (plus the card's own
buffering) at -6 dB. The agent's voice is espeak-ng speaking the reply (a fake TTS: the random Marvis makes noise
the VAD would not take for speech, and this test is about echo, not the TTS); Whisper tiny.en and SmolLM2 are
real. Both runs are full duplex (barge-in on):
- without echo cancellation the agent hears its own reply: a turn whose transcript is the agent's words;
- with it (audio.echo_cancellation) the echo starts no turn, and the user, who starts talking 1 s into the
  reply, interrupts it: a barge-in, the reply marked interrupted, the next transcript is the user's words.
Nothing here depends on the machine's speed: the user's interruption is timed from when the echo starts, and
each run is stopped (Ctrl-C) once the bundle shows the transcript it is about.
"""

from __future__ import annotations

import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.echo import is_echo
from agent.session import read_events, read_session
from conftest import require_checkpoints
from virtual_audio import MIC_RATE, PacedDrain, alsa_env, espeak_pcm16, write_asoundrc

ROOT = Path(__file__).resolve().parents[1]
QUESTION, INTERRUPTION = "What is the capital of France?", "Stop, please wait."
ECHO_DELAY_S, ECHO_GAIN = 0.05, 0.5
USER_AFTER_ECHO_S = 1.0
RUN_TIMEOUT_S = 150

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(ctypes.util.find_library("portaudio") is None, reason="PortAudio is not installed"),
]

DRIVER = '''
import subprocess, sys, tempfile
from pathlib import Path
import numpy as np
import agent.build
from pipelines.audio import load_audio
from pipelines.messages import AudioChunk


class EspeakVoice:
    """The agent's voice for this test: espeak-ng reads the reply (slowly, so the user can interrupt it)."""
    sample_rate, samples_per_frame, untrained = 24000, 1920, False

    def warmup(self): pass
    def describe(self): return "espeak-ng (test voice)"
    def prepare_context(self, context): return 0
    def max_chars(self, config): return None
    def prebuffer_s(self, text, config, least_s, out_s=0.0): return least_s
    def rtf_now(self, config): return None
    def rate_margin(self): return None

    def stream(self, text, speaker=0, context=(), voice=None, config=None, cancelled=lambda: False, ahead=None,
               waiting=None):
        wav = Path(tempfile.mkdtemp()) / "reply.wav"
        subprocess.run(["espeak-ng", "-s", "110", "-w", str(wav), text], check=True, capture_output=True)
        audio = load_audio(wav, self.sample_rate)
        for first in range(0, len(audio), 4 * self.samples_per_frame):
            part = audio[first:first + 4 * self.samples_per_frame]
            frames = -(-len(part) // self.samples_per_frame)
            yield AudioChunk(part, np.zeros((32, frames), np.int32), first // self.samples_per_frame)


agent.build.build_tts = lambda cfg, checkpoint=None, log=print: EspeakVoice()
from agent.cli import main
sys.exit(main(sys.argv[1:]))
'''


class _SpeakerTap(PacedDrain):
    """The speaker's recording, also handed to `listener` as it is drained (real time)."""

    def __init__(self, fifo: Path, bytes_per_s: int, listener):
        self.listener = listener
        super().__init__(fifo, bytes_per_s)

    def _keep(self, data: bytes) -> None:
        super()._keep(data)
        self.listener(data)


class LoopbackCard:
    """A virtual card whose mic is the user's speech plus the speaker's echo, written in real time."""

    def __init__(self, folder: Path, question: np.ndarray, interruption: np.ndarray | None):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.mic_fifo = folder / "mic.fifo"
        os.mkfifo(self.mic_fifo)
        config = write_asoundrc(folder, self.mic_fifo, played_raw=folder / "speaker.fifo",
                                mic_tap=folder / "mic-tap.fifo")
        self.env = dict(alsa_env(config), PYTHONUNBUFFERED="1")
        self.question = np.concatenate([np.zeros(MIC_RATE // 2, np.int16), question]).astype(np.float32) / 32768
        self.interruption = None if interruption is None else interruption.astype(np.float32) / 32768
        self.echo_at: float | None = None  # mic time the echo started
        self.interruption_at: float | None = None
        self.written: list[np.ndarray] = []  # everything the mic delivered, [n] float32 each
        self.echo: list[np.ndarray] = []  # its echo part
        self._far = bytearray()
        self._far_lock = threading.Lock()
        self._stop = threading.Event()

    def __enter__(self) -> "LoopbackCard":
        self._drains = [PacedDrain(self.folder / "mic-tap.fifo", MIC_RATE * 2),
                        _SpeakerTap(self.folder / "speaker.fifo", 24000 * 2, self._heard)]
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._writer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._writer.join(5)
        for drain in self._drains:
            drain.close()

    def _heard(self, data: bytes) -> None:
        with self._far_lock:
            self._far += data

    def _open(self) -> int | None:
        while not self._stop.is_set():  # the mic end opens when PortAudio opens the capture device
            try:
                return os.open(self.mic_fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.005)
        return None

    def _write(self) -> None:
        # PortAudio opens the capture device more than once (probing on import, then the stream): each time the
        # reader goes away, the mic starts again from its first sample
        while not self._stop.is_set():
            fd = self._open()
            if fd is None:
                return
            os.set_blocking(fd, True)
            try:
                self._stream(fd)
            except BrokenPipeError:
                pass
            finally:
                os.close(fd)

    def _stream(self, fd: int) -> None:
        import soxr

        resampler = soxr.ResampleStream(24000, MIC_RATE, 1, dtype="float32")
        delayed = np.zeros(int(ECHO_DELAY_S * MIC_RATE), np.float32)
        user = self.question.copy()
        self.echo_at = self.interruption_at = None
        self.written, self.echo = [], []
        with self._far_lock:
            self._far = bytearray()
        n, t, due = MIC_RATE // 100, 0, time.monotonic()
        while not self._stop.is_set():
            with self._far_lock:
                whole = len(self._far) // 2 * 2
                far, self._far = bytes(self._far[:whole]), self._far[whole:]
            played = np.frombuffer(far, "<i2").astype(np.float32) / 32768
            delayed = np.concatenate([delayed, ECHO_GAIN * resampler.resample_chunk(played)])
            echo = np.zeros(n, np.float32)
            k = min(n, len(delayed))
            echo[:k], delayed = delayed[:k], delayed[k:]
            if self.echo_at is None and np.abs(echo).max() > 0.01:
                self.echo_at = t / MIC_RATE
                if self.interruption is not None:
                    self.interruption_at = self.echo_at + USER_AFTER_ECHO_S
                    start = int(self.interruption_at * MIC_RATE)
                    user = np.pad(user, (0, max(0, start + len(self.interruption) - len(user))))
                    user[start:start + len(self.interruption)] += self.interruption
            block = echo + np.pad(user[t:t + n], (0, n - len(user[t:t + n])))
            os.write(fd, np.clip(np.round(block * 32768), -32768, 32767).astype("<i2").tobytes())
            self.written.append(block)
            self.echo.append(echo)
            t += n
            due += n / MIC_RATE
            time.sleep(max(0.0, due - time.monotonic()))


class EchoRun:
    def __init__(self, folder: Path, speech, cancel: bool):
        self.bundle = folder / "bundle"
        self.card = LoopbackCard(folder / "card", speech[0], speech[1] if cancel else None).__enter__()
        driver = folder / "driver.py"
        driver.write_text(DRIVER)
        args = ["chat", "--out", str(self.bundle), "--duration", "60", "--llm.max_tokens", "16",
                "--audio.half_duplex", "false", "--audio.barge_in", "true",
                "--audio.echo_cancellation", "true" if cancel else "false"]
        self.log = open(folder / "log.txt", "w")
        self.proc = subprocess.Popen([sys.executable, str(driver), *args], cwd=ROOT, env=self.card.env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        self.folder = folder

    def transcripts(self) -> list[dict]:
        return [e for e in read_events(self.bundle / "events.jsonl") if e["type"] == "transcript"]

    def stop_when(self, done, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None and not done(self):
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.card.__exit__(None, None, None)
        self.log.close()
        return (self.folder / "log.txt").read_text()


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    folder = tmp_path_factory.mktemp("espeak")
    question = espeak_pcm16(QUESTION, folder)
    if question is None:
        pytest.skip("espeak-ng is not installed (Debian: apt install espeak-ng)")
    return question, espeak_pcm16(INTERRUPTION, folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, speech):
    """Both runs side by side: each stops once it has heard two utterances."""
    root = tmp_path_factory.mktemp("echo-live")
    started = {name: EchoRun(root / name, speech, cancel=name == "cancelled") for name in ("plain", "cancelled")}
    logs = {name: run.stop_when(lambda r: len(r.transcripts()) >= 2, RUN_TIMEOUT_S) for name, run in started.items()}
    for name, run in started.items():
        run.output = logs[name]
    return started


def db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64)) + 1e-12))


def test_without_cancellation_the_agent_hears_itself(runs):
    run = runs["plain"]
    heard = run.transcripts()
    assert len(heard) >= 2 and run.card.echo_at is not None, run.output
    assert "capital" in heard[0]["text"].lower(), heard
    events = read_events(run.bundle / "events.jsonl")
    reply = next(e["reply"] for e in events if e["type"] == "turn")
    print(f"\nwithout AEC, the agent said {reply!r} and heard {heard[1]['text']!r}")
    # no user spoke after the question: what the VAD heard next was the echo, and it stopped the reply
    assert heard[1]["start_s"] >= run.card.echo_at - 0.35, (heard, run.card.echo_at)
    barge_ins = [e for e in events if e["type"] == "barge_in"]
    assert barge_ins and barge_ins[0]["t"] >= run.card.echo_at, (barge_ins, run.card.echo_at)


def test_with_cancellation_the_echo_is_no_turn_and_the_user_barges_in(runs):
    run = runs["cancelled"]
    card = run.card
    heard = run.transcripts()
    assert len(heard) >= 2 and card.interruption_at is not None, run.output
    assert "capital" in heard[0]["text"].lower()
    # nothing was heard between the echo's start and the user's interruption
    assert heard[1]["start_s"] >= card.interruption_at - 0.35, (heard, card.echo_at, card.interruption_at)
    events = read_events(run.bundle / "events.jsonl")
    reply = next(e["reply"] for e in events if e["type"] == "turn")
    print(f"\nwith AEC, over the reply {reply!r}, the user was heard as {heard[1]['text']!r}")
    # AEC3 damps the first syllables of double talk: "Stop, please wait." has come out as "Please mate." and, since
    # the reply plays without gaps (more double talk), as "Talk, lead weight.". What must hold: words were heard,
    # and they are not the agent's own reply coming back.
    assert len(heard[1]["text"].split()) >= 2, heard
    assert not is_echo(heard[1]["text"], reply)
    barge_ins = [e for e in events if e["type"] == "barge_in"]
    assert len(barge_ins) == 1 and barge_ins[0]["t"] >= card.interruption_at, (barge_ins, card.interruption_at)
    turns = [e for e in events if e["type"] == "turn"]
    assert turns and turns[0]["interrupted"], turns

    # the echo, before and after the canceller (mic.pcm holds what the VAD heard)
    raw = np.concatenate(card.written)
    cleaned = read_session(run.bundle).mic
    span = slice(int((card.echo_at + 0.2) * MIC_RATE), int((card.interruption_at - 0.05) * MIC_RATE))
    assert len(cleaned) >= span.stop
    attenuation = db(raw[span]) - db(cleaned[span])
    print(f"\nlive echo attenuation over the first {USER_AFTER_ECHO_S - 0.25:.2f} s of the reply: {attenuation:.1f} dB")
    assert attenuation > 10
