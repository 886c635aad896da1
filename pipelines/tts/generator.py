"""The frame loop: prompt rows -> one frame of 32 Mimi codes at a time, sampled, until EOS or the cap.

What is notable here:
- The network runs on a backend: `MLXFrames` (the model of record, `model.py`; lazy, one host sync per frame)
  or `OrtFrames` (the same network as ONNX Runtime graphs built from the same weights, `ort.py`: fast
  matmuls on CPUs where MLX is slow). Both are driven by the one loop in `FrameGenerator`.
- Sampling is top-k + temperature for every codebook; temperature 0 is greedy. On MLX it is a lazy
  categorical draw; on ONNX Runtime it runs inside the frame graph by `sample_sorted`'s rule (one host-drawn
  uniform per codebook). Keys and seeds are explicit (`seed`), so a run is reproducible whatever else uses the
  global RNG.
- The backbone cache outlives a generation in an explicit `PrefixCache`: consecutive prompts share a long
  prefix (the same context; the previous sentence's text and frames are the next one's context), so only
  the new rows are prefilled.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipelines.tts.prompt import Prompt


@dataclass(frozen=True)
class GenerationConfig:
    temperature: float = 0.9
    top_k: int = 50
    seed: int | None = None  # None: a fresh random seed per call
    max_audio_length_ms: float = 10_000
    frames_per_char: float = 1.0  # text-length cap: 12.5 characters a second, slower than people speak (14-15)
    min_text_frames: int = 12
    stop_on_eos: bool = True
    chunk_frames: int = 8
    first_chunk_frames: int = 2  # two frames: the first sound as soon as this call's frame rate is measured

    def __post_init__(self):
        def bad(name: str, rule: str):
            raise ValueError(f"tts.{name} must be {rule}, got {getattr(self, name)!r}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if self.top_k < 0:
            bad("top_k", ">= 0 (0 = no top-k cut)")
        if not (math.isfinite(self.max_audio_length_ms) and self.max_audio_length_ms >= 80):
            bad("max_audio_length_ms", "a finite number >= 80 (one frame)")
        if not (math.isfinite(self.frames_per_char) and self.frames_per_char > 0):
            bad("frames_per_char", "a finite number > 0")
        for name in ("min_text_frames", "chunk_frames", "first_chunk_frames"):
            if getattr(self, name) < 1:
                bad(name, ">= 1")


# ---- sampling ------------------------------------------------------------------------------------------------

def sample_mlx(logits, temperature: float, top_k: int, key):
    """logits [B, V] (MLX) -> [B] int32; lazy. temperature 0 (or no key) is greedy."""
    import mlx.core as mx

    if temperature <= 0 or key is None:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    logits = logits.astype(mx.float32) / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = mx.partition(logits, V - top_k, axis=-1)[..., V - top_k : V - top_k + 1]  # the k-th largest
        logits = mx.where(logits < kth, -mx.inf, logits)
    return mx.random.categorical(logits, axis=-1, key=key).astype(mx.int32)


def sample_sorted(logits: np.ndarray, temperature: float, top_k: int, u: float) -> int:
    """logits [V] -> one token, given one uniform u in [0, 1): the k largest logits sorted high to low, softmax
    at `temperature`, the first whose cumulative probability passes u. The ONNX frame graph samples by this
    same rule in float32 (`ort._sample`), so a seeded run gives the same codes on the host and in the graph.
    temperature 0 is argmax."""
    V = logits.shape[-1]
    k = top_k if 0 < top_k < V else V
    top = np.argsort(-logits, kind="stable")[:k]
    if temperature <= 0:
        return int(top[0])
    vals = logits[top].astype(np.float32)
    cdf = np.cumsum(np.exp((vals - vals[0]) / np.float32(max(temperature, 1e-5))), dtype=np.float32)
    j = int(np.count_nonzero(cdf <= np.float32(u) * cdf[-1]))
    return int(top[min(j, k - 1)])


# ---- backends ------------------------------------------------------------------------------------------------

class _MLXCache:
    """The backbone's per-layer KV caches, seen as one object with an offset (as `ort.OrtCache`)."""

    def __init__(self, layers):
        self.layers = layers

    @property
    def offset(self) -> int:
        return self.layers[0].offset

    def trim(self, n: int) -> int:
        for c in self.layers:
            c.trim(n)
        return n


