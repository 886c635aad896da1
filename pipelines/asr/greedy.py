"""Whisper's greedy decoding for one window in numpy, for the ONNX Runtime decoder.

mlx-whisper's `DecodingTask` keeps the logits, its logit filters and the chosen tokens as lazy MLX arrays and
evaluates them every step. On MLX's CPU path that bookkeeping cost ~2 ms a token here, on top of a ~2.7 ms
tiny.en decoder step, plus one step more than needed (its loop computes the next step before it looks at the
last one). With the decoder on ONNX Runtime the logits are numpy already, so this loop applies the same rules
to them in numpy:

- the task itself (initial tokens, suppressed tokens, sample length, the timestamp options) is mlx-whisper's
  `DecodingTask` built from the same `DecodingOptions`, so nothing about which rules apply is restated here;
- the filters in its order: blank and end of text suppressed at the first sampled position, the suppressed
  tokens, then the timestamp rules as mlx-whisper applies them (in pairs, a timestamp first and at most
  `max_initial_timestamp`, and a timestamp whenever the timestamps together outweigh the likeliest text token);
- greedy choice (the first of equal maxima, as MLX's argmax), the log-probability sum and the no-speech
  probability (softmax at the start-of-transcript position of the first step) as `GreedyDecoder` keeps them;
- `forced` tokens (teacher forcing, the stand-ins' timing) are taken instead of the argmax, and their
  log-probabilities summed, as `whisper._forced_task` does.

Temperatures above 0 and language detection stay with mlx-whisper's own task. tests/test_asr.py holds this loop to
mlx-whisper's on real speech, noise and silence: the same tokens and text, the same no-speech probability and
average log-probability to float rounding. (Rounding is where they can part: MLX's CPU logsumexp is ~3e-4 from
float64, numpy's much nearer, so a timestamp-or-text decision within that of a tie may go the other way.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# (tokens [1, T] int64, cache or None) -> (logits [1, T, n_vocab] float32, cache): one decoder call
Step = Callable[[np.ndarray, object], tuple[np.ndarray, object]]


def _logsumexp(x: np.ndarray) -> np.float32:
    top = np.max(x)
    if not np.isfinite(top):
        return top
    return np.float32(top + np.log(np.sum(np.exp(x - top))))


class GreedyRules:
    """A `DecodingTask`'s filters as numpy masks, made once per task."""

    def __init__(self, task):
        tok = task.tokenizer
        n_vocab = task.model.dims.n_vocab
        self.eot, self.ts = tok.eot, tok.timestamp_begin
        self.no_timestamps, self.no_speech = tok.no_timestamps, tok.no_speech
        self.sample_begin, self.sot_index = task.sample_begin, task.sot_index
        self.sample_len, self.n_ctx = task.sample_len, task.n_ctx
        self.initial_tokens = list(task.initial_tokens)
        opts = task.options
        self.blank = None
        if opts.suppress_blank:
            self.blank = np.array(tok.encode(" ") + [tok.eot])
        self.suppress = np.zeros(n_vocab, np.float32)
        if opts.suppress_tokens:
            self.suppress[list(task._get_suppress_tokens())] = -np.inf
        self.timestamps = not opts.without_timestamps
        self.max_initial = None
        if self.timestamps and opts.max_initial_timestamp:
            from mlx_whisper.audio import CHUNK_LENGTH

            self.max_initial = round(opts.max_initial_timestamp / (CHUNK_LENGTH / task.model.dims.n_audio_ctx))
        if opts.temperature != 0 or task.n_group != 1:
            raise ValueError("the numpy loop decodes greedily, one sequence at a time")

    def filtered(self, logits: np.ndarray, tokens: list[int]) -> np.ndarray:
        """The logits of the next token after `tokens`, with every rule applied ([n_vocab] float32, a copy)."""
        out = logits + self.suppress
        if self.blank is not None and len(tokens) == self.sample_begin:
            out[self.blank] = -np.inf
        if not self.timestamps:
            return out
        ts, seq = self.ts, tokens[self.sample_begin:]
        mask = np.zeros_like(out)
        if self.no_timestamps is not None:
            mask[self.no_timestamps] = -np.inf
        last_ts = len(seq) >= 1 and seq[-1] >= ts
        penultimate_ts = len(seq) < 2 or seq[-2] >= ts
        if last_ts:
            if penultimate_ts:
                mask[ts:] = -np.inf  # after a pair: text
            else:
                mask[: self.eot] = -np.inf  # a segment's closing timestamp, or the end
        # (mlx-whisper's "timestamps never decrease" rule masks from the timestamp tokens up to the *position* of
        # the last timestamp in the sampled tokens, a number below `ts`: an empty range, so nothing; the parity
        # test would see it if that rule started to mask)
        if len(tokens) == self.sample_begin:
            mask[:ts] = -np.inf  # the first sampled token is a timestamp
            if self.max_initial is not None:
                mask[ts + self.max_initial + 1:] = -np.inf
        norm = _logsumexp(out)
        if _logsumexp(out[ts:] - norm) > np.max(out[:ts] - norm):
            mask[:ts] = -np.inf  # the timestamps together outweigh any text token
        return out + mask


def decode_greedy(rules: GreedyRules, step: Step, forced: list[int] | None = None) -> tuple[list[int], float, float]:
    """One window's sampled tokens (up to, not including, end of text), their summed log-probability (the end of
    text's included, as mlx-whisper sums) and the no-speech probability. `forced`: the tokens to take instead
    (ending with end of text)."""
    with np.errstate(invalid="ignore", over="ignore"):  # a stand-in's random logits may sum to inf - inf
        return _decode(rules, step, forced)


def _decode(rules: GreedyRules, step: Step, forced: list[int] | None) -> tuple[list[int], float, float]:
    tokens = list(rules.initial_tokens)
    logits, cache = step(np.array([tokens], np.int64), None)
    no_speech = float("nan")
    if rules.no_speech is not None:
        first = logits[0, rules.sot_index].astype(np.float64)
        no_speech = float(np.exp(first[rules.no_speech] - _logsumexp(first)))
    last = logits[0, -1]
    total = np.float32(0.0)
    for i in range(rules.sample_len):
        scores = rules.filtered(last, tokens)
        if forced is not None:
            chosen = forced[min(len(tokens) - rules.sample_begin, len(forced) - 1)]
        else:
            chosen = int(np.argmax(scores))
        total = np.float32(total + (scores[chosen] - _logsumexp(scores)))
        tokens.append(chosen)
        if chosen == rules.eot or len(tokens) > rules.n_ctx:  # mlx-whisper feeds no position past n_ctx - 1
            break
        if i + 1 < rules.sample_len:
            logits, cache = step(np.array([[chosen]], np.int64), cache)
            last = logits[0, -1]
    sampled = tokens[rules.sample_begin:]
    if rules.eot in sampled:
        sampled = sampled[: sampled.index(rules.eot)]
    return sampled, float(total), no_speech
