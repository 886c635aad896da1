"""The session loop every transport drives: mic blocks in, the agent's voice out through a sink.

A transport (the sound card in `chat` and push-to-talk, a recorded session in replay, a browser page or a
Realtime client in `serve`) opens a session with `open_session(cfg, mode, sink, listeners=...)`, feeds it mic
blocks and calls its methods for what else it does (commit or clear the user's input, switch duplex or turn
detection, answer a typed message, cut the reply); it follows the conversation through typed events
(agent/events.py) like the session's own bundle does. It never reaches into the floor, the VAD or the worker.

    feed(t, block, keys)  record the block -> `Floor.step` (turn-taking) -> tell the listeners what it decided,
                          at the block's mic time (the recorder among them, so replay decides the same) ->
                          hand the utterances to the worker
    close(stopped)        answer and play what is pending (a stop abandons it), then close the bundle

Threads: the transport's thread runs `feed` and the other session methods, and with them the floor, including
the VAD's end-of-turn model (Smart Turn, ONNX Runtime) when it is on. The worker's thread (`Worker`) builds, warms
and runs the ASR, the LLM and the TTS, one utterance at a time; how it gets a thread is its `RunPolicy`: its own
thread (live), the server's one model thread (`serve`), or none, inline in the caller (fast replay: each
utterance is answered before the next block is fed, which keeps it deterministic).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.build import build_stages, endpointer
from agent.config import AgentConfig
from agent.conversation import Conversation
from agent.engine import Speculation, Stages, TurnEngine
from agent.events import (
    BargedIn,
    DuplexChanged,
    EchoHeard,
    InputCleared,
    InputCommitted,
    KeyAction,
    Listener,
    Listeners,
    MuteChanged,
    TurnDetectionChanged,
    TurnWithdrawn,
    UtteranceEnded,
)
from agent.floor import Floor, Step
from agent.metrics import session_summary, summary_table
from agent.session import MIC_RATE, SessionRecorder, new_bundle_dir
from agent.sinks import AudioSink
from pipelines.errors import VoiceAgentError
from pipelines.vad import Utterance

Log = Callable[[str], None]
STOPPED = "stopped before a turn was completed"


def session_meta(cfg: AgentConfig, mode: str, stages: Stages | None = None, **extra) -> dict:
    meta = {"mode": mode, "config": cfg.to_dict(), **extra}
    if stages is not None:
        meta["tts"] = stages.tts.describe()
        meta["tts_untrained"] = stages.tts.untrained
        # stand-ins of the fetched models (agent/scripted.py): random weights, teacher-forced on the session's script
        meta["asr_untrained"] = bool(getattr(stages.asr, "untrained", False))
        meta["llm_untrained"] = bool(getattr(stages.llm, "untrained", False))
    return meta


def finish(recorder: SessionRecorder | None, conversation: Conversation, log: Log, why: str | None = None) -> dict:
    """Report the session's latency (or `why` no turn was taken) and close its bundle."""
    turns = conversation.turns
    summary = session_summary([t.waterfall for t in turns])
    if turns:
        log(f"latency over {len(turns)} turns (ms after end of user speech):")
        log(summary_table(summary))
    elif why:
        log(f"no turn taken: {why}")
    if recorder is not None:
        written = recorder.finish(turns, summary)
        log(f"session bundle: {recorder.folder}" + (f" ({', '.join(written)})" if written else ""))
    return summary


# ---- what the session hands the worker (one queue, in order) ------------------------------------------------

@dataclass(frozen=True)
class Answer:
    utterance: Utterance
    text: str | None = None  # what the user typed instead of speaking (no ASR)
    n: int = 0  # the worker numbers its answers (what `withdraw` names)


@dataclass(frozen=True)
class Speculate:
    utterance: Utterance  # speech paused: answer ahead, the endpoint may confirm it


@dataclass(frozen=True)
class DropSpeculation:
    pass


@dataclass(frozen=True)
class Stop:
    pass


Work = Answer | Speculate | DropSpeculation | Stop


# ---- how the worker gets a thread --------------------------------------------------------------------------

