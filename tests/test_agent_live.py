"""`voice-agent chat` and `voice-agent ptt` end to end, through real PortAudio streams on the virtual ALSA card.

The CLI runs as a subprocess on a `VirtualCard` (tests/virtual_audio.py): its mic plays an espeak-ng recording
of two user turns in real time, its speaker records what the agent played. The real Whisper tiny.en and
SmolLM2-135M answer; the TTS is a tiny random Marvis checkpoint (with the random Mimi), so a run takes its
seconds of mic audio, model loading and a few short replies. The three live sessions run at the same time (most of their wall time is the
mic's real-time pace and model loading), once per module; every test reads one of them.

Nothing here depends on how fast the machine is:
- hands-free runs full-duplex (`--audio.half_duplex false`), so the second utterance is a turn however long
  the first reply takes; half-duplex has its own session, checked through the mute spans in its bundle;
- push-to-talk turns are decided by the scripted keys, which are in mic-stream time.
"""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent.config import load_config
from agent.metrics import STAGES
from agent.session import SessionData, read_session
from conftest import require_checkpoints
from virtual_audio import VirtualCard, espeak_pcm16, no_devices_env

ROOT = Path(__file__).resolve().parents[1]
RATE = 16000
SPEAKER_RATE = 24000
QUESTION, THANKS = "What is the capital of France?", "Thank you, goodbye."
QUESTION_WORDS, THANKS_WORDS = ("capital", "france"), ("thank", "goodbye")
LEAD_S, GAP_S, TAIL_S = 0.5, 2.5, 1.0  # silence before, between and after the two utterances
RUN_TIMEOUT_S = 300

pytestmark = pytest.mark.skipif(ctypes.util.find_library("portaudio") is None,
                                reason="PortAudio is not installed (Debian: apt install libportaudio2)")


@dataclass
class Speech:
    question: np.ndarray  # int16 at 16 kHz
    thanks: np.ndarray

    @staticmethod
    def span(start_s: float, pcm: np.ndarray) -> tuple[float, float]:
        return start_s, start_s + len(pcm) / RATE


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(round(seconds * RATE)), np.int16)


