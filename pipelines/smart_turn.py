"""Semantic end of turn: Smart Turn v3.2 (pipecat, BSD-2) asks "has the speaker finished?".

The model is an 8.7 MB ONNX graph (Whisper-tiny encoder + classifier) shipped inside the
`pipecat-ai` wheel, installed `--no-deps` by scripts/bootstrap.sh; we locate the file through the
package spec and never import pipecat. Facts from pipecat's own feature code, which we follow:
- input `input_features` [B, 80, 800]: the last 8 s at 16 kHz, shorter audio zero-padded on the
  LEFT (the end of speech always sits at the right edge), the whole 8 s buffer normalised to zero
  mean and unit variance, then Whisper's log-mel (n_fft 400, hop 160, Slaney filters, the trailing
  frame dropped, clamp to max - 8, (x + 4) / 4), which is mlx-whisper's `log_mel_spectrogram`.
- output `logits` [B, 1] is already a probability: the graph's last node is a Sigmoid (so random
  input gives ~0.98, not a logit), and pipecat calls it complete above 0.5.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from pipelines.audio import resample, to_mono_float32
from pipelines.errors import CheckpointError

SAMPLE_RATE = 16_000
WINDOW_S = 8
MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
MODEL_DIR = ("audio", "turn", "smart_turn", "data")  # inside the pipecat package
NORM_EPS = 1e-7


def find_smart_turn() -> Path:
    """The ONNX file inside the installed pipecat-ai wheel (its package is never imported)."""
    spec = importlib.util.find_spec("pipecat")  # a top-level spec imports nothing; a dotted one would
    roots = list(spec.submodule_search_locations or []) if spec else []
    path = next((Path(root, *MODEL_DIR, MODEL_FILE) for root in roots if Path(root, *MODEL_DIR, MODEL_FILE).is_file()), None)
    if path is None:
        raise CheckpointError(f"Smart Turn model {MODEL_FILE} not found: pip install --no-deps pipecat-ai==1.14.0 (scripts/bootstrap.sh)")
    return path


def turn_features(audio_16k: np.ndarray) -> np.ndarray:
    """[T] float32 at 16 kHz -> [80, 800] log-mel of the last 8 s, left-padded, normalised first."""
    from mlx_whisper.audio import log_mel_spectrogram

    n = WINDOW_S * SAMPLE_RATE
    x = np.zeros(n, np.float32)
    tail = audio_16k[-n:]
    x[n - tail.size :] = tail
    x = (x - x.mean()) / np.sqrt(x.var() + NORM_EPS)
    return np.asarray(log_mel_spectrogram(x, n_mels=80)).T  # [80, 800]


class SmartTurn:
    """End-of-turn probability of an utterance so far. Plain object: `warmup()`, `predict(audio)`; where the turn is
    cut (`vad.smart_turn_threshold`) is the Endpointer's business."""

    def __init__(self, model_path: str | Path | None = None, threads: int = 2):
        import onnxruntime as ort

        path = Path(model_path) if model_path is not None else find_smart_turn()
        if not path.is_file():
            raise CheckpointError(f"{path}: no Smart Turn ONNX file there")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a corrupt graph
            raise CheckpointError(f"{path}: not a loadable ONNX model ({type(e).__name__})") from None

    def warmup(self) -> None:
        self.predict(np.zeros(SAMPLE_RATE, np.float32))

    def predict(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
        """Probability that the speaker has finished their turn at the end of `audio`."""
        audio = resample(to_mono_float32(audio, what="Smart Turn input"), sample_rate, SAMPLE_RATE)
        features = turn_features(audio)[None]  # [1, 80, 800]
        (probability,) = self._session.run(None, {"input_features": features})
        return float(probability[0, 0])
