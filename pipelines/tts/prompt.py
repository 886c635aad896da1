"""Segments -> prompt rows: the text tokenizer, Mimi codes of context audio (cached), and the window.

What is notable here:
- A segment is `[{speaker}]{text}` as BOS..EOS text rows, then its Mimi frames as audio rows and one
  all-zero EOS frame. The prompt is the context segments followed by the target text rows.
- Codes of context audio are cached by content (or passed in, for the agent's own speech), so a long
  conversation never re-encodes old audio.
- The prompt plus the frames to generate must fit the 2048-position window: context is dropped oldest
  first, never the target text. Frames are capped by `max_audio_length_ms` and by the text length,
  because real models sometimes never emit the all-zero EOS frame.
- Voice match: one segment `"[0]" + ref_text + " " + text` followed by the reference frames without
  their EOS frame, so the model carries on speaking in that voice.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.audio import resample, to_mono_float32
from pipelines.errors import AudioInputError, CheckpointError, TextInputError
from pipelines.messages import TTS_SAMPLE_RATE, Segment, VoiceReference

FRAME_MS = 80


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


def check_speaker(speaker) -> int:
    if isinstance(speaker, bool) or not isinstance(speaker, (int, np.integer)) or speaker < 0:
        raise TextInputError(f"speaker must be a non-negative integer id, got {speaker!r}")
    return int(speaker)


def frame_cap(text: str, max_audio_length_ms: float, frames_per_char: float, min_text_frames: int) -> int:
    by_time = int(max_audio_length_ms // FRAME_MS)
    by_text = math.ceil(min_text_frames + frames_per_char * len(text))
    return max(1, min(by_time, by_text))


def chars_that_fit(max_audio_length_ms: float, frames_per_char: float, min_text_frames: int) -> int:
    """The longest text that, spoken at `frames_per_char` (slow speech), ends within `max_audio_length_ms`
    (`min_text_frames` is a floor for short texts, not speech: it does not count)."""
    return max(0, int((max_audio_length_ms // FRAME_MS) / frames_per_char))


class PromptBuilder:
    """Turns text, context Segments and an optional voice reference into the backbone's prompt rows."""

    def __init__(self, tokenizer: TextTokenizer, codec, num_codebooks: int, max_seq_len: int,
                 codes_cache_size: int = 512):
        self.tokenizer = tokenizer
        self.codec = codec  # anything with encode(audio_24k) -> [K, F] codes
        self.num_codebooks = num_codebooks
        self.max_seq_len = max_seq_len
        self._codes_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.codes_cache_size = codes_cache_size

    def text_rows(self, text: str, speaker: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokenizer.encode(f"[{check_speaker(speaker)}]{text}")
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
        codes = self.codec.encode(resample(audio, sample_rate, TTS_SAMPLE_RATE))
        self._codes_cache[key] = codes
        if len(self._codes_cache) > self.codes_cache_size:
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

    def context_rows(self, context: Sequence[Segment]) -> tuple[np.ndarray, np.ndarray]:
        """The rows of context segments alone, as a prompt holding them starts."""
        K = self.num_codebooks
        rows = [self.segment_rows(s) for s in context]
        if not rows:
            return np.zeros((0, K + 1), np.int32), np.zeros((0, K + 1), bool)
        return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])

    def build(self, text: str, speaker: int, context: Sequence[Segment], voice: VoiceReference | None,
              max_frames: int) -> Prompt:
        """The prompt for `text`; `max_frames` is the caller's frame cap, cut further to fit the window."""
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
        room = self.max_seq_len - target[0].shape[0]
        if room < 1:
            raise TextInputError(
                f"the text (and reference clip) take {target[0].shape[0]} of {self.max_seq_len} positions; "
                "split the text into sentences or use a shorter reference"
            )
        frames = min(max_frames, room)
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

    def clear(self) -> None:
        self._codes_cache.clear()
