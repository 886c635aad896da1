"""Nothing recorded is lost: the floor rule, bundles that are never reused, SIGTERM / SIGKILL mid-reply, zero
turns, a full disk, a dead microphone.

The process tests run `python -m agent.cli` as a subprocess (real Whisper tiny.en, SmolLM2-135M, a tiny random
Marvis), four side by side: `replay --realtime` of the shipped demo session and `chat` on the virtual ALSA card
(tests/virtual_audio.py) playing the same audio, each stopped by SIGTERM or SIGKILL as soon as the first turn is
being answered. Nothing depends on how fast the machine is: the signal is sent once stdout says a turn began.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.config import ROOT, load_config
from agent.floor import Floor
from agent.session import SessionRecorder, read_session
from agent.sinks import ReplaySink
from conftest import require_checkpoints
from pipelines.vad import Endpointer, VADConfig
from virtual_audio import VirtualCard

DEMO = ROOT / "sessions" / "demo"
RATE = 16000
WAIT_S = 300


# -- the floor, driven by hand ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech(jfk_path) -> np.ndarray:
    from pipelines.audio import load_audio

    return load_audio(jfk_path, RATE)[: 2 * RATE]  # "And so my fellow Americans"


def _feed(floor: Floor, audio: np.ndarray, t0: float = 0.0, speaking: bool = False, keys=None):
    steps, block = [], 480
    keys = dict(keys or {})
    for i in range(0, len(audio), block):
        t = t0 + i / RATE
        due = [a for at, a in sorted(keys.items()) if at <= t]
        for at in [at for at in keys if at <= t]:
            del keys[at]
        steps.append(floor.step(t, audio[i:i + block], due, speaking, RATE))
    return steps


def test_half_duplex_mutes_while_the_agent_speaks_and_records_the_change(speech):
    floor = Floor(Endpointer(VADConfig(), RATE), push_to_talk=False, half_duplex=True, barge_in=False)
    steps = _feed(floor, np.concatenate([speech, np.zeros(RATE, np.float32)]), speaking=True)
    assert steps[0].mute is True and all(s.mute is None for s in steps[1:])
    assert not any(s.utterances for s in steps) and floor.muted_s == floor.heard_s
    assert "muted all along" in floor.why_silent(0)
    steps = _feed(floor, np.concatenate([speech, np.zeros(RATE, np.float32)]), t0=3.0, speaking=False)
    assert steps[0].mute is False and sum(len(s.utterances) for s in steps) == 1


def test_a_key_press_takes_the_floor_from_a_speaking_agent(speech):
    floor = Floor(Endpointer(VADConfig(enabled_endpointing=False), RATE), push_to_talk=True, half_duplex=True,
                  barge_in=False)
    _feed(floor, np.zeros(RATE // 2, np.float32), speaking=True)
    assert floor.muted
    steps = _feed(floor, speech, t0=0.5, speaking=True, keys={0.6: "press", 2.4: "release"})
    pressed = next(s for s in steps if s.keys == ["press"])
    assert pressed.mute is False and pressed.barge_in
    assert [len(s.utterances) for s in steps if s.keys == ["release"]] == [1]


def test_recorded_mutes_are_reapplied_whatever_the_agent_does(speech):
    floor = Floor(Endpointer(VADConfig(), RATE), push_to_talk=False, half_duplex=True, barge_in=False,
                  mutes=[(0.0, 2.5)])
    steps = _feed(floor, np.concatenate([speech, np.zeros(RATE, np.float32)]), speaking=False)
    assert steps[0].mute is True and not any(s.utterances for s in steps)
    assert "no speech found" in floor.why_silent(0)


# -- bundles ------------------------------------------------------------------------------------------------


def _cli(*args, env=None, timeout=WAIT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def test_replay_never_writes_into_an_existing_bundle(tmp_path):
    src = tmp_path / "B"
    shutil.copytree(DEMO, src)
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    proc = _cli("replay", src, "--out", src, "--no-progress", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: {src}: already exists and is not an empty folder; a session bundle is "
                                   f"never overwritten, pass a new --out (or leave it out for a fresh name)")
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before
    with pytest.raises(Exception, match="already exists"):
        SessionRecorder(src, {})


def test_full_disk_stops_recording_with_one_warning_and_the_session_goes_on(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: writes fail with EFBIG as they would ENOSPC."""
    script = f"""
import resource, signal, numpy as np
from agent.session import SessionRecorder
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
rec = SessionRecorder({str(tmp_path / 'b')!r}, {{}}, warn=print)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
for i in range(8):
    rec.write_mic(np.full(16000, 0.1, np.float32))
    rec.event("tick", i=i)
print("written", rec.finish([], {{}}), "mic_s", rec.mic_time)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    warnings = [ln for ln in proc.stdout.splitlines() if ln.startswith("warning: recording stopped")]
    assert len(warnings) == 1 and "File too large" in warnings[0], proc.stdout
    assert proc.stdout.splitlines()[-1] == "written [] mic_s 8.0"
    data = read_session(tmp_path / "b")  # what was flushed before the disk filled still reads
    assert 0 < len(data.mic) <= 100_000 // 2


# -- stopping: the running turn ends at its next TTS frame or LLM token ------------------------------------


def test_a_cancelled_tts_stream_stops_at_the_next_frame(tiny_tts):
    cfg = dataclasses.replace(tiny_tts.config, first_chunk_frames=2, chunk_frames=8, stop_on_eos=False,
                              max_audio_length_ms=2000)
    asked = []

    def cancelled() -> bool:
        asked.append(True)
        return len(asked) > 5

    tiny_tts.clock = lambda: 0.0  # infinitely fast: after the first chunk, chunks are chunk_frames long
    try:
        chunks = list(tiny_tts.stream("hello there how are you", 0, config=cfg, cancelled=cancelled))
    finally:
        tiny_tts.clock = time.monotonic
    assert len(asked) == 6  # once a frame, and no frame after the answer was yes
    assert [c.num_frames for c in chunks] == [2]  # frames 3..5 waited for an 8-frame chunk: never played
    assert len(list(tiny_tts.stream("hello there how are you", 0, config=cfg))) > 1


class _Words:
    """An LLM stand-in (the LLM is not under test) that counts the tokens taken from it."""

    max_history_turns = 0  # no earlier reply is checked for copies

    def __init__(self, reply: str):
        self.reply, self.taken, self.history = reply, 0, []

    def warmup(self) -> None:
        pass

    def stream(self, text: str, avoid=(), unlike=()):
        for word in self.reply.split(" "):
            self.taken += 1
            yield word + " "

    def prepare_next_turn(self) -> int:
        return 0

    def commit(self, user: str, reply: str) -> None:
        self.history.append((user, reply))


def test_stopping_the_engine_mid_reply_ends_the_turn_and_prepares_nothing(tiny_tts):
    """What SIGTERM / Ctrl-C do to the worker: `engine.stop()` from another thread while a reply plays."""
    from agent.conversation import Conversation
    from agent.engine import Stages, TurnEngine
    from pipelines.asr.whisper import Transcript
    from pipelines.tts.load import TTSConfig
    from pipelines.vad import Utterance

    class Heard:
        def warmup(self) -> None:
            pass

        def transcribe(self, audio, sample_rate=16000):
            return Transcript("hello there", 0.0, "en")

    llm = _Words("Hello there. How are you today? I am fine. Thanks, and you? The weather is sunny.")
    stages = Stages(Heard(), llm, tiny_tts, TTSConfig(seed=0, max_audio_length_ms=2000, first_chunk_frames=2,
                                                      chunk_frames=8, stop_on_eos=False))
    engine = TurnEngine(stages, Conversation(), log=lambda m: None)
    prepared = []
    tiny_tts.prepare_context = lambda context: prepared.append(context) or 0

    class StopsAfterTheFirstChunk(ReplaySink):
        def write(self, audio):
            super().write(audio)
            stopper = threading.Thread(target=engine.stop)  # another thread, as the signal handler's is
            stopper.start()
            stopper.join()

    sink = StopsAfterTheFirstChunk(tiny_tts.sample_rate)
    audio = np.zeros(16000, np.float32)
    utterance = Utterance(audio=audio, start_s=0.0, end_s=1.0, decided_s=1.6, reason="silence", audio_start_s=0.0)
    turn = engine.run_turn(utterance, sink)
    assert turn.interrupted and turn.transcript == "hello there"
    assert len(sink.audio()) == 2 * tiny_tts.samples_per_frame  # the first chunk only: cut at the next frame
    assert turn.agent.codes.shape[1] == 2 and turn.reply == "Hello there."
    assert llm.taken == 3  # "How" ended the first sentence; the rest of the reply was never asked for
    assert llm.history == [("hello there", "Hello there.")] and prepared == []
    assert engine.run_turn(dataclasses.replace(utterance, start_s=2.0), sink).interrupted  # stays stopped


# -- processes: SIGTERM and SIGKILL while a turn is answered ------------------------------------------------


class Run:
    """`voice-agent VERB ... --out BUNDLE`, signalled as soon as its stdout says a turn is being answered."""

    def __init__(self, folder: Path, verb: str, args: list[str], sig: int, env: dict, card=None):
        self.folder, self.sig, self.card = folder, sig, card
        self.bundle = folder / "bundle"
        self.out_path, self.err_path = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", verb, "--out", str(self.bundle), *args],
                                         cwd=ROOT, env=dict(env, PYTHONUNBUFFERED="1"), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err)
        self.signalled_wall: float | None = None
        self.signalled_at: float | None = None
        self.rc: int | None = None

    def poll(self) -> bool:
        """Signal once a turn began; True when the process is done."""
        if self.signalled_wall is None and "you   >" in self.out_path.read_text():
            self.signalled_wall, self.signalled_at = time.time(), time.monotonic()
            self.proc.send_signal(self.sig)
        self.rc = self.proc.poll()
        return self.rc is not None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.ended = time.monotonic()
        if self.card is not None:
            self.card.__exit__(None, None, None)
        self.stdout, self.stderr = self.out_path.read_text(), self.err_path.read_text()

    def stream_time_at_signal(self) -> float:
        """Mic-stream seconds a live mic had delivered when the signal went: from the last event's (t, wall)."""
        e = [e for e in read_session(self.bundle).events if "wall" in e][-1]
        return float(e["t"]) + (self.signalled_wall - float(e["wall"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_marvis) -> dict[str, Run]:
    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    live = ctypes.util.find_library("portaudio") is not None
    # a long reply, so the signal lands while the agent is answering
    common = ["--tts.checkpoint", tiny_marvis, "--llm.max_tokens", "24", "--tts.min_text_frames", "50",
              "--tts.max_audio_length_ms", "4000"]
    root = tmp_path_factory.mktemp("lifecycle")
    mic = np.frombuffer((DEMO / "mic.pcm").read_bytes(), "<i2")
    started: dict[str, Run] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            name = f"replay-{sig.name}"
            (root / name).mkdir()
            started[name] = Run(root / name, "replay", [DEMO, "--realtime", "--no-progress", *common], sig,
                                dict(os.environ))
            if live:
                name = f"live-{sig.name}"
                card = VirtualCard(root / name, mic).__enter__()
                started[name] = Run(root / name, "chat", ["--audio.half_duplex", "false", "--duration", "60", *common],
                                    sig, card.env, card)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not all([r.poll() for r in started.values()]):
            time.sleep(0.1)
    finally:
        for r in started.values():
            r.close()
    return started


@pytest.mark.long
@pytest.mark.parametrize("kind", ["replay", "live"])
def test_sigterm_closes_the_session_like_ctrl_c(runs, kind):
    run = runs.get(f"{kind}-SIGTERM") or pytest.skip("PortAudio is not installed")
    assert run.signalled_at is not None, f"no turn began:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    assert run.rc in (0, 130), f"rc {run.rc}:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    assert "Traceback" not in run.stderr, run.stderr
    meta = json.loads((run.bundle / "session.json").read_text())
    assert "closed" in meta and "summary" in meta
    for name in ("transcript.txt", "summary.json", "waterfall.jsonl"):
        assert (run.bundle / name).is_file(), name
    # the turn being answered was cut where the stop found it (its long reply unfinished) and is in the bundle
    heard = run.stdout.split("you   > ", 1)[1].splitlines()[0]
    turns = [e for e in read_session(run.bundle).events if e["type"] == "turn"]
    assert turns and turns[-1]["transcript"] == heard and turns[-1]["interrupted"], turns
    assert f"you:   {heard}" in (run.bundle / "transcript.txt").read_text()
    print(f"{kind}: SIGTERM to exit {run.ended - run.signalled_at:.1f} s")


@pytest.mark.parametrize("kind", ["replay", "live"])
def test_sigkill_mid_reply_keeps_the_mic_audio_and_the_bundle_replays(runs, kind):
    from agent.modes import replay_utterances

    run = runs.get(f"{kind}-SIGKILL") or pytest.skip("PortAudio is not installed")
    assert run.signalled_at is not None, f"no turn began:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    assert run.rc == -signal.SIGKILL
    data = read_session(run.bundle)
    kept_s, stream_s = len(data.mic) / data.rate, run.stream_time_at_signal()
    print(f"{kind}: SIGKILL at stream time {stream_s:.2f} s, mic.pcm holds {kept_s:.2f} s "
          f"(lost {max(0.0, stream_s - kept_s):.3f} s)")
    assert kept_s >= stream_s - 0.5
    assert "closed" not in data.meta
    assert len(list(replay_utterances(load_config("replay"), data))) >= 1


def test_zero_turns_says_why_and_names_only_files_that_exist(tmp_path, tiny_marvis):
    import soundfile as sf

    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    sf.write(tmp_path / "quiet.wav", np.zeros(2 * RATE, np.int16), RATE)
    out = tmp_path / "bundle"
    proc = _cli("replay", tmp_path / "quiet.wav", "--out", out, "--no-progress", "--tts.checkpoint", tiny_marvis)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any(ln.startswith("no turn taken: no speech found in") for ln in lines), proc.stdout
    last = lines[-1]
    assert last.startswith(f"session bundle: {out} (")
    named = last[last.index("(") + 1:-1].split(", ")
    assert "waterfall.png" not in named and all((out / n).exists() for n in named), last


# -- a microphone that delivers only zeros (a muted mic, or a denied macOS permission) ---------------------


@pytest.fixture()
def silent_card(tmp_path):
    if ctypes.util.find_library("portaudio") is None:
        pytest.skip("PortAudio is not installed (Debian: apt install libportaudio2)")
    with VirtualCard(tmp_path / "card", np.zeros(RATE, np.int16)) as card:
        yield card


def test_doctor_reports_a_microphone_that_delivers_only_zeros(silent_card):
    proc = _cli("doctor", env=silent_card.env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert any(ln.startswith("microphone: delivers only zeros") for ln in proc.stdout.splitlines()), proc.stdout


def test_chat_warns_when_the_microphone_delivers_only_zeros(silent_card, tmp_path, tiny_marvis):
    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    proc = _cli("chat", "--duration", "4", "--out", tmp_path / "bundle", "--tts.checkpoint", tiny_marvis,
                env=silent_card.env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(ln.startswith("warning: the microphone has delivered only zeros for 3 s") for ln in lines) == 1, lines
    assert any(ln.startswith("no turn taken: no speech found in 4.0 s") for ln in lines), lines
    assert len(read_session(tmp_path / "bundle").mic) >= 4 * RATE


# -- the microphone goes away mid-session ----------------------------------------------------------------


def test_a_microphone_that_goes_away_ends_the_session_in_one_line_and_keeps_it(tmp_path, tiny_marvis):
    """The mic's stream fails for real inside PortAudio (`VirtualCard.unplug_mic`) while a turn is answered."""
    from agent.modes import replay_utterances

    if ctypes.util.find_library("portaudio") is None:
        pytest.skip("PortAudio is not installed (Debian: apt install libportaudio2)")
    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    bundle, out, err = tmp_path / "bundle", tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    mic = np.frombuffer((DEMO / "mic.pcm").read_bytes(), "<i2")
    with VirtualCard(tmp_path, mic) as card, open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "chat", "--out", str(bundle), "--duration", "60",
                                 "--audio.half_duplex", "false", "--tts.checkpoint", str(tiny_marvis)],
                                cwd=ROOT, env=dict(card.env, PYTHONUNBUFFERED="1"), stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=stderr)
        try:
            deadline = time.monotonic() + WAIT_S  # a hang guard only
            while "you   >" not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            delivered = card.unplug_mic()
            rc = proc.wait(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout, stderr = out.read_text(), err.read_text()
    assert "you   >" in stdout, f"no turn began:\n{stdout[-2000:]}\n{stderr[-2000:]}"
    assert rc == 2 and "Traceback" not in stderr, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the microphone 'default' (device "), stderr
    assert "went away" in errors[0] and "session up to then is saved" in errors[0]
    assert f"session bundle: {bundle}" in stdout
    meta = json.loads((bundle / "session.json").read_text())
    assert "closed" in meta and "summary" in meta and (bundle / "transcript.txt").is_file()
    data = read_session(bundle)
    print(f"mic delivered {delivered / RATE:.2f} s before it went away, mic.pcm keeps {len(data.mic) / data.rate:.2f} s")
    assert len(data.mic) >= delivered - 480  # all of it, but a block PortAudio held back unfinished (block_ms 30)
    assert len(list(replay_utterances(load_config("replay"), data))) >= 1
