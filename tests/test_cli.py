"""`voice-agent`: verbs, usage errors, one-line errors, the tts command on every checkpoint format, fetch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from agent.cli import main
from agent.config import ROOT
from agent.fetch import fetch, resolve_model
from conftest import require_checkpoints
from pipelines.errors import VoiceAgentError


def run_cli(*args, timeout=300):
    """The real console path in a subprocess: what a user sees, tracebacks included if any."""
    env = dict(os.environ, VOICE_AGENT_NO_PRELOAD=os.environ.get("VOICE_AGENT_NO_PRELOAD", ""))
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)


def test_usage_errors(capsys):
    assert main([]) == 2
    for argv in (["frobnicate"], ["replay"], ["replay", "x.wav", "--bogus"], ["models", "prepare", "--tts.seed", "1"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err and "unrecognised arguments: --bogus" in err


def test_bad_input_is_one_line_not_a_traceback(tmp_path):
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"not audio at all")
    nan = tmp_path / "nan.wav"
    samples = np.zeros(16000, np.float32)
    samples[100] = np.nan
    sf.write(nan, samples, 16000, subtype="FLOAT")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    cases = [
        (["replay", str(nan)], "NaN"),
        (["replay", str(empty)], "audio file is empty"),
        (["replay", "sessions/demo", "--asr.model", str(tmp_path / "no-whisper")], "no-whisper"),
        (["replay", "sessions/demo", "--llm.model", str(tmp_path / "no-llm")], "no-llm"),
        (["replay", "sessions/demo", "--vad.frame_ms", "25"], "frame_ms must be 10, 20 or 30"),
        (["replay", str(tmp_path / "missing.wav")], "no such audio file"),
        (["replay", str(bad)], "cannot read audio"),
        (["replay", "sessions/demo", "--vad.silence_msec", "3"], "unknown config key 'vad.silence_msec'"),
        (["tts", "hello", "--checkpoint", str(tmp_path / "nope")], "no such TTS checkpoint"),
        (["tts", "   ", "--checkpoint", "random:marvis-100m"], "nothing to say"),
    ]
    for argv, message in cases:
        proc = run_cli(*argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("fmt", ["transformers", "torchtune", "mlx"])
def test_tts_command_on_every_format(fmt, transformers_dir, torchtune_file, tiny_args, tiny_tokenizer, tmp_path):
    import shutil

    from pipelines.tts.weights import random_model, save_checkpoint

    if fmt == "mlx":
        ckpt = save_checkpoint(random_model(tiny_args, seed=1).model, tmp_path / "mlx")
        shutil.copy(tiny_tokenizer / "tokenizer.json", ckpt)
    else:
        ckpt = transformers_dir if fmt == "transformers" else torchtune_file
    out, codes = tmp_path / "out.wav", tmp_path / "codes.npy"
    assert main(["tts", "hello there", "-o", str(out), "--checkpoint", str(ckpt), "--seed", "2", "--max-ms", "400",
                 "--codes-out", str(codes), "--stream"]) == 0
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) == 5 * 1920
    assert np.load(codes).shape == (32, 5)


def test_tts_speaks_every_sentence_and_splits_one_too_long_for_the_cap(tiny_marvis, tmp_path, capsys):
    from agent.config import load_config
    from pipelines.tts.prompt import frame_cap

    gen = load_config("default").tts
    out = tmp_path / "three.wav"
    assert main(["tts", "First sentence. Second one. And a third.", "-o", str(out), "--checkpoint", str(tiny_marvis),
                 "--seed", "2"]) == 0
    assert "speaking 3 sentences one after another" in capsys.readouterr().err
    caps = [frame_cap(s, gen.max_audio_length_ms, gen.frames_per_char, gen.min_text_frames)
            for s in ("First sentence.", "Second one.", "And a third.")]
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) == sum(caps) * 1920  # each to its own cap: random weights never stop early

    # 41 characters, no full stop, 2 s an utterance at most: cut at 25 frames unless it is split
    out, codes = tmp_path / "long.wav", tmp_path / "long.npy"
    assert main(["tts", "hello there how are you i am fine thanks", "-o", str(out), "--checkpoint", str(tiny_marvis),
                 "--tts.max_audio_length_ms", "2000", "--stream", "--codes-out", str(codes)]) == 0
    err = capsys.readouterr().err
    assert "sentence 1 is longer than one utterance may be (2000 ms): spoken in 2 parts" in err, err
    assert "speaking 2 sentences" in err
    assert np.load(codes).shape[1] > 25 and len(sf.read(out)[0]) == np.load(codes).shape[1] * 1920


def test_tts_max_ms_caps_the_whole_output(tiny_marvis, tmp_path, capsys):
    """`--max-ms` is the longest audio written, whatever the text: not a per-part cap the text is split to fit
    (that wrote 4.8 s in 5 parts for a 960 ms cap on a 44-character sentence)."""
    out, codes = tmp_path / "capped.wav", tmp_path / "capped.npy"
    text = "The quick brown fox jumps over the lazy dog."  # 44 characters: 56 frames by the text cap
    assert main(["tts", text, "-o", str(out), "--checkpoint", str(tiny_marvis), "--seed", "2", "--max-ms", "960",
                 "--stream", "--codes-out", str(codes)]) == 0
    err = capsys.readouterr().err
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) == 12 * 1920  # 960 ms: random weights never stop sooner
    assert np.load(codes).shape == (32, 12)
    assert "--max-ms 960: the audio is cut there" in err and "parts" not in err, err
    chunks = [line for line in err.splitlines() if line.startswith("chunk: frames")]
    assert chunks and chunks[-1].endswith("..11")  # the last chunk printed ends at the cap
    # a cap longer than the text needs changes nothing: two sentences, each to its own length cap
    out2 = tmp_path / "uncapped.wav"
    assert main(["tts", "Hello there. How are you?", "-o", str(out2), "--checkpoint", str(tiny_marvis),
                 "--seed", "2", "--max-ms", "60000"]) == 0
    assert "cut there" not in capsys.readouterr().err
    assert len(sf.read(out2)[0]) == ((12 + 12) + (12 + 12)) * 1920


def test_tts_offline_default_is_labelled_untrained(tmp_path):
    require_checkpoints("smollm2-135m-instruct")
    out = tmp_path / "hi.wav"
    ref = tmp_path / "ref.wav"
    sf.write(ref, (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32), 16000)
    proc = run_cli("tts", "Hi.", "-o", str(out), "--max-ms", "160", "--temperature", "0",
                   "--voice-match", str(ref), "--ref-text", "hello there")
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" in proc.stderr and "UNTRAINED" in proc.stdout
    audio, rate = sf.read(out)
    assert rate == 24000 and len(audio) == 2 * 1920


def test_fetch_offline_and_model_resolution(tmp_path):
    with pytest.raises(VoiceAgentError, match="no network"):
        fetch(["mimi"], root=tmp_path, reachable=lambda: False)
    with pytest.raises(VoiceAgentError, match="unknown model kind"):
        fetch(["weights"], root=tmp_path, reachable=lambda: True)
    (tmp_path / "whisper-x").mkdir()
    assert resolve_model("whisper-x", root=tmp_path) == ("local", (tmp_path / "whisper-x").resolve())
    assert resolve_model(str(tmp_path / "whisper-x"), root=tmp_path)[0] == "local"
    assert resolve_model("mlx-community/whisper-tiny", root=tmp_path) == ("hub", "mlx-community/whisper-tiny")
    with pytest.raises(VoiceAgentError, match="no such local model"):
        resolve_model("./missing/model", root=tmp_path)


def test_fetch_command_fails_fast_without_network():
    proc = run_cli("fetch", "mimi", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: cannot reach") and "Traceback" not in proc.stderr


def test_openblas_is_preloaded_only_when_a_stage_runs_on_mlx():
    """OpenBLAS speeds up MLX's CPU matmuls but its threads take cores from ONNX Runtime: the agent's verbs
    re-exec with it only when their config puts a network on MLX."""
    from agent.cli import _runs_mlx
    from pipelines.ortgraph import prefer_onnx

    if not prefer_onnx():
        pytest.skip("MLX has Metal here: every stage runs on MLX")
    assert not _runs_mlx(["replay", "sessions/demo", "--config", "demo"])
    assert not _runs_mlx(["bench", "agent", "sessions/demo", "--config", "demo"])
    assert not _runs_mlx(["tts", "hello"])
    for stage in ("tts", "llm", "asr"):
        assert _runs_mlx(["replay", "sessions/demo", f"--{stage}.backend", "mlx"])
        assert _runs_mlx(["bench", "agent", "sessions/demo", f"--{stage}.backend=mlx"])
    assert _runs_mlx(["bench", "tts"]) and _runs_mlx(["doctor"])  # bench tts preloads per worker itself


@pytest.mark.parametrize("args", [("tts", "--help"), ("tts",), ("replay", "--help")])
def test_help_and_usage_errors_are_printed_once(args):
    # the OpenBLAS preload probe parses the command line before the real parse: it must stay silent
    r = run_cli(*args, timeout=120)
    assert (r.stdout + r.stderr).count("usage: voice-agent") == 1, r.stdout + r.stderr


def test_bench_runs_from_the_package_not_from_scripts():
    # an installed package carries agent/bench, not the repository's scripts/ folder
    r = run_cli("bench", "agent", "--help", timeout=120)
    assert r.returncode == 0 and "usage: voice-agent bench agent" in r.stdout, r.stdout + r.stderr
    assert not (ROOT / "scripts" / "bench_agent.py").exists()
