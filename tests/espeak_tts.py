"""A second TTS stage beside Marvis, for tests: espeak-ng through the same `TTSStage` Protocol, no Mimi.

It shows what the turn engine needs of a TTS and nothing more: real speech at espeak-ng's own rate
(22050 Hz), handed out in chunks, without codes, under its own config type. espeak-ng has no use for the
conversation's context; the stage keeps what it was given so a test can see the engine passed it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from pipelines.messages import AudioChunk, Segment, VoiceReference

VOICES = ("en-us", "en-us+f3")  # speaker id -> espeak-ng voice (ids beyond wrap round)


def _never() -> bool:
    return False


@dataclass(frozen=True)
class EspeakConfig:
    """The fields the engine reads (`pipelines.messages.VoiceConfig`) and espeak-ng's own."""

    seed: int = 0  # espeak-ng is deterministic: the engine's per-turn seed changes nothing
    speaker: int = 0
    user_speaker: int = 1
    context_segments: int = 4
    words_per_minute: int = 175
    chunk_ms: int = 100


class EspeakTTS:
    sample_rate = 22_050  # espeak-ng's own; the agent plays and records at whatever rate its TTS says
    untrained = False

    def __init__(self, config: EspeakConfig | None = None, binary: str = "espeak-ng"):
        path = shutil.which(binary)
        if path is None:
            raise FileNotFoundError(f"{binary} is not installed")
        self.binary = path
        self.config = config or EspeakConfig()
        self.calls: list[tuple[str, int, list[tuple[int, str]]]] = []  # (text, speaker, context) per stream
        self.rtf: float | None = None

    def describe(self) -> str:
        version = subprocess.run([self.binary, "--version"], capture_output=True, text=True).stdout.strip()
        return f"espeak-ng [{version.split(' Data at')[0]}]"

    def warmup(self) -> None:
        self.synthesise("Hi.", 0, self.config)

    def synthesise(self, text: str, speaker: int = 0, config: EspeakConfig | None = None) -> np.ndarray:
        """`text` in the voice of `speaker`, as float32 mono at `sample_rate`."""
        cfg = config or self.config
        with tempfile.TemporaryDirectory() as folder:
            wav = Path(folder) / "say.wav"
            # the text on stdin: a text that starts with "-" is never taken for an option
            subprocess.run([self.binary, "-v", VOICES[speaker % len(VOICES)], "-s", str(cfg.words_per_minute),
                            "-w", str(wav), "--stdin"], input=text.encode(), check=True, capture_output=True)
            audio, rate = sf.read(wav, dtype="float32")
        if rate != self.sample_rate:
            raise RuntimeError(f"espeak-ng wrote {rate} Hz, not {self.sample_rate}")
        return audio

    def stream(self, text: str, speaker: int = 0, context: Sequence[Segment] = (),
               voice: VoiceReference | None = None, config: EspeakConfig | None = None,
               cancelled: Callable[[], bool] = _never,
               ahead: Callable[[], float] | None = None,
               waiting: Callable[[], float] | None = None) -> Iterator[AudioChunk]:
        cfg = config or self.config
        self.calls.append((text, speaker, [(s.speaker, s.text) for s in context]))
        began = time.monotonic()
        audio = self.synthesise(text, speaker, cfg)
        self.rtf = (time.monotonic() - began) / max(audio.size / self.sample_rate, 1e-3)
        step = max(1, round(self.sample_rate * cfg.chunk_ms / 1000))
        for first in range(0, audio.size, step):
            if cancelled():
                return
            yield AudioChunk(audio[first:first + step], None, first // step, self.sample_rate, step)

    def prepare_context(self, context: Sequence[Segment]) -> int:
        return 0  # nothing to prepare: the context is not used

    def max_chars(self, config: EspeakConfig | None = None) -> int | None:
        return None  # espeak-ng says any length of text in one call

    def prebuffer_s(self, text: str, config: EspeakConfig | None, least_s: float, out_s: float = 0.0) -> float:
        # the whole piece is made before its first chunk is handed out: from then on every chunk is ready
        return least_s

    def rtf_now(self, config: EspeakConfig | None = None) -> float | None:
        return self.rtf  # the last piece's synthesis time over its audio

    def rate_margin(self) -> float | None:
        return None  # the whole piece is made before it plays: no rate is planned
