"""Bad input never crashes the agent: audio of every kind, damaged bundles, out-of-range config, and the CLI's
checks before any model loads. Each case is handled or one line naming the file (or key) and the problem."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from agent.config import ROOT, load_config
from agent.session import read_session
from pipelines.audio import load_audio
from pipelines.errors import AudioInputError, ConfigError

RATE = 16_000


def _tone(seconds=0.5, rate=RATE, channels=1, amp=0.3):
    t = np.arange(int(seconds * rate)) / rate
    mono = amp * np.sin(2 * np.pi * 220 * t)
    return np.repeat(mono[:, None], channels, axis=1) if channels > 1 else mono


def _write(tmp, name, data=None, rate=RATE, **kw):
    path = tmp / name
    sf.write(str(path), _tone() if data is None else data, rate, **kw)
    return path


def _raw(tmp, name, payload: bytes):
    path = tmp / name
    path.write_bytes(payload)
    return path


def _wav_with_format_tag(tmp, tag):
    """A WAV whose fmt chunk names a codec libsndfile does not decode."""
    data = b"\x00" * 800
    fmt = struct.pack("<HHIIHH", tag, 1, RATE, RATE * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return _raw(tmp, "codec.wav", b"RIFF" + struct.pack("<I", len(body)) + body)


def _fifo(tmp):
    path = tmp / "pipe.wav"
    os.mkfifo(path)
    return path


def _sox(tmp, name, *effect):
    path = tmp / name
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(path), "synth", "0.5", "sine", "300", *effect],
                   check=True, capture_output=True)
    return path


def _nonfinite(value):
    x = _tone().astype(np.float32)
    x[100] = value
    return x


def _good_wav(tmp):
    return _write(tmp, "good.wav")


OK = None
# (kind, make(tmp) -> path, None if it must load or a substring of its one-line error)
AUDIO_CASES = [
    ("empty file", lambda d: _raw(d, "empty.wav", b""), "empty"),
    ("header only, no frames", lambda d: _write(d, "noframes.wav", np.zeros(0)), "empty"),
    ("truncated header", lambda d: _raw(d, "trunc.wav", _good_wav(d).read_bytes()[:30]), "cannot read audio"),
    ("not audio (text)", lambda d: _raw(d, "text.wav", b"hello, this is not audio\n" * 20), "cannot read audio"),
    ("random bytes after RIFF", lambda d: _raw(d, "riff.wav", b"RIFF" + np.random.default_rng(0).bytes(2000)),
     "cannot read audio"),
    ("a directory", lambda d: (d / "folder.wav").mkdir() or d / "folder.wav", "is a folder"),
    ("missing", lambda d: d / "missing.wav", "no such audio file"),
    ("a FIFO (would block)", _fifo, "not a regular file"),
    ("unsupported codec (fmt tag 0x1234)", lambda d: _wav_with_format_tag(d, 0x1234), "cannot read audio"),
    ("data cut short of the header's length", lambda d: _raw(d, "cut.wav", _good_wav(d).read_bytes()[:-3001]), OK),
    ("WAV u8", lambda d: _write(d, "u8.wav", subtype="PCM_U8"), OK),
    ("AIFF s8", lambda d: _write(d, "s8.aiff", subtype="PCM_S8"), OK),
    ("WAV 16", lambda d: _write(d, "s16.wav", subtype="PCM_16"), OK),
    ("WAV 24", lambda d: _write(d, "s24.wav", subtype="PCM_24"), OK),
    ("WAV 32", lambda d: _write(d, "s32.wav", subtype="PCM_32"), OK),
    ("WAV float32", lambda d: _write(d, "f32.wav", subtype="FLOAT"), OK),
    ("WAV float64", lambda d: _write(d, "f64.wav", subtype="DOUBLE"), OK),
    ("WAV A-law", lambda d: _write(d, "alaw.wav", subtype="ALAW"), OK),
    ("WAV u-law", lambda d: _write(d, "ulaw.wav", subtype="ULAW"), OK),
    ("WAV IMA ADPCM", lambda d: _write(d, "ima.wav", subtype="IMA_ADPCM"), OK),
    ("WAV GSM 6.10", lambda d: _write(d, "gsm.wav", _tone(rate=8000), 8000, subtype="GSM610"), OK),
    ("FLAC 16", lambda d: _write(d, "a.flac", subtype="PCM_16"), OK),
    ("FLAC 24", lambda d: _write(d, "a24.flac", subtype="PCM_24"), OK),
    ("OGG Vorbis", lambda d: _write(d, "a.ogg", subtype="VORBIS"), OK),
    ("MP3", lambda d: _write(d, "a.mp3", format="MP3"), OK),
    ("AU / CAF / W64 / RF64", lambda d: [_write(d, f"a.{e}") for e in ("caf", "w64")][-1], OK),
    ("sox-made WAV", lambda d: _sox(d, "sox.wav"), OK),
    ("2 channels", lambda d: _write(d, "c2.wav", _tone(channels=2)), OK),
    ("4 channels", lambda d: _write(d, "c4.wav", _tone(channels=4)), OK),
    ("6 channels", lambda d: _write(d, "c6.wav", _tone(channels=6)), OK),
    ("8 channels", lambda d: _write(d, "c8.wav", _tone(channels=8)), OK),
    ("8 kHz", lambda d: _write(d, "r8k.wav", _tone(rate=8000), 8000), OK),
    ("11.025 kHz", lambda d: _write(d, "r11k.wav", _tone(rate=11025), 11025), OK),
    ("22.05 kHz", lambda d: _write(d, "r22k.wav", _tone(rate=22050), 22050), OK),
    ("44.1 kHz", lambda d: _write(d, "r44k.wav", _tone(rate=44100), 44100), OK),
    ("48 kHz", lambda d: _write(d, "r48k.wav", _tone(rate=48000), 48000), OK),
    ("96 kHz", lambda d: _write(d, "r96k.wav", _tone(rate=96000), 96000), OK),
    ("192 kHz", lambda d: _write(d, "r192k.wav", _tone(rate=192000), 192000), OK),
    ("NaN samples", lambda d: _write(d, "nan.wav", _nonfinite(np.nan), subtype="FLOAT"), "NaN or infinite"),
    ("inf samples", lambda d: _write(d, "inf.wav", _nonfinite(np.inf), subtype="FLOAT"), "NaN or infinite"),
    ("beyond full scale (float x4)", lambda d: _write(d, "loud.wav", _tone(amp=4.0), subtype="FLOAT"), OK),
    ("full-scale clipping (int16)", lambda d: _write(d, "clip.wav", np.clip(_tone(amp=3.0), -1, 1)), OK),
    ("DC offset", lambda d: _write(d, "dc.wav", _tone() * 0.3 + 0.6), OK),
    ("pure silence", lambda d: _write(d, "silence.wav", np.zeros(8000)), OK),
    ("one sample", lambda d: _write(d, "one.wav", np.zeros(1)), OK),
]


@pytest.mark.parametrize("kind,make,error", AUDIO_CASES, ids=[c[0] for c in AUDIO_CASES])
def test_audio_kind(kind, make, error, tmp_path):
    path = make(tmp_path)
    if error is None:
        audio = load_audio(path, RATE)
        assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) > 0
        assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
        return
    with pytest.raises(AudioInputError) as exc:
        load_audio(path, RATE)
    message = str(exc.value)
    assert error in message and str(path) in message and "\n" not in message


def test_at_least_forty_kinds():
    assert len(AUDIO_CASES) >= 40


def test_unreadable_file(tmp_path, monkeypatch):
    # we run as root, for whom every file is readable: os.access is mocked, the only fake here
    path = _good_wav(tmp_path)
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(AudioInputError, match="permission denied"):
        load_audio(path, RATE)


def test_resampled_and_mixed_correctly(tmp_path):
    """A 48 kHz stereo tone comes out at 16 kHz mono with its length and pitch intact."""
    path = _write(tmp_path, "st.wav", _tone(seconds=1.0, rate=48000, channels=2), 48000, subtype="FLOAT")
    audio = load_audio(path, RATE)
    assert abs(len(audio) - RATE) <= 2
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * RATE / len(audio) - 220) < 2


def test_half_hour_is_streamed_in_bounded_memory(tmp_path):
    """30 minutes at 8 kHz (29 MB of int16) -> 16 kHz float32: the peak is the output plus a few blocks,
    not the whole decoded file plus its resampled copy."""
    path = tmp_path / "long.wav"
    minutes, src = 30, 8000
    block = (0.1 * np.sin(np.arange(src * 60) * 0.05)).astype(np.float32)
    with sf.SoundFile(str(path), "w", samplerate=src, channels=1, subtype="PCM_16") as f:
        for _ in range(minutes):
            f.write(block)
    file_bytes = path.stat().st_size
    tracemalloc.start()
    audio = load_audio(path, RATE)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert abs(len(audio) - minutes * 60 * RATE) < 64
    # whole-file reading would peak at >= output + 2x the decoded float32 input (another 4x the file size)
    assert peak < audio.nbytes + 0.5 * file_bytes, (peak, audio.nbytes, file_bytes)


# ---- bundles -------------------------------------------------------------------------------------------------

def _bundle(tmp, events=None, meta=None, mic=None):
    folder = tmp / "bundle"
    folder.mkdir()
    (folder / "mic.pcm").write_bytes(np.zeros(RATE, "<i2").tobytes() if mic is None else mic)
    if events is not None:
        (folder / "events.jsonl").write_text(events)
    if meta is not None:
        (folder / "session.json").write_bytes(meta if isinstance(meta, bytes) else json.dumps(meta).encode())
    return folder


# (kind, events.jsonl, session.json, mic bytes, None if it reads (with `warning` if one is due) or the error)
BUNDLE_CASES = [
    ("event line 5", '5\n{"type": "mute", "on": true, "t": 0.1}\n{"type": "mute", "on": false, "t": 0.5}\n', None,
     None, "warning"),
    ("event line []", "[]\n", None, None, "warning"),
    ("event line null", "null\n", None, None, "warning"),
    ("mute without t", '{"type": "mute", "on": true}\n', None, None, "warning"),
    ("t a string", '{"type": "key", "action": "press", "t": "soon"}\n', None, None, "warning"),
    ("t NaN", '{"type": "mute", "on": true, "t": NaN}\n', None, None, "warning"),
    ("t Infinity", '{"type": "mute", "on": true, "t": Infinity}\n', None, None, "warning"),
    ("half-written last line", '{"type": "mute", "on": true, "t": 0.1}\n{"type": "mu', None, None, OK),
    ("deeply nested line", "[" * 100_000 + "\n{\"type\": \"x\", \"t\": 1}\n", None, None, "warning"),
    ("session.json a list", None, [1, 2], None, "a JSON list"),
    ("session.json not UTF-8", None, b"\xff\xfe{\x00", None, "not UTF-8"),
    ("session.json not JSON", None, b"{mic_rate: 3", None, "not JSON"),
    ("mic_rate abc", None, {"mic_rate": "abc"}, None, "mic_rate 'abc'"),
    ("mic_rate 0", None, {"mic_rate": 0}, None, "mic_rate 0"),
    ("mic_rate -1", None, {"mic_rate": -1}, None, "mic_rate -1"),
    ("mic_rate 1e9", None, {"mic_rate": 1e9}, None, "mic_rate 1000000000.0"),
    ("mic_rate true", None, {"mic_rate": True}, None, "mic_rate True"),
    ("empty mic.pcm", None, None, b"", "nothing to replay"),
    ("one odd byte", None, None, b"\x01", "nothing to replay"),
    ("names outside the bundle", '{"type": "turn", "t": 1, "audio": "../../x.wav"}\n',
     {"mic": "../../x", "mic_rate": 16000}, None, OK),
]


_OPENED: list = []  # [True, paths opened...] while a bundle test records


def _audit(event, args):
    if event == "open" and _OPENED and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # sees every file Python opens, pathlib and numpy included


@pytest.mark.parametrize("kind,events,meta,mic,error", BUNDLE_CASES, ids=[c[0] for c in BUNDLE_CASES])
def test_bundle_kind(kind, events, meta, mic, error, tmp_path):
    folder = _bundle(tmp_path, events, meta, mic)
    _OPENED.clear()
    _OPENED.append(True)  # record from here on
    warnings = []
    if error in (OK, "warning"):
        data = read_session(folder, warn=warnings.append)
        assert data.rate == RATE and len(data.mic) == RATE
        assert all(np.isfinite(t) for t, _ in data.keys) and all(np.isfinite(a) for a, _ in data.mutes)
        assert bool(warnings) == (error == "warning"), warnings
        assert all(len(w.splitlines()) == 1 and "events.jsonl" in w for w in warnings)
    else:
        with pytest.raises(AudioInputError) as exc:
            read_session(folder, warn=warnings.append)
        assert error in str(exc.value) and str(folder) in str(exc.value) and "\n" not in str(exc.value)
    opened = [os.path.abspath(p) for p in _OPENED[1:]]
    _OPENED.clear()
    assert all(p.startswith(str(folder)) for p in opened) and (opened or mic == b"" or len(mic) == 1), opened


# ---- config --------------------------------------------------------------------------------------------------

CONFIG_CASES = [
    ("vad.energy_margin_db", "nan", "finite"),
    ("vad.energy_margin_db", "inf", "finite"),
    ("llm.temperature", "-inf", "finite"),
    ("llm.max_tokens", "0", "llm.max_tokens: must be in 1..4096"),
    ("llm.max_tokens", "1e9", "expected an integer"),
    ("llm.max_history_turns", "-1", "llm.max_history_turns: must be in 0..1000"),
    ("llm.temperature", "-1", "llm.temperature: must be in 0.0..10.0"),
    ("audio.block_ms", "0", "audio.block_ms: must be in 5..1000"),
    ("audio.jitter_ms", "-5", "audio.jitter_ms"),
    ("replay.chunk_ms", "0", "replay.chunk_ms"),
    ("mode", "sleepy", "mode: must be one of hands-free, push-to-talk, replay"),
    ("tts.checkpoint", "random:nonexistent", "no such preset"),
    ("tts.fallback", "random:nonexistent", "no such preset"),
    ("session.record", "maybe", "expected true/false"),
    ("llm.seed", "1" + "0" * 400, "llm.seed"),
    ("asr.model", "[1]", None),  # a string is a string
]


@pytest.mark.parametrize("key,value,error", CONFIG_CASES)
def test_config_ranges(key, value, error):
    if error is None:
        assert load_config("default", [(key, value)])
        return
    with pytest.raises(ConfigError) as exc:
        load_config("default", [(key, value)])
    assert error in str(exc.value) and "\n" not in str(exc.value)


def test_config_files(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[llm]\nsystem_prompt = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(bad))
    looped = tmp_path / "ext.toml"
    looped.write_text("extends = 5\n")
    with pytest.raises(ConfigError, match="`extends` must be a file name"):
        load_config(str(looped))
    for name in ("default", "push_to_talk", "replay", "demo"):
        load_config(name)  # the shipped presets are in range


# ---- the CLI: one line, before any model loads ----------------------------------------------------------------

def _cli(*args, timeout=120):
    env = dict(os.environ, VOICE_AGENT_NO_PRELOAD="1")
    return subprocess.run([sys.executable, "-m", "agent.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.long
def test_cli_fails_before_the_models_load(tmp_path):
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    fifo = _fifo(tmp_path)
    trunc = _raw(tmp_path, "trunc.wav", _good_wav(tmp_path).read_bytes()[:30])
    empty_bundle = _bundle(tmp_path, None, {"mic_rate": 16000}, b"")
    ok = _good_wav(tmp_path)
    tts = ["tts", "hello there", "--checkpoint", "random:marvis-100m"]
    cases = [
        (["replay", folder, ok], "one session folder, or audio files"),
        (["replay", fifo], "not a regular file"),
        (["replay", trunc], "cannot read audio"),
        (["replay", empty_bundle], "nothing to replay"),
        (["replay", ok, "--vad.energy_margin_db", "nan"], "finite"),
        ([*tts, "--context", trunc, "hi"], "cannot read audio"),
        ([*tts, "--context", folder, "hi"], "is a folder"),
        ([*tts, "--voice-match", fifo, "--ref-text", "hi"], "not a regular file"),
        ([*tts, "-o", tmp_path], "is a folder"),
        ([*tts, "-o", "/proc/voice-agent-test.wav"], "cannot write there"),
        ([*tts, "--max-ms", "0"], "--max-ms"),
        ([*tts, "--max-ms", "-1"], "--max-ms"),
        ([*tts, "--speaker", "-2"], "--speaker"),
        (["tts", " \n ", "--checkpoint", "random:marvis-100m"], "nothing to say"),
        ([*tts, "--tts.checkpoint", "random:nonexistent"], "no such preset"),
    ]
    for argv, message in cases:
        proc = _cli(*argv)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
        # nothing was loaded: the loaders announce themselves on stderr
        assert proc.stderr.strip() == lines[0], (argv, proc.stderr)
