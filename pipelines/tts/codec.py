"""The Mimi bridge (moshi, PyTorch): 24 kHz audio <-> 32 codebooks at 12.5 frames/s.

Streaming matters: decoding frame chunks independently restarts Mimi's convolutions and transformer at
each chunk (clicks and reverb). `StreamDecoder` keeps one `mimi.streaming(1)` state for a whole
utterance, so the concatenated chunks equal a one-shot decode.

Speed: a streamed frame reaches the decoder's first transposed convolution (1024 -> 512 channels, kernel 16)
as 2 time steps. PyTorch sends inputs that small down its reference path, whose GEMM reads the weight
transposed: 40-70 ms of a ~110 ms frame here. `_MatmulConvTranspose1d` does the same arithmetic as one GEMM
on a weight stored the other way round plus `F.fold` (PyTorch's col2im), ~7 ms; equal to
`nn.ConvTranspose1d` to float rounding (tests/test_tts.py).

The transformers CSM/Marvis repos carry Mimi as a transformers `MimiModel` (`codec_model.*`):
`MimiCodec.from_transformers` maps its names and layouts (split q/k/v, q/k in rotate-half order) onto moshi's
Mimi and loads them strictly, so those repos need no separate Mimi file.

A streamed call's cost is mostly fixed (the decoder's ~40 M weights are read whatever the chunk's length):
`_ColumnLinear` reads the decoder transformer's weights in the order BLAS is fastest at for few rows.

Memory: PyTorch's convolutions go through oneDNN, which compiles and caches kernels for every input length it
meets and keeps them (up to 1024 of them). Every user turn that becomes context has a length of its own, so a long
conversation grew the process by 2-4 MB a turn (the 30-turn soak: 3.7 MB a turn, none of it Python objects).
Mimi's encoder is causal, so zeros after the audio leave the codes of its own frames as they are: `encode` pads
to whole seconds (`ENCODE_STEP`) and drops the extra frames, and the encoder meets one length a second of audio.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from pipelines.errors import AudioInputError, CheckpointError
from pipelines.tts.weights import check_fit, rotate_half_to_interleaved

SAMPLE_RATE = 24_000
FRAME_SIZE = 1920  # samples per 80 ms frame
ENCODE_STEP = SAMPLE_RATE  # `encode` pads its input to a whole number of these (see the module's note on memory)


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
        for module in self.mimi.decoder_transformer.modules():
            if type(module) is torch.nn.Linear:
                module.__class__ = _ColumnLinear
        self.num_codebooks = num_codebooks
        self.source = "random Mimi (untrained)" if self.random_weights else str(weights)

    def use_threads(self, threads: int) -> None:
        """Mimi runs on torch's pool: size it to the cores free now (a pool of two on one free core waits at every
        op for the thread the machine descheduled)."""
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def encode(self, audio: np.ndarray) -> np.ndarray:
        """[T] float32 at 24 kHz -> [K, ceil(T / 1920)] int32 codes: the codes Mimi gives `audio` itself (padded to
        whole `ENCODE_STEP`s inside, for memory: see the module note)."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise AudioInputError(f"Mimi encode needs non-empty mono audio, got shape {audio.shape}")
        if not np.isfinite(audio).all():
            raise AudioInputError("Mimi encode: audio contains NaN or infinite samples")
        if self.mimi._streaming_state is not None:
            raise RuntimeError("Mimi is streaming a decode; encode context audio before starting the stream")
        frames = -(-audio.size // FRAME_SIZE)  # the last part frame counts, as Mimi counts it
        padded = np.zeros(-(-audio.size // ENCODE_STEP) * ENCODE_STEP, np.float32)
        padded[: audio.size] = audio
        codes = self.mimi.encode(torch.from_numpy(padded)[None, None])
        return codes[0, :, :frames].numpy().astype(np.int32)

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

    @classmethod
    def from_transformers(cls, files: Sequence[str | Path], num_codebooks: int = 32, config: dict | None = None,
                          prefix: str = "codec_model.") -> "MimiCodec":
        """Moshi's Mimi from a transformers `MimiModel`'s tensors: the transformers CSM/Marvis repos carry the codec
        as `codec_model.*` beside the TTS (`prefix=""` for a bare MimiModel). Every tensor must fit: nothing stays random."""
        where = str(files[0]) if len(files) == 1 else str(Path(files[0]).parent)
        _check_transformers_config(config or {}, where)
        state: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                with safe_open(str(f), "pt") as fh:
                    state.update({k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)})
            except Exception as exc:
                raise CheckpointError(f"{f}: cannot read safetensors ({exc}); the file may be truncated") from None
        if not state:
            raise CheckpointError(f"{where}: no {prefix}* tensors (a transformers Mimi codec)")
        codec = cls(None, num_codebooks=num_codebooks)
        _load_moshi_state(codec.mimi, transformers_to_moshi(state, codec.mimi), where)
        codec.random_weights = False
        codec.source = f"{where} (transformers Mimi{f' {prefix}*' if prefix else ''})"
        return codec


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


# transformers' Mimi -> moshi's. transformers 5 nests its halves in memory (`encoder.encoder_seanet.*`) but its
# checkpoints, save_pretrained included, keep the original flat layout (`encoder.layers.*`, `encoder_transformer.*`).
_TRANSFORMERS_NESTED = [
    ("encoder.encoder_seanet.", "encoder."),
    ("encoder.encoder_transformer.", "encoder_transformer."),
    ("encoder.downsample.", "downsample."),
    ("decoder.upsample.", "upsample."),
    ("decoder.decoder_transformer.", "decoder_transformer."),
    ("decoder.decoder_seanet.", "decoder."),
]
_TRANSFORMERS_RENAMES = [
    (r"^(encoder|decoder)\.layers\.(\d+)\.", r"\1.model.\2."),
    (r"^(encoder|decoder)_transformer\.layers\.", r"\1_transformer.transformer.layers."),
    (r"\.self_attn\.o_proj\.", ".self_attn.out_projs.0."),
    (r"\.mlp\.fc1\.", ".linear1."),
    (r"\.mlp\.fc2\.", ".linear2."),
    (r"\.input_layernorm\.", ".norm1."),
    (r"\.post_attention_layernorm\.", ".norm2."),
    (r"\.self_attn_layer_scale\.", ".layer_scale_1."),
    (r"\.mlp_layer_scale\.", ".layer_scale_2."),
    (r"^quantizer\.semantic_residual_vector_quantizer\.", "quantizer.rvq_first."),
    (r"^quantizer\.acoustic_residual_vector_quantizer\.", "quantizer.rvq_rest."),
    (r"\.layers\.(\d+)\.codebook\.", r".vq.layers.\1._codebook."),
    (r"\.embed_sum$", ".embedding_sum"),
    (r"\._codebook\.initialized$", "._codebook._initialized"),
]
# Not a shape, so load_state_dict cannot see it: what moshi's Mimi hard-codes.
_MOSHI_MIMI = {"sampling_rate": 24_000, "sliding_window": 250, "rope_theta": 10_000.0, "use_causal_conv": True,
               "pad_mode": "constant", "trim_right_ratio": 1.0, "hidden_act": "gelu", "norm_eps": 1e-5}


def _check_transformers_config(config: dict, where: str) -> None:
    config = {**config, "rope_theta": config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))}
    wrong = [f"{k}={config[k]!r} (moshi's: {v!r})" for k, v in _MOSHI_MIMI.items()
             if config.get(k) is not None and config[k] != v]
    if wrong:
        raise CheckpointError(f"{where}: this transformers Mimi is not moshi's Mimi: " + ", ".join(wrong))


