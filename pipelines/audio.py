"""Audio in and out: every stage speaks float32 mono numpy arrays at an explicit sample rate.

Reading goes through libsndfile (WAV, FLAC, OGG, MP3...), streamed in blocks and resampled through soxr's
streaming resampler, so an hour-long file costs its output and a few blocks. Anything that cannot become clean
mono float32 raises `AudioInputError` with a one-line reason naming the file. NaN/inf samples are rejected, not
zeroed: they only come from a broken export, and silently zeroed audio would look like a deaf agent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from pipelines.errors import AudioInputError


def to_mono_float32(audio: np.ndarray, *, what: str = "audio") -> np.ndarray:
    """[T] or [T, C] of any numeric dtype -> [T] float32 in [-1, 1]. NaN/inf are an error."""
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2):
        raise AudioInputError(f"{what}: expected mono [T] or [T, channels] samples, got shape {audio.shape}")
    if np.issubdtype(audio.dtype, np.integer):  # scale before mixing: the mean of ints is float64
        audio = audio.astype(np.float32) / (float(np.iinfo(audio.dtype).max) + 1.0)
    else:
        audio = audio.astype(np.float32, copy=False)
    if audio.ndim == 2:
        audio = audio.mean(axis=1, dtype=np.float32)
    if audio.size and not np.isfinite(audio).all():
        raise AudioInputError(f"{what}: contains NaN or infinite samples; re-export the audio")
    return audio


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate <= 0 or to_rate <= 0:
        raise AudioInputError(f"bad sample rate {from_rate} -> {to_rate}")
    if from_rate == to_rate or audio.size == 0:
        return audio.astype(np.float32, copy=False)
    return soxr.resample(audio, from_rate, to_rate).astype(np.float32, copy=False)


BLOCK_FRAMES = 1 << 18  # ~5 s at 48 kHz: long files are streamed in blocks, never read whole


def _audio_file(path: Path) -> Path:
    """The one-line reason a path cannot be opened as audio, checked before libsndfile sees it."""
    if path.is_dir():
        raise AudioInputError(f"{path}: is a folder, not an audio file")
    if not path.exists():
        raise AudioInputError(f"{path}: no such audio file")
    if not path.is_file():  # a FIFO or a device would block the read forever
        raise AudioInputError(f"{path}: not a regular file (a pipe or a device); save the audio to a file first")
    if not os.access(path, os.R_OK):
        raise AudioInputError(f"{path}: permission denied; make the file readable")
    if path.stat().st_size == 0:
        raise AudioInputError(f"{path}: audio file is empty (0 bytes)")
    return path


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read any libsndfile format (WAV of any PCM/float/A-law/µ-law subtype, FLAC, OGG, MP3...), mix to mono,
    resample to `sample_rate`. Streamed in blocks: peak memory is the output plus a few blocks."""
    path = _audio_file(Path(path))
    try:
        f = sf.SoundFile(str(path))
    except Exception as exc:  # libsndfile's messages are already one line
        reason = " ".join(str(exc).split())
        raise AudioInputError(f"{path}: cannot read audio ({reason}); use WAV, FLAC, OGG or MP3") from None
    with f:
        if f.samplerate <= 0 or f.channels <= 0:
            raise AudioInputError(f"{path}: header says {f.samplerate} Hz, {f.channels} channels")
        if f.frames == 0:
            raise AudioInputError(f"{path}: audio file is empty")
        ratio = sample_rate / f.samplerate
        # [T] at sample_rate; soxr's streaming output can exceed the exact length by a few samples
        out = np.empty(int(np.ceil(f.frames * ratio)) + 64, np.float32)
        stream = None if f.samplerate == sample_rate else soxr.ResampleStream(f.samplerate, sample_rate, 1, "float32")
        n, read = 0, 0
        while True:
            try:
                block = f.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
            except Exception as exc:
                raise AudioInputError(f"{path}: cannot decode audio after {read / f.samplerate:.1f} s "
                                      f"({' '.join(str(exc).split())}); the file is damaged") from None
            last = len(block) < BLOCK_FRAMES
            mono = to_mono_float32(block, what=f"{path} (at {read / f.samplerate:.1f} s)")
            read += len(block)
            np.clip(mono, -1.0, 1.0, out=mono)  # float files may exceed full scale; stages assume [-1, 1]
            if stream is not None:
                mono = stream.resample_chunk(mono, last=last)
            if n + len(mono) > len(out):  # a header that undercounts its frames
                out = np.resize(out, max(2 * len(out), n + len(mono)))
            out[n:n + len(mono)] = mono
            n += len(mono)
            if last:
                break
    if n == 0:
        raise AudioInputError(f"{path}: audio file is empty")
    return out[:n]


def save_audio(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write 16-bit PCM WAV (or FLAC by suffix), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0)
    sf.write(str(path), audio, sample_rate, subtype="PCM_16")
    return path


def float_to_pcm16(audio: np.ndarray) -> bytes:
    # the exact inverse of pcm16_to_float for every representable sample; +1.0 clips to 32767
    return np.clip(np.round(np.asarray(audio, np.float32) * 32768.0), -32768, 32767).astype("<i2").tobytes()


def pcm16_to_float(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
