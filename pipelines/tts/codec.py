"""The Mimi bridge (moshi, PyTorch): 24 kHz audio <-> 32 codebooks at 12.5 frames/s.

Streaming matters: decoding frame chunks independently restarts Mimi's convolutions and transformer at
each chunk (clicks and reverb). `StreamDecoder` keeps one `mimi.streaming(1)` state for a whole
utterance, so the concatenated chunks equal a one-shot decode.

Speed: a streamed frame reaches the decoder's first transposed convolution (1024 -> 512 channels, kernel 16)
as 2 time steps. PyTorch sends inputs that small down its reference path, whose GEMM reads the weight
transposed: 40-70 ms of a ~110 ms frame here. `_MatmulConvTranspose1d` does the same arithmetic as one GEMM
on a weight stored the other way round plus `F.fold` (PyTorch's col2im), ~7 ms; equal to
`nn.ConvTranspose1d` to float rounding (tests/test_tts.py).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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
        for module in self.mimi.decoder.modules():
            if type(module) is torch.nn.ConvTranspose1d and _MatmulConvTranspose1d.fits(module):
                module.__class__ = _MatmulConvTranspose1d
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


class _MatmulConvTranspose1d(torch.nn.ConvTranspose1d):
    """`nn.ConvTranspose1d` (no groups, padding or dilation) as GEMM + col2im on a [out * kernel, in] weight copy.

    y[o, t*s + j] = sum_i w[i, o, j] x[i, t]: the GEMM gives every (o, j, t) term, `F.fold` sums the overlaps.
    """

    @staticmethod
    def fits(conv: torch.nn.ConvTranspose1d) -> bool:
        return (conv.groups == 1 and conv.padding == (0,) and conv.dilation == (1,) and conv.output_padding == (0,)
                and conv.padding_mode == "zeros")

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is not None or x.dim() != 3:
            return super().forward(x, output_size)
        w = self.weight  # [in, out, kernel]
        key = (w.data_ptr(), w._version)
        if getattr(self, "_folded_key", None) != key:  # the weight changed (loaded after construction): redo the copy
            self._folded = w.detach().reshape(w.shape[0], -1).t().contiguous()  # [out * kernel, in]
            self._folded_key = key
        (k,), (s,) = self.kernel_size, self.stride
        B, _, T = x.shape
        cols = torch.matmul(self._folded, x)  # [B, out * kernel, T]
        y = F.fold(cols[:, :, None, :].flatten(2), output_size=(1, (T - 1) * s + k), kernel_size=(1, k),
                   stride=(1, s))[:, :, 0]  # [B, out, (T - 1) * s + k]
        return y if self.bias is None else y + self.bias[:, None]


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
