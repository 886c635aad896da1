"""Audio devices through the real ALSA -> PortAudio -> sounddevice stack, on the virtual card of `virtual_audio.py`.

ALSA reads its config when PortAudio starts, which happens on `import sounddevice`, so everything that touches
a device runs in a subprocess with the card's environment and reports back as one JSON line.
"""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.devices import MicSource, SpeakerSink
from agent.sinks import ReplaySink
from pipelines.audio import float_to_pcm16, load_audio
from virtual_audio import VirtualCard, espeak_pcm16, no_devices_env, virtual_card_env

ROOT = Path(__file__).resolve().parents[1]
needs_portaudio = pytest.mark.skipif(ctypes.util.find_library("portaudio") is None,
                                     reason="PortAudio is not installed (Debian: apt install libportaudio2)")


def run_device_code(code: str, env: dict[str, str], timeout: float = 20.0) -> dict:
    """Run `code` in a fresh interpreter under `env`; it prints one JSON object as its last line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"device code failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def locate(haystack: np.ndarray, needle: np.ndarray) -> int:
    """Offset of `needle` in `haystack` by FFT cross-correlation."""
    n = len(haystack) + len(needle)
    spectrum = np.fft.rfft(haystack.astype(np.float64), n) * np.conj(np.fft.rfft(needle.astype(np.float64), n))
    corr = np.fft.irfft(spectrum, n)
    return int(np.argmax(corr[:len(haystack) - len(needle) + 1]))


@pytest.fixture(scope="module")
def speech16k(tmp_path_factory) -> np.ndarray:
    pcm = espeak_pcm16("Hello there. How are you today?", tmp_path_factory.mktemp("espeak"))
    if pcm is None:
        pytest.skip("espeak-ng is not installed (Debian: apt install espeak-ng); it makes the test speech")
    return pcm


@pytest.fixture(scope="module")
def speech24k(tmp_path_factory, speech16k) -> np.ndarray:
    folder = tmp_path_factory.mktemp("espeak24")
    subprocess.run(["espeak-ng", "-w", str(folder / "s.wav"), "Hello there. How are you today?"], check=True)
    return load_audio(folder / "s.wav", 24000)


# -- through the virtual card ------------------------------------------------------------------------------


@needs_portaudio
def test_mic_delivers_the_file_bit_exact_in_real_time(tmp_path, speech16k):
    read_s = len(speech16k) / 16000 + 0.3
    with VirtualCard(tmp_path, speech16k, mic_silence_s=2.0) as card:
        result = run_device_code(f"""
            import json, time, numpy as np
            from agent.devices import MicSource
            with MicSource(sample_rate=16000, block_ms=30) as mic:
                blocks, t0 = [], time.monotonic()
                while mic.stream_time < {read_s}:
                    block = mic.read(timeout=2.0)
                    assert block is not None, "mic went quiet"
                    blocks.append(block)
                wall = time.monotonic() - t0
            audio = np.concatenate(blocks)
            np.save({str(tmp_path / "mic.npy")!r}, audio)
            print(json.dumps(dict(sizes=sorted({{len(b) for b in blocks}}), dtype=str(audio.dtype), wall=wall,
                                  stream_time=mic.stream_time, overflows=mic.overflows)))
        """, card.env)
    audio = np.load(tmp_path / "mic.npy")
    assert result["sizes"] == [480] and result["dtype"] == "float32"
    assert result["overflows"] == 0
    assert result["stream_time"] == pytest.approx(len(audio) / 16000)
    got = np.round(audio * 32768).astype(np.int32)
    expected = np.concatenate([speech16k, np.zeros(16000, np.int16)])[:len(got)]
    assert np.abs(got).max() > 1000  # real speech came through, not silence
    np.testing.assert_array_equal(got, expected)
    assert result["wall"] > read_s - 0.6, "the virtual mic ran faster than real time: pacing is broken"


@needs_portaudio
def test_speaker_plays_exactly_what_was_written(tmp_path, speech24k):
    with VirtualCard(tmp_path, speaker_rate=24000) as card:
        np.save(tmp_path / "say.npy", speech24k)
        result = run_device_code(f"""
            import json, time, numpy as np
            from agent.devices import SpeakerSink
            audio = np.load({str(tmp_path / "say.npy")!r})
            with SpeakerSink(sample_rate=24000, jitter_ms=120) as sink:
                stamps = []
                sink.on_first_sample = stamps.append
                sink.begin_utterance()
                t_write = time.monotonic()
                for chunk in np.array_split(audio, 7):
                    sink.write(chunk)
                playing = sink.is_playing
                sink.end_of_stream()
                idle = sink.wait_idle(timeout=10)
                played_s = time.monotonic() - t_write
            print(json.dumps(dict(idle=idle, playing=playing, played=sink.played_samples, underruns=sink.underruns,
                                  first_sample_s=stamps[0] - t_write, n_first=len(stamps), played_s=played_s,
                                  latency=sink.output_latency, after=sink.is_playing)))
        """, card.env)
    assert result["idle"] and result["playing"] and not result["after"]
    assert result["played"] == len(speech24k) and result["underruns"] == 0 and result["n_first"] == 1
    assert 0 <= result["first_sample_s"] < 0.5
    assert result["played_s"] > len(speech24k) / 24000 - 0.6  # played in real time, not instantly
    played = card.played()
    expected = np.frombuffer(float_to_pcm16(speech24k), dtype="<i2")
    start = locate(played, expected)
    np.testing.assert_array_equal(played[start:start + len(expected)], expected)
    assert not played[:start].any() and not played[start + len(expected):].any()  # only zeros around it


@needs_portaudio
def test_clear_stops_playback_at_once_and_reports_what_was_played(tmp_path):
    rate = 24000
    noise = np.random.default_rng(0).uniform(-0.3, 0.3, 3 * rate).astype(np.float32)  # aperiodic: one place to align
    np.save(tmp_path / "noise.npy", noise)
    with VirtualCard(tmp_path, speaker_rate=rate) as card:
        result = run_device_code(f"""
            import json, time, threading, numpy as np
            from agent.devices import SpeakerSink
            first = threading.Event()
            with SpeakerSink(sample_rate={rate}) as sink:
                sink.on_first_sample = lambda t: first.set()
                sink.write(np.load({str(tmp_path / "noise.npy")!r}))
                assert first.wait(2.0)
                time.sleep(0.5)
                played = sink.clear()
                stopped = dict(playing=sink.is_playing, idle=sink.wait_idle(0))
                time.sleep(0.3)
            print(json.dumps(dict(played=played, later=sink.played_samples, **stopped)))
        """, card.env)
    played = result["played"]
    assert 0.25 * rate < played < 1.2 * rate  # ~0.5 s after the first sample, give or take the card's lead
    assert result["later"] == played and not result["playing"] and result["idle"]
    out = card.played()
    expected = np.frombuffer(float_to_pcm16(noise), dtype="<i2")
    start = locate(out, expected[:rate // 5])
    np.testing.assert_array_equal(out[start:start + played], expected[:played])
    assert not out[start + played:].any(), "audio kept coming after clear()"


@needs_portaudio
def test_check_devices_says_in_one_line_that_there_is_no_device(tmp_path):
    code = """
        import json
        from agent.devices import check_devices, list_devices
        from pipelines.errors import VoiceAgentError
        out = dict(listing=list_devices())
        for name, need, kw in [("input", (True, False), {}), ("output", (False, True), {}),
                               ("both", (True, True), {}), ("named", (True, False), dict(input_device="no-such-mic"))]:
            try:
                check_devices(*need, **kw)
                out[name] = None
            except VoiceAgentError as exc:
                out[name] = str(exc)
        print(json.dumps(out))
    """
    none = run_device_code(code, no_devices_env(tmp_path))
    assert none["listing"] == "no audio devices (PortAudio sees none)"
    assert none["input"].startswith("no microphone found (PortAudio sees no input device); try `voice-agent replay")
    assert none["output"].startswith("no speaker found (PortAudio sees no output device)")
    assert none["both"] == none["input"]
    for message in (none["input"], none["output"]):
        assert "\n" not in message

    np.zeros(1600, "<i2").tofile(tmp_path / "mic.raw")  # it must exist: without it "mic" has no input channels
    card = run_device_code(code, virtual_card_env(tmp_path, tmp_path / "mic.raw", tmp_path / "played.raw"))
    assert "mic" in card["listing"] and "sink" in card["listing"]
    assert card["input"] is None and card["output"] is None and card["both"] is None
    assert card["named"].startswith("microphone 'no-such-mic' not usable") and "'mic'" in card["named"]
    assert "\n" not in card["named"]


def test_check_devices_without_portaudio_is_one_line(tmp_path):
    (tmp_path / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    env = dict(no_devices_env(tmp_path), PYTHONPATH=str(tmp_path))
    result = run_device_code("""
        import json
        from agent.devices import check_devices
        from pipelines.errors import VoiceAgentError
        try:
            check_devices(True, True)
            print(json.dumps(dict(message=None)))
        except VoiceAgentError as exc:
            print(json.dumps(dict(message=str(exc))))
    """, env)
    message = result["message"]
    assert message.startswith("audio devices unavailable: PortAudio could not be loaded (PortAudio library not found)")
    assert "voice-agent replay" in message and "\n" not in message


# -- the speaker's buffer logic, driven by hand (no device) -------------------------------------------------


def pcm(x: float) -> int:
    return int(np.frombuffer(float_to_pcm16(np.float32([x])), dtype="<i2")[0])


def pull(sink: SpeakerSink, frames: int) -> tuple[np.ndarray, bool]:
    out = np.full(frames, 7, dtype=np.int16)  # garbage the fill must overwrite
    first = sink._fill(out)
    return out, first


def test_speaker_jitter_buffer_underruns_and_end_of_stream():
    sink = SpeakerSink(sample_rate=1000, jitter_ms=100)  # 100 samples of jitter buffer
    out, first = pull(sink, 50)
    assert not out.any() and not first and sink.underruns == 0  # idle silence is no underrun
    sink.write(np.full(60, 0.5, np.float32))
    out, first = pull(sink, 50)
    assert not out.any() and not first and sink.is_playing  # 60 < 100: still buffering
    sink.write(np.full(60, 0.25, np.float32))
    out, first = pull(sink, 50)
    assert first and (out == pcm(0.5)).all() and sink.played_samples == 50
    out, first = pull(sink, 100)
    assert not first and (out[:10] == pcm(0.5)).all() and (out[10:70] == pcm(0.25)).all() and not out[70:].any()
    assert sink.underruns == 1 and sink.played_samples == 120
    sink.write(np.full(30, 0.5, np.float32))
    assert not pull(sink, 50)[0].any() and sink.underruns == 1  # re-buffering after the underrun, not counted again
    sink.end_of_stream()
    out, _ = pull(sink, 50)
    assert (out[:30] == pcm(0.5)).all() and not out[30:].any()
    assert not sink.is_playing and sink.wait_idle(0) and sink.played_samples == 150
    assert not pull(sink, 50)[0].any() and sink.underruns == 1


def test_speaker_clear_drops_queued_audio_and_next_utterance_starts_fresh():
    sink = SpeakerSink(sample_rate=1000, jitter_ms=10)
    stamps = []
    sink.on_first_sample = stamps.append
    sink.begin_utterance()
    sink.write(np.full(500, 0.1, np.float32))
    pull(sink, 40)
    assert sink.clear() == 40 and not sink.is_playing and sink.wait_idle(0)
    assert not pull(sink, 40)[0].any() and sink.underruns == 0
    sink.begin_utterance()
    assert sink.played_samples == 0
    sink.write(np.full(20, -0.5, np.float32))
    out, first = pull(sink, 40)
    assert first and (out[:20] == pcm(-0.5)).all() and sink.played_samples == 20


def test_speaker_write_rejects_nan():
    from pipelines.errors import AudioInputError

    with pytest.raises(AudioInputError):
        SpeakerSink().write(np.array([0.0, np.nan], np.float32))


def test_mic_drops_the_oldest_blocks_when_the_reader_lags():
    from types import SimpleNamespace

    mic = MicSource(sample_rate=1000, block_ms=10, max_queued_s=0.03)  # room for 3 blocks of 10 samples
    for i in range(5):
        mic._callback(np.full((10, 1), i, np.int16), 10, None, SimpleNamespace(input_overflow=i == 0))
    assert mic.overflows == 3  # two dropped blocks + one overflow reported by PortAudio
    got = [mic.read(timeout=0) for _ in range(4)]
    assert [int(b[0] * 32768) for b in got[:3]] == [2, 3, 4] and got[3] is None
    assert mic.stream_time == pytest.approx(0.03)


def test_replay_sink_plays_instantly_into_memory():
    sink = ReplaySink(sample_rate=24000)
    stamps = []
    sink.on_first_sample = stamps.append
    sink.begin_utterance()
    sink.write(np.ones(100, np.float32))
    sink.write(np.zeros(50, np.float32))
    assert len(stamps) == 1 and sink.played_samples == 150 and not sink.is_playing
    assert sink.clear() == 150
    sink.write(np.full(10, 0.5, np.float32))  # a write with no begin_utterance() starts the next utterance
    sink.end_of_stream()
    assert len(stamps) == 2 and sink.played_samples == 10
    audio = sink.audio()
    assert audio.dtype == np.float32 and len(audio) == 160 and audio[0] == 1.0 and audio[-1] == 0.5


def test_every_sink_keeps_the_whole_contract():
    """The session loop and the engine use only `agent.sinks.AudioSink`: every sink has all of it."""
    from agent.sinks import AudioSink, PlaybackSink
    from agent.web.page import BrowserSink
    from agent.web.realtime import RealtimeSink

    sinks = [ReplaySink(), PlaybackSink(SpeakerSink()), BrowserSink(lambda m: None), RealtimeSink(lambda b: None)]
    for sink in sinks:
        assert isinstance(sink, AudioSink), type(sink).__name__
        assert not hasattr(sink, "speaker") or isinstance(sink, PlaybackSink)  # no reach-through shim


@pytest.mark.parametrize("kind", ["replay", "browser", "realtime"])
def test_every_sink_behaves_as_the_contract_says(kind):
    """What the engine relies on, tried on each sink (not only that the names exist): a barge-in drops every later
    write of the utterance, `clear()` returns what the listener heard (never more than was written), the next
    utterance starts afresh, and a rate the sink cannot play is a one-line error, not ignored."""
    from agent.sinks import ReplaySink
    from agent.web.page import BrowserSink
    from agent.web.realtime import RealtimeSink
    from pipelines.errors import VoiceAgentError

    out = []
    sink = {"replay": lambda: ReplaySink(sample_rate=24000),
            "browser": lambda: BrowserSink(out.append),
            "realtime": lambda: RealtimeSink(out.append)}[kind]()
    if kind == "realtime":
        with pytest.raises(VoiceAgentError, match="24000 Hz"):
            sink.set_sample_rate(22050)
        sink.set_sample_rate(24000)
    else:
        sink.set_sample_rate(22050)
        assert sink.sample_rate == 22050
        sink.set_sample_rate(24000)
    if kind == "browser":
        sink.CLEAR_WAIT_S = 0.0
    sink.begin_utterance()
    sink.write(np.full(2400, 0.1, np.float32))
    if kind == "browser":
        sink.report_played(1, 1200, final=False)  # the page played half of it
    sent_before = len(out)
    sink.barge_in()
    sink.write(np.full(2400, 0.1, np.float32))  # after the cut: dropped
    heard = sink.clear()
    assert 0 <= heard <= 2400
    if kind == "browser":
        assert heard == 1200
    if kind == "replay":
        assert heard == 2400 and len(sink.audio()) == 2400
    assert not any(isinstance(m, (bytes, bytearray)) for m in out[sent_before:])  # nothing of the cut write left
    assert not sink.is_playing
    sink.begin_utterance()  # the next utterance is not cut
    sink.write(np.full(480, 0.1, np.float32))
    assert sink.played_samples in (0, 480)  # a device-less sink counts at once; a page counts when it reports
