"""The ASR stage: one utterance of 16 kHz mono audio in, one `Transcript` out, through mlx-whisper.

Notable:
- `model_dir` is always a local folder (config.json + weights.safetensors/.npz). mlx-whisper would
  treat a path that does not exist as a hub repo id and download it; we refuse first, so a typo or a
  missing conversion is a one-line `CheckpointError`, never a network call.
- mlx-whisper's `fp16` option must match the stored weights (it checks the encoder's output dtype),
  so we read the dtype from the weights file instead of asking the user.
- Each window is decoded on its own (`condition_on_previous_text=False`): a voice agent's utterances
  are short, and this keeps one bad window from dragging the next one into a repetition loop.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.audio import resample, to_mono_float32
from pipelines.errors import CheckpointError, ConfigError

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.1  # below this there is no word to find; return "" without running the model
SILENCE_PEAK = 1e-4  # digital silence: nothing to hear, so skip the encoder pass (seconds on CPU)


@dataclass(frozen=True)
class Transcript:
    text: str
    seconds: float  # wall time spent transcribing
    language: str | None


def _weights_dtype(weights: Path) -> str:
    """Dtype of `encoder.conv1.weight` (never quantised): 'F16', 'F32', 'BF16' (safetensors names)."""
    if weights.suffix == ".safetensors":
        try:
            with open(weights, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            return header["encoder.conv1.weight"]["dtype"]
        except (OSError, ValueError, KeyError, struct.error):
            raise CheckpointError(f"{weights}: not an mlx-whisper safetensors file; re-convert the model") from None
    try:
        with np.load(weights) as npz:
            return {"float16": "F16", "float32": "F32"}.get(str(npz["encoder.conv1.weight"].dtype), "?")
    except (OSError, ValueError, KeyError):
        raise CheckpointError(f"{weights}: not an mlx-whisper weights.npz file; re-convert the model") from None


class WhisperASR:
    """Speech to text with mlx-whisper. Plain object: `warmup()`, `transcribe(audio)`."""

    def __init__(self, model_dir: str | Path, language: str | None = None, initial_prompt: str | None = None):
        from mlx_whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

        self.model_dir = Path(model_dir).expanduser().resolve()
        if not self.model_dir.is_dir():
            raise CheckpointError(
                f"{model_dir}: no such Whisper model folder; convert one first (pipelines.asr.ct2.convert_ct2_whisper)"
            )
        config_path = self.model_dir / "config.json"
        weights = next((p for p in (self.model_dir / "weights.safetensors", self.model_dir / "weights.npz") if p.is_file()), None)
        if not config_path.is_file() or weights is None:
            raise CheckpointError(f"{self.model_dir}: needs config.json and weights.safetensors; re-convert the model")
        try:
            config = json.loads(config_path.read_text())
            self.multilingual = int(config["n_vocab"]) >= 51865
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{config_path}: not an mlx-whisper config (needs n_vocab...); re-convert the model") from None
        dtype = _weights_dtype(weights)
        if dtype not in ("F16", "F32"):
            raise CheckpointError(f"{weights}: weights are {dtype}; mlx-whisper runs float16 or float32 only")
        self.fp16 = dtype == "F16"

        if language is not None:
            code = language.lower()
            code = TO_LANGUAGE_CODE.get(code, code)
            if code not in LANGUAGES:
                raise ConfigError(f"asr.language: unknown language '{language}'; use a code like 'en' or 'de'")
            if code != "en" and not self.multilingual:
                raise ConfigError(f"asr.language '{language}': {self.model_dir.name} is English-only; use a multilingual model")
            language = code
        self.language = language
        self.initial_prompt = initial_prompt

    def _run(self, audio: np.ndarray, temperature: float | tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)) -> dict:
        import mlx_whisper

        return mlx_whisper.transcribe(
            audio,
            path_or_hf_repo=str(self.model_dir),  # exists (checked), so never a hub lookup
            language=self.language,
            initial_prompt=self.initial_prompt,
            condition_on_previous_text=False,
            temperature=temperature,  # greedy first; hotter only if that one looks like a failure
            fp16=self.fp16,
            verbose=None,
        )

    def warmup(self) -> None:
        """Load the weights and run one decode so the first real utterance pays no start-up cost."""
        noise = np.random.default_rng(0).normal(0.0, 0.01, SAMPLE_RATE // 2).astype(np.float32)
        self._run(noise, temperature=0.0)

    def transcribe(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Transcript:
        """[T] float32 mono (any rate, resampled to 16 kHz) -> Transcript. Too short or silent -> ""."""
        start = time.perf_counter()
        audio = resample(to_mono_float32(audio, what="ASR input"), sample_rate, SAMPLE_RATE)
        if audio.size < MIN_SECONDS * SAMPLE_RATE or float(np.abs(audio).max()) < SILENCE_PEAK:
            return Transcript("", time.perf_counter() - start, self.language or (None if self.multilingual else "en"))
        result = self._run(audio)
        return Transcript(str(result.get("text", "")).strip(), time.perf_counter() - start, result.get("language"))
