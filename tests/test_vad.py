"""Endpointing on real webrtcvad: real speech (jfk.flac), espeak-ng speech and synthetic bursts."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from pipelines.audio import load_audio
from pipelines.errors import AudioInputError
from pipelines.vad import Endpointer, SpeechEnded, SpeechPaused, SpeechResumed, SpeechStarted, VADConfig

# the mechanics are shown on jfk at a 600 ms end of turn, where its 0.63 s pause ends a turn (the agent
# waits 700 ms: configs/default.toml)
AT_600 = VADConfig(silence_ms=600)

SR = 16000
JFK = Path(__file__).parent / "fixtures" / "jfk.flac"
# Turns of jfk.flac with the default config, measured once: (start_s, end_s). Its three pauses
# are ~1.1 s, ~1.1 s and ~0.63 s of -40 dBFS hiss; the file ends mid-turn.
JFK_TURNS = [(0.33, 2.13), (3.27, 4.32), (5.40, 7.56), (8.19, 10.98)]
ODD_CHUNKS = (1, 7, 333, 4801, 97, 1024, 2999)


@pytest.fixture(scope="module")
def jfk() -> np.ndarray:
    return load_audio(JFK, SR)


@pytest.fixture(scope="module")
def espeak_wav(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); it makes the synthetic speech")
    path = tmp_path_factory.mktemp("espeak") / "hello.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Hello there. How are you doing today?"], check=True)
    return path


def hiss(seconds: float, seed: int = 0) -> np.ndarray:
    """A quiet open mic: -60 dBFS white noise."""
    return np.random.default_rng(seed).normal(0.0, 1e-3, round(seconds * SR)).astype(np.float32)


def run(endpointer: Endpointer, audio: np.ndarray, chunks=None, flush: bool = True) -> list:
    events = []
    if chunks is None:
        events += endpointer.process(audio)
    else:
        sizes, i = itertools.cycle(chunks), 0
        while i < audio.size:
            n = next(sizes)
            events += endpointer.process(audio[i : i + n])
            i += n
    return events + (endpointer.flush() if flush else [])


def utterances(events: list) -> list:
    return [e.utterance for e in events if isinstance(e, SpeechEnded)]


def spans(events: list) -> list[tuple[float, float]]:
    return [(u.start_s, u.end_s) for u in utterances(events)]


def test_jfk_default_turns(jfk):
    events = run(Endpointer(AT_600), jfk)
    got = utterances(events)
    assert [u.reason for u in got] == ["silence", "silence", "silence", "flush"]
    np.testing.assert_allclose(spans(events), JFK_TURNS, atol=0.035)
    # every turn is announced once, at its first speech frame, before it ends
    assert [type(e) for e in events if not isinstance(e, (SpeechPaused, SpeechResumed))] == [SpeechStarted, SpeechEnded] * 4
    assert [e.t for e in events if isinstance(e, SpeechStarted)] == [u.start_s for u in got]
    for u in got[:3]:
        assert u.decided_s - u.end_s == pytest.approx(0.6)
        assert u.sample_rate == SR and u.audio.dtype == np.float32
    # pre-roll in front, a pre-roll-long tail behind; consecutive turns never share audio
    for prev, nxt in zip(got, got[1:]):
        assert prev.audio_start_s + prev.duration_s <= nxt.audio_start_s + 1e-9


def test_noise_floor_gate_is_what_splits_jfk(jfk):
    # webrtcvad alone calls the -40 dBFS hiss in jfk's pauses speech: one turn that never ends
    events = run(Endpointer(VADConfig(silence_ms=600, energy_margin_db=0)), jfk)
    assert [u.reason for u in utterances(events)] == ["flush"]


def test_pre_roll_keeps_the_onset(espeak_wav):
    speech = load_audio(espeak_wav, SR)
    signal = np.concatenate([hiss(1.0), speech + hiss(speech.size / SR, 1), hiss(1.5, 2)])
    (u,) = utterances(run(Endpointer(AT_600), signal))
    assert 1.0 <= u.start_s <= 1.1  # espeak's first sound is at ~1.01 s
    assert u.audio_start_s == pytest.approx(u.start_s - 0.3)
    first = round(u.audio_start_s * SR)
    np.testing.assert_array_equal(u.audio, signal[first : first + u.audio.size])
    assert u.duration_s >= speech.size / SR + 0.3
    (bare,) = utterances(run(Endpointer(VADConfig(silence_ms=600, pre_roll_ms=0)), signal))
    assert bare.start_s == u.start_s
    assert u.duration_s - bare.duration_s == pytest.approx(0.6)  # 300 ms before + 300 ms after


def test_jfk_first_turn_starts_300ms_early(jfk):
    (u, *_) = utterances(run(Endpointer(AT_600), jfk))
    assert u.audio_start_s == pytest.approx(0.03)
    np.testing.assert_array_equal(u.audio[:4800], jfk[480 : 480 + 4800])


@pytest.mark.parametrize("kind", ["noise", "click"])
def test_short_burst_is_not_a_turn(kind):
    signal = hiss(3.0)
    if kind == "noise":
        signal[SR : SR + SR // 10] += np.random.default_rng(5).normal(0, 0.3, SR // 10).astype(np.float32)
    else:
        signal[SR] = 1.0
    endpointer = Endpointer(AT_600)
    assert run(endpointer, signal) == []
    assert not endpointer.in_speech
    if kind == "noise":  # the burst does open a candidate turn: min_speech_ms is what drops it
        assert len(utterances(run(Endpointer(VADConfig(silence_ms=600, min_speech_ms=0)), signal))) == 1


@pytest.mark.parametrize("pause_s, turns", [(1.0, 2), (0.3, 1)])
def test_pause_length_decides_split(jfk, pause_s, turns):
    room = np.tile(jfk[round(2.3 * SR) : round(3.1 * SR)], 2)  # jfk's own hiss, no speech
    first, second = jfk[round(5.3 * SR) : round(7.6 * SR)], jfk[round(8.1 * SR) : round(10.3 * SR)]
    signal = np.concatenate([room[: SR // 2], first, room[: round(pause_s * SR)], second, room])
    got = utterances(run(Endpointer(AT_600), signal))
    assert len(got) == turns
    assert all(u.reason == "silence" for u in got)
    assert got[0].start_s == pytest.approx(0.6, abs=0.035)
    assert got[-1].end_s == pytest.approx(0.5 + 2.3 + pause_s + 2.2, abs=0.25)


def test_max_length_forces_an_end(jfk):
    got = utterances(run(Endpointer(VADConfig(silence_ms=600, max_utterance_ms=1000)), jfk))
    assert got[0].reason == "max_length"
    assert got[0].start_s == pytest.approx(0.33)
    assert got[0].decided_s - got[0].start_s == pytest.approx(1.02)  # first whole 30 ms frame past 1 s
    assert sum(u.reason == "max_length" for u in got) >= 4
    assert all(u.decided_s - u.start_s <= 1.02 + 1e-9 for u in got)
    assert all(u.duration_s <= 1.32 + 1e-9 for u in got)  # 1.02 s + pre-roll at most
    for prev, nxt in zip(got, got[1:]):  # speech goes on after a forced end: pre-roll must not repeat it
        assert prev.audio_start_s + prev.duration_s <= nxt.audio_start_s + 1e-9


@pytest.mark.parametrize("rate", [48000, 44100])
def test_any_input_rate_gives_the_same_turns(jfk, rate):
    resampled = soxr.resample(jfk, SR, rate).astype(np.float32)
    events = run(Endpointer(AT_600, input_rate=rate), resampled, chunks=ODD_CHUNKS)
    assert [u.reason for u in utterances(events)] == ["silence", "silence", "silence", "flush"]
    np.testing.assert_allclose(spans(events), JFK_TURNS, atol=0.035)


def test_chunking_does_not_change_anything_at_16k(jfk):
    whole = utterances(run(Endpointer(AT_600), jfk))
    chunked = utterances(run(Endpointer(AT_600), jfk, chunks=ODD_CHUNKS))
    assert [(u.start_s, u.end_s, u.decided_s) for u in chunked] == [(u.start_s, u.end_s, u.decided_s) for u in whole]
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a.audio, b.audio)


def test_espeak_at_its_native_rate(espeak_wav):
    native, rate = sf.read(str(espeak_wav), dtype="float32")
    assert rate == 22050
    pad = lambda s, r: np.concatenate([np.zeros(r // 2, np.float32), s, np.zeros(r, np.float32)])  # noqa: E731
    at_16k = spans(run(Endpointer(AT_600), pad(load_audio(espeak_wav, SR), SR)))
    at_native = spans(run(Endpointer(AT_600, input_rate=rate), pad(native, rate), chunks=ODD_CHUNKS))
    assert len(at_16k) == 1
    np.testing.assert_allclose(at_native, at_16k, atol=0.035)


def test_flush_keeps_the_last_turn(jfk):
    cut = jfk[: round(9.5 * SR)]  # ends in the middle of "ask what you can do for your country"
    endpointer = Endpointer(AT_600)
    before = run(endpointer, cut, flush=False)
    assert len(utterances(before)) == 3 and endpointer.in_speech
    (last,) = utterances(endpointer.flush())
    assert last.reason == "flush"
    assert last.start_s == pytest.approx(8.19, abs=0.035)
    assert last.decided_s == pytest.approx(9.5)
    assert not endpointer.in_speech
    assert endpointer.flush() == []


def test_flush_drains_the_resampler(jfk):
    cut = soxr.resample(jfk[: round(9.5 * SR)], SR, 48000).astype(np.float32)
    endpointer = Endpointer(AT_600, input_rate=48000)
    (last,) = utterances(run(endpointer, cut, chunks=ODD_CHUNKS, flush=False) + endpointer.flush())[-1:]
    assert last.reason == "flush"
    assert endpointer.time_s == pytest.approx(9.5, abs=1e-3)


def test_push_to_talk_records_exactly_between(jfk):
    endpointer = Endpointer(VADConfig(silence_ms=600, enabled_endpointing=False, pre_roll_ms=0))
    begin, end = 32011, 80003
    assert run(endpointer, jfk[:begin], chunks=ODD_CHUNKS, flush=False) == []
    assert endpointer.begin() == SpeechStarted(t=begin / SR)
    assert endpointer.in_speech
    assert run(endpointer, jfk[begin:end], chunks=ODD_CHUNKS, flush=False) == []
    u = endpointer.end()
    assert u.reason == "manual"
    assert (u.start_s, u.end_s, u.decided_s) == (begin / SR, end / SR, end / SR)
    np.testing.assert_array_equal(u.audio, jfk[begin:end])
    assert endpointer.end() is None and not endpointer.in_speech


def test_push_to_talk_pre_roll_and_flush(jfk):
    endpointer = Endpointer(VADConfig(silence_ms=600, enabled_endpointing=False))
    endpointer.process(jfk[:SR])
    endpointer.begin()
    endpointer.process(jfk[SR : 2 * SR])
    (u,) = utterances(endpointer.flush())
    assert u.reason == "flush"
    np.testing.assert_array_equal(u.audio, jfk[SR - 4800 : 2 * SR])


def test_begin_end_need_push_to_talk():
    with pytest.raises(RuntimeError, match="push-to-talk"):
        Endpointer(AT_600).begin()
    with pytest.raises(RuntimeError, match="push-to-talk"):
        Endpointer(AT_600).end()


def test_mute_ignores_speech(jfk):
    endpointer = Endpointer(AT_600)
    endpointer.mute(True)
    assert run(endpointer, jfk, chunks=ODD_CHUNKS) == []
    assert endpointer.time_s == pytest.approx(jfk.size / SR)


def test_mute_drops_the_open_turn(jfk):
    endpointer = Endpointer(AT_600)
    events = endpointer.process(jfk[:SR])
    assert events == [SpeechStarted(t=pytest.approx(0.33))] and endpointer.in_speech
    endpointer.mute(True)
    assert not endpointer.in_speech
    assert endpointer.process(jfk[SR : 3 * SR]) == []
    endpointer.mute(False)
    got = utterances(run(endpointer, jfk[3 * SR :]))
    np.testing.assert_allclose([(u.start_s, u.end_s) for u in got], JFK_TURNS[1:], atol=0.035)
    assert got[0].audio_start_s == pytest.approx(3.0)  # pre-roll never reaches into muted audio


def test_reset_clears_everything(jfk):
    endpointer = Endpointer(AT_600)
    endpointer.process(jfk[:SR])
    assert endpointer.in_speech
    endpointer.reset()
    assert not endpointer.in_speech and endpointer.time_s == 0.0
    np.testing.assert_allclose(spans(run(endpointer, jfk)), JFK_TURNS, atol=0.035)


@pytest.mark.parametrize("field, value", [("frame_ms", 25), ("frame_ms", 0), ("aggressiveness", 4), ("silence_ms", 0)])
def test_bad_config_is_a_clear_error(field, value):
    with pytest.raises(ValueError, match=f"vad.{field}"):
        VADConfig(**{field: value})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_an_audio_error(bad):
    samples = hiss(0.1)
    samples[10] = bad
    with pytest.raises(AudioInputError, match="NaN"):
        Endpointer(AT_600).process(samples)


@pytest.mark.parametrize("form", ["int16", "stereo"])
def test_int16_and_stereo_input_are_accepted(jfk, form):
    samples = (jfk * 32767).astype(np.int16) if form == "int16" else np.stack([jfk, jfk], axis=1)
    np.testing.assert_allclose(spans(run(Endpointer(AT_600), samples)), JFK_TURNS, atol=0.035)


def test_pause_events_bracket_each_gap_and_prefix_the_final_utterance(jfk):
    events = run(Endpointer(AT_600), jfk)
    kinds = [type(e) for e in events]
    ended = utterances(events)
    # inside a turn pauses and resumes alternate, and a turn that ends on silence was paused first
    turn = []
    for e in events:
        if isinstance(e, SpeechStarted):
            turn = []
        elif isinstance(e, (SpeechPaused, SpeechResumed)):
            turn.append(type(e))
        elif e.utterance.reason == "silence":
            assert turn and turn[0] is SpeechPaused and turn[-1] is SpeechPaused
            assert all(a is not b for a, b in zip(turn, turn[1:]))
    assert SpeechResumed in kinds  # words inside a turn are not one unbroken voiced run
    # the last pause before each silence end carries exactly the final audio (the kept tail included)
    last_pause = None
    for e in events:
        if isinstance(e, SpeechPaused):
            last_pause = e.utterance
            assert last_pause.reason == "pause" and last_pause.decided_s > last_pause.end_s
        elif isinstance(e, SpeechEnded) and e.utterance.reason == "silence":
            u = e.utterance
            assert last_pause.end_s == u.end_s and last_pause.audio_start_s == u.audio_start_s
            np.testing.assert_array_equal(u.audio, last_pause.audio)
    assert len(ended) == 4


def test_pause_then_resume_on_a_burst_gap():
    burst = np.random.default_rng(1).normal(0.0, 0.3, SR // 2).astype(np.float32)
    audio = np.concatenate([hiss(0.5), burst, hiss(0.45, seed=2), burst, hiss(1.0, seed=3)])
    events = run(Endpointer(VADConfig(silence_ms=600, energy_margin_db=0)), audio)
    speech = [type(e) for e in events]
    assert SpeechStarted in speech and speech[-1] is SpeechEnded
    assert speech.count(SpeechEnded) == 1  # the 450 ms gap is longer than the 300 ms tail, shorter than silence_ms
    paused = [e for e in events if isinstance(e, SpeechPaused)]
    resumed = [e for e in events if isinstance(e, SpeechResumed)]
    assert len(paused) == len(resumed) + 1
    gap = [e for e in resumed if 1.35 <= e.t <= 1.6]
    assert gap, [e.t for e in resumed]


def test_speculation_switched_off_gives_no_pause_events_and_the_same_turns(jfk):
    on = run(Endpointer(AT_600), jfk)
    off = run(Endpointer(VADConfig(silence_ms=600, speculate=False)), jfk)
    assert any(isinstance(e, SpeechPaused) for e in on)
    assert not any(isinstance(e, (SpeechPaused, SpeechResumed)) for e in off)
    assert [(u.start_s, u.end_s, u.reason) for u in utterances(off)] == [(u.start_s, u.end_s, u.reason) for u in utterances(on)]
