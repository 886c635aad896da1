"""Marvis generation: Segments -> prompt rows -> frame loop -> Mimi codes -> streamed audio.

What is notable here:
- A segment is `[{speaker}]{text}` as BOS..EOS text rows, then its Mimi frames as audio rows and one
  all-zero EOS frame. The prompt is the context segments followed by the target text rows.
- Codes of context audio are cached per segment (or passed in, for the agent's own speech), so a long
  conversation never re-encodes old audio.
- The prompt plus the frames to generate must fit the 2048-position window: context is dropped oldest
  first, never the target text. Frames are capped by `max_audio_length_ms` and by the text length,
  because real models sometimes never emit the all-zero EOS frame.
- Voice match: one segment `"[0]" + ref_text + " " + text` followed by the reference frames without
  their EOS frame, so the model carries on speaking in that voice.
- Sampling keys are explicit (`seed`), so a run is reproducible whatever else uses MLX's global RNG.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from pipelines.audio import resample, to_mono_float32
from pipelines.errors import AudioInputError, CheckpointError, TextInputError
from pipelines.tts.codec import SAMPLE_RATE, MimiCodec
from pipelines.tts.weights import LoadedCheckpoint

FRAME_MS = 80


@dataclass(frozen=True, eq=False)
class Segment:
    """One turn of speech: who spoke, what was said, and how it sounded."""

    speaker: int
    text: str
    audio: np.ndarray | None = None  # mono float32 at `sample_rate`
    sample_rate: int = SAMPLE_RATE
    codes: np.ndarray | None = None  # [K, F] Mimi codes when already known (skips encoding)


@dataclass(frozen=True, eq=False)
class VoiceReference:
    """A reference clip and its transcript, for voice match."""

    audio: np.ndarray
    text: str
    sample_rate: int = SAMPLE_RATE


@dataclass(frozen=True, eq=False)
class AudioChunk:
    audio: np.ndarray  # [n * 1920] float32 at 24 kHz
    codes: np.ndarray  # [K, n]
    first_frame: int
    sample_rate: int = SAMPLE_RATE

    @property
    def num_frames(self) -> int:
        return self.codes.shape[1]


@dataclass(frozen=True, eq=False)
class Speech:
    audio: np.ndarray
    codes: np.ndarray  # [K, F]
    sample_rate: int = SAMPLE_RATE
    stopped_on_eos: bool = False


@dataclass
class GenerationConfig:
    temperature: float = 0.9
    top_k: int = 50
    seed: int | None = None  # None: a fresh random seed per call
    max_audio_length_ms: float = 10_000
    frames_per_char: float = 1.25  # text-length cap: ~10 characters a second, slow speech
    min_text_frames: int = 12
    stop_on_eos: bool = True
    chunk_frames: int = 8
    first_chunk_frames: int = 2  # a small first chunk: first sound sooner


@dataclass
class Prompt:
    tokens: np.ndarray  # [T, K+1] int32: codebooks + text
    mask: np.ndarray  # [T, K+1] bool
    context_used: int  # how many context segments survived trimming
    max_frames: int


class TextTokenizer:
    """The checkpoint's text tokenizer (`tokenizer.json`), with explicit BOS/EOS around each segment."""

    def __init__(self, folder: str | Path, bos: str | None = None, eos: str | None = None):
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no text tokenizer; the TTS checkpoint or tokenizer folder must carry it")
        self.tokenizer = Tokenizer.from_file(str(path))
        vocab = self.tokenizer.get_vocab()
        bos = bos or next((t for t in ("<|im_start|>", "<|begin_of_text|>", "<s>") if t in vocab), None)
        eos = eos or next((t for t in ("<|im_end|>", "<|end_of_text|>", "</s>") if t in vocab), None)
        if bos is None or eos is None:
            raise CheckpointError(f"{path}: cannot tell the BOS/EOS tokens of this tokenizer")
        self.bos_id, self.eos_id = vocab[bos], vocab[eos]
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *self.tokenizer.encode(text, add_special_tokens=False).ids, self.eos_id]


def _check_speaker(speaker) -> int:
    if isinstance(speaker, bool) or not isinstance(speaker, (int, np.integer)) or speaker < 0:
        raise TextInputError(f"speaker must be a non-negative integer id, got {speaker!r}")
    return int(speaker)


