"""The turn engine: one user utterance in, one spoken reply out, the same for every mode.

A turn is four steps, each a method that runs (and is tested) alone:

    transcribe  the utterance -> text: the ASR, or what the user typed, or a kept speculation's transcript
    reply       the LLM's reply as streamed text (a kept speculation's first), read no further than needed
    speak       each sentence as soon as it is complete -> `ReplyVoice` (agent/voice.py): the TTS, with the
                conversation and the reply's earlier sentences as context -> the audio sink
    finish      keep what was played, commit the reply to the LLM's history (unless it has problems), the
                waterfall, TurnEnded, and the next turn's TTS context and LLM prompt prepared while the reply plays

The engine knows the TTS only through `pipelines.messages.TTSStage` (and its config through `VoiceConfig`):
Marvis or a second TTS speak a reply the same way. All MLX work happens in the thread that calls `run_turn`
(the modes give it one owner thread), never in an audio callback.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.conversation import Conversation, Turn
from agent.events import (
    Listener,
    ReplyKeptOut,
    ReplyRejected,
    ReplyStarted,
    ReplyText,
    Said,
    Speculated,
    SpeculationDropped,
    SpeculationKept,
    Transcribed,
    TurnEnded,
    TurnJudged,
    TurnWithdrawn,
)
from agent.metrics import Waterfall, summary_line
from agent.sinks import AudioSink
from agent.voice import ReplyVoice
from pipelines.llm.form import complete_sentences, reply_problems
from pipelines.llm.sentences import SentenceSplitter, clean_for_speech
from pipelines.messages import ASRStage, ReplyStage, Segment, TTSStage, VoiceConfig
from pipelines.vad import Utterance


def _never() -> bool:
    return False


@dataclass
class Stages:
    asr: ASRStage
    llm: ReplyStage
    tts: TTSStage
    tts_config: VoiceConfig  # the TTS stage's own config: its knobs, the agent's and the user's voices, the context size
    first_clause_words: int = 0  # a long first sentence may start speaking at a clause break (0: sentences only)
    max_sentences: int = 0  # a reply is spoken up to this many sentences; the LLM stops there (0: no limit)
    candidates: int = 1  # replies tried until one's first piece passes the form checks (1: the first is spoken as is)
    fallback_reply: str = ""  # said when none passed ("": nothing)
    # the words said in an utterance, when a script knows them (agent/scripted.py): the ASR is then teacher-forced
    # with them, for stand-in weights whose own words mean nothing
    words: Callable[[Utterance], str] | None = None

    def hear(self, utterance: Utterance) -> str:
        """What the ASR makes of the utterance (teacher-forced with the script's words when `words` is set)."""
        if self.words is not None:
            return self.asr.transcribe_forced(utterance.audio, utterance.sample_rate, self.words(utterance)).text.strip()
        return self.asr.transcribe(utterance.audio, utterance.sample_rate).text.strip()


@dataclass
class Speculation:
    """ASR and the LLM started at the first silence after speech, before the endpoint was sure.

    `run_turn` keeps this work when the utterance it is given is the one speculated on (the user did not speak
    again); otherwise it is dropped: nothing was played and nothing entered the history.
    """

    utterance: Utterance
    transcript: str
    replies: Iterator[str] | None  # the LLM stream, partly consumed
    deltas: list[str]  # what it has produced so far
    started_wall: float
    marks: dict[str, float]  # stage -> wall time it completed during speculation
    done: bool = False  # the LLM stream ended during speculation

    def matches(self, utterance: Utterance) -> bool:
        return (abs(utterance.start_s - self.utterance.start_s) < 1e-6
                and abs(utterance.end_s - self.utterance.end_s) < 1e-6)

    def drop(self) -> None:
        if self.replies is not None:
            self.replies.close()
            self.replies = None


class TurnClock:
    """One turn's clock and waterfall.

    With a kept speculation the turn counts from when the endpoint would have been decided had the
    speculation run beside the stream (as it does live), and the clock runs ahead by what a fast replay
    gained on a live stream: work finished by then costs nothing, the rest shows."""

    def __init__(self, utterance: Utterance, clock: Callable[[], float], speculation: Speculation | None = None):
        self._clock = clock
        if speculation is not None:
            # the endpoint came (decided_s - end_s) after the speculation started, on the stream clock
            self.decided = speculation.started_wall + (utterance.decided_s - speculation.utterance.decided_s)
            self.shift = max(0.0, self.decided - clock())
        else:
            self.decided, self.shift = clock(), 0.0
        self.waterfall = Waterfall(utterance.decided_s - utterance.end_s, self.decided)

    def now(self) -> float:
        return self._clock() + self.shift

    def mark(self, stage: str, wall: float | None = None) -> None:
        """Stamp `stage` at `wall` on this turn's clock (now when not given); the first stamp stands."""
        self.waterfall.mark(stage, self.now() if wall is None else wall)

    def first_sample(self, wall: float) -> None:
        """The sink's first-sample callback: `wall` is on the sink's clock (the engine's, unshifted)."""
        self.waterfall.mark("first_sample_played", wall + self.shift)


class TurnEngine:
    def __init__(self, stages: Stages, conversation: Conversation | None = None, emit: Listener | None = None,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic,
                 jitter_s: float = 0.08):
        self.stages = stages
        self.conversation = conversation or Conversation()
        self.emit: Listener = emit or (lambda event: None)  # the session's listeners (agent.events)
        self.log = log
        self.clock = clock
        self.jitter_s = jitter_s  # the least audio buffered before playback starts (one frame: the first chunk)
        self.stopping = threading.Event()  # the session is ending (Ctrl-C, SIGTERM): cut the turn, prepare nothing

    def stop(self) -> None:
        """End the running turn at its next LLM token or TTS frame (any thread); the engine takes no new work."""
        self.stopping.set()

    def prebuffer_s(self, text: str, cfg: VoiceConfig) -> float:
        """The playback buffer for a reply whose first piece is `text`: the TTS stage's rule, at least `jitter_s`."""
        return self.stages.tts.prebuffer_s(clean_for_speech(text), cfg, self.jitter_s)

    def warmup(self) -> None:
        for stage in (self.stages.asr, self.stages.llm, self.stages.tts):
            stage.warmup()

    def _reply(self, transcript: str, on_token: Callable[[], None] = lambda: None,
               stop: Callable[[], bool] = _never) -> Iterator[str]:
        """The LLM's reply stream (`checked_reply`), each delta told to the listeners once it may be spoken;
        `on_token()` at each token the LLM gives, a `ReplyRejected` for each candidate not spoken; `stop()`: the
        turn was cut or dropped while a first piece was still being chosen."""
        st = self.stages
        started = False
        earlier = [t.reply for t in self.conversation.turns]
        for delta in checked_reply(st.llm, transcript, earlier, first_clause_words=st.first_clause_words,
                                   candidates=st.candidates, fallback_reply=st.fallback_reply, on_token=on_token,
                                   rejected=lambda text, problems: self.emit(ReplyRejected(text, problems)),
                                   stop=lambda: stop() or self.stopping.is_set()):
            if not started:  # told once the reply has something to say (a candidate may be stopped unsaid)
                self.emit(ReplyStarted())
                started = True
            self.emit(ReplyText(delta))
            yield delta

    def speculate(self, utterance: Utterance, cancelled: Callable[[], bool] = _never,
                  judge: Callable[[Utterance, float], None] | None = None) -> Speculation:
        """Transcribe what was said so far and run the LLM until its first sentence is ready (text only).
        With `judge`, the words are judged first (the reply model's end-of-turn score: `ReplyStage.end_of_turn`)
        and the verdict handed to `judge` before the reply starts, so the floor can end the turn on it."""
        st = self.stages
        started = self.clock()
        transcript = st.hear(utterance)
        spec = Speculation(utterance, transcript, None, [], started, {"asr_final": self.clock()})
        if judge is not None and transcript:
            began = self.clock()
            probability = st.llm.end_of_turn(transcript)
            self.emit(TurnJudged(utterance.start_s, utterance.end_s, round(probability, 4),
                                 round((self.clock() - began) * 1000, 1)))
            judge(utterance, probability)
        if transcript and not cancelled():
            spec.replies = self._reply(transcript, lambda: spec.marks.setdefault("llm_first_token", self.clock()),
                                       cancelled)
            splitter = SentenceSplitter(st.first_clause_words)
            for delta in spec.replies:
                spec.deltas.append(delta)
                if splitter.push(delta) or cancelled() or self.stopping.is_set():
                    break
            else:
                if spec.deltas or not cancelled():
                    spec.done = True
                else:  # cancelled while its first piece was chosen: a kept speculation starts the reply anew
                    spec.replies = None
        self.emit(Speculated(utterance.start_s, utterance.end_s, transcript, round((self.clock() - started) * 1000, 1)))
        return spec

    def run_turn(self, utterance: Utterance, sink: AudioSink, interrupted: Callable[[], bool] = _never,
                 speculation: Speculation | None = None, text: str | None = None,
                 withdrawn: Callable[[], bool] = _never) -> Turn | None:
        """Answer one utterance. Returns None when the ASR heard no words (no turn is taken), or when the turn
        was `withdrawn()` (the user went on with it: nothing of the reply is kept; `interrupted()` cuts it).

        `text` is what the user typed instead (a Realtime client's text message): no ASR, and the turn has no
        user audio for the TTS context (`utterance` then only gives the turn its times).

        With a matching `speculation`, its transcript and LLM output are used instead of being recomputed; the
        waterfall then counts as `TurnClock` says.
        """
        interrupted = functools.partial(self._cut_short, interrupted)
        if withdrawn():
            if speculation is not None:
                speculation.drop()
            self.emit(TurnWithdrawn(utterance.start_s))
            return None
        speculation = self._kept(speculation, utterance)
        timing = TurnClock(utterance, self.clock, speculation)
        transcript = self.transcribe(utterance, timing, speculation, text)
        self.emit(Transcribed(transcript, utterance.start_s, utterance.end_s, utterance.decided_s, utterance.reason))
        if not transcript:
            self.log("(heard no words; no turn taken)")
            return None
        turn = self.conversation.new_turn(transcript)
        self.log(f"you   > {transcript}")
        voice = self.voice(turn, sink, timing, interrupted)
        deltas = self.reply(transcript, timing, speculation, until=voice.halted)
        for sentence in spoken_sentences(deltas, SentenceSplitter(self.stages.first_clause_words),
                                         self.stages.max_sentences):
            voice.say(sentence)
        if speculation is not None:
            speculation.drop()
        if withdrawn():
            sink.clear()
            self.emit(TurnWithdrawn(utterance.start_s, voice.text))
            self.log("  (the user went on: this reply is withdrawn)")
            return None
        sink.end_of_stream()
        self.finish(turn, utterance, voice, sink, timing)
        return turn

    # ---- the steps of a turn ---------------------------------------------------------------------------------

    def _cut_short(self, barged_in: Callable[[], bool]) -> bool:
        return barged_in() or self.stopping.is_set()

    def _kept(self, speculation: Speculation | None, utterance: Utterance) -> Speculation | None:
        """`speculation` when it was made on `utterance`; otherwise it is dropped (nothing of it was played)."""
        if speculation is None:
            return None
        if not speculation.matches(utterance):
            speculation.drop()
            self.emit(SpeculationDropped(speculation.utterance.start_s))
            return None
        self.emit(SpeculationKept(utterance.start_s))
        return speculation

    def transcribe(self, utterance: Utterance, timing: TurnClock, speculation: Speculation | None = None,
                   text: str | None = None) -> str:
        """What the user said: typed `text`, a kept speculation's transcript (its stage times count from the
        endpoint), or the ASR's."""
        if text is not None:
            transcript = text.strip()
        elif speculation is not None:
            for stage, wall in speculation.marks.items():
                timing.mark(stage, max(wall, timing.decided))
            return speculation.transcript
        else:
            transcript = self.stages.hear(utterance)
        timing.mark("asr_final")
        return transcript

    def reply(self, transcript: str, timing: TurnClock, speculation: Speculation | None = None,
              until: Callable[[], bool] = _never) -> Iterator[str]:
        """The reply's text deltas: a kept speculation's, then the rest of its LLM stream (or a new stream). The
        LLM is read no further once `until()` says the reply is cut short."""
        if speculation is not None:
            if speculation.replies is None and not speculation.done:  # cancelled before the LLM started
                speculation.replies = self._reply(transcript, functools.partial(timing.mark, "llm_first_token"), until)
            deltas = itertools.chain(speculation.deltas, speculation.replies or ())
        else:
            deltas = self._reply(transcript, functools.partial(timing.mark, "llm_first_token"), until)
        for delta in deltas:
            timing.mark("llm_first_token")
            yield delta
            if until():
                return

    def voice(self, turn: Turn, sink: AudioSink, timing: TurnClock,
              interrupted: Callable[[], bool] = _never) -> ReplyVoice:
        """The speak step for `turn`: its TTS context from the conversation, its own seed, the sink begun."""
        st = self.stages
        context, turn.context_turns = self.conversation.context(st.tts_config.context_segments)
        cfg = dataclasses.replace(st.tts_config, seed=st.tts_config.seed + turn.index)
        sink.on_first_sample = timing.first_sample
        sink.begin_utterance()
        return ReplyVoice(st.tts, cfg, cfg.speaker, context, sink=sink, cancelled=interrupted, clock=timing.now,
                          least_prebuffer_s=self.jitter_s, mark=timing.mark, said=self._said)

    def _said(self, text: str) -> None:
        self.emit(Said(text))

    def finish(self, turn: Turn, utterance: Utterance, voice: ReplyVoice, sink: AudioSink, timing: TurnClock) -> None:
        """Close the turn: keep what the user heard, commit the reply, the waterfall, TurnEnded; then get the
        next turn's TTS context ready."""
        if voice.halted():
            turn.interrupted = True
            voice.keep_played(sink.clear())
        turn.reply = voice.text
        self.log(f"agent > {turn.reply}" + (" [interrupted]" if turn.interrupted else ""))
        if utterance.audio.size:
            turn.user = Segment(self.stages.tts_config.user_speaker, turn.transcript, utterance.audio,
                                utterance.sample_rate)
        turn.agent = voice.segment()
        self.commit(turn)
        turn.waterfall = timing.waterfall.offsets()
        if voice.timeline and not turn.interrupted:
            turn.waterfall.update(voice.playback())
        self.conversation.append(turn)
        self.log("  " + summary_line(turn.index, turn.waterfall))
        self.emit(TurnEnded(turn))
        if self.stopping.is_set():
            return
        # get the next turn's context ready now (for Marvis: Mimi-encode the user's audio, prefill the new rows; for
        # the LLM: its prompt up to the user's words), while the reply plays and the user thinks, instead of inside
        # the next turn's latency
        self.stages.tts.prepare_context(self.conversation.context(self.stages.tts_config.context_segments)[0])
        if not self.stopping.is_set():
            self.stages.llm.prepare_next_turn()

    def commit(self, turn: Turn) -> None:
        """The reply into the LLM's history, unless it has problems: a small model copies its own slips into
        later turns, so such a reply is kept out (and said to the listeners)."""
        window = self.stages.llm.max_history_turns  # the replies the LLM could copy from its history
        earlier = [t.reply for t in self.conversation.turns[-window:]] if window else []
        problems = reply_problems(turn.reply, earlier) if turn.reply else []
        if problems:
            self.emit(ReplyKeptOut(problems))
        else:
            self.stages.llm.commit(turn.transcript, turn.reply)


def checked_reply(llm: ReplyStage, transcript: str, earlier: list[str], *, first_clause_words: int = 0,
                  candidates: int = 1, fallback_reply: str = "", on_token: Callable[[], None] = lambda: None,
                  rejected: Callable[[str, list[str]], None] = lambda text, problems: None,
                  stop: Callable[[], bool] = _never) -> Iterator[str]:
    """The reply to speak, as text deltas, given the replies said `earlier` in the conversation. No run of five
    of their words is generated at all (the LLM's `avoid`). The first piece (the first sentence or clause, as it
    would be spoken) is checked before anything is handed out: with problems (`reply_problems`: markup, a
    dialogue, too long, an earlier reply again) it is `rejected(text, problems)` and the LLM is asked for a reply
    that starts otherwise (`unlike`), up to `candidates` in all; then `fallback_reply` is the reply.
    `on_token()` at each delta the LLM gives, rejected or not (the waterfall's first token); `stop()`, asked at
    each one while a first piece is read, ends the reply with nothing more (the turn was cut or dropped)."""
    if candidates <= 1:  # nothing to choose from: the first reply as it comes
        for delta in llm.stream(transcript, avoid=earlier):
            on_token()
            yield delta
        return
    unlike: list[str] = []
    for _ in range(candidates):
        stream = llm.stream(transcript, avoid=earlier, unlike=list(unlike))
        try:
            held, first = _first_piece(stream, SentenceSplitter(first_clause_words), on_token, stop)
            if stop():
                return
            # an empty reply is said as empty (as without the checks), unless it came after one rejected
            problems = reply_problems(first, earlier) if first.strip() or unlike else []
            if problems:
                rejected(first, problems)
                unlike.append(first)
                continue
            yield from held
            for delta in stream:
                on_token()
                yield delta
            return
        finally:
            stream.close()
    if fallback_reply:
        yield fallback_reply


def _first_piece(stream: Iterator[str], splitter: SentenceSplitter, on_token: Callable[[], None],
                 stop: Callable[[], bool] = _never) -> tuple[list[str], str]:
    """Read `stream` until its first piece to speak is whole, or `stop()`: (the deltas read, that piece)."""
    held = []
    for delta in stream:
        on_token()
        held.append(delta)
        if pieces := splitter.push(delta):
            return held, pieces[0]
        if stop():
            return held, ""
    return held, " ".join(splitter.flush())


def spoken_sentences(deltas, splitter: SentenceSplitter, max_sentences: int = 0) -> Iterator[str]:
    """The pieces of a streamed reply to speak, in order, until `max_sentences` whole sentences are out: the
    LLM stream is not read further (a spoken reply is a sentence or two, however long the model would go on)."""
    def pieces():
        for delta in deltas:
            yield from splitter.push(delta)
        yield from splitter.flush()

    said = ""
    for piece in pieces():
        yield piece
        said += " " + piece
        if max_sentences and complete_sentences(said) >= max_sentences:
            return


def spoken_reply(deltas, first_clause_words: int = 0, max_sentences: int = 0) -> str:
    """The reply text the engine would speak for an LLM stream (no TTS): for benchmarks of the replies."""
    pieces = spoken_sentences(deltas, SentenceSplitter(first_clause_words), max_sentences)
    return " ".join(t for p in pieces for t in [clean_for_speech(p).strip()] if t)
