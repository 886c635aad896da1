"""Session bundles: written live, read back, still replayable when truncated; replay's VAD path."""

from __future__ import annotations

import numpy as np
import pytest

from agent.config import load_config
from agent.modes import replay_utterances
from agent.session import SessionData, SessionRecorder, load_replay_source, read_session
from pipelines.audio import load_audio, save_audio
from pipelines.errors import AudioInputError


@pytest.fixture(scope="module")
def jfk16(jfk_path):
    return load_audio(jfk_path, 16000)


def test_recorder_round_trip(tmp_path):
    rec = SessionRecorder(tmp_path / "b", {"mode": "test"})
    block = (np.sin(np.arange(480) / 5) * 0.5).astype(np.float32)
    rec.write_mic(block)
    rec.event("mute", on=True)
    rec.write_mic(block)
    rec.event("mute", on=False)
    rec.event("key", action="press")
    rec.close(turns=0)
    data = read_session(tmp_path / "b")
    assert data.rate == 16000 and len(data.mic) == 960
    np.testing.assert_allclose(data.mic[:480], block, atol=1 / 32768)
    assert data.mutes == [(0.03, 0.06)]
    assert data.keys == [(0.06, "press")]
    assert data.meta["mode"] == "test" and data.meta["turns"] == 0


def test_truncated_bundle_still_replays(tmp_path):
    """A crash mid-write: odd byte count, half a JSON line, no session.json, a mute never closed."""
    rec = SessionRecorder(tmp_path / "b", {"mode": "chat"})
    rec.write_mic(np.full(1000, 0.25, np.float32))
    rec.event("mute", on=True)
    folder = rec.folder  # never closed: the process was killed
    with open(folder / "mic.pcm", "ab") as f:
        f.write(b"\x01")
    with open(folder / "events.jsonl", "a") as f:
        f.write('{"type": "mute", "on": fal')
    (folder / "session.json").unlink()
    data = read_session(folder)
    assert len(data.mic) == 1000 and abs(data.mic[0] - 0.25) < 1e-3
    assert data.mutes == [(1000 / 16000, float("inf"))]


def test_not_a_bundle(tmp_path):
    with pytest.raises(AudioInputError, match="not a session bundle"):
        read_session(tmp_path)
    with pytest.raises(AudioInputError, match="no such audio file"):
        load_replay_source([tmp_path / "missing.wav"], gap_s=1.0)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not really a wav")
    with pytest.raises(AudioInputError, match="cannot read audio"):
        load_replay_source([bad], gap_s=1.0)


def test_replay_turns_from_audio_files(tmp_path, jfk16):
    """Audio files at any rate/channels become one turn each (long pauses inside a file split it)."""
    a = save_audio(tmp_path / "a.wav", jfk16[: 2 * 16000 + 2400], 16000)  # "And so my fellow Americans"
    stereo = np.stack([jfk16[5 * 16000: 8 * 16000]] * 2, axis=1)
    b = tmp_path / "b.flac"
    import soundfile as sf

    from pipelines.audio import resample

    sf.write(b, resample(stereo[:, 0], 16000, 44100)[:, None].repeat(2, axis=1), 44100)
    cfg = load_config("replay")
    data = load_replay_source([a, b], gap_s=cfg.vad.silence_ms / 1000 + 1.0)
    utts = list(replay_utterances(cfg, data))
    assert len(utts) == 2
    assert all(u.reason == "silence" for u in utts)
    assert utts[0].end_s < utts[1].start_s


def test_replay_applies_recorded_mutes(jfk16):
    """Half-duplex in a recording: speech that arrived while the agent was talking is not a turn."""
    cfg = load_config("replay")
    gap = np.zeros(16000, np.float32)
    mic = np.concatenate([gap, jfk16[: 2 * 16000 + 2400], gap * 1.0, gap, jfk16[5 * 16000: 8 * 16000], gap, gap])
    second_start = (16000 + 2 * 16000 + 2400 + 2 * 16000) / 16000
    plain = list(replay_utterances(cfg, SessionData(mic, 16000)))
    muted = list(replay_utterances(cfg, SessionData(mic, 16000, mutes=[(second_start - 0.5, second_start + 3.5)])))
    assert len(plain) == 2 and len(muted) == 1
    assert muted[0].end_s < second_start


def test_replay_push_to_talk_keys(jfk16):
    """A push-to-talk bundle replays with its keys: the turn is exactly press..release, no endpointing."""
    cfg = load_config("replay")
    mic = np.concatenate([np.zeros(8000, np.float32), jfk16[:8 * 16000], np.zeros(16000, np.float32)])
    data = SessionData(mic, 16000, keys=[(0.51, "press"), (6.0, "release")])
    utts = list(replay_utterances(cfg, data))
    assert len(utts) == 1 and utts[0].reason == "manual"
    # the jfk pauses (>600 ms) would split it under endpointing; with keys it is one turn of ~5.5 s
    assert 5.3 < utts[0].duration_s < 6.2
    assert len(list(replay_utterances(cfg, SessionData(mic, 16000)))) >= 3


def test_demo_session_ships(tmp_path):
    from agent.config import ROOT

    data = read_session(ROOT / "sessions" / "demo")
    assert data.rate == 16000 and 8 < len(data.mic) / 16000 < 20
    utts = list(replay_utterances(load_config("replay"), data))
    assert len(utts) == len(data.meta["turns"]) == 3


def test_realtime_replay_is_paced_like_a_mic(jfk16):
    """--realtime feeds audio no faster than it was recorded (a lower bound only: never flaky)."""
    import time

    cfg = load_config("replay")
    cfg.replay.realtime = True
    mic = np.concatenate([jfk16[: 2 * 16000], np.zeros(16000, np.float32)])
    start = time.monotonic()
    utts = list(replay_utterances(cfg, SessionData(mic, 16000)))
    assert time.monotonic() - start >= 2.9
    assert len(utts) == 1


def test_the_bundle_hears_an_event_before_any_transport():
    """The recorder is added to a session's listeners first, so whatever a transport tells its client (a
    Realtime response.done, the page's turn) is already in the bundle when the client reads it."""
    from agent.events import Listeners, Said

    heard = []
    listeners = Listeners(lambda e: heard.append("transport"))
    listeners.add(lambda e: heard.append("bundle"), first=True)
    listeners.add(lambda e: heard.append("later"))
    listeners.emit(Said("hi"))
    assert heard == ["bundle", "transport", "later"]