def sample_token(logits: mx.array, temperature: float, top_k: int, key: mx.array | None) -> mx.array:
    """logits [B, V] -> [B] int32. temperature 0 is greedy."""
    if temperature <= 0 or key is None:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    logits = logits.astype(mx.float32) / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = mx.sort(logits, axis=-1)[..., V - top_k][..., None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    return mx.random.categorical(logits, axis=-1, key=key).astype(mx.int32)


class MarvisTTS:
    """The TTS stage: text (+ context Segments) -> Mimi frames -> 24 kHz audio, streamed or one shot."""

    sample_rate = SAMPLE_RATE

    def __init__(self, checkpoint: LoadedCheckpoint, tokenizer: TextTokenizer, codec: MimiCodec,
                 config: GenerationConfig | None = None, codes_cache_size: int = 512):
        self.model = checkpoint.model.prepare_for_cpu()
        self.checkpoint = checkpoint
        self.tokenizer = tokenizer
        self.codec = codec
        self.config = config or GenerationConfig()
        self.num_codebooks = checkpoint.args.audio_num_codebooks
        self.max_seq_len = checkpoint.args.max_seq_len
        if codec.num_codebooks != self.num_codebooks:
            raise CheckpointError(f"Mimi gives {codec.num_codebooks} codebooks but the model wants {self.num_codebooks}")
        if tokenizer.vocab_size > checkpoint.args.text_vocab_size:
            raise CheckpointError(
                f"text tokenizer has {tokenizer.vocab_size} tokens but the model embeds {checkpoint.args.text_vocab_size}"
            )
        self._codes_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._codes_cache_size = codes_cache_size
        self.reuse_prefix = True  # keep the backbone cache between generations (see _reusable_cache)
        self._prefix: tuple[np.ndarray, list] | None = None

    @property
    def untrained(self) -> bool:
        return self.checkpoint.random_weights or self.codec.random_weights

    def describe(self) -> str:
        label = "UNTRAINED random weights: output is noise, not speech" if self.untrained else "trained"
        return f"Marvis TTS [{label}] model={self.checkpoint.source} mimi={self.codec.source}"

    # ---- prompt rows -------------------------------------------------------------------------------------

    def text_rows(self, text: str, speaker: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer.encode(f"[{_check_speaker(speaker)}]{text}")
        tokens = np.zeros((len(ids), self.num_codebooks + 1), np.int32)
        mask = np.zeros_like(tokens, dtype=bool)
        tokens[:, -1] = ids
        mask[:, -1] = True
        return tokens, mask

    def audio_rows(self, codes: np.ndarray, eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
        K = self.num_codebooks
        frames = codes.T.astype(np.int32)  # [F, K]
        if eos:
            frames = np.concatenate([frames, np.zeros((1, K), np.int32)])
        tokens = np.zeros((frames.shape[0], K + 1), np.int32)
        tokens[:, :K] = frames
        mask = np.zeros_like(tokens, dtype=bool)
        mask[:, :K] = True
        return tokens, mask

    def encode_audio(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono audio at any rate -> [K, F] codes, cached by content."""
        audio = to_mono_float32(audio, what="context audio")
        if sample_rate <= 0:
            raise AudioInputError(f"context audio has a bad sample rate {sample_rate}")
        key = hashlib.blake2b(audio.tobytes() + str(sample_rate).encode(), digest_size=16).digest()
        if key in self._codes_cache:
            self._codes_cache.move_to_end(key)
            return self._codes_cache[key]
        codes = self.codec.encode(resample(audio, sample_rate, SAMPLE_RATE))
        self._codes_cache[key] = codes
        if len(self._codes_cache) > self._codes_cache_size:
            self._codes_cache.popitem(last=False)
        return codes

    def segment_codes(self, segment: Segment) -> np.ndarray | None:
        if segment.codes is not None:
            codes = np.asarray(segment.codes)
            if codes.ndim != 2 or codes.shape[0] != self.num_codebooks:
                raise AudioInputError(f"segment codes must be [{self.num_codebooks}, frames], got {codes.shape}")
            return codes
        if segment.audio is None or np.asarray(segment.audio).size == 0:
            return None  # a text-only context turn
        return self.encode_audio(segment.audio, segment.sample_rate)

    def segment_rows(self, segment: Segment) -> tuple[np.ndarray, np.ndarray]:
        tokens, mask = self.text_rows(segment.text, segment.speaker)
        codes = self.segment_codes(segment)
        if codes is None:
            return tokens, mask
        a_tokens, a_mask = self.audio_rows(codes)
        return np.concatenate([tokens, a_tokens]), np.concatenate([mask, a_mask])

    def frame_cap(self, text: str, cfg: GenerationConfig) -> int:
        by_time = int(cfg.max_audio_length_ms // FRAME_MS)
        by_text = math.ceil(cfg.min_text_frames + cfg.frames_per_char * len(text))
        return max(1, min(by_time, by_text))

    def build_prompt(self, text: str, speaker: int, context: Sequence[Segment] = (),
                     voice: VoiceReference | None = None, config: GenerationConfig | None = None) -> Prompt:
        cfg = config or self.config
        text = (text or "").strip()
        if not text:
            raise TextInputError("nothing to say: the text is empty")
        if voice is not None:
            if not voice.text.strip():
                raise TextInputError("voice match needs the transcript of the reference clip (--ref-text)")
            t_tok, t_mask = self.text_rows(f"{voice.text.strip()} {text}", 0)
            ref_codes = self.encode_audio(voice.audio, voice.sample_rate)
            a_tok, a_mask = self.audio_rows(ref_codes, eos=False)
            target = (np.concatenate([t_tok, a_tok]), np.concatenate([t_mask, a_mask]))
        else:
            target = self.text_rows(text, speaker)
        frames = self.frame_cap(text, cfg)
        room = self.max_seq_len - target[0].shape[0]
        if room < 1:
            raise TextInputError(
                f"the text (and reference clip) take {target[0].shape[0]} of {self.max_seq_len} positions; "
                "split the text into sentences or use a shorter reference"
            )
        frames = min(frames, room)
        rows = [self.segment_rows(s) for s in context]
        # drop the oldest context until the prompt and the frames to generate fit the window
        start = 0
        used = sum(r[0].shape[0] for r in rows)
        while start < len(rows) and used + target[0].shape[0] + frames > self.max_seq_len:
            used -= rows[start][0].shape[0]
            start += 1
        kept = rows[start:] + [target]
        return Prompt(
            tokens=np.concatenate([r[0] for r in kept]),
            mask=np.concatenate([r[1] for r in kept]),
            context_used=len(rows) - start,
            max_frames=frames,
        )

    # ---- the frame loop ----------------------------------------------------------------------------------

    def generate_frame(self, tokens: mx.array, mask: mx.array, cache, cfg: GenerationConfig,
                       key: mx.array | None) -> mx.array:
        """Rows [1, T, K+1] in, one frame of codes [1, K] out (lazy: the caller evaluates)."""
        model = self.model
        keys = [None] * self.num_codebooks if key is None else list(mx.random.split(key, self.num_codebooks))
        temperature = cfg.temperature if key is not None else 0.0
        h = model.backbone_hidden(tokens, mask, cache)  # [1, D]
        c = sample_token(model.codebook0_head(h), temperature, cfg.top_k, keys[0])
        codes = [c]
        decoder_cache = model.make_decoder_cache()  # fresh every frame
        x = mx.concatenate([h[:, None, :], model.embed_audio(0, c)], axis=1)  # [1, 2, D]
        for k in range(1, self.num_codebooks):
            d = model.decoder_hidden(x, decoder_cache)
            c = sample_token(model.codebook_logits(d, k), temperature, cfg.top_k, keys[k])
            codes.append(c)
            x = model.embed_audio(k, c)
        return mx.stack(codes, axis=-1)

    def _reusable_cache(self, prompt: Prompt) -> tuple[list, int]:
        """The backbone cache of the previous generation, trimmed to the rows this prompt shares with it.

        Consecutive prompts share a long prefix (the same context segments; the previous sentence's text
        and frames are the next sentence's context), so only the new rows need the backbone. At least one
        prompt row is always left to run: its hidden state starts the first frame.
        """
        previous, self._prefix = self._prefix, None
        if previous is None or not self.reuse_prefix:
            return self.model.make_backbone_cache(), 0
        rows, cache = previous
        n = min(len(rows), len(prompt.tokens) - 1)
        new = np.concatenate([prompt.tokens[:n], prompt.mask[:n]], axis=1)
        same = (rows[:n] == new).all(axis=1)
        shared = n if same.all() else int(np.argmin(same))
        if shared == 0:
            return self.model.make_backbone_cache(), 0
        for c in cache:
            c.trim(c.offset - shared)
        return cache, shared

    def generate_codes(self, prompt: Prompt, config: GenerationConfig | None = None) -> Iterator[np.ndarray]:
        """Yield frames of codes [K] until EOS or the frame cap."""
        cfg = config or self.config
        greedy = cfg.temperature <= 0
        key = None if greedy else mx.random.key(cfg.seed if cfg.seed is not None else secrets.randbits(31))
        cache, start = self._reusable_cache(prompt)
        fed = [np.concatenate([prompt.tokens, prompt.mask], axis=1)[:start]]  # rows the cache holds, [N, 2(K+1)]
        rows_np = (prompt.tokens[start:], prompt.mask[start:])
        tokens, mask = mx.array(rows_np[0])[None], mx.array(rows_np[1])[None]
        frame_mask_np = np.r_[np.ones(self.num_codebooks, bool), False]
        frame_mask = mx.array(frame_mask_np)[None, None]
        zero_text = mx.zeros((1, 1), mx.int32)
        try:
            for _ in range(prompt.max_frames):
                if key is not None:
                    key, sub = mx.random.split(key)
                else:
                    sub = None
                frame = self.generate_frame(tokens, mask, cache, cfg, sub)
                mx.eval(frame)
                fed.append(np.concatenate(rows_np, axis=1))
                codes = np.array(frame[0])
                if cfg.stop_on_eos and not codes.any():
                    return
                yield codes
                tokens = mx.concatenate([frame, zero_text], axis=-1)[:, None, :]  # [1, 1, K+1]
                mask = frame_mask
                rows_np = (np.r_[codes, 0][None].astype(np.int32), frame_mask_np[None])
        finally:
            rows = np.concatenate(fed) if fed else np.zeros((0, 2 * (self.num_codebooks + 1)), np.int32)
            if cache and cache[0].offset == len(rows):  # only a cache whose rows we know is reused
                self._prefix = (rows.astype(np.int32), cache)

    # ---- public API --------------------------------------------------------------------------------------

    def stream(self, text: str, speaker: int = 0, context: Sequence[Segment] = (),
               voice: VoiceReference | None = None, config: GenerationConfig | None = None) -> Iterator[AudioChunk]:
        """Audio chunks as frames are produced, decoded with one Mimi streaming state per utterance."""
        cfg = config or self.config
        prompt = self.build_prompt(text, speaker, context, voice, cfg)
        pending: list[np.ndarray] = []
        first = 0
        target = max(1, cfg.first_chunk_frames)
        with self.codec.stream_decoder() as decoder:
            for codes in self.generate_codes(prompt, cfg):
                pending.append(codes)
                if len(pending) >= target:
                    chunk = np.stack(pending, axis=1)
                    yield AudioChunk(decoder.decode(chunk), chunk, first)
                    first += len(pending)
                    pending = []
                    target = max(1, cfg.chunk_frames)
            if pending:
                chunk = np.stack(pending, axis=1)
                yield AudioChunk(decoder.decode(chunk), chunk, first)

    def generate(self, text: str, speaker: int = 0, context: Sequence[Segment] = (),
                 voice: VoiceReference | None = None, config: GenerationConfig | None = None) -> Speech:
        """The whole utterance at once (one-shot Mimi decode)."""
        cfg = config or self.config
        prompt = self.build_prompt(text, speaker, context, voice, cfg)
        frames = list(self.generate_codes(prompt, cfg))
        if not frames:
            return Speech(np.zeros(0, np.float32), np.zeros((self.num_codebooks, 0), np.int32), stopped_on_eos=True)
        codes = np.stack(frames, axis=1)
        return Speech(self.codec.decode(codes), codes, stopped_on_eos=len(frames) < prompt.max_frames)

    def warmup(self) -> None:
        """Compile and touch every weight once, so the first real turn is not the slow one."""
        cfg = GenerationConfig(temperature=0.0, max_audio_length_ms=2 * FRAME_MS, stop_on_eos=False)
        for _ in self.stream("Hi.", 0, config=cfg):
            pass

    def reset(self) -> None:
        self._codes_cache.clear()
        self._prefix = None