class Inline:
    """No thread: the worker sets up and answers in the caller's thread (fast replay, deterministic)."""

    threaded = False

    def start(self, worker: Worker) -> None:
        worker.setup()
        worker.raise_error()

    def put(self, worker: Worker, work: Work) -> None:
        if not isinstance(work, Stop):
            worker.handle(work)
            worker.raise_error()


class OwnThread:
    """A thread of the worker's own, fed through its queue (live modes, paced replay)."""

    threaded = True

    def start(self, worker: Worker) -> None:
        threading.Thread(target=worker.run, name="model-owner", daemon=True).start()

    def put(self, worker: Worker, work: Work) -> None:
        worker.work.put(work)


class SharedThread(OwnThread):
    """A server's one model thread (an executor with one worker) that every conversation's worker runs on in
    turn: the models keep one owner, and no thread is made per connection (each new thread that runs the models
    leaves native memory behind: measured ~4.5 MB a connection)."""

    def __init__(self, executor):
        self.executor = executor

    def start(self, worker: Worker) -> None:
        self.executor.submit(worker.run)


RunPolicy = Inline | OwnThread | SharedThread


class Worker:
    """The model owner: builds the stages (or takes built ones), warms them up, then answers utterances one at
    a time on the thread its `RunPolicy` gives it.

    An utterance counts as outstanding from `answer()` until its reply has been played out (including what is
    still in the device's buffer), unless it was withdrawn: that is when the agent is "speaking" for
    half-duplex purposes. Speculation
    hints go through the same queue, but do not count as speaking. `outstanding` and `generation` are changed
    from the transport's thread and the worker's, under `_lock`.
    """

    def __init__(self, cfg: AgentConfig, sink: AudioSink, emit: Listener, log: Log,
                 open_recorder: Callable[[Stages], SessionRecorder | None], stages: Stages | None = None,
                 run: RunPolicy | None = None, echo_guard: bool = False):
        self.cfg, self.sink, self.emit, self.log = cfg, sink, emit, log
        self.open_recorder = open_recorder
        self.stages = stages  # built ones (a server's, loaded once), or None: built on the worker's thread
        self.run_policy = run or OwnThread()
        self.echo_guard = echo_guard
        self.recorder: SessionRecorder | None = None
        self.work: queue.Queue[Work] = queue.Queue()
        self.unheard = 0  # utterances the ASR found no words in
        self.ready = threading.Event()
        # set when run() ends: waited on instead of join(), which a Ctrl-C/SIGTERM interrupting it on Python 3.11
        # leaves reporting the thread as stopped while it still runs (the session would close under its turn)
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.engine: TurnEngine | None = None
        self._lock = threading.Lock()
        self._outstanding: set[int] = set()  # the answers handed over and not yet played out, by number
        self._generation = 0  # bumped by barge-in / cancel: the running turn sees it changed and stops
        self._answers = 0  # answers handed over
        self._withdrawn: set[int] = set()  # answers to turns the user went on with: nothing of them is kept
        self._speculation: Speculation | None = None  # the worker's thread only
        # the words' verdict on a pause, from the speculation (the worker's thread) to the floor: None = not judged
        self.judge: Callable[[Utterance, float], None] | None = None

    # -- the transport's side ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.run_policy.start(self)

    def wait_ready(self) -> None:
        """Wait for the models; a failure to build them is raised here."""
        self.ready.wait()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    @property
    def speaking(self) -> bool:
        """An utterance is queued, being answered, or its reply is still playing."""
        with self._lock:
            return bool(self._outstanding - self._withdrawn)

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def _put(self, work: Work) -> int:
        """Queue `work` (run it, inline); an answer's number, else 0."""
        if isinstance(work, Answer):
            with self._lock:
                self._answers += 1
                self._outstanding.add(self._answers)
                work = dataclasses.replace(work, n=self._answers)
        self.run_policy.put(self, work)
        return work.n if isinstance(work, Answer) else 0

    def answer(self, utterance: Utterance, text: str | None = None) -> int:
        """Hand an utterance over to be answered; returns its number (for `withdraw`)."""
        return self._put(Answer(utterance, text))

    def withdraw(self, n: int) -> None:
        """The user went on with the turn answer `n` was for: it stops (queued: it never starts), and nothing of
        it is kept."""
        with self._lock:
            self._withdrawn.add(n)
            self._generation += 1
        self.sink.barge_in()
        self._put(DropSpeculation())

    @property
    def inline(self) -> bool:
        """Answers run in the caller's thread (fast replay): each is over before the next block is fed."""
        return not self.run_policy.threaded

    def withdrawn(self, n: int) -> bool:
        with self._lock:
            return n in self._withdrawn

    def speculate(self, utterance: Utterance) -> None:
        self._put(Speculate(utterance))

    def drop_speculation(self) -> None:
        self._put(DropSpeculation())

    def barge_in(self) -> None:
        """Stop the reply under way: the running turn ends, keeping what the user heard."""
        with self._lock:
            self._generation += 1
        self.sink.barge_in()

    def cancel(self) -> None:
        """Drop the queued utterances and stop the running turn (Ctrl-C, SIGTERM, a page that left)."""
        while True:
            try:
                work = self.work.get_nowait()
            except queue.Empty:
                break
            if isinstance(work, Answer):
                with self._lock:
                    self._outstanding.discard(work.n)
        if self.engine is not None:
            self.engine.stop()  # at the next LLM token or TTS frame, and no context is prepared after it
        self.barge_in()

    def stop(self) -> None:
        """Answer what is queued, then end."""
        if self.run_policy.threaded:
            self.work.put(Stop())
        else:
            self.finished.set()

    # -- the worker's thread ------------------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.setup()
            if self.error is None:
                self._serve()
        finally:
            self.finished.set()

    def setup(self) -> None:
        try:
            if self.stages is None:
                stages = build_stages(self.cfg, log=self.log)
            else:  # a server's stages, loaded once: this session starts from an empty history, and wraps a copy
                self.stages.llm.reset()
                self.stages.llm.system_prompt = self.cfg.llm.system_prompt
                self.stages.llm.prepare_next_turn()  # the system prompt, before the first turn needs it
                stages = dataclasses.replace(self.stages)
            if self.judge is not None and not callable(getattr(stages.llm, "end_of_turn", None)):
                self.log("warning: this reply stage cannot judge the words (no end_of_turn); turns end on silence")
                self.judge = None
            if self.echo_guard:
                from agent.echo import guard_against_echo

                guard_against_echo(stages, self._heard_echo)
            self.engine = TurnEngine(stages, Conversation(), emit=self.emit, log=self.log,
                                     jitter_s=self.cfg.audio.jitter_ms / 1000)
            if self.stages is None:
                self.engine.warmup()
            self.recorder = self.open_recorder(stages)
        except BaseException as exc:  # reported by the transport's thread as one line
            self.error = exc
        finally:
            self.ready.set()

    def _heard_echo(self, text: str) -> None:
        self.log(f"(echo of the agent's own reply: {text!r}; no turn)")
        self.emit(EchoHeard(text))

    def _serve(self) -> None:
        while True:
            work = self.work.get()
            if isinstance(work, Stop):
                return
            self.handle(work)
            if self.error is not None:
                return

    def handle(self, work: Work) -> None:
        try:
            if isinstance(work, DropSpeculation):
                self._drop_speculation()
            elif isinstance(work, Speculate):  # stops early once anything else is queued
                self._drop_speculation()
                self._speculation = self.engine.speculate(work.utterance, cancelled=lambda: not self.work.empty(),
                                                          judge=self.judge)
            elif isinstance(work, Answer):
                self._answer(work)
        except BaseException as exc:
            self.error = exc
        finally:
            if isinstance(work, Answer):
                with self._lock:
                    self._outstanding.discard(work.n)

    def _drop_speculation(self) -> None:
        if self._speculation is not None:
            self._speculation.drop()
            self._speculation = None

    def _answer(self, work: Answer) -> None:
        gen = self.generation
        if work.text is not None:
            self._drop_speculation()  # a typed turn was never speculated on
        turn = self.engine.run_turn(work.utterance, self.sink, interrupted=lambda: self.generation != gen,
                                    speculation=self._speculation, text=work.text,
                                    withdrawn=lambda: self.withdrawn(work.n))
        self._speculation = None
        if turn is None and self.generation == gen:
            self.unheard += 1
        if self.sink.played_samples and self.generation == gen:
            time.sleep(min(self.sink.output_latency, 1.0))  # still in the device's buffer


