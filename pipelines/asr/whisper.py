"""The ASR stage: one utterance of 16 kHz mono audio in, one `Transcript` out, through mlx-whisper.

Notable:
- The stage owns its network: its own mlx-whisper model, with the encoder and text decoder replaced by their ONNX
  Runtime drop-ins (pipelines/asr/ort.py) when `backend` is onnx, never mlx-whisper's module-level cached model
  (which any other caller could reload or swap). So the 30 s windows are walked here, not by mlx-whisper's
  `transcribe` (which only takes a model path): the same windows, skips and segment rules for the options this
  agent uses, tested to give its text exactly; decoding itself is mlx-whisper's `DecodingTask`, except a greedy
  window on ONNX Runtime: its steps run in numpy by the task's own rules (pipelines/asr/greedy.py, tested equal
  on real speech; only a near-tie within MLX's rounding could decide otherwise).
- `model_dir` is always a local folder (config.json + weights.safetensors/.npz). mlx-whisper would
  treat a path that does not exist as a hub repo id and download it; we refuse first, so a typo or a
  missing conversion is a one-line `CheckpointError`, never a network call.
- mlx-whisper's `fp16` option must match the network's dtype (it checks the encoder's output dtype),
  so we read the dtype from the weights file instead of asking the user. float16 weights (mlx-community's
  conversions) run in float16 on MLX and are widened to float32 on ONNX Runtime.
- Each window is decoded on its own (`condition_on_previous_text=False`): a voice agent's utterances
  are short, and this keeps one bad window from dragging the next one into a repetition loop.
- Trimmed window (`trim=True`; off by default: on the shipped utterances it cost 3 WER points, see
  tests/test_asr.py): mlx-whisper always encodes a 30 s window (1500 encoder positions), ~1.6 s of tiny.en on two CPU cores even for a 2 s utterance. We run the encoder's parts
  ourselves on the utterance's mel plus `margin_s` of the padded-silence mel (at least `floor_s`), with
  the positional embedding sliced to the frames fed (whisper.cpp's `audio_ctx`), then decode with
  mlx-whisper's own DecodingTask: same greedy-then-hotter temperature fallback and thresholds as its
  `transcribe`. The margin and floor keep the decoder from running away on a window that ends on the
  last word (at a 3 s floor "Hi!" ran away into "3 a I 1 1 1 ..."; 8 s gives "Hi."). Utterances over
  30 s, and `trim=False`, take the full 30 s windows.
- Incremental: `transcribe` remembers its last input and result. A call whose audio is the last
  audio plus only a quiet tail (or nothing more) returns that result without running the model, so
  the agent can transcribe at the first pause and pay nothing at the endpoint if the user said no more.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.audio import resample, to_mono_float32
from pipelines.errors import CheckpointError, ConfigError
from pipelines.ortgraph import Placement
from pipelines.standins import is_stand_in

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.1  # below this there is no word to find; return "" without running the model
SILENCE_PEAK = 1e-4  # digital silence: nothing to hear, so skip the encoder pass (seconds on CPU)
TAIL_QUIET_DB = 20.0  # an appended tail this far below the utterance's RMS adds no words
FULL_WINDOW_S = 30.0  # mlx-whisper's window: 3000 mel frames, 1500 encoder positions
# Greedy, then (with `fallback`) mlx-whisper transcribe's hotter retries when the result looks like a failure,
# with its thresholds. Off by default: on the shipped utterances the retries only ever ran on one espeak turn Whisper
# cannot read, cost 2.5 s there (6 decodes) and gave a worse transcript (WER 24.6 % with them, 23.9 % greedy).
FALLBACK = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_MAX = 2.4
LOGPROB_MIN = -1.0
NO_SPEECH_MIN = 0.6


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


def _weights_file(model_dir: Path) -> Path | None:
    return next((p for p in (model_dir / "weights.safetensors", model_dir / "weights.npz") if p.is_file()), None)


class WhisperASR:
    """Speech to text with mlx-whisper. Plain object: `warmup()`, `transcribe(audio)`."""

    def __init__(
        self,
        model_dir: str | Path,
        language: str | None = None,
        initial_prompt: str | None = None,
        trim: bool = False,
        margin_s: float = 2.0,
        floor_s: float = 8.0,
        placement: Placement = Placement(),
        ort_cache: Path | None = None,
        fallback: bool = False,
    ):
        from mlx_whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

        self.model_dir = Path(model_dir).expanduser().resolve()
        if not self.model_dir.is_dir():
            raise CheckpointError(
                f"{model_dir}: no such Whisper model folder; convert one first (pipelines.asr.ct2.convert_ct2_whisper)"
            )
        config_path = self.model_dir / "config.json"
        weights = _weights_file(self.model_dir)
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
        # float16 weights run in float16 on MLX; on ONNX Runtime (a CPU) they are widened to float32, as OpenAI's
        # whisper does on a CPU: the same stored numbers, fp32 arithmetic (MLX's fp16 CPU kernels are unvectorised:
        # small.en took ~117 s a turn). `fp16` is what the network computes in
        self.weights_fp16 = dtype == "F16"
        self.fp16 = self.weights_fp16 and placement.backend == "mlx"
        self.untrained = is_stand_in(self.model_dir)  # random weights of the real shape: its words mean nothing

        if language is not None:
            code = language.lower()
            code = TO_LANGUAGE_CODE.get(code, code)
            if code not in LANGUAGES:
                raise ConfigError(f"asr.language: unknown language '{language}'; use a code like 'en' or 'de'")
            if code != "en" and not self.multilingual:
                raise ConfigError(f"asr.language '{language}': {self.model_dir.name} is English-only; use a multilingual model")
            language = code
        self.language = language
        # what decoding is told: English-only models are English; None lets a multilingual model detect it
        self.decode_language = language or (None if self.multilingual else "en")
        self.initial_prompt = initial_prompt or None  # "" is no prompt (not a prompt of one space)
        if margin_s < 0 or not 0 < floor_s <= FULL_WINDOW_S:
            raise ConfigError(f"asr: margin_s must be >= 0 and floor_s in (0, 30], got {margin_s}, {floor_s}")
        self.trim, self.margin_s, self.floor_s = trim, margin_s, floor_s
        self.temperatures = FALLBACK if fallback else (0.0,)
        self._last: tuple[np.ndarray, Transcript] | None = None  # (16 kHz input, its transcript)
        dynamic = placement.backend == "onnx" and placement.precision.dynamic
        if placement.backend not in ("mlx", "onnx") or (placement.precision.bits is not None and not dynamic):
            raise ConfigError(f"asr: Whisper runs on mlx or onnx in fp32 (onnx: or dynamic int8), not {placement}")
        self.precision = placement.precision
        # encoder and text decoder on ONNX Runtime (pipelines/asr/ort.py) when placed there
        self.backend = placement.backend
        self.ort_cache = ort_cache
        self._net = None  # this stage's Whisper (`_network`)
        self._rules: dict = {}  # (language, prompt) -> the numpy loop's rules and tokenizer (`_greedy`)

    def _network(self):
        """This stage's own Whisper, loaded once: mlx-whisper's model of its folder (not mlx-whisper's module-level
        cached copy, which any other caller may reload or change), with the encoder and the text decoder swapped for
        their ONNX Runtime drop-ins when the stage is placed there. The MLX parts stay reachable as the drop-ins'
        `mlx_encoder` / `mlx_decoder`."""
        if self._net is None:
            import mlx.core as mx
            from mlx_whisper.load_models import load_model

            model = load_model(str(self.model_dir), mx.float16 if self.fp16 else mx.float32)
            if self.weights_fp16 and not self.fp16:
                model.set_dtype(mx.float32)  # widened for ONNX Runtime's fp32 graphs (and the MLX parts beside them)
            if self.backend == "onnx":
                from pipelines.asr.ort import load

                model.encoder, model.decoder = load(model.encoder, model.decoder, model.dims, self.ort_cache,
                                                    precision=self.precision)
            self._net = model
        return self._net

    def _decode(self, model, x, language: str | None, prompt: list[int], temperatures, encoded: bool = False,
                forced: list[int] | None = None):
        """One window: greedy, then (with `fallback`) hotter while the result looks like a failure; `x` is a mel
        window [3000, n_mels], or encoder output [1, positions, n_state] when `encoded`. mlx-whisper's rules.
        `forced`: the tokens to decode instead, each step's token taken from them (`_forced_task`)."""
        from mlx_whisper.decoding import DecodingOptions, DecodingTask

        task = _encoded_task() if encoded else DecodingTask
        numpy_loop = self.backend == "onnx" and language is not None  # pipelines/asr/greedy.py
        if forced is not None:
            options = DecodingOptions(language=language, temperature=0.0, prompt=prompt, fp16=self.fp16)
            if numpy_loop:
                return self._greedy(model, x, options, encoded, forced)
            return _forced_task()(model, options, forced).run(x[None])[0]
        for temperature in temperatures:
            options = DecodingOptions(language=language, temperature=temperature, prompt=prompt, fp16=self.fp16)
            if numpy_loop and temperature == 0:
                result = self._greedy(model, x, options, encoded)
            else:
                result = task(model, options).run(x if encoded else x[None])[0]
            if result.no_speech_prob > NO_SPEECH_MIN:
                break  # silence: hotter decoding will not find words either
            if result.compression_ratio <= COMPRESSION_RATIO_MAX and result.avg_logprob >= LOGPROB_MIN:
                break
        return result

    def _greedy(self, model, x, options, encoded: bool, forced: list[int] | None = None):
        """`_decode`'s greedy pass on ONNX Runtime: mlx-whisper's task for the rules, the numpy loop of
        pipelines/asr/greedy.py for the steps; an mlx-whisper `DecodingResult`."""
        import mlx.core as mx
        from mlx_whisper.decoding import DecodingResult, DecodingTask, compression_ratio

        from pipelines.asr.greedy import GreedyRules, decode_greedy

        key = (options.language, tuple(options.prompt or ()))
        rules = self._rules.get(key)
        if rules is None:
            task = DecodingTask(model, options)
            rules = self._rules[key] = (GreedyRules(task), task.tokenizer)
        rules, tokenizer = rules
        if encoded:
            features = np.asarray(x.astype(mx.float32))
        else:
            features = model.encoder.features(np.asarray(x[None].astype(mx.float32)))
        decoder = model.decoder
        cache = decoder.start(features)

        def step(tokens: np.ndarray, past):
            return decoder.step(tokens, cache if past is None else past)

        tokens, total, no_speech = decode_greedy(rules, step, None if forced is None else [*forced, tokenizer.eot])
        text = tokenizer.decode(tokens).strip()
        return DecodingResult(audio_features=None, language=options.language, tokens=tokens, text=text,
                              avg_logprob=total / (len(tokens) + 1), no_speech_prob=no_speech, temperature=0.0,
                              compression_ratio=compression_ratio(text))

    def _run_trimmed(self, audio: np.ndarray) -> dict:
        """One window of the utterance's mel + margin: encoder on the sliced positions, then decode."""
        import mlx.core as mx
        import mlx.nn as nn
        from mlx_whisper.audio import HOP_LENGTH, N_FRAMES
        from mlx_whisper.tokenizer import get_tokenizer

        model = self._network()
        # padded exactly as the full window is, so the margin is the same "silence" mel it would see
        mel = padded_log_mel(audio, model.dims.n_mels)  # [frames, n_mels]
        content = audio.size / HOP_LENGTH
        frames = max(content + self.margin_s * SAMPLE_RATE / HOP_LENGTH, self.floor_s * SAMPLE_RATE / HOP_LENGTH)
        frames = min(N_FRAMES, 2 * math.ceil(frames / 2))  # even: conv2 has stride 2
        mel = mel[None, :frames].astype(mx.float16 if self.fp16 else mx.float32)  # [1, frames, n_mels]

        encoder = getattr(model.encoder, "mlx_encoder", model.encoder)  # the trimmed path runs MLX parts
        x = nn.gelu(encoder.conv1(mel))
        x = nn.gelu(encoder.conv2(x))  # [1, frames / 2, n_state]
        x = x + encoder._positional_embedding[: x.shape[1]]
        for block in encoder.blocks:
            x, _, _ = block(x)
        features = encoder.ln_post(x)

        language = self.decode_language
        prompt = []
        if self.initial_prompt:
            tokenizer = get_tokenizer(self.multilingual, num_languages=model.num_languages, language=language, task="transcribe")
            prompt = tokenizer.encode(" " + self.initial_prompt.strip())
        result = self._decode(model, features, language, prompt, self.temperatures, encoded=True)
        if result.no_speech_prob > NO_SPEECH_MIN and result.avg_logprob <= LOGPROB_MIN:
            return {"text": "", "language": result.language}
        return {"text": result.text, "language": result.language}

    def _run(self, audio: np.ndarray, temperatures: tuple[float, ...] | None = None, forced: str | None = None) -> dict:
        """mlx-whisper's `transcribe` as this agent calls it (tested equal to it): 30 s windows of the padded mel,
        no conditioning on the previous window, no word timestamps. A window that looks like silence is skipped;
        otherwise its timestamped segments are kept and the next window starts after the last finished one.
        `forced`: the words, decoded teacher-forced in the first window as one timestamped segment (no window is
        skipped as silence: a stand-in's no-speech probability means nothing)."""
        import mlx.core as mx
        from mlx_whisper.audio import N_FRAMES, pad_or_trim
        from mlx_whisper.tokenizer import get_tokenizer

        model = self._network()
        dtype = mx.float16 if self.fp16 else mx.float32
        mel = padded_log_mel(audio, model.dims.n_mels)  # [frames, n_mels]
        content = mel.shape[0] - N_FRAMES
        language = self.decode_language
        if language is None:  # detected once, on the first window
            _, probs = model.detect_language(pad_or_trim(mel, N_FRAMES, axis=-2).astype(dtype))
            language = max(probs, key=probs.get)
        tokenizer = get_tokenizer(self.multilingual, num_languages=model.num_languages, language=language,
                                  task="transcribe")
        prompt = tokenizer.encode(" " + self.initial_prompt.strip()) if self.initial_prompt else []
        stride = N_FRAMES // model.dims.n_audio_ctx  # mel frames per timestamp step
        kept: list[int] = []
        seek = 0
        while seek < content:
            size = min(N_FRAMES, content - seek)
            window = pad_or_trim(mel[seek: seek + size], N_FRAMES, axis=-2).astype(dtype)
            script = None
            if forced is not None:  # the words as one segment over the window's audio; later windows say nothing
                script = [tokenizer.timestamp_begin]
                if seek == 0 and forced.strip():
                    stamp_end = tokenizer.timestamp_begin + min(model.dims.n_audio_ctx, size // stride)
                    script += [*tokenizer.encode(" " + forced.strip()), stamp_end]
            result = self._decode(model, window, language, prompt, temperatures or self.temperatures, forced=script)
            if script is None and result.no_speech_prob > NO_SPEECH_MIN and result.avg_logprob <= LOGPROB_MIN:
                seek += size  # silence
                continue
            prompt = []  # the initial prompt leads the first window that is decoded, no later one
            tokens = np.array(result.tokens, dtype=np.int64)
            stamp = tokens >= tokenizer.timestamp_begin
            cuts = (np.flatnonzero(stamp[:-1] & stamp[1:]) + 1).tolist()  # between two timestamps: a segment ends
            if not cuts:
                segments = [tokens]
                seek += size
            elif stamp[-2:].tolist() == [False, True]:  # the last segment is finished too: the window is done
                segments = [tokens[a:b] for a, b in zip([0, *cuts], [*cuts, len(tokens)])]
                seek += size
            else:  # the last segment runs past the window: drop it and start the next window where it started
                segments = [tokens[a:b] for a, b in zip([0, *cuts[:-1]], cuts)]
                seek += int(tokens[cuts[-1] - 1] - tokenizer.timestamp_begin) * stride
            for segment in segments:  # an instantaneous (same start and end timestamp) or empty segment says nothing
                instantaneous = bool(cuts) and segment[0] == segment[-1]
                if not instantaneous and tokenizer.decode([int(t) for t in segment if t < tokenizer.eot]).strip():
                    kept.extend(int(t) for t in segment)
        return {"text": tokenizer.decode(kept), "language": language}

    def warmup(self) -> None:
        """Load the weights and run one decode so the first real utterance pays no start-up cost."""
        noise = np.random.default_rng(0).normal(0.0, 0.01, SAMPLE_RATE // 2).astype(np.float32)
        self._run(noise, temperatures=(0.0,))

    def transcribe(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Transcript:
        """[T] float32 mono (any rate, resampled to 16 kHz) -> Transcript. Too short or silent -> ""."""
        return self._transcribe(audio, sample_rate)

    def transcribe_forced(self, audio: np.ndarray, sample_rate: int, words: str) -> Transcript:
        """What transcribing `audio` costs when its words are `words`, and those words: the same steps as
        `transcribe` (the encoder on the window, mlx-whisper's decoding loop with its filters, one decoder step per
        token; on ONNX Runtime the numpy loop of `_greedy`), each step's token taken from `words` instead of the
        logits (teacher forcing). For stand-in weights
        (pipelines/standins.py): shape-true and random, so their own words mean nothing, their cost everything."""
        return self._transcribe(audio, sample_rate, words)

    def _transcribe(self, audio: np.ndarray, sample_rate: int, forced: str | None = None) -> Transcript:
        start = time.perf_counter()
        audio = resample(to_mono_float32(audio, what="ASR input"), sample_rate, SAMPLE_RATE)
        if self._last is not None and _adds_only_quiet(self._last[0], audio) and forced in (None, self._last[1].text):
            return Transcript(self._last[1].text, time.perf_counter() - start, self._last[1].language)
        if audio.size < MIN_SECONDS * SAMPLE_RATE or float(np.abs(audio).max()) < SILENCE_PEAK:
            return Transcript("", time.perf_counter() - start, self.decode_language)
        if self.trim and forced is None and audio.size <= FULL_WINDOW_S * SAMPLE_RATE:
            result = self._run_trimmed(audio)
        else:
            result = self._run(audio, forced=forced)
        transcript = Transcript(str(result.get("text", "")).strip(), time.perf_counter() - start, result.get("language"))
        self._last = (audio, transcript)
        return transcript

    def reset(self) -> None:
        """Forget the last utterance (the next call always runs the model)."""
        self._last = None


def padded_log_mel(audio: np.ndarray, n_mels: int):
    """mlx-whisper's `log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES)`, the same numbers, without running
    the STFT over the 30 s of padding (~40 ms of MLX on a CPU for every utterance). A frame wholly in the zero
    padding has power 0, so its log-mel is the floor (log10(1e-10), raised to the clamp: the maximum - 8); the
    spectrogram is taken over the audio and `_TAIL` zeros (ending in such frames, which also hold the maximum's
    floor) and its last frame stands for every padding frame after it."""
    import mlx.core as mx
    from mlx_whisper.audio import HOP_LENGTH, N_SAMPLES, log_mel_spectrogram

    mel = log_mel_spectrogram(audio, n_mels=n_mels, padding=_TAIL)
    frames = (audio.size + N_SAMPLES + HOP_LENGTH) // HOP_LENGTH - 1  # what the full padding gives
    if mel.shape[0] >= frames:
        return mel[:frames]
    return mx.concatenate([mel, mx.broadcast_to(mel[-1:], (frames - mel.shape[0], mel.shape[1]))])


_TAIL = 1600  # zeros after the audio: the last STFT frames (400 samples, reflect-padded by 200) are all zero


def _adds_only_quiet(previous: np.ndarray, audio: np.ndarray) -> bool:
    """`audio` is `previous` plus nothing, or plus a tail TAIL_QUIET_DB below `previous`'s RMS."""
    if audio.size < previous.size or not np.array_equal(audio[: previous.size], previous):
        return False
    tail = audio[previous.size :]
    if tail.size == 0:
        return True
    rms = lambda x: float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))  # noqa: E731
    return rms(tail) <= max(rms(previous) * 10 ** (-TAIL_QUIET_DB / 20), SILENCE_PEAK)


@functools.cache
def _forced_task():
    from mlx_whisper.decoding import DecodingTask, GreedyDecoder

    class ForcedDecoder(GreedyDecoder):
        """Each step's next token is the script's (then end of text), whatever the logits say; the log-probability
        sum is kept as greedy decoding keeps it, so a step costs what a greedy step does."""

        def __init__(self, script: list[int], eot: int, start: int):
            super().__init__(0.0, eot)
            self.script, self.start = [*script, eot], start

        def update(self, tokens, logits, sum_logprobs):
            import mlx.core as mx

            step = min(tokens.shape[-1] - self.start, len(self.script) - 1)
            chosen = mx.full((tokens.shape[0],), self.script[step], dtype=mx.int32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            sum_logprobs = sum_logprobs + logprobs[mx.arange(logprobs.shape[0]), chosen]
            tokens = mx.concatenate([tokens, chosen[:, None]], axis=-1)
            return tokens, mx.all(chosen == self.eot), sum_logprobs

    class ForcedDecodingTask(DecodingTask):
        """mlx-whisper's decoding with `ForcedDecoder` for its greedy one: teacher forcing through the same loop."""

        def __init__(self, model, options, script: list[int]):
            super().__init__(model, options)
            self.decoder = ForcedDecoder(script, self.tokenizer.eot, self.sample_begin)

    return ForcedDecodingTask


@functools.cache
def _encoded_task():
    from mlx_whisper.decoding import DecodingTask

    class EncodedDecodingTask(DecodingTask):
        """mlx-whisper's decoding, given encoder output of any length (its check wants 1500 positions)."""

        def _get_audio_features(self, features):
            return features

    return EncodedDecodingTask
