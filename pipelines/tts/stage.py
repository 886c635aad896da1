"""The TTS stage: text (+ context Segments) -> Mimi frames -> 24 kHz audio, streamed or one shot.

A thin composition of the prompt builder (`prompt.py`), the frame loop on a backend (`generator.py`) and the
Mimi codec (`codec.py`). It holds one `PrefixCache`, so consecutive calls (the sentences of a reply, the turns
of a conversation) prefill only the rows that are new. `load.py` builds it from a config. Marvis' frame rules
reach the turn engine only through the `TTSStage` Protocol (pipelines/messages.py): `max_chars` (the text one
utterance's frame cap holds) and `prebuffer_s` (how far the measured frame rate falls behind real time).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from pipelines.cores import CoreMeter, threads_for
from pipelines.errors import CheckpointError
from pipelines.messages import TIME_EPS, TTS_SAMPLE_RATE, AudioChunk, Segment, Speech, VoiceReference
from pipelines.tts.codec import FRAME_SIZE
from pipelines.tts.generator import FrameGenerator, GenerationConfig, MLXFrames, PrefixCache
from pipelines.tts.prompt import FRAME_MS, Prompt, PromptBuilder, TextTokenizer, chars_that_fit, frame_cap

RATE_MARGIN = 1.2  # the buffer is sized for a rate this much slower than the one measured (before any stream has run)
MARGIN_STREAMS = 3  # once streams have run: the most that any of the last this many needed (`rate_need`)
MARGIN_RANGE = (1.0, 1.3)  # the margin stays within these
FRAME_S = FRAME_MS / 1000
WARMUP_FRAMES = 10  # each warm-up stream that measures the first reply's margin (`warmup`): 9 intervals
MIMI_PER_FRAME = 0.16  # a Mimi call of n frames costs ~(1 + 0.16 n) times its fixed part (scripts/bench_mimi_chunks.py:
# ~23 ms + ~4 ms a frame on two threads, ~39 + ~6.4 on one: the ratio holds)
FRAME_SPARE = 1.25  # a chunk is planned with a quarter of a frame's time spare per frame: the next frames may be slower


def fits(ahead_s: float, frame: float, decode: float) -> int:
    """Frames that can be made (`frame` seconds each, a quarter spare) and decoded (`decode` seconds a Mimi call,
    mostly a fixed cost) before `ahead_s` of queued audio runs out."""
    return int((ahead_s - decode) // (FRAME_SPARE * frame))


def steady_chunk(frame: float, decode: float, most: int) -> int:
    """The fewest frames a chunk whose share of Mimi's decode keeps the stream at 90 % of real time (`most` when
    no chunk size can)."""
    spare = 0.9 * FRAME_S - frame
    return most if spare <= 0 else max(1, min(most, math.ceil(decode / spare)))


def next_chunk(ahead_s: float, frame: float, decode: float, most: int, greedy: bool = True) -> int:
    """Frames in the next chunk. `greedy`: the most, up to `most`, that are ready before the audio ahead of the
    listener runs out; when not even one frame is, it runs dry whatever is made: then a chunk long enough that Mimi's
    fixed cost a call does not make the stream slower than real time (`steady_chunk`), so it catches up. Not greedy:
    never shorter than that (the whole utterance's throughput first: a stream slower than real time, or one whose
    listener started at the first chunk, as the stage path's bench measures)."""
    n = fits(ahead_s, frame, decode)
    if greedy:
        return min(most, n) if n >= 1 else steady_chunk(frame, decode, most)
    return min(most, max(1, n, steady_chunk(frame, decode, most)))


def fill_chunk(short_s: float, most: int) -> int:
    """The fewest frames (at most `most`) that fill `short_s` of audio the listener still waits for."""
    return min(most, max(1, math.ceil(short_s / FRAME_S - TIME_EPS)))


def keeps_up(frame: float, decode: float, most: int) -> bool:
    """Whether a stream at its steady chunks is at least as fast as real time: then short chunks can start playback
    early and the stream still catches up (`next_chunk` greedy); otherwise every chunk is long (Mimi's cost a call
    spread thin), since the stream falls behind whatever is done and short chunks only fall further."""
    return frame + decode / steady_chunk(frame, decode, most) <= FRAME_S


def runs_dry(buffer_s: float, frames: int, made: int, frame: float, decode: float, most: int,
             greedy: bool = True) -> bool:
    """Whether a listener who waits for `buffer_s` of audio runs dry over an utterance of `frames`, `made` of them
    out in its first chunk, the rest made `frame` seconds each and decoded `decode` seconds a chunk, in the chunks
    `stream` makes: while the listener waits, the fewest frames that fill the buffer; then `next_chunk`."""
    t, out, left, start = 0.0, made * FRAME_S, frames - made, None
    if out >= buffer_s - TIME_EPS:
        start = 0.0
    while left > 0:
        if start is None:
            n = min(left, fill_chunk(buffer_s - out, most))
        else:
            n = min(left, next_chunk(start + out - t, frame, decode, most, greedy))
            if t + FRAME_SPARE * n * frame + decode > start + out + TIME_EPS:  # not ready, with the spare a chunk
                return True  # is planned with (a long chunk's Mimi call also costs more than the first one's)
        t += n * frame + decode
        out += n * FRAME_S
        left -= n
        if start is None and out >= buffer_s - TIME_EPS:
            start = t
    return False


def rate_need(intervals: Sequence[float], seen: int = 1) -> float | None:
    """The margin a stream's buffer needed: planned from the mean of its first `seen` frame-to-frame intervals
    (one: the first chunk's plan; more: a plan made again while the listener waits), every later frame is made by
    the time that rate, this many times slower, says (the most running mean of the intervals after those, over
    their mean). None for a stream too short to say (fewer than three intervals after those)."""
    if seen < 1 or len(intervals) < seen + 3:
        return None
    base = float(np.mean(intervals[:seen]))
    if base <= 0:
        return None
    later = np.asarray(intervals[seen:], np.float64)
    return float(np.max(np.cumsum(later) / np.arange(1, len(later) + 1)) / base)


def start_buffer(frames: int, made: int, frame: float, decode: float, most: int, least_s: float = 0.0) -> float:
    """The least audio to buffer before playback starts so that the listener never runs dry (`runs_dry`, greedy
    chunks when the stream `keeps_up`): `least_s` when it can play from the first chunk on; whole frames of audio,
    at most the whole utterance, otherwise."""
    greedy = keeps_up(frame, decode, most)
    if made >= frames or not runs_dry(made * FRAME_S, frames, made, frame, decode, most, greedy):
        return least_s
    lo, hi = made + 1, frames
    while lo < hi:  # bisect on whole frames; `hi` only ever holds a buffer that does not run dry
        mid = (lo + hi) // 2
        if runs_dry(mid * FRAME_S, frames, made, frame, decode, most, greedy):
            lo = mid + 1
        else:
            hi = mid
    return max(least_s, lo * FRAME_MS / 1000)  # whole frames, exactly (lo * FRAME_S is off by a float step)


class MarvisTTS:
    sample_rate = TTS_SAMPLE_RATE

    def __init__(self, checkpoint, tokenizer: TextTokenizer, codec, config: GenerationConfig | None = None,
                 backend=None, codes_cache_size: int = 512):
        args = checkpoint.args
        if codec.num_codebooks != args.audio_num_codebooks:
            raise CheckpointError(f"Mimi gives {codec.num_codebooks} codebooks but the model wants {args.audio_num_codebooks}")
        if tokenizer.vocab_size > args.text_vocab_size:
            raise CheckpointError(f"text tokenizer has {tokenizer.vocab_size} tokens but the model embeds {args.text_vocab_size}")
        self.checkpoint = checkpoint
        self.codec = codec
        self.config = config or GenerationConfig()
        self.samples_per_frame = FRAME_SIZE
        self.num_codebooks = args.audio_num_codebooks
        self.prompts = PromptBuilder(tokenizer, codec, args.audio_num_codebooks, args.max_seq_len, codes_cache_size)
        self.frames = FrameGenerator(backend or MLXFrames(checkpoint.model))
        self.prefix = PrefixCache()
        self.clock = time.monotonic
        self.frame_seconds: float | None = None  # measured seconds from frame to frame while streaming, smoothed
        self.decode_seconds = 0.0  # the last Mimi chunk decode
        self.decode_frames = 0  # the frames it decoded (0: not known; its cost is then taken as all fixed)
        self._intervals: list[float] = []  # frame to frame in the current (or last) stream call
        self.past_intervals: list[list[float]] = []  # the last streams' frame intervals: what their buffers needed
        self._greedy = True  # the chunk rule the last planned buffer assumed (`keeps_up`)
        self.cores = CoreMeter()  # what other programs leave free: sizes Mimi's thread pool at each call

    @property
    def rate_needs(self) -> list[float]:
        """What the last streams' buffers needed over their first interval (`rate_need`)."""
        return self._needs()

    def _needs(self, seen: int = 1) -> list[float]:
        """`rate_need` of each of the last streams long enough to say, planned from `seen` intervals."""
        return [n for n in (rate_need(intervals, seen) for intervals in self.past_intervals) if n is not None]

    @property
    def untrained(self) -> bool:
        return self.checkpoint.random_weights or self.codec.random_weights

    def describe(self) -> str:
        def label(random: bool) -> str:
            return "UNTRAINED random weights" if random else "trained"

        backend = self.frames.backend
        precision = f"int{backend.quantization}" if backend.quantization else "fp32"
        note = ": output is noise, not speech" if self.untrained else ""
        return (f"Marvis TTS [model {label(self.checkpoint.random_weights)}, Mimi {label(self.codec.random_weights)}"
                f"{note}] model={self.checkpoint.source} mimi={self.codec.source} "
                f"backend={backend.name} precision={precision}")

    def build_prompt(self, text: str, speaker: int = 0, context: Sequence[Segment] = (),
                     voice: VoiceReference | None = None, config: GenerationConfig | None = None) -> Prompt:
        cfg = config or self.config
        cap = frame_cap((text or "").strip(), cfg.max_audio_length_ms, cfg.frames_per_char, cfg.min_text_frames)
        return self.prompts.build(text, speaker, context, voice, cap)

    def max_chars(self, config: GenerationConfig | None = None) -> int:
        """The longest text that fits one utterance's frame cap when spoken slowly (`frames_per_char`): a longer
        sentence said in one call could be cut off by `max_audio_length_ms` mid-word."""
        cfg = config or self.config
        return chars_that_fit(cfg.max_audio_length_ms, cfg.frames_per_char, cfg.min_text_frames)

    def _frame_seconds_now(self) -> float | None:
        """Seconds a frame at the rate measured now: the current stream call's mean interval, the last measured
        frame's before it has two. None: not measured."""
        return float(np.mean(self._intervals)) if self._intervals else self.frame_seconds

    def decode_cost(self) -> tuple[float, float]:
        """Mimi's cost a call as (fixed seconds, seconds a frame), scaled from the last call's cost and length
        (`MIMI_PER_FRAME`). The chunk helpers take the per-frame part as part of the frame's time."""
        if self.decode_frames <= 0:
            return self.decode_seconds, 0.0
        fixed = self.decode_seconds / (1.0 + MIMI_PER_FRAME * self.decode_frames)
        return fixed, MIMI_PER_FRAME * fixed

    def rtf_now(self, config: GenerationConfig | None = None) -> float | None:
        """Seconds of work a second of audio at the rate measured now: frame to frame in the current stream call
        (the last one's before it makes a second frame), Mimi's decode spread over the chunks it settles on. None:
        not measured."""
        seconds = self._frame_seconds_now()
        if seconds is None:
            return None
        cfg = config or self.config
        fixed, per_frame = self.decode_cost()
        chunk = steady_chunk(seconds + per_frame, fixed, cfg.chunk_frames)  # the chunks the stream settles on
        return (seconds + per_frame + fixed / chunk) / FRAME_S

    def prebuffer_s(self, text: str, config: GenerationConfig | None = None, least_s: float = 0.0,
                    out_s: float = 0.0) -> float:
        """Audio to buffer before `text` starts playing (the stream under way has made its first chunk), at least
        `least_s`: the least from which the chunks `stream` goes on to make never let the listener run dry, at the
        rate measured now (this call's own frames once it has two) made slower by `rate_margin` (one interval is a
        noisy sample, and a busy machine's frames vary), over the frames `text` may run to. `out_s`: the audio of
        `text` already out (0: its first chunk's, as at that chunk). `least_s` when nothing is measured."""
        cfg = config or self.config
        seconds = self._frame_seconds_now()
        if seconds is None:
            return least_s
        frames = frame_cap(text.strip(), cfg.max_audio_length_ms, cfg.frames_per_char, cfg.min_text_frames)
        made = min(frames, round(out_s / FRAME_S) if out_s > 0 else cfg.first_chunk_frames)
        fixed, per_frame = self.decode_cost()
        planned = self.rate_margin(max(1, len(self._intervals))) * seconds + per_frame
        self._greedy = keeps_up(planned, fixed, cfg.chunk_frames)  # the chunks the plan assumes
        return max(least_s, start_buffer(frames, made, planned, fixed, cfg.chunk_frames, least_s))

    def rate_margin(self, seen: int = 1) -> float:
        """How much slower than the rate measured the buffer is planned for: a reply's first interval is one sample
        of a rate that varies, by little on an idle machine and by much on a busy one, and drifts as a stream goes
        on. The most the last MARGIN_STREAMS streams needed (`rate_need`, within MARGIN_RANGE); RATE_MARGIN before
        any has run. `seen`: the plan is made from the mean of that many intervals (a plan made again while the
        listener waits): what those streams needed over the mean of as many of their own first intervals, where
        they ran that long (the first interval's margin where none did)."""
        low, high = MARGIN_RANGE
        needs = self._needs(seen) if seen > 1 else []
        if not needs:
            needs = self.rate_needs
        if not needs:
            return RATE_MARGIN
        return min(high, max(low, max(needs)))

    def prepare_context(self, context: Sequence[Segment]) -> int:
        """Get ready for a next call whose context is `context`: encode its audio (cached) and run its rows
        through the backbone now, so that call prefills only its own text. Returns the rows run."""
        tokens, mask = self.prompts.context_rows(context)
        if len(tokens) + 1 >= self.prompts.max_seq_len:
            return 0  # the window will trim this context: nothing here can be reused
        return self.frames.prefill(tokens, mask, self.prefix)

    def stream(self, text: str, speaker: int = 0, context: Sequence[Segment] = (),
               voice: VoiceReference | None = None, config: GenerationConfig | None = None,
               cancelled: Callable[[], bool] = lambda: False,
               ahead: Callable[[], float] | None = None,
               waiting: Callable[[], float] | None = None) -> Iterator[AudioChunk]:
        """Audio chunks as frames are produced, decoded with one Mimi streaming state per utterance.

        The first chunk is `first_chunk_frames` (two by default: the caller sizes its playback buffer from this
        call's own frame rate, `rtf_now`, measured frame to frame); after it a chunk grows while the audio already handed out is
        far enough ahead of a listener who started at the first chunk: as many frames (up to `chunk_frames`)
        as the measured frame rate makes before that audio runs out. So a TTS faster than real time starts
        with one-frame chunks and no gap, then amortises Mimi's per-call cost over longer ones.
        `ahead()`, when given, says how much audio the caller's listener still has queued (an earlier sentence
        of the same reply): the chunks start from that, not from one frame. `waiting()`, when given, is how much
        more audio the listener waits for before playback starts (the buffer `prebuffer_s` chose): until it is out,
        each chunk is the fewest frames that fill it, so playback starts as soon as the buffer allows.
        `cancelled()` is asked after every frame: a chunk takes seconds on a slow machine, a frame does not."""
        cfg = config or self.config
        prompt = self.build_prompt(text, speaker, context, voice, cfg)
        pending: list[np.ndarray] = []
        first, target = 0, cfg.first_chunk_frames
        if ahead is not None and self.frame_seconds:  # audio still queued: the first chunk may be longer
            fixed, per_frame = self.decode_cost()
            target = max(target, min(cfg.chunk_frames, fits(ahead(), self.frame_seconds + per_frame, fixed)))
        started = last = None
        if rate_need(self._intervals) is not None:  # the last stream's, taken as the next one starts
            self.past_intervals = (self.past_intervals + [list(self._intervals)])[-MARGIN_STREAMS:]
        self._intervals = []
        self._use_cores()
        with self.codec.stream_decoder() as decoder:
            for codes in self.frames.frames(prompt, cfg, self.prefix):
                if cancelled():
                    return
                now = self.clock()
                if last is not None:  # frame to frame (Mimi's decode is timed on its own)
                    seen = self.frame_seconds
                    self._intervals.append(now - last)
                    self.frame_seconds = now - last if seen is None else 0.8 * seen + 0.2 * (now - last)
                last = now
                pending.append(codes)
                if len(pending) >= target:
                    yield self._chunk(decoder, pending, first)
                    first += len(pending)
                    pending = []
                    self._use_cores()
                    now = last = self.clock()
                    started = now if started is None else started
                    queued = first * FRAME_S - (now - started)  # audio out minus audio played since
                    if ahead is not None:
                        queued = max(queued, ahead())
                    target = self._next_chunk(queued, cfg.chunk_frames, greedy=waiting is not None and self._greedy)
                    short = waiting() if waiting is not None else 0.0
                    if short > 0:  # the listener waits for the buffer: the fewest frames that fill it
                        target = fill_chunk(short, cfg.chunk_frames)
            if pending:
                yield self._chunk(decoder, pending, first)

    def _use_cores(self) -> None:
        """Size Mimi's pool to the cores other programs leave free now, and let the frame pool spin inside a run
        only while every core is (a spinning pool on a core another program holds waits at every op)."""
        free = self.cores.free()
        self.codec.use_threads(threads_for(free, self.cores.cores))
        self.frames.backend.use_spin(free >= self.cores.cores - 0.25)

    def _next_chunk(self, ahead_s: float, most: int, greedy: bool = False) -> int:
        """Frames in the next chunk (`next_chunk`) at the rate and Mimi cost measured so far."""
        frame = self.frame_seconds
        if frame is None:  # not measured yet: the smallest step
            return 1
        if frame <= 0:
            return most
        fixed, per_frame = self.decode_cost()
        return next_chunk(ahead_s, frame + per_frame, fixed, most, greedy)

    def _chunk(self, decoder, frames: list[np.ndarray], first: int) -> AudioChunk:
        codes = np.stack(frames, axis=1)
        t0 = self.clock()
        audio = decoder.decode(codes)
        self.decode_seconds = self.clock() - t0  # the last call stands for the next (`decode_cost`)
        self.decode_frames = len(frames)
        return AudioChunk(audio, codes, first, self.sample_rate, self.samples_per_frame)

    def generate(self, text: str, speaker: int = 0, context: Sequence[Segment] = (),
                 voice: VoiceReference | None = None, config: GenerationConfig | None = None) -> Speech:
        """The whole utterance at once (one-shot Mimi decode)."""
        cfg = config or self.config
        prompt = self.build_prompt(text, speaker, context, voice, cfg)
        frames = list(self.frames.frames(prompt, cfg, self.prefix))
        if not frames:
            return Speech(np.zeros(0, np.float32), np.zeros((self.num_codebooks, 0), np.int32), stopped_on_eos=True)
        codes = np.stack(frames, axis=1)
        return Speech(self.codec.decode(codes), codes, stopped_on_eos=len(frames) < prompt.max_frames)

    def warmup(self) -> None:
        """Touch every weight and Mimi's streaming path once, so the first real turn is not the slow one; then make
        MARGIN_STREAMS short streams whose frames measure the margin the first reply's buffer is planned with
        (`rate_need`), as every later reply's is: the most the last MARGIN_STREAMS streams needed. Before, the first reply
        of a session was planned with the RATE_MARGIN guess, a rate a fifth slower than measured: near real time,
        hundreds of ms more buffer than the replies after it."""
        cfg = dataclasses.replace(self.config, temperature=0.0, max_audio_length_ms=2 * FRAME_MS, stop_on_eos=False)
        for _ in self.stream("Hi.", 0, config=cfg):
            pass
        cfg = dataclasses.replace(cfg, max_audio_length_ms=WARMUP_FRAMES * FRAME_MS, min_text_frames=WARMUP_FRAMES)
        for _ in range(MARGIN_STREAMS):
            for _ in self.stream("Hi.", 0, config=cfg):
                pass  # its intervals become a `rate_need` as the next stream starts
        self.prefix.clear()