class SessionLoop:
    """One conversation over a transport: its floor (turn-taking), its worker (the models), its listeners (the
    bundle among them). Every method but `close` runs on the transport's thread."""

    def __init__(self, cfg: AgentConfig, floor: Floor, worker: Worker | None, listeners: Listeners, log: Log):
        self.cfg, self.floor, self.worker, self.listeners, self.log = cfg, floor, worker, listeners, log
        self.sink = worker.sink if worker is not None else None  # no worker: the session only listens
        self._verdicts: queue.SimpleQueue[tuple[float, float]] = queue.SimpleQueue()  # (pause's end_s, probability)
        self._held: list[Utterance] = []  # fast replay: turns the words ended, answered once they can't go on
        self._open_answer: int | None = None  # the answer to a turn the words ended, while it may go on
        if worker is not None and cfg.vad.words and not floor.push_to_talk:
            worker.judge = self._verdict

    def _verdict(self, utterance: Utterance, probability: float) -> None:
        """The words' verdict on a pause (the worker's thread): applied by the floor at the next block."""
        self._verdicts.put((utterance.end_s, probability))

    # -- starting ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Build (or borrow) and warm the models, open the bundle, and put the sink at the TTS's rate (blocking:
        a transport on an event loop calls it off the loop). A failure to build is raised here."""
        self.worker.start()
        self.worker.wait_ready()
        self.sink.set_sample_rate(self.engine.stages.tts.sample_rate)

    @property
    def engine(self) -> TurnEngine:
        return self.worker.engine

    @property
    def conversation(self) -> Conversation:
        return self.worker.engine.conversation

    @property
    def recorder(self) -> SessionRecorder | None:
        return self.worker.recorder if self.worker is not None else None

    @property
    def bundle(self) -> Path | None:
        return self.recorder.folder if self.recorder is not None else None

    @property
    def error(self) -> BaseException | None:
        return self.worker.error

    # -- what a transport asks --------------------------------------------------------------------------------

    @property
    def speaking(self) -> bool:
        """The agent is answering or still audible: what half-duplex mutes the VAD for."""
        return self.worker is not None and (self.worker.speaking or self.sink.is_playing)

    @property
    def in_speech(self) -> bool:
        """The user is speaking (or holds the push-to-talk key)."""
        return self.floor.in_speech

    @property
    def spoke(self) -> bool:
        """Did the user begin any utterance?"""
        return self.floor.started > 0

    def why_silent(self) -> str:
        return self.floor.why_silent(self.worker.unheard)

    # -- what a transport does --------------------------------------------------------------------------------

    def feed(self, t: float, block: np.ndarray, keys: Sequence[str] = (), answer: bool = True) -> Step:
        """One mic block starting at mic time `t`, with the push-to-talk key actions due at it. With `answer`
        off, the utterances the floor ends are left to the caller (a transport that answers on request: it
        hears them as `UtteranceEnded` events, and calls `answer`)."""
        recorder = self.recorder
        if recorder is not None:
            recorder.write_mic(block)
        self._judged(t, answer)
        step = self.floor.step(t, block, list(keys), self.speaking, MIC_RATE, audible=self._audible)
        self._hand_over(step, t, answer)
        if not self.floor.vad.reopenable:  # fast replay: the turn can't go on now
            self._release_held()
        return step

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for utterance in held:
            self.worker.answer(utterance)

    @property
    def _audible(self) -> bool:
        """The agent's voice is heard: its utterance has begun to play (not merely begun while the reply is still
        being written and synthesised)."""
        return self.sink is not None and self.sink.is_playing and self.sink.played_samples > 0

    def _judged(self, t: float, answer: bool = True) -> None:
        """Apply the words' verdicts that came back (each may end the turn at its pause)."""
        while not self._verdicts.empty():
            end_s, probability = self._verdicts.get()
            self._hand_over(self.floor.judge(t, end_s, probability), t, answer)

    def _hand_over(self, step: Step, t: float, answer: bool = True) -> None:
        """Tell the listeners what the floor decided at mic time `t` (mute changes and keys first: what replay
        re-applies), then pass it to the worker."""
        emit, worker = self.listeners.emit, self.worker
        if step.mute is not None:
            emit(MuteChanged(t, step.mute))
        for action in step.keys:
            emit(KeyAction(t, action))
        if worker is not None:
            if step.drop_speculation:
                worker.drop_speculation()
            if step.speculate is not None:
                worker.speculate(step.speculate)
            if step.barge_in:
                worker.barge_in()
        if step.barge_in:
            emit(BargedIn(t))
        for event in step.events:
            emit(event)
        if step.reopened and worker is not None:
            self._withdraw()
        for utterance in step.utterances if answer and worker is not None else ():
            if utterance.reason == "words" and self.floor.vad.reopenable and worker.inline:
                self._held.append(utterance)  # answered inline it would be spoken before the user could go on
                continue
            n = worker.answer(utterance)
            self._open_answer = n if utterance.reason == "words" and self.floor.vad.reopenable else None
        if worker is not None and step.speculate is not None and worker.inline:
            self._judged(t, answer)  # inline: the verdict is in already

    def _withdraw(self) -> None:
        """The user went on with the turn the words ended: its answer is withdrawn (or never given)."""
        for utterance in self._held:
            self.listeners.emit(TurnWithdrawn(utterance.start_s))
        if self._held:
            self._held = []
            self.worker.drop_speculation()
        elif self._open_answer is not None:
            self.worker.withdraw(self._open_answer)
        self._open_answer = None

    def commit(self, t: float, answer: bool = True) -> list[Utterance]:
        """The transport ends the user's turn now: the speech so far is the utterance (push-to-talk: the key is
        released). Returns the utterances ended (none when nobody was speaking)."""
        self.listeners.emit(InputCommitted(t))
        if self.floor.push_to_talk:
            return self.feed(t, np.zeros(0, np.float32), ["release"], answer=answer).utterances
        step = self.floor.flush(t)
        self._hand_over(step, t, answer)
        return step.utterances

    def clear(self, t: float) -> None:
        """The transport drops the user's speech so far: nothing of it is answered."""
        self.floor.clear()
        self.listeners.emit(InputCleared(t))

    def set_duplex(self, t: float, full: bool, echo_cancellation: bool | None = None) -> None:
        """Full duplex (the user may talk over the agent) or half (the VAD is muted while the agent speaks)."""
        self.floor.set_duplex(full)
        self.listeners.emit(DuplexChanged(t, full, echo_cancellation))

    def set_turn_detection(self, t: float, on: bool) -> None:
        """The VAD ends turns (and speech cuts a reply), or the transport's commit does. Between turns only."""
        if self.floor.in_speech:
            raise VoiceAgentError("turn detection can change only between turns")
        self.floor.set_endpointing(endpointer(self.cfg, endpointing=on, log=self.log), on)
        self.listeners.emit(TurnDetectionChanged(t, on))

    def answer(self, utterance: Utterance) -> None:
        """Answer an utterance the floor ended (a transport that holds them until asked)."""
        self.worker.answer(utterance)

    def answer_text(self, text: str, t: float) -> None:
        """A turn the user typed at mic time `t`: answered like speech, without the ASR."""
        empty = np.zeros(0, np.float32)
        self.worker.answer(Utterance(audio=empty, start_s=t, end_s=t, decided_s=t, reason="text", audio_start_s=t),
                           text)

    def interrupt(self, t: float) -> None:
        """Cut the reply under way (a client's cancel): the turn keeps what the user heard."""
        self.worker.barge_in()
        self.listeners.emit(BargedIn(t))

    def set_instructions(self, text: str) -> None:
        """The reply model's system prompt from the next turn on (a session not started yet has no model)."""
        if self.worker is not None and self.worker.engine is not None:
            self.worker.engine.stages.llm.system_prompt = text

    def flush(self, t: float) -> None:
        """End of input: an utterance still open is answered too."""
        self._hand_over(self.floor.flush(t), t)
        self._release_held()

    def cancel(self) -> None:
        self.worker.cancel()

    def close(self, stopped: bool = False, abandon: bool = False) -> tuple[dict, bool]:
        """Answer and play what is pending, then close the bundle. A stop (Ctrl-C here, or `stopped`) abandons
        what is pending and says so; `abandon` drops it without calling the session stopped (the listener left:
        nobody is there to hear it). Returns the summary and whether the session was stopped."""
        worker = self.worker
        if stopped or abandon:
            worker.cancel()
        worker.stop()
        try:
            worker.finished.wait()
        except KeyboardInterrupt:
            if not stopped:
                self.log("stopping...")
            stopped = True
            worker.cancel()
            worker.stop()  # the cancel dropped the stop queued above
            worker.finished.wait(timeout=10)
        if worker.engine is None:
            return {}, stopped
        why = STOPPED if stopped else self.why_silent()
        return finish(worker.recorder, worker.engine.conversation, self.log, why), stopped