class LiveRun:
    """`python -m agent.cli VERB --out BUNDLE ARGS...` on its own virtual card, started now, collected later."""

    def __init__(self, folder: Path, verb: str, mic: np.ndarray, args: list[str]):
        self.folder = folder
        self.mic = mic
        self.bundle = folder / "bundle"
        self.card = VirtualCard(folder, mic).__enter__()
        self.stdout_path, self.stderr_path = folder / "stdout.txt", folder / "stderr.txt"
        self.started = time.monotonic()
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", verb, "--out", str(self.bundle), *args],
                                         env=self.card.env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.rc: int | None = None

    def finish(self, timeout: float) -> "LiveRun":
        try:
            self.rc = self.proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.rc = None
        finally:
            self.card.__exit__(None, None, None)
        self.wall_s = time.monotonic() - self.started
        self.stdout, self.stderr = self.stdout_path.read_text(), self.stderr_path.read_text()
        self.played = self.card.played()
        return self

    def check_ok(self) -> None:
        assert self.rc is not None, f"timed out after {RUN_TIMEOUT_S} s:\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}"
        assert self.rc == 0, f"rc {self.rc}:\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}"
        assert "Traceback" not in self.stderr, self.stderr

    def events(self, kind: str) -> list[dict]:
        return [e for e in read_session(self.bundle).events if e["type"] == kind]


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Speech:
    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    folder = tmp_path_factory.mktemp("espeak")
    question = espeak_pcm16(QUESTION, folder)
    if question is None:
        pytest.skip("espeak-ng is not installed (Debian: apt install espeak-ng); it makes the test speech")
    return Speech(question, espeak_pcm16(THANKS, folder))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, speech, tiny_marvis) -> dict:
    """The three live sessions, run side by side."""
    q, t = speech.question, speech.thanks
    two_turns = np.concatenate([silence(LEAD_S), q, silence(GAP_S), t, silence(TAIL_S)])
    q_span = speech.span(LEAD_S, q)
    t_span = speech.span(q_span[1] + GAP_S, t)
    common = ["--tts.checkpoint", str(tiny_marvis), "--llm.max_tokens", "16"]
    plans = {}

    # (1) hands-free: both utterances; stop 0.8 s after the second one ends (its endpoint is ~0.6 s of silence
    # after its last voiced frame, so it is decided before; the worker is typically still answering then).
    duration = round(t_span[1] + 0.8, 2)
    plans["chat"] = ("chat", two_turns, dict(question=q_span, thanks=t_span, duration=duration),
                     ["--duration", str(duration), "--audio.half_duplex", "false",
                      "--tts.max_audio_length_ms", "800"])

    # (2) push-to-talk: keys around each utterance; no --duration, the run ends with the key script.
    keys = [(round(q_span[0] - 0.2, 3), "press"), (round(q_span[1] + 0.3, 3), "release"),
            (round(t_span[0] - 0.2, 3), "press"), (round(t_span[1] + 0.3, 3), "release")]
    plans["ptt"] = ("ptt", two_turns, dict(question=q_span, thanks=t_span, keys=keys),
                    ["--tts.max_audio_length_ms", "800"])

    # (3) half-duplex: the second utterance starts 2.5 s after the first one ends, i.e. ~2 s after the endpoint
    # (the moment the agent starts answering: it is heard within that even with the other two sessions running
    # beside it; once, under CI, its first sample came 3 s after the endpoint with a 1.2 s gap here), and lasts
    # ~1.5 s; the reply is made 100 frames (8 s) long, so the agent is still speaking when the mic hears the
    # second utterance, however fast it runs.
    overlap = np.concatenate([silence(LEAD_S), q, silence(2.5), t, silence(TAIL_S)])
    o_t_span = speech.span(q_span[1] + 2.5, t)
    plans["half_duplex"] = ("chat", overlap, dict(question=q_span, thanks=o_t_span),
                            ["--duration", f"{o_t_span[1] + 0.5:.2f}", "--tts.min_text_frames", "100",
                             "--tts.max_audio_length_ms", "8000"])

    root = tmp_path_factory.mktemp("live")
    started = {}
    try:
        for name, (verb, mic, info, args) in plans.items():
            folder = root / name
            folder.mkdir()
            if "keys" in info:
                (folder / "keys.txt").write_text("".join(f"{action} {at:.3f}\n" for at, action in info["keys"]))
                args = [*args, "--keys", str(folder / "keys.txt")]
            started[name] = LiveRun(folder, verb, mic, common + args)
            started[name].info = info
    finally:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for run in started.values():
            run.finish(deadline - time.monotonic())
    return started


# -- helpers ---------------------------------------------------------------------------------------------


def assert_mic_recorded_exactly(run: LiveRun, at_least_s: float) -> np.ndarray:
    """mic.pcm in the bundle is the card's mic input, bit for bit, from its first sample."""
    got = np.fromfile(run.bundle / "mic.pcm", dtype="<i2")
    assert len(got) >= at_least_s * RATE, f"mic.pcm holds {len(got) / RATE:.2f} s, expected >= {at_least_s:.2f} s"
    expected = np.concatenate([run.mic, np.zeros(len(got), np.int16)])[:len(got)]
    np.testing.assert_array_equal(got, expected)
    return got


def assert_played_all_agent_audio(run: LiveRun, turns: int) -> None:
    """The speaker recorded every sample of every reply, in order: its non-zero samples are exactly the turns'
    agent audio (turns/*-agent.wav, 16-bit; the wav and the speaker each round to int16 once, so +-1)."""
    wavs = []
    for i in range(turns):
        wav, rate = sf.read(run.bundle / "turns" / f"{i:04d}-agent.wav", dtype="int16")
        assert rate == SPEAKER_RATE
        wavs.append(wav)
    agent = np.concatenate(wavs)
    heard = run.played[run.played != 0].astype(np.int32)
    said = agent[agent != 0].astype(np.int32)
    assert len(said) > 0.2 * SPEAKER_RATE * turns, "the replies hold (almost) no audio"
    assert len(heard) == len(said), f"played {len(heard)} non-zero samples, the replies hold {len(said)}"
    assert np.abs(heard - said).max() <= 1
    # the file is at least the replies long (plus PortAudio's leading buffer and the idle silence around them)
    assert len(run.played) >= len(agent)


def replayed_utterances(run: LiveRun, config: str):
    """What the replay path makes of the bundle: its mic audio with its recorded mutes and keys."""
    from agent.modes import replay_utterances

    return list(replay_utterances(load_config(config), read_session(run.bundle)))