class MLXFrames:
    """The MLX network (the model of record): a frame is one lazy graph and one host sync."""

    name = "mlx"
    quantization = None

    def __init__(self, model, cpu_layout: bool = True):
        """cpu_layout=False runs the model in its plain layout (`Model.prepare_for_cpu`'s parity tests)."""
        self.model = model.prepare_for_cpu() if cpu_layout else model
        self.num_codebooks = model.args.audio_num_codebooks
        self.quantization = getattr(model, "quantization_bits", None)

    def make_cache(self) -> _MLXCache:
        return _MLXCache(self.model.make_backbone_cache())

    def use_spin(self, on: bool) -> None:
        """MLX's CPU pool has no such choice."""

    def rng(self, cfg: GenerationConfig):
        import mlx.core as mx

        if cfg.temperature <= 0:
            return None
        return [mx.random.key(cfg.seed if cfg.seed is not None else secrets.randbits(31))]

    def prefill(self, tokens: np.ndarray, mask: np.ndarray, cache: _MLXCache) -> None:
        """Run rows [T, K+1] through the backbone into the cache, sampling nothing."""
        import mlx.core as mx

        mx.eval(self.model.backbone_hidden(mx.array(tokens)[None], mx.array(mask)[None], cache.layers))

    def frame(self, tokens: np.ndarray, mask: np.ndarray, cache: _MLXCache, cfg: GenerationConfig, rng) -> np.ndarray:
        """Rows [T, K+1] in, one frame of codes [K] out."""
        import mlx.core as mx

        model, K = self.model, self.num_codebooks
        if rng is None:
            keys = [None] * K
        else:
            rng[0], sub = mx.random.split(rng[0])
            keys = list(mx.random.split(sub, K))
        h = model.backbone_hidden(mx.array(tokens)[None], mx.array(mask)[None], cache.layers)  # [1, D]
        c = sample_mlx(model.codebook0_head(h), cfg.temperature, cfg.top_k, keys[0])
        codes = [c]
        decoder_cache = model.make_decoder_cache()  # fresh every frame
        x = mx.concatenate([h[:, None, :], model.embed_audio(0, c)], axis=1)  # [1, 2, D]
        for k in range(1, K):
            d = model.decoder_hidden(x, decoder_cache)
            c = sample_mlx(model.codebook_logits(d, k), cfg.temperature, cfg.top_k, keys[k])
            codes.append(c)
            x = model.embed_audio(k, c)
        frame = mx.stack(codes, axis=-1)  # [1, K]
        mx.eval(frame)
        return np.array(frame)[0]  # index in numpy: `frame[0]` would be a second graph, a second host sync


class OrtFrames:
    """The same network on ONNX Runtime (`ort.OrtFrameModel`): a frame, sampling included, is one session run."""

    name = "onnx"

    def __init__(self, ort_model):
        self.ort = ort_model
        self.num_codebooks = ort_model.num_codebooks
        self.quantization = ort_model.quantization

    def make_cache(self):
        return self.ort.make_cache()

    def use_spin(self, on: bool) -> None:
        """Run the frames on the session whose pool spins inside a run (`on`: every core is free) or sleeps."""
        self.ort.spin = on

    def rng(self, cfg: GenerationConfig):
        if cfg.temperature <= 0:
            return None
        return np.random.default_rng(cfg.seed if cfg.seed is not None else secrets.randbits(31))

    def prefill(self, tokens: np.ndarray, mask: np.ndarray, cache) -> None:
        self.ort.prefill(tokens, mask, cache)

    def frame(self, tokens, mask, cache, cfg: GenerationConfig, rng) -> np.ndarray:
        uniforms = None if rng is None else rng.random(self.num_codebooks, dtype=np.float32)
        codes, _ = self.ort.run(tokens, mask, cache, uniforms, cfg.temperature if rng is not None else 0.0, cfg.top_k)
        return codes


