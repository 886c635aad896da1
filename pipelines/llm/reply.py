"""The reply stage: user text in, the agent's reply out as streamed text deltas (mlx-lm).

A plain object: the agent calls `stream(user_text)`, speaks what it gets, and then `commit`s the
turn with the reply text that was actually spoken (shorter than generated after a barge-in), so the
history matches what the user heard. History is bounded by turns (trimmed to half when full) and the prompt by tokens.

Each turn's prompt is the last one's (system prompt, history) plus a turn, so the KV cache a generation
ends with is kept with the tokens it holds (`PromptCache`): the next prompt runs only the tokens after the
longest shared prefix. Content-addressed, so a dropped speculation or a trimmed history just shares less.

`end_of_turn(user_text)` reads the same model as a text end-of-turn detector: with the user's words in the chat
template, their trailing punctuation stripped, how likely is the next token to end the sentence (`.` `?` `!`, or
the end of the message)? "Can you recommend a book about" scores near 0, "What is the capital of France" high.
Whisper's own punctuation is left out because it does not separate the two (it puts a full stop after a cut-off
clause as readily as after a question); its prompt is the reply's up to the user's words, so the prompt cache
makes it cost the user's few tokens, which the reply then shares.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from mlx.utils import tree_flatten

from pipelines.errors import CheckpointError
from pipelines.ortgraph import Placement
from pipelines.standins import is_stand_in

_NEEDED_FILES = ("config.json", "tokenizer.json")
_TRAILING = ".?!,;:…-–—\"' "  # stripped from the user's words before asking whether they are finished


def banned_tokens(reply: list[int], n: int) -> list[int]:
    """Tokens that would complete a run of `n` tokens the reply already holds (no repeated n-grams: a small
    model's loops, "the opposite of the opposite of ...", end before they start). n < 2: none."""
    if n < 2 or len(reply) < n:
        return []
    tail = tuple(reply[len(reply) - n + 1:])
    return sorted({reply[i + n - 1] for i in range(len(reply) - n + 1) if tuple(reply[i:i + n - 1]) == tail})


class Bans:
    """What the next token of a reply may not be, given the reply so far and the next token's logits:
    - a token that completes a run of `n` tokens the reply already holds (`banned_tokens`);
    - as the first token, one of `first` (a reply unlike one not wanted);
    - a token whose text ends a run of `REPEAT_WORDS` words said in an earlier reply of the conversation (`avoid`),
      compared as `pipelines.llm.form.words` does (lower case, punctuation ignored), so a stock phrase is never
      spoken twice rather than only kept out of the history after it was said;
    - a token whose text ends a whole shorter sentence of an earlier reply, said anywhere (`stock_runs`: "That's a
      classic one." once is enough, "That's a classic one, but ..." is the same again). Checked on the likeliest tokens in
      turn: greedy decoding checks until one passes; sampling, until the tokens checked hold all but 1e-4 of the
      probability at `temperature` (at most `_MOST_CHECKED`). A word the model is still spelling out counts as
      said: "Madr" + "id" is banned when "... is Madrid" was said before, even if "Madridian" was coming."""

    _MOST_CHECKED = 256

    def __init__(self, tokenizer, n: int, avoid: Sequence[str] = (), temperature: float = 0.0,
                 first: set[int] = frozenset()):
        from pipelines.llm.form import stock_runs, words

        self.tokenizer, self.n, self.temperature, self._words = tokenizer, n, temperature, words
        self.first = sorted(first)  # tokens the reply may not start with
        self.grams = stock_runs(avoid)
        self.sizes = sorted({len(run) for run in self.grams})

    def __bool__(self) -> bool:
        return self.n >= 2 or bool(self.grams) or bool(self.first)

    def _repeats(self, text: str, before: int) -> bool:
        """`text` (the reply with the token) ends a stock run, in a word from index `before - 1` on."""
        w = self._words(text)
        return any(tuple(w[i:i + size]) in self.grams
                   for size in self.sizes for i in range(max(0, before - size), len(w) - size + 1))

    def __call__(self, reply: list[int], logits: np.ndarray) -> list[int]:
        banned = banned_tokens(reply, self.n) + ([] if reply else self.first)
        if not self.grams:
            return banned
        scores = np.asarray(logits, np.float64).reshape(-1).copy()
        scores[banned] = -np.inf
        if self.temperature > 0:
            z = scores / self.temperature
            p = np.exp(z - z.max())
            p /= p.sum()
        before = len(self._words(self.tokenizer.decode(reply)))
        checked = 0.0  # sampling: the probability of the tokens checked so far
        for _ in range(self._MOST_CHECKED):
            token = int(np.argmax(scores))
            if scores[token] == -np.inf:
                break
            scores[token] = -np.inf
            repeats = self._repeats(self.tokenizer.decode(reply + [token]), before)
            if repeats:
                banned.append(token)
            if self.temperature <= 0:
                if not repeats:
                    break  # greedy: the likeliest token left passes
            else:
                checked += p[token]
                if checked >= 1 - 1e-4:
                    break
        return banned


class PromptCache:
    """The KV cache of the last generation and the token ids it holds."""

    def __init__(self):
        self.tokens: list[int] = []
        self.cache = None

    def take(self, prompt: list[int]) -> tuple[object, int]:
        """(the kept cache or None, how many leading tokens of `prompt` it already holds); at least the last
        prompt token is left to run, for its logits. The cache leaves this object: one generation owns it."""
        tokens, cache = self.tokens, self.cache
        self.tokens, self.cache = [], None
        shared = 0
        for a, b in zip(tokens, prompt[: len(prompt) - 1]):
            if a != b:
                break
            shared += 1
        return (cache, shared) if cache is not None and shared else (None, 0)

    def keep(self, tokens: list[int], cache) -> None:
        self.tokens, self.cache = list(tokens), cache

    def clear(self) -> None:
        self.tokens, self.cache = [], None


class TokenNet(Protocol):
    """Where the reply network runs (`MLXTokens` here, `pipelines.llm.ort.OrtLlama`): ids in, next tokens out.

    `tokens` feeds `ids` after what `cache` holds and yields one sampled token at a time (greedy at temperature 0;
    `ban(reply so far, the next token's logits)` lists tokens to rule out). A token is fed into the cache when the next one is asked for, or
    earlier (mlx-lm computes the next token while this one is handed out); the caller trims what it did not keep.
    """

    def new_cache(self): ...

    def length(self, cache) -> int: ...

    def trim(self, cache, keep: int) -> None: ...

    def logits(self, ids: list[int], cache) -> np.ndarray:
        """Feed `ids` after what `cache` holds (kept in it); the next token's logits [V] as float32."""

    def tokens(self, ids: list[int], cache, max_tokens: int, temperature: float, seed: int | None,
               ban: Callable[[list[int], np.ndarray], list[int]] | None) -> Generator[int, None, None]: ...


class MLXTokens:
    """The mlx-lm model (the model of record) through mlx-lm's `generate_step`: chunked prefill, and on Apple silicon
    the next token evaluated asynchronously while this one is handed out."""

    name = "mlx"

    def __init__(self, model):
        self.model = model

    def new_cache(self):
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(self.model)

    def length(self, cache) -> int:
        return cache[0].offset

    def trim(self, cache, keep: int) -> None:
        from mlx_lm.models.cache import trim_prompt_cache

        trim_prompt_cache(cache, cache[0].offset - keep)

    def logits(self, ids, cache) -> np.ndarray:
        import mlx.core as mx

        out = self.model(mx.array(ids)[None], cache=cache)[0, -1].astype(mx.float32)
        mx.eval(out)
        return np.array(out)

    def tokens(self, ids, cache, max_tokens, temperature, seed, ban):
        import mlx.core as mx
        from mlx_lm.generate import generate_step, generation_stream, wired_limit
        from mlx_lm.sample_utils import make_sampler

        if seed is not None:
            mx.random.seed(seed)  # per turn, so a replayed turn samples the same reply

        def no_repeats(tokens, logits):  # `tokens`: the ids fed here, then the reply so far
            banned = ban([int(t) for t in tokens.tolist()[len(ids):]], np.array(logits[0].astype(mx.float32)))
            if banned:
                logits[..., mx.array(banned)] = -mx.inf
            return logits

        # wired_limit keeps the weights wired in unified memory while generating (Metal; a no-op on a CPU)
        with wired_limit(self.model, [generation_stream]):
            for token, _ in generate_step(mx.array(ids), self.model, max_tokens=max_tokens,
                                          sampler=make_sampler(temp=temperature), prompt_cache=cache,
                                          logits_processors=[no_repeats] if ban else None):
                yield int(token)


def forced_tokens(net: TokenNet, ids: list[int], cache, reply: list[int],
                  ban: Callable[[list[int], np.ndarray], list[int]] | None = None) -> Iterator[int]:
    """Teacher forcing: the tokens of `reply`, each handed out after the network has run on everything before it
    (the prompt's prefill, then one forward a token, fed when the next is asked for, as `TokenNet.tokens` feeds),
    with `ban` asked as sampling asks it. What a reply of these tokens costs, whatever the weights would say: for
    stand-in weights (pipelines/standins.py), whose own words mean nothing."""
    logits = net.logits(ids, cache)
    for n, token in enumerate(reply):
        if ban is not None:
            ban(reply[:n], logits)
        yield token
        if n + 1 < len(reply):
            logits = net.logits([token], cache)


class ReplyLLM:
    def __init__(
        self,
        model_dir: str | Path,
        system_prompt: str,
        max_history_turns: int = 8,
        max_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
        max_prompt_tokens: int = 2048,
        placement: Placement = Placement(),
        ort_cache: Path | None = None,
        examples: list[tuple[str, str]] = (),
        no_repeat_ngram: int = 0,
    ):
        model_dir = Path(model_dir)
        missing = [name for name in _NEEDED_FILES if not (model_dir / name).is_file()]
        if not model_dir.is_dir() or missing or not list(model_dir.glob("model*.safetensors")):
            found = model_dir.is_dir()
            what = f"missing {', '.join(missing) or 'model*.safetensors'}" if found else "directory not found"
            raise CheckpointError(f"reply LLM {model_dir}: {what}; convert or download the model first")
        if max_history_turns < 0 or max_tokens < 1 or max_prompt_tokens < 16:
            raise ValueError("max_history_turns >= 0, max_tokens >= 1 and max_prompt_tokens >= 16 are required")

        import mlx_lm

        try:
            # a str path that exists never reaches the hub
            self.model, self.tokenizer = mlx_lm.load(str(model_dir))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"reply LLM {model_dir}: cannot load ({type(error).__name__}: {error})") from None
        import mlx.core as mx

        self.placement = placement.check("reply LLM")
        if placement.backend == "mlx" and placement.precision.bits is not None:  # llm.quantization 8 | 4 on MLX
            from pipelines.ortgraph import quantize_mlx

            quantize_mlx(self.model, placement.precision)
            mx.eval(self.model.parameters())
        elif (placement.backend == "mlx" and mx.default_device() == mx.cpu
              and any(k.endswith(".scales") for k, _ in tree_flatten(self.model.parameters()))):
            # the checkpoint's own quantisation, on a CPU: MLX's CPU quantised matmul is slow (SmolLM2 first token
            # 3.1 s -> 0.3 s in fp32). ONNX Runtime reads the quantised layers (pipelines.ortgraph.float_params
            # dequantises one at a time) and quantises again in its own kernels' layout: no fp32 copy of the whole
            # model is kept (Llama-3.2-1B's would be 5 GB)
            from mlx_lm.utils import dequantize_model

            self.model = dequantize_model(self.model)
            mx.eval(self.model.parameters())
        self.model_dir = model_dir
        self.untrained = is_stand_in(model_dir)  # random weights of the real shape: its words mean nothing
        self.system_prompt = system_prompt
        self.examples = [(str(u), str(r)) for u, r in examples]  # example exchanges after the system prompt
        self.no_repeat_ngram = no_repeat_ngram  # a reply never says the same run of this many tokens twice (0: off)
        self.max_tokens = max_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.seed = seed
        self.temperature = temperature
        if placement.backend == "onnx":
            from pipelines.llm.ort import OrtLlama, supported

            shape = supported(self.model)
            if shape is None:
                raise CheckpointError(f"reply LLM {model_dir}: the ONNX backend runs plain Llama models only; "
                                      "use --llm.backend mlx")
            self.net: TokenNet = OrtLlama(self.model, shape, placement.precision, ort_cache, progress=True)
        else:
            self.net = MLXTokens(self.model)
        self.max_history_turns = max_history_turns
        self._history: list[tuple[str, str]] = []
        self.prompt_cache = PromptCache()
        self.last_prompt_run = 0  # prompt tokens the last generation ran (the rest came from the prompt cache)

    @property
    def history(self) -> tuple[tuple[str, str], ...]:
        """Committed (user, reply) turns, oldest first."""
        return tuple(self._history)

    def warmup(self) -> None:
        """One short generation so the first real turn does not pay for lazy loading and graph setup."""
        for _ in self._generate(self._prompt_tokens("Hi", []), max_tokens=2):
            pass

    def stream(self, user_text: str, avoid: Sequence[str] = (), unlike: Sequence[str] = (),
               forced: str | None = None) -> Iterator[str]:
        """Text deltas of the reply to `user_text`, as tokens arrive. Does not change the history. `avoid`: the
        replies said earlier in the conversation; no run of 5 of their words is said again (`Bans`). `unlike`:
        replies not wanted (their first piece failed a check); this one does not start with their first token.
        `forced`: the reply's words, teacher-forced (`forced_tokens`: stand-in weights), then the end of the message."""
        user_text = user_text.strip()
        if not user_text:
            return
        # the first token as it starts a message, and as it would after a space the piece's text lost
        first = {ids[0] for text in unlike for spelt in (text.strip(), " " + text.strip())
                 for ids in [self.tokenizer.encode(spelt, add_special_tokens=False)] if ids}
        script = None
        if forced is not None:
            script = [*self.tokenizer.encode(forced.strip(), add_special_tokens=False), self.tokenizer.eos_token_id]
        yield from self._generate(self._prompt(user_text), max_tokens=self.max_tokens, avoid=avoid, first=first,
                                  forced=script)

    def end_of_turn(self, user_text: str) -> float:
        """The probability that `user_text` is a finished message: the next token after its words (trailing
        punctuation stripped) ends the sentence or the message. 0.0 for no words."""
        words = user_text.strip().rstrip(_TRAILING).rstrip()
        if not words:
            return 0.0
        messages = self._messages(words, list(self._history))
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        logits, _ = self._feed(self.tokenizer.encode(text[: text.rindex(words) + len(words)], add_special_tokens=False))
        logits = logits.astype(np.float64)
        p = np.exp(logits - logits.max())
        return float(p[self._ending_ids].sum() / p.sum())

    def prepare_next_turn(self) -> int:
        """Run the next turn's prompt up to the user's words (system prompt, examples, the history as it is now)
        into the prompt cache, while the reply plays and the user thinks: the next turn's end-of-turn judgement and
        reply then run only the user's own tokens. Worth most after the history was trimmed (the whole history is
        new then: ~0.5 s on Llama-3.2-1B, two cores) and on a large model. Returns the prompt tokens run."""
        placeholder = "Hello"
        messages = self._messages(placeholder, list(self._history))
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        _, ran = self._feed(self.tokenizer.encode(text[: text.rindex(placeholder)], add_special_tokens=False))
        return ran

    def _feed(self, prompt: list[int]) -> tuple[np.ndarray, int]:
        """Run `prompt` into the prompt cache (only what it does not hold yet): its last token's next-token logits,
        and how many tokens were run."""
        cache, shared = self.prompt_cache.take(prompt)
        if cache is None:
            cache = self.net.new_cache()
        else:
            self.net.trim(cache, shared)
        try:
            return self.net.logits(prompt[shared:], cache), len(prompt) - shared
        finally:
            self.prompt_cache.keep(prompt[: self.net.length(cache)], cache)

    @functools.cached_property
    def _ending_ids(self) -> list[int]:
        """The tokens that end a sentence or the message: `.` `?` `!` and the end-of-message tokens."""
        ids = set(self.tokenizer.eos_token_ids)
        for mark in ".?!":
            encoded = self.tokenizer.encode(mark, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
        return sorted(ids)

    def commit(self, user_text: str, reply_text: str) -> None:
        """Append a finished turn. Beyond `max_history_turns` the older half drops out at once: dropping one turn
        a turn would change the prompt right after the system prompt every time, and the prompt cache with it."""
        user_text, reply_text = user_text.strip(), reply_text.strip()
        if user_text or reply_text:
            self._history.append((user_text, reply_text))
        if len(self._history) > self.max_history_turns:
            keep = min(self.max_history_turns, max(1, self.max_history_turns // 2))
            del self._history[: len(self._history) - keep]

    def reset(self) -> None:
        self._history.clear()
        self.prompt_cache.clear()

    def _generate(self, prompt: list[int], max_tokens: int, avoid: Sequence[str] = (),
                  first: set[int] = frozenset(), forced: list[int] | None = None) -> Iterator[str]:
        """The one generate loop, whichever network runs (`self.net`): EOS, max_tokens, the streaming detokenizer
        and the prompt cache are handled here; the network only turns ids into a stream of next tokens."""
        net = self.net
        cache, shared = self.prompt_cache.take(prompt)
        if cache is None:
            cache = net.new_cache()
        else:
            net.trim(cache, shared)
        self.last_prompt_run = len(prompt) - shared
        held = list(prompt)
        detokenizer = self.tokenizer.detokenizer
        detokenizer.reset()
        ban = Bans(self.tokenizer, self.no_repeat_ngram, avoid, self.temperature, first) or None
        if forced is None:
            tokens = net.tokens(prompt[shared:], cache, max_tokens, self.temperature, self.seed, ban)
        else:
            tokens = forced_tokens(net, prompt[shared:], cache, forced, ban)
        try:
            for n, token in enumerate(tokens):
                held.append(token)
                if token in self.tokenizer.eos_token_ids:
                    break
                detokenizer.add_token(token)
                if n + 1 == max_tokens:
                    break
                if segment := detokenizer.last_segment:  # reading it takes it
                    yield segment
            detokenizer.finalize()
            if segment := detokenizer.last_segment:
                yield segment
        finally:
            tokens.close()
            # the cache holds a prefix of `held`, or tokens the network fed ahead: keep only what we know
            if net.length(cache) > len(held):
                net.trim(cache, len(held))
            self.prompt_cache.keep(held[: net.length(cache)], cache)

    def _prompt(self, user_text: str) -> list[int]:
        # drop the oldest turns until the prompt fits; the user's own words come last and stay
        turns = list(self._history)
        while True:
            tokens = self._prompt_tokens(user_text, turns)
            if len(tokens) <= self.max_prompt_tokens or not turns:
                break
            turns.pop(0)
        if len(tokens) > self.max_prompt_tokens:
            # one huge utterance: keep its end, which is what the user said last
            excess = len(tokens) - self.max_prompt_tokens
            user_ids = self.tokenizer.encode(user_text, add_special_tokens=False)
            user_text = self.tokenizer.decode(user_ids[min(len(user_ids), excess + 8) :])
            tokens = self._prompt_tokens(user_text, [])
        return tokens

    def _messages(self, user_text: str, turns: list[tuple[str, str]]) -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}]
        for user, reply in [*self.examples, *turns]:
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": reply})
        messages.append({"role": "user", "content": user_text})
        return messages

    def _prompt_tokens(self, user_text: str, turns: list[tuple[str, str]]) -> list[int]:
        messages = self._messages(user_text, turns)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)
