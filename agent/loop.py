"""The session loop every front end drives: mic blocks in, the agent's voice out through a sink.

A transport (the sound card in `chat` and push-to-talk, a recorded session in replay, a browser page in
`serve`) only feeds mic blocks and provides an `agent.sinks.AudioSink`; `SessionLoop` does the rest, the same
way for all of them:

    feed(t, block, keys)  record the block -> `Floor.step` (turn-taking) -> record what it decided at the
                          block's mic time (so replay of the bundle decides the same) -> hand it to the worker
    close(stopped)        answer and play what is pending (a stop abandons it), then close the bundle

`Worker` owns the models: every MLX/ONNX call runs on its thread (built, warmed up and run there), one
utterance at a time; the transport's thread only moves blocks. Fast replay runs the worker inline instead
(`threaded=False`): each utterance is answered before the next block is fed, which keeps it deterministic.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.build import build_stages
from agent.config import AgentConfig
from agent.conversation import Conversation
from agent.engine import Stages, TurnEngine
from agent.events import Listeners
from agent.floor import Floor, Step
from agent.metrics import session_summary, summary_table
from agent.session import MIC_RATE, SessionRecorder, new_bundle_dir
from agent.sinks import AudioSink
from pipelines.vad import Utterance

Log = Callable[[str], None]
STOPPED = "stopped before a turn was completed"


def session_meta(cfg: AgentConfig, mode: str, stages: Stages | None = None, **extra) -> dict:
    meta = {"mode": mode, "config": cfg.to_dict(), **extra}
    if stages is not None:
        meta["tts"] = stages.tts.describe()
        meta["tts_untrained"] = stages.tts.untrained
    return meta


def open_recorder(cfg: AgentConfig, mode: str, out: Path | None, stages: Stages, log: Log,
                  recorder_class=SessionRecorder, **meta) -> SessionRecorder | None:
    """The session's bundle: `out`, or a new folder under `session.dir`; None when recording is off."""
    if not cfg.session.record and out is None:
        return None
    folder = out or new_bundle_dir(cfg.resolve(cfg.session.dir), mode)
    return recorder_class(folder, session_meta(cfg, mode, stages, **meta), warn=log)


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