def open_session(cfg: AgentConfig, mode: str, sink: AudioSink | None, *, listeners: Sequence[Listener] = (),
                 push_to_talk: bool = False, half_duplex: bool | None = None, barge_in: bool | None = None,
                 echo_guard: bool | None = None,
                 mutes: list[tuple[float, float]] | None = None, stages: Stages | None = None,
                 run: RunPolicy | None = None, out: Path | None = None, listen_only: bool = False, log: Log = print,
                 meta: dict | None = None) -> SessionLoop:
    """The one way a transport opens a conversation: its floor, its worker and its bundle, wired to `listeners`.

    `half_duplex` (the VAD is muted while the agent speaks) and `barge_in` (the user's speech cuts the reply):
    the config's (`audio.*`) unless given. `echo_guard` (default: on with barge-in): an utterance that is the
    agent's own last reply heard back is no turn. `mutes`: replay's recorded mute spans. `stages`: models already
    built (a server's); otherwise the worker builds them. `out`: the bundle's folder (default: a new one under
    `session.dir` when `session.record`); `meta` goes into its session.json (with the mode, the config and what
    the TTS is). `listen_only`: no models and no bundle, only turn-taking (see `listen`). Call `start()` on the
    result before feeding it."""
    half_duplex = cfg.audio.half_duplex if half_duplex is None else half_duplex
    barge_in = cfg.audio.barge_in if barge_in is None else barge_in
    floor = Floor(endpointer(cfg, endpointing=not push_to_talk, log=log), push_to_talk=push_to_talk,
                  half_duplex=half_duplex, barge_in=barge_in, mutes=mutes)
    fanout = Listeners(*listeners)
    if listen_only:
        return SessionLoop(cfg, floor, None, fanout, log)

    def open_recorder(stages: Stages) -> SessionRecorder | None:  # on the worker's thread, once the stages are built
        if not cfg.session.record and out is None:
            return None
        folder = out or new_bundle_dir(cfg.resolve(cfg.session.dir), mode)
        recorder = SessionRecorder(folder, session_meta(cfg, mode, stages, **(meta or {})), warn=log)
        fanout.add(recorder.listen, first=True)  # written before any transport tells its client
        return recorder

    worker = Worker(cfg, sink, fanout.emit, log, open_recorder, stages=stages, run=run,
                    echo_guard=barge_in if echo_guard is None else echo_guard)
    return SessionLoop(cfg, floor, worker, fanout, log)


def listen(cfg: AgentConfig, blocks: Iterable[tuple[float, np.ndarray, list[str]]], push_to_talk: bool = False,
           mutes: list[tuple[float, float]] | None = None) -> Iterator[Utterance]:
    """Turn-taking alone, as a session does it: the utterances the floor ends for these (mic time, block, keys),
    in order, with no model loaded (where replay would end each turn)."""
    ended: list[Utterance] = []
    def heard(event) -> None:
        if isinstance(event, UtteranceEnded):
            ended.append(event.utterance)

    loop = open_session(cfg, "listen", None, listeners=[heard], push_to_talk=push_to_talk, mutes=mutes,
                        listen_only=True)
    end = 0.0
    for t, block, keys in blocks:
        loop.feed(t, block, keys)
        end = t + len(block) / MIC_RATE
        yield from ended
        ended.clear()
    loop.flush(end)
    yield from ended