# ---- the loop ------------------------------------------------------------------------------------------------

class PrefixCache:
    """The backbone cache of the previous generation and the rows it holds, for the next one to start from.

    `take` trims it to the rows a new prompt shares with it (a generation always leaves at least one prompt
    row to run: its hidden state starts the first frame); `keep` stores the cache a generation ends with.
    """

    def __init__(self):
        self.rows: np.ndarray | None = None  # [N, 2(K+1)] int32: tokens | mask of every row the cache holds
        self.cache = None

    def take(self, rows: np.ndarray, backend, leave: int = 1) -> tuple[object, int]:
        previous, cache = self.rows, self.cache
        self.rows = self.cache = None
        if previous is None:
            return backend.make_cache(), 0
        n = min(len(previous), len(rows) - leave)
        same = (previous[:n] == rows[:n]).all(axis=1)
        shared = n if same.all() else int(np.argmin(same))
        if shared == 0:
            return backend.make_cache(), 0
        cache.trim(cache.offset - shared)
        return cache, shared

    def keep(self, rows: np.ndarray, cache) -> None:
        if cache.offset == len(rows):  # only a cache whose rows we know is reused
            self.rows, self.cache = rows, cache

    def clear(self) -> None:
        self.rows = self.cache = None


class FrameGenerator:
    """Drives a backend frame by frame: feeds each frame back as a row, stops on the all-zero EOS frame."""

    def __init__(self, backend):
        self.backend = backend
        self.num_codebooks = backend.num_codebooks
        self.last_prefill_rows = 0  # prompt rows the backbone ran in the last generation (the rest were reused)

    def prefill(self, tokens: np.ndarray, mask: np.ndarray, prefix: PrefixCache) -> int:
        """Run context rows [T, K+1] into `prefix` ahead of time (only those it does not hold yet), so the next
        generation whose prompt starts with them runs just its own rows. Returns the rows run."""
        rows = np.concatenate([tokens, mask], axis=1).astype(np.int32)
        cache, start = prefix.take(rows, self.backend, leave=0)
        if start < len(rows):
            self.backend.prefill(tokens[start:], mask[start:], cache)
        prefix.keep(rows, cache)
        return len(rows) - start

    def frames(self, prompt: Prompt, cfg: GenerationConfig, prefix: PrefixCache | None = None) -> Iterator[np.ndarray]:
        """Yield frames of codes [K] until EOS or `prompt.max_frames`."""
        K = self.num_codebooks
        rows = np.concatenate([prompt.tokens, prompt.mask], axis=1).astype(np.int32)  # [T, 2(K+1)]
        cache, start = prefix.take(rows, self.backend) if prefix is not None else (self.backend.make_cache(), 0)
        self.last_prefill_rows = len(rows) - start
        fed = [rows[:start]]
        rng = self.backend.rng(cfg)
        tokens, mask = prompt.tokens[start:], prompt.mask[start:]
        frame_mask = np.r_[np.ones(K, bool), False][None]
        try:
            for _ in range(prompt.max_frames):
                codes = self.backend.frame(tokens, mask, cache, cfg, rng)
                fed.append(np.concatenate([tokens, mask], axis=1).astype(np.int32))
                if cfg.stop_on_eos and not codes.any():
                    return
                yield codes
                tokens, mask = np.r_[codes, 0][None].astype(np.int32), frame_mask
        finally:
            if prefix is not None:
                prefix.keep(np.concatenate(fed), cache)
