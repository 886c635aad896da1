"""Audio in and out: every stage speaks float32 mono numpy arrays at an explicit sample rate.

Reading goes through libsndfile (WAV, FLAC, OGG...), resampling through soxr. Anything that cannot
become clean mono float32 raises `AudioInputError` with a one-line reason.
"""

from __future__ import annotations

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


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Read any libsndfile format, mix to mono, resample to `sample_rate`."""
    path = Path(path)
    if not path.is_file():
        raise AudioInputError(f"{path}: no such audio file")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's messages are already one line
        raise AudioInputError(f"{path}: cannot read audio ({exc}); use WAV or FLAC") from None
    if data.shape[0] == 0:
        raise AudioInputError(f"{path}: audio file is empty")
    return resample(to_mono_float32(data, what=str(path)), rate, sample_rate)


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
