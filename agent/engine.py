"""The turn engine: one user utterance in, one spoken reply out, the same for every mode.

utterance -> ASR -> LLM (streamed) -> sentences -> Marvis (streamed, with the conversation as context)
-> audio sink. All MLX work happens in the thread that calls `run_turn` (the modes give it one owner
thread), never in an audio callback. Each sentence gets the earlier sentences of the same reply as
context too, so the voice holds within a reply as well as across turns.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from agent.conversation import Conversation, Turn
from agent.events import (
    Listener,
    ReplyKeptOut,
    ReplyStarted,
    ReplyText,
    Said,
    Speculated,
    SpeculationDropped,
    SpeculationKept,
    Transcribed,
    TurnEnded,
)
from agent.metrics import Waterfall, audio_ahead, playback_stalls, summary_line
from agent.sinks import AudioSink
from pipelines.llm.form import complete_sentences, reply_problems
from pipelines.llm.sentences import SentenceSplitter, clean_for_speech, split_to_fit
from pipelines.messages import ASRStage, ReplyStage, Segment, TTSStage
from pipelines.tts.load import TTSConfig
from pipelines.tts.prompt import FRAME_MS, chars_that_fit, frame_cap
from pipelines.vad import Utterance


@dataclass
class Stages:
    asr: ASRStage
    llm: ReplyStage
    tts: TTSStage
    tts_config: TTSConfig  # sampling knobs, the agent's and the user's voices, how much context to pass
    first_clause_words: int = 0  # a long first sentence may start speaking at a clause break (0: sentences only)
    max_sentences: int = 0  # a reply is spoken up to this many sentences; the LLM stops there (0: no limit)


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

    def prebuffer_s(self, text: str, cfg: TTSConfig) -> float:
        """Audio to buffer before playback starts, from the TTS's measured frame rate and how long this first
        sentence may run: nothing beyond `jitter_s` when the TTS is faster than real time; otherwise the time
        it falls behind over the sentence, so that a sentence that can be spoken without a gap is."""
        tts = self.stages.tts
        if getattr(tts, "frame_seconds", None) is None:
            return self.jitter_s
        per_frame = tts.frame_seconds + tts.decode_seconds / cfg.chunk_frames
        frame_s = FRAME_MS / 1000
        frames = frame_cap(clean_for_speech(text), cfg.max_audio_length_ms, cfg.frames_per_char, cfg.min_text_frames)
        return max(self.jitter_s, (per_frame / frame_s - 1.0) * frames * frame_s)

    def warmup(self) -> None:
        for stage in (self.stages.asr, self.stages.llm, self.stages.tts):
            stage.warmup()

    def _reply(self, transcript: str) -> Iterator[str]:
        """The LLM's reply stream, each piece told to the listeners as it is generated."""
        self.emit(ReplyStarted())
        for delta in self.stages.llm.stream(transcript):
            self.emit(ReplyText(delta))
            yield delta

    def speculate(self, utterance: Utterance, cancelled: Callable[[], bool] = lambda: False) -> Speculation:
        """Transcribe what was said so far and run the LLM until its first sentence is ready (text only)."""
        st = self.stages
        started = self.clock()
        transcript = st.asr.transcribe(utterance.audio, utterance.sample_rate).text.strip()
        spec = Speculation(utterance, transcript, None, [], started, {"asr_final": self.clock()})
        if transcript and not cancelled():
            spec.replies = self._reply(transcript)
            splitter = SentenceSplitter(st.first_clause_words)
            for delta in spec.replies:
                spec.marks.setdefault("llm_first_token", self.clock())
                spec.deltas.append(delta)
                if splitter.push(delta) or cancelled() or self.stopping.is_set():
                    break
            else:
                spec.done = True
        self.emit(Speculated(utterance.start_s, utterance.end_s, transcript, round((self.clock() - started) * 1000, 1)))
        return spec

    def run_turn(self, utterance: Utterance, sink: AudioSink, interrupted: Callable[[], bool] = lambda: False,
                 speculation: Speculation | None = None, text: str | None = None) -> Turn | None:
        """Answer one utterance. Returns None when the ASR heard no words (no turn is taken).

        `text` is what the user typed instead (a Realtime client's text message): no ASR, and the turn has no
        user audio for the TTS context (`utterance` then only gives the turn its times).

        With a matching `speculation`, its transcript and LLM output are used instead of being recomputed. The
        waterfall then counts from when the endpoint would have been decided had the speculation run in parallel
        with the stream (as it does live): work finished by then costs nothing, the rest shows.
        """
        st = self.stages
        barged_in = interrupted
        interrupted = lambda: barged_in() or self.stopping.is_set()  # noqa: E731
        if speculation is not None and not speculation.matches(utterance):
            speculation.drop()
            self.emit(SpeculationDropped(speculation.utterance.start_s))
            speculation = None
        if speculation is not None:
            # the endpoint came (decided_s - end_s) after the speculation started, on the stream clock
            decided = speculation.started_wall + (utterance.decided_s - speculation.utterance.decided_s)
            now = self.clock()
            shift = max(0.0, decided - now)  # a fast replay got here sooner than a live stream would
            clock = lambda: self.clock() + shift  # noqa: E731
            self.emit(SpeculationKept(utterance.start_s))
        else:
            decided, clock = self.clock(), self.clock
        wf = Waterfall(utterance.decided_s - utterance.end_s, decided)
        if text is not None:
            transcript = text.strip()
            wf.mark("asr_final", clock())
        elif speculation is not None:
            transcript = speculation.transcript
            for stage, wall in speculation.marks.items():
                wf.mark(stage, max(wall, decided))
        else:
            transcript = st.asr.transcribe(utterance.audio, utterance.sample_rate).text.strip()
            wf.mark("asr_final", clock())
        self.emit(Transcribed(transcript, utterance.start_s, utterance.end_s, utterance.decided_s, utterance.reason))
        if not transcript:
            self.log("(heard no words; no turn taken)")
            return None
        turn = self.conversation.new_turn(transcript)
        self.log(f"you   > {transcript}")
        context, turn.context_turns = self.conversation.context(st.tts_config.context_segments)
        sink.on_first_sample = lambda wall: wf.mark("first_sample_played", wall + (clock() - self.clock()))
        sink.begin_utterance()

        splitter = SentenceSplitter(st.first_clause_words)
        spoken: list[tuple[str, np.ndarray, np.ndarray]] = []  # sentence, audio, codes
        timeline: list[tuple[float, int]] = []  # (wall time a chunk was ready, its samples)
        tts_wall = [0.0]  # seconds spent in the TTS stream, for the RTF the reply achieved
        prebuffer: list[float] = []  # the playback buffer chosen at the reply's first chunk
        cfg = dataclasses.replace(st.tts_config, seed=st.tts_config.seed + turn.index)
        agent_speaker, user_speaker = cfg.speaker, cfg.user_speaker
        stopped = False

        room = chars_that_fit(cfg.max_audio_length_ms, cfg.frames_per_char, cfg.min_text_frames)

        def speak(sentence: str) -> None:
            # a sentence longer than one utterance's frame cap is spoken in pieces, never cut off by the cap
            for text in split_to_fit(clean_for_speech(sentence), room):
                if text and not stopped and not interrupted():
                    say(text)

        def say(text: str) -> None:
            nonlocal stopped
            wf.mark("first_sentence", clock())
            self.emit(Said(text))
            own = [Segment(agent_speaker, s, codes=c) for s, _, c in spoken]
            audio_parts, code_parts = [], []
            began = self.clock()
            # a later sentence starts while the earlier ones still play: its chunks can be long from the start
            queued = (lambda: audio_ahead(timeline, st.tts.sample_rate, prebuffer[0], clock())) if prebuffer else None
            for chunk in st.tts.stream(text, agent_speaker, context + own, config=cfg, cancelled=interrupted,
                                       ahead=queued):
                ready = clock()
                wf.mark("first_tts_chunk", ready)
                if interrupted():
                    stopped = True
                    break
                if not prebuffer:
                    prebuffer.append(self.prebuffer_s(text, cfg))
                    sink.set_prebuffer(prebuffer[0])
                timeline.append((ready, chunk.audio.size))
                sink.write(chunk.audio)
                audio_parts.append(chunk.audio)
                code_parts.append(chunk.codes)
            tts_wall[0] += self.clock() - began
            if audio_parts:
                spoken.append((text, np.concatenate(audio_parts), np.concatenate(code_parts, axis=1)))

        if speculation is not None:
            if speculation.replies is None and not speculation.done:  # cancelled before the LLM started
                speculation.replies = self._reply(transcript)
            deltas = itertools.chain(speculation.deltas, speculation.replies or ())
        else:
            deltas = self._reply(transcript)
        def marked(deltas):
            nonlocal stopped
            for delta in deltas:
                wf.mark("llm_first_token", clock())
                yield delta
                if stopped or interrupted():
                    stopped = True
                    return

        for sentence in spoken_sentences(marked(deltas), splitter, st.max_sentences):
            speak(sentence)
        if speculation is not None:
            speculation.drop()
        sink.end_of_stream()

        if stopped or interrupted():
            turn.interrupted = True
            played = sink.clear()
            spoken = _truncate_to_played(spoken, played, st.tts.samples_per_frame)
        turn.reply = " ".join(s for s, _, _ in spoken)
        self.log(f"agent > {turn.reply}" + (" [interrupted]" if turn.interrupted else ""))
        if utterance.audio.size:
            turn.user = Segment(user_speaker, transcript, utterance.audio, utterance.sample_rate)
        if spoken:
            turn.agent = Segment(agent_speaker, turn.reply, np.concatenate([a for _, a, _ in spoken]),
                                 st.tts.sample_rate, codes=np.concatenate([c for _, _, c in spoken], axis=1))
        window = getattr(st.llm, "max_history_turns", 0)  # the replies the LLM could copy from its history
        earlier = [t.reply for t in self.conversation.turns[-window:]] if window else []
        problems = reply_problems(turn.reply, earlier) if turn.reply else []
        if problems:  # kept out of the LLM's history: a small model copies its own slips into later turns
            self.emit(ReplyKeptOut(problems))
        else:
            st.llm.commit(transcript, turn.reply)
        turn.waterfall = wf.offsets()
        if timeline and not turn.interrupted:
            turn.waterfall.update(playback_stalls(timeline, st.tts.sample_rate, prebuffer[0]))
            turn.waterfall["prebuffer_ms"] = round(prebuffer[0] * 1000.0, 1)
            audio_s = sum(n for _, n in timeline) / st.tts.sample_rate
            turn.waterfall["tts_rtf"] = round(tts_wall[0] / audio_s, 3)
        self.conversation.append(turn)
        self._finish(turn)
        if self.stopping.is_set():
            return turn
        # get the next turn's context ready now (Mimi-encode the user's audio, prefill the new rows), while
        # the reply plays and the user thinks, instead of inside the next turn's latency
        st.tts.prepare_context(self.conversation.context(st.tts_config.context_segments)[0])
        return turn

    def _finish(self, turn: Turn) -> None:
        self.log("  " + summary_line(turn.index, turn.waterfall))
        self.emit(TurnEnded(turn))


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


def _truncate_to_played(spoken, played_samples: int, samples_per_frame: int):
    """Keep only what the user heard: whole sentences, and the played part of the one cut off."""
    kept, left = [], played_samples
    for text, audio, codes in spoken:
        if left <= 0:
            break
        n = min(len(audio), left)
        frames = -(-n // samples_per_frame)
        kept.append((text, audio[:n], codes[:, :frames]))
        left -= n
    return kept