def contains(text: str, words) -> bool:
    return all(w in text.lower() for w in words)


# -- (1) hands-free ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hands_free_two_turns_through_the_sound_card(runs):
    run = runs["chat"]
    run.check_ok()
    turns = run.events("turn")
    assert len(turns) == 2, run.stdout
    assert contains(turns[0]["transcript"], QUESTION_WORDS) and contains(turns[1]["transcript"], THANKS_WORDS)
    assert all(t["reply"].strip() for t in turns), turns
    assert not any(t["interrupted"] for t in turns)
    transcript = (run.bundle / "transcript.txt").read_text()
    assert turns[0]["transcript"] in transcript and turns[1]["reply"] in transcript
    meta = json.loads((run.bundle / "session.json").read_text())
    assert meta["mode"] == "hands-free" and meta["turns"] == 2 and meta["tts_untrained"] is True

    heard = run.events("transcript")
    # the words end a finished question at the pause, once its transcript is judged; if the machine is slow the
    # silence may come first (either is right: which one wins is a race with the clock)
    assert all(h["reason"] in ("words", "silence") for h in heard), heard
    for h, (start, end) in zip(heard, (run.info["question"], run.info["thanks"])):
        assert start - 0.1 <= h["start_s"] and h["end_s"] <= end + 0.1, (h, start, end)

    rows = [json.loads(line) for line in (run.bundle / "waterfall.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert [s for s in STAGES if s in row] == STAGES, row  # first_sample_played: the real speaker callback
        values = [row[s] for s in STAGES]
        assert values == sorted(values), row
    vad = load_config("default").vad
    for row, h in zip(rows, heard):  # the words' verdict comes after the pause, never after the silence would
        low = vad.pause_ms if h["reason"] == "words" else vad.silence_ms
        assert low - 40 <= row["endpoint"] <= vad.silence_ms + 40, (row, h)

    assert_mic_recorded_exactly(run, at_least_s=run.info["duration"])
    assert_played_all_agent_audio(run, turns=2)


@pytest.mark.slow
def test_hands_free_bundle_replays_to_the_same_utterances(runs):
    run = runs["chat"]
    run.check_ok()
    live = [(h["start_s"], h["end_s"]) for h in run.events("transcript")]
    again = [(u.start_s, u.end_s) for u in replayed_utterances(run, "default")]
    assert len(again) == len(live) == 2
    np.testing.assert_allclose(again, live, atol=1e-6)


# -- (2) push-to-talk ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_push_to_talk_scripted_keys_make_the_turns(runs):
    run = runs["ptt"]
    run.check_ok()
    keys = run.events("key")
    assert [k["action"] for k in keys] == ["press", "release", "press", "release"]
    for k, (at, _) in zip(keys, run.info["keys"]):
        assert at <= k["t"] < at + 0.031, (k, at)  # applied on the first 30 ms mic block at or after its time
    heard = run.events("transcript")
    assert [h["reason"] for h in heard] == ["manual", "manual"]
    for h, press, release in zip(heard, keys[0::2], keys[1::2]):
        assert h["start_s"] == pytest.approx(press["t"], abs=1e-3)  # the turn is exactly press..release
        assert h["end_s"] == pytest.approx(release["t"], abs=1e-3)
    turns = run.events("turn")
    assert len(turns) == 2, run.stdout
    assert contains(turns[0]["transcript"], QUESTION_WORDS) and contains(turns[1]["transcript"], THANKS_WORDS)
    meta = json.loads((run.bundle / "session.json").read_text())
    assert meta["mode"] == "push-to-talk" and meta["turns"] == 2
    # the run ended with its key script, right after the last release, and still answered that turn
    last_release = run.info["keys"][-1][0]
    assert_mic_recorded_exactly(run, at_least_s=last_release)
    assert len(np.fromfile(run.bundle / "mic.pcm", dtype="<i2")) <= (last_release + 0.1) * RATE
    # a press while the agent is still answering takes the floor: that reply stops (recorded as a barge-in);
    # whether the first reply was still under way at the second press depends on the machine's speed
    barge_ins = run.events("barge_in")
    assert len(barge_ins) <= 1 and all(b["t"] == pytest.approx(keys[2]["t"], abs=1e-3) for b in barge_ins)
    assert barge_ins or not turns[0]["interrupted"]
    assert turns[0]["interrupted"] or turns[0]["reply"].strip()
    assert not turns[1]["interrupted"] and turns[1]["reply"].strip()
    # the replay path applies the recorded keys on the same blocks: the same two turns
    again = replayed_utterances(run, "push_to_talk")
    assert [u.reason for u in again] == ["manual", "manual"]
    np.testing.assert_allclose([(u.start_s, u.end_s) for u in again], [(h["start_s"], h["end_s"]) for h in heard],
                               atol=1e-6)


# -- (3) half-duplex ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_half_duplex_speech_while_the_agent_talks_is_no_turn(runs):
    run = runs["half_duplex"]
    run.check_ok()
    data = read_session(run.bundle)
    start, end = run.info["thanks"]
    # precondition, from the bundle: the mic heard the second utterance while the VAD was muted
    assert any(a <= start and end <= b for a, b in data.mutes), (data.mutes, start, end)
    heard = run.events("transcript")
    assert len(heard) == 1 and contains(heard[0]["text"], QUESTION_WORDS), heard
    for h in heard:  # nothing the VAD decided lies inside a mute span
        assert not any(a <= h["start_s"] < b for a, b in data.mutes), (h, data.mutes)
    turns = run.events("turn")
    assert len(turns) == 1 and turns[0]["reply"].strip()
    # without the mutes the same mic audio is two utterances: the second one was real speech
    plain = SessionData(data.mic, data.rate)
    from agent.modes import replay_utterances

    assert len(list(replay_utterances(load_config("default"), plain))) == 2
    assert len(replayed_utterances(run, "default")) == 1
    # --duration came while the turn was still being answered: it was answered and played out in full
    assert_mic_recorded_exactly(run, at_least_s=end)
    assert_played_all_agent_audio(run, turns=1)
    assert turns[0]["waterfall"]["first_sample_played"] > 0


# -- (4) no sound card -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["chat", "ptt"])
def test_no_audio_device_is_one_line_pointing_at_replay(tmp_path, verb):
    proc = subprocess.run([sys.executable, "-m", "agent.cli", verb, "--duration", "5"], env=no_devices_env(tmp_path),
                          cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: no microphone found") and "voice-agent replay" in lines[0]
    assert "Traceback" not in proc.stderr


def test_bad_key_script_is_one_line(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("press 0.5\nhold 2\n")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "ptt", "--keys", str(keys)], env=no_devices_env(tmp_path),
                          cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {keys}:2: expected 'press SECONDS' or 'release SECONDS', got 'hold 2'"


# -- the live mode's speaker wrapper, driven by hand (no device) -------------------------------------------------


def test_playback_sink_waits_for_the_reply_and_keeps_only_what_was_heard_on_barge_in():
    import threading

    from agent.devices import SpeakerSink
    from agent.sinks import PlaybackSink

    speaker = SpeakerSink(sample_rate=1000, jitter_ms=10)  # not started: we play it by calling its callback's fill
    sink = PlaybackSink(speaker)
    stamps = []
    sink.on_first_sample = stamps.append
    done = threading.Event()

    def play():  # a 1 kHz "device" taking 20 samples every 2 ms (10x real time)
        while not done.is_set():
            out = np.zeros(20, np.int16)
            if speaker._fill(out):
                speaker.on_first_sample(time.monotonic())
            time.sleep(0.002)

    player = threading.Thread(target=play, daemon=True)
    player.start()
    try:
        sink.begin_utterance()
        sink.write(np.full(300, 0.5, np.float32))
        sink.end_of_stream()  # returns once all 300 samples are played, first sample reported
        assert not speaker.is_playing and speaker.played_samples == 300 and len(stamps) == 1

        sink.begin_utterance()
        sink.write(np.full(2000, 0.5, np.float32))
        deadline = time.monotonic() + 2
        while speaker.played_samples < 100 and time.monotonic() < deadline:
            time.sleep(0.001)
        sink.barge_in()  # from another thread, in the live loop
        heard = sink.clear()
        sink.write(np.full(500, 0.5, np.float32))  # a chunk that was on its way: dropped, not played
        sink.end_of_stream()
        assert 100 <= heard < 2000 and not speaker.is_playing and sink.clear() == heard
        sink.begin_utterance()  # the next reply plays again
        sink.write(np.full(50, 0.5, np.float32))
        sink.end_of_stream()
        assert speaker.played_samples == 50 and len(stamps) == 3
    finally:
        done.set()
        player.join()