class Worker(threading.Thread):
    """The model owner: builds the stages (or takes built ones), warms them up, then answers utterances one at
    a time.

    An utterance counts as outstanding from `submit()` until its reply has been played out (including what
    is still in the device's buffer): that is when the agent is "speaking" for half-duplex purposes.
    Speculation hints (speech paused / resumed) go through the same queue, but do not count as speaking.
    `prepare(stages)` may wrap the stages for this session (the echo guard, the page's narration) and returns
    the session's recorder.
    """

    def __init__(self, cfg: AgentConfig, sink: AudioSink, prepare: Callable[[Stages], SessionRecorder | None],
                 log: Log, stages: Stages | None = None, threaded: bool = True,
                 on_event=None, owner=None):
        super().__init__(name="model-owner", daemon=True)
        self.cfg, self.sink, self.log = cfg, sink, log
        self.prepare = prepare
        self.stages = stages  # built ones (a server's, loaded once), or None: built on this thread
        self.threaded = threaded
        # a server's one model thread (an executor with one worker), which every conversation's worker runs on in
        # turn: the models keep one owner, and no thread is made per connection (each new thread that runs the
        # models leaves native memory behind: measured ~4.5 MB a connection)
        self.owner = owner
        self.on_event = on_event  # the engine's events, as they happen (on this thread)
        self.recorder: SessionRecorder | None = None
        # ("turn" | "speculate", utterance), ("text", (utterance, text)), ("drop", None), ("stop", None)
        self.work: queue.Queue = queue.Queue()
        self.outstanding = 0  # turns submitted and not yet played out
        self.unheard = 0  # utterances the ASR found no words in
        self.ready = threading.Event()
        # set when run() ends: waited on instead of join(), which a Ctrl-C/SIGTERM interrupting it on Python 3.11
        # leaves reporting the thread as stopped while it still runs (the session would close under its turn)
        self.finished = threading.Event()
        self.generation = 0  # bumped by barge-in / cancel: the running turn sees it changed and stops
        self.error: BaseException | None = None
        self.engine: TurnEngine | None = None
        self._speculation = None

    def start(self) -> None:
        if self.threaded and self.owner is not None:
            self.owner.submit(self.run)
        elif self.threaded:
            super().start()
        else:
            self._setup()
            if self.error is not None:
                raise self.error

    def wait_ready(self) -> None:
        """Wait for the models; a failure to build them is raised here."""
        self.ready.wait()
        if self.error is not None:
            raise self.error

    @property
    def speaking(self) -> bool:
        """An utterance is queued, being answered, or its reply is still playing."""
        return self.outstanding > 0

    def _put(self, kind: str, utterance: Utterance | None) -> None:
        if self.threaded:
            self.work.put((kind, utterance))
        else:
            self._handle(kind, utterance)
            if self.error is not None:
                raise self.error

    def submit(self, utterance: Utterance) -> None:
        self.outstanding += 1
        self._put("turn", utterance)

    def submit_text(self, text: str, t: float) -> None:
        """A turn the user typed (at mic time `t`): answered like speech, without the ASR."""
        self.outstanding += 1
        empty = np.zeros(0, np.float32)
        self._put("text", (Utterance(audio=empty, start_s=t, end_s=t, decided_s=t, reason="text",
                                     audio_start_s=t), text))

    def speculate(self, utterance: Utterance) -> None:
        self._put("speculate", utterance)

    def drop_speculation(self) -> None:
        self._put("drop", None)

    def barge_in(self) -> None:
        """Stop the reply under way: the running turn ends, keeping what the user heard."""
        self.generation += 1
        self.sink.barge_in()

    def cancel(self) -> None:
        """Drop the queued utterances and stop the running turn (Ctrl-C, SIGTERM, a page that left)."""
        while True:
            try:
                kind, _ = self.work.get_nowait()
            except queue.Empty:
                break
            self.outstanding -= kind in ("turn", "text")
        if self.engine is not None:
            self.engine.stop()  # at the next LLM token or TTS frame, and no context is prepared after it
        self.barge_in()

    def stop(self) -> None:
        """Answer what is queued, then end."""
        if self.threaded:
            self.work.put(("stop", None))
        else:
            self.finished.set()

    def run(self) -> None:
        try:
            self._setup()
            if self.error is None:
                self._serve()
        finally:
            self.finished.set()

    def _setup(self) -> None:
        try:
            if self.stages is None:
                stages = build_stages(self.cfg, log=self.log)
            else:  # a server's stages, loaded once: this session starts from an empty history, and wraps a copy
                self.stages.llm.reset()
                self.stages.llm.system_prompt = self.cfg.llm.system_prompt
                stages = dataclasses.replace(self.stages)
            self.engine = TurnEngine(stages, Conversation(), log=self.log, jitter_s=self.cfg.audio.jitter_ms / 1000)
            if self.stages is None:
                self.engine.warmup()
            self.recorder = self.prepare(stages)
            self.engine.emit = Listeners(self.recorder.listen if self.recorder is not None else None, self.on_event)
        except BaseException as exc:  # reported by the transport's thread as one line
            self.error = exc
        finally:
            self.ready.set()

    def _serve(self) -> None:
        while True:
            kind, utterance = self.work.get()
            if kind == "stop":
                return
            self._handle(kind, utterance)
            if self.error is not None:
                return

    def _handle(self, kind: str, utterance: Utterance | None) -> None:
        try:
            if kind == "drop" and self._speculation is not None:
                self._speculation.drop()
                self._speculation = None
            elif kind == "speculate":  # stops early once anything else is queued
                self._speculation = self.engine.speculate(utterance, cancelled=lambda: not self.work.empty())
            elif kind in ("turn", "text"):
                gen = self.generation
                text = None
                if kind == "text":
                    utterance, text = utterance
                    if self._speculation is not None:
                        self._speculation.drop()
                        self._speculation = None
                turn = self.engine.run_turn(utterance, self.sink, interrupted=lambda: self.generation != gen,
                                            speculation=self._speculation, text=text)
                self.unheard += turn is None and self.generation == gen
                self._speculation = None
                if self.sink.played_samples and self.generation == gen:
                    time.sleep(min(self.sink.output_latency, 1.0))  # still in the device's buffer
        except BaseException as exc:
            self.error = exc
        finally:
            self.outstanding -= kind in ("turn", "text")


class SessionLoop:
    """One conversation over a transport: its floor (turn-taking), its worker (the models), its bundle."""

    def __init__(self, cfg: AgentConfig, floor: Floor, worker: Worker, log: Log):
        self.cfg, self.floor, self.worker, self.log = cfg, floor, worker, log

    @property
    def speaking(self) -> bool:
        """The agent is answering or still audible: what half-duplex mutes the VAD for."""
        return self.worker.speaking or self.worker.sink.is_playing

    def feed(self, t: float, block, keys: list[str] = (), answer: bool = True) -> Step:
        """One mic block starting at mic time `t`, with the push-to-talk key actions due at it. With `answer`
        off, the step's utterances are left to the caller (a transport that answers on request)."""
        recorder = self.worker.recorder
        if recorder is not None:
            recorder.write_mic(block)
        step = self.floor.step(t, block, list(keys), self.speaking, MIC_RATE)
        self.hand_over(step, t, answer)
        return step

    def hand_over(self, step: Step, t: float, answer: bool = True) -> None:
        """Record a floor decision at mic time `t` (mute changes, keys, barge-in: what replay re-applies), then
        pass it to the worker."""
        recorder, worker = self.worker.recorder, self.worker
        if recorder is not None:
            if step.mute is not None:
                recorder.event("mute", t=t, on=step.mute)
            for action in step.keys:
                recorder.event("key", t=t, action=action)
        if step.drop_speculation:
            worker.drop_speculation()
        if step.speculate is not None:
            worker.speculate(step.speculate)
        if step.barge_in:
            worker.barge_in()
            if recorder is not None:
                recorder.event("barge_in", t=t)
        for utterance in step.utterances if answer else ():
            worker.submit(utterance)

    def flush(self, t: float) -> None:
        """End of input: an utterance still open is answered too."""
        self.hand_over(self.floor.flush(), t)

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
        why = STOPPED if stopped else self.floor.why_silent(worker.unheard)
        return finish(worker.recorder, worker.engine.conversation, self.log, why), stopped
