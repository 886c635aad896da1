"""The Mimi bridge (moshi, PyTorch): 24 kHz audio <-> 32 codebooks at 12.5 frames/s.

Streaming matters: decoding frame chunks independently restarts Mimi's convolutions and transformer at
each chunk (clicks and reverb). `StreamDecoder` keeps one `mimi.streaming(1)` state for a whole
utterance, so the concatenated chunks equal a one-shot decode.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from pipelines.errors import AudioInputError, CheckpointError

SAMPLE_RATE = 24_000
FRAME_SIZE = 1920  # samples per 80 ms frame


class MimiCodec:
    def __init__(self, weights: str | Path | None = None, num_codebooks: int = 32, seed: int = 0):
        from moshi.models import loaders  # heavy import, only when a codec is built

        self.random_weights = weights is None
        if weights is not None and not Path(weights).is_file():
            raise CheckpointError(f"{weights}: no Mimi weights file; run `voice-agent fetch` or drop the file there")
        if self.random_weights:
            torch.manual_seed(seed)
        try:
            self.mimi = loaders.get_mimi(None if weights is None else str(weights), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{weights}: cannot load Mimi weights ({exc})") from None
        if self.random_weights:
            _randomise_codebooks(self.mimi, seed)
        self.mimi.set_num_codebooks(num_codebooks)
        self.mimi.eval()
        self.num_codebooks = num_codebooks
        self.source = "random Mimi (untrained)" if self.random_weights else str(weights)

    @torch.no_grad()
    def encode(self, audio: np.ndarray) -> np.ndarray:
        """[T] float32 at 24 kHz -> [K, F] int32 codes."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise AudioInputError(f"Mimi encode needs non-empty mono audio, got shape {audio.shape}")
        if not np.isfinite(audio).all():
            raise AudioInputError("Mimi encode: audio contains NaN or infinite samples")
        if self.mimi._streaming_state is not None:
            raise RuntimeError("Mimi is streaming a decode; encode context audio before starting the stream")
        codes = self.mimi.encode(torch.from_numpy(audio)[None, None])
        return codes[0].numpy().astype(np.int32)

    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """[K, F] codes -> [F * 1920] float32 audio, one shot."""
        return self.mimi.decode(self._codes_tensor(codes))[0, 0].numpy()

    def _codes_tensor(self, codes: np.ndarray) -> torch.Tensor:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
            raise ValueError(f"codes must be [{self.num_codebooks}, frames], got {codes.shape}")
        return torch.from_numpy(np.clip(codes, 0, 2047).astype(np.int64))[None]

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


def _randomise_codebooks(mimi, seed: int) -> None:
    # An untrained Mimi starts with all-zero codebooks, so it would encode every input to code 0;
    # random centroids make context audio give varied codes, as a trained codec does.
    gen = torch.Generator().manual_seed(seed)
    for name, buf in mimi.named_buffers():
        if name.endswith("embedding_sum"):
            buf.copy_(torch.randn(buf.shape, generator=gen))
            mimi.get_buffer(name[: -len("embedding_sum")] + "cluster_usage").fill_(1.0)
    for module in mimi.modules():
        if hasattr(module, "_embedding") and hasattr(module, "embedding_sum"):
            module._embedding = None  # drop the cached centroids


class StreamDecoder:
    """One utterance's decode state: `with codec.stream_decoder() as dec: dec.decode(chunk)...`."""

    def __init__(self, codec: MimiCodec):
        self.codec = codec
        self._stack: ExitStack | None = None

    def __enter__(self) -> "StreamDecoder":
        self._stack = self.codec.mimi.streaming(1)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """[K, n] codes of the next n frames -> [n * 1920] audio continuing the previous chunks."""
        if self._stack is None:
            raise RuntimeError("StreamDecoder used outside its `with` block")
        return self.codec.mimi.decode(self.codec._codes_tensor(codes))[0, 0].numpy()