def transformers_to_moshi(state: dict[str, torch.Tensor], mimi) -> dict[str, torch.Tensor]:
    """A transformers `MimiModel` state dict (flat or nested names) -> moshi `MimiModel` names and layouts."""
    targets = set(mimi.state_dict())
    num_heads = mimi.encoder_transformer.transformer.layers[0].self_attn.num_heads
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for old, new in _TRANSFORMERS_NESTED:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        for pattern, repl in _TRANSFORMERS_RENAMES:
            key = re.sub(pattern, repl, key)
        if m := re.match(r"(.*\.self_attn)\.([qkv])_proj\.weight$", key):
            qkv.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        if m := re.match(r"(.*)\.conv\.(weight|bias)$", key):
            # moshi wraps each torch conv two or three modules deep (streaming, norm, resampling), `convtr` if transposed
            wraps = ("conv.conv", "convtr.convtr", "conv.conv.conv", "convtr.convtr.convtr")
            key = next((c for c in (f"{m.group(1)}.{w}.{m.group(2)}" for w in wraps) if c in targets), key)
        out[key] = value
    for attn, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            out.update({f"{attn}.{p}_proj.weight": v for p, v in parts.items()})  # left for the fit check to name
            continue
        # transformers stores q/k rows per head as [even dims..., odd dims...] (rotate-half RoPE); moshi pairs them
        q, k = (rotate_half_to_interleaved(parts[p], num_heads) for p in "qk")
        out[f"{attn}.in_projs.0.weight"] = torch.cat([q, k, parts["v"]])  # [3 * dim, dim]
    return out


def _load_moshi_state(mimi, state: dict[str, torch.Tensor], where: str) -> None:
    """`load_state_dict(strict=True)`, with one line naming every tensor that does not fit."""
    check_fit(mimi.state_dict(), state, f"{where}: the transformers Mimi does not fit moshi's Mimi")
    mimi.load_state_dict(state, strict=True)
    for module in mimi.modules():
        if hasattr(module, "_embedding") and hasattr(module, "embedding_sum"):
            module._embedding = None  # drop centroids cached from the random codebooks


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


class _ColumnLinear(torch.nn.Linear):
    """`nn.Linear` as (W @ x.T).T, for the few rows a streamed chunk gives Mimi's decoder transformer (two a frame).

    At so few rows the weight read dominates, and BLAS reads a [out, in] weight fastest as the left operand: a
    1-frame streamed decode took 28-30 ms against 34-35 with `nn.Linear` (scripts/bench_mimi_chunks.py, two runs;
    longer chunks 0.79-1.15 of its time, mostly below 1). Equal to `F.linear` to float rounding (tests/test_tts.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = torch.matmul(self.weight, rows.T).T.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


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
