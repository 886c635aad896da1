"""The three ways to talk to the agent, over one turn engine.

- replay: a recorded session (or audio files) through the same VAD path, as fast as possible or paced
  like a mic (`realtime`), deterministic for a given seed.
- hands-free: PortAudio mic -> VAD endpointing -> turns; half-duplex by default.
- push-to-talk: a key starts and ends each turn; VAD endpointing is off.
Who holds the floor is decided in one place, `agent.floor.Floor`, for live and replay alike.
Threads: audio callbacks only copy samples; one worker thread owns every MLX call (models are built,
warmed up and run there); the main thread moves mic blocks into the floor and the recorder. `--realtime`
replay runs the same way, on the stream clock: audio keeps coming while a turn is answered, as from a mic.
Fast replay answers each utterance before feeding on, which keeps it deterministic for a seed.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.build import build_stages, endpointer
from agent.config import AgentConfig
from agent.conversation import Conversation
from agent.devices import ReplaySink
from agent.engine import TurnEngine
from agent.floor import Floor, Step
from agent.metrics import session_summary, summary_table
from agent.session import (MIC_RATE, SessionData, SessionRecorder, check_new_bundle, load_replay_source,
                           new_bundle_dir)
from pipelines.audio import resample
from pipelines.vad import Utterance

Log = Callable[[str], None]


MIC_STALL_S = 10.0  # no mic block for this long: the device has stopped (unplugged, stream died)
DEAD_MIC_S = 3.0  # only exact zeros for this long: a muted or denied microphone
STOPPED = "stopped before a turn was completed"


@dataclass
class RunResult:
    bundle: Path | None
    conversation: Conversation
    summary: dict


def _meta(cfg: AgentConfig, mode: str, stages=None, **extra) -> dict:
    meta = {"mode": mode, "config": cfg.to_dict(), **extra}
    if stages is not None:
        meta["tts"] = stages.tts.describe()
        meta["tts_untrained"] = stages.tts.untrained
    return meta


def _open_recorder(cfg: AgentConfig, mode: str, out: Path | None, stages, log: Log) -> SessionRecorder | None:
    if not cfg.session.record and out is None:
        return None
    folder = out or new_bundle_dir(cfg.resolve(cfg.session.dir), mode)
    return SessionRecorder(folder, _meta(cfg, mode, stages), warn=log)


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


def _record_step(recorder: SessionRecorder | None, t: float, step: Step) -> None:
    """A step's mute change and keys, at the mic time of the block they apply to: what replay re-applies."""
    if recorder is None:
        return
    if step.mute is not None:
        recorder.event("mute", t=t, on=step.mute)
    for action in step.keys:
        recorder.event("key", t=t, action=action)


def _replay_floor(cfg: AgentConfig, data: SessionData) -> Floor:
    vad = endpointer(cfg, endpointing=not data.keys)
    return Floor(vad, push_to_talk=bool(data.keys), half_duplex=cfg.audio.half_duplex,
                 barge_in=cfg.audio.barge_in, mutes=data.mutes)


def _replay_steps(cfg: AgentConfig, data: SessionData, floor: Floor, recorder: SessionRecorder | None = None,
                  progress: bool = False, speaking: Callable[[], bool] = lambda: False
                  ) -> Iterator[tuple[float, Step]]:
    """Feed a session's mic audio block by block to the floor, re-applying its recorded mutes and keys; with
    `replay.realtime` on the stream clock (a block is due when a mic would have delivered it)."""
    mic = resample(data.mic, data.rate, MIC_RATE) if data.rate != MIC_RATE else data.mic
    keys = sorted(data.keys)
    size = max(1, int(cfg.replay.chunk_ms * MIC_RATE / 1000))
    wall0 = time.monotonic()
    blocks = ((start / MIC_RATE, mic[start:start + size]) for start in range(0, len(mic), size))
    if progress:
        from tqdm import tqdm

        blocks = tqdm(blocks, total=-(-len(mic) // size), unit="block", desc="replay", disable=None, leave=False)
    for t, block in blocks:
        if cfg.replay.realtime:
            time.sleep(max(0.0, wall0 + t - time.monotonic()))
        due = []
        while keys and keys[0][0] <= t:
            due.append(keys.pop(0)[1])
        step = floor.step(t, block, due, speaking(), MIC_RATE)
        _record_step(recorder, t, step)
        if recorder:
            recorder.write_mic(block)
        yield t, step
    yield len(mic) / MIC_RATE, floor.flush()


def replay_utterances(cfg: AgentConfig, data: SessionData, recorder: SessionRecorder | None = None,
                      progress: bool = False) -> Iterator[Utterance]:
    """Feed a session's mic audio through the VAD exactly as a live mic would, applying the recorded
    half-duplex mutes and push-to-talk keys; yield each utterance as its end is decided."""
    for _, step in _replay_steps(cfg, data, _replay_floor(cfg, data), recorder, progress):
        yield from step.utterances


def run_replay(cfg: AgentConfig, sources: list[Path], out: Path | None = None, log: Log = print,
               progress: bool = True) -> RunResult:
    if out is not None:
        check_new_bundle(out)  # before any model loads; the bundle being read is never written to
    data = load_replay_source(sources, gap_s=cfg.vad.silence_ms / 1000 + 1.0)
    log(f"replay: {len(data.mic) / data.rate:.1f} s of audio from {', '.join(map(str, sources))}"
        + (" (push-to-talk keys from the bundle)" if data.keys else ""))
    if cfg.replay.realtime:
        return _run_replay_on_stream_clock(cfg, data, out, log, progress)
    stages = build_stages(cfg, log=log)
    engine = TurnEngine(stages, Conversation(), log=log, jitter_s=cfg.audio.jitter_ms / 1000)
    engine.warmup()
    recorder = _open_recorder(cfg, "replay", out, stages, log)
    engine.recorder = recorder
    sink = ReplaySink(stages.tts.sample_rate, keep=False)
    floor = _replay_floor(cfg, data)
    speculation = None
    unheard = 0  # utterances the ASR found no words in
    stopped = False
    try:
        for _, step in _replay_steps(cfg, data, floor, recorder, progress):
            if step.drop_speculation and speculation is not None:
                speculation.drop()
                speculation = None
            if step.speculate is not None:
                speculation = engine.speculate(step.speculate)
            for utterance in step.utterances:
                unheard += engine.run_turn(utterance, sink, speculation=speculation) is None
                speculation = None
    except KeyboardInterrupt:
        stopped = True
        raise
    finally:
        why = STOPPED if stopped else floor.why_silent(unheard)
        summary = finish(recorder, engine.conversation, log, why)
    return RunResult(recorder.folder if recorder else None, engine.conversation, summary)


def _run_replay_on_stream_clock(cfg: AgentConfig, data: SessionData, out: Path | None, log: Log,
                                progress: bool) -> RunResult:
    """`--realtime`: blocks are fed when a mic would deliver them while the worker answers, as live."""
    sink = ReplaySink(24_000, keep=False)
    worker = _Worker(cfg, sink, lambda stages: _open_recorder(cfg, "replay", out, stages, log), log)
    worker.start()
    worker.wait_ready()
    sink.sample_rate = worker.engine.stages.tts.sample_rate
    floor = _replay_floor(cfg, data)
    interrupted = False
    try:
        for t, step in _replay_steps(cfg, data, floor, worker.recorder, progress, speaking=lambda: worker.speaking):
            if worker.error is not None:
                break
            _hand_over(step, worker, worker.recorder, t)
    except KeyboardInterrupt:
        log("stopping...")
        interrupted = True
        worker.cancel()
    finally:
        summary, stopped = _close(worker, floor, log, interrupted)
    if worker.error is not None:
        raise worker.error
    if stopped:
        raise KeyboardInterrupt
    return RunResult(worker.recorder.folder if worker.recorder else None, worker.engine.conversation, summary)


class _Worker(threading.Thread):
    """The MLX owner: builds the stages, warms them up, then answers utterances one at a time.

    An utterance counts as outstanding from `submit()` until its reply has been played out (including what
    is still in the device's buffer): that is when the agent is "speaking" for half-duplex purposes.
    Speculation hints (speech paused / resumed) go through the same queue, but do not count as speaking.
    """

    def __init__(self, cfg: AgentConfig, sink, recorder_factory, log: Log):
        super().__init__(name="mlx-owner", daemon=True)
        self.cfg, self.sink, self.log = cfg, sink, log
        self.recorder_factory = recorder_factory
        self.recorder: SessionRecorder | None = None
        self.work: queue.Queue = queue.Queue()  # ("turn" | "speculate", utterance), ("drop", None), ("stop", None)
        self.outstanding = 0  # turns submitted and not yet played out
        self.unheard = 0  # utterances the ASR found no words in
        self.ready = threading.Event()
        # set when run() ends: waited on instead of join(), which a Ctrl-C/SIGTERM interrupting it on Python 3.11
        # leaves reporting the thread as stopped while it still runs (the session would close under its turn)
        self.finished = threading.Event()
        self.generation = 0  # bumped by barge-in / cancel: the running turn sees it changed and stops
        self.error: BaseException | None = None
        self.engine: TurnEngine | None = None

    def wait_ready(self) -> None:
        """Wait for the models; a failure to build them is raised here."""
        self.ready.wait()
        if self.error is not None:
            raise self.error

    @property
    def speaking(self) -> bool:
        """An utterance is queued, being answered, or its reply is still playing."""
        return self.outstanding > 0

    def submit(self, utterance: Utterance) -> None:
        self.outstanding += 1
        self.work.put(("turn", utterance))

    def speculate(self, utterance: Utterance) -> None:
        self.work.put(("speculate", utterance))

    def drop_speculation(self) -> None:
        self.work.put(("drop", None))

    def barge_in(self) -> None:
        """Stop the reply under way: the running turn ends, keeping what the user heard."""
        self.generation += 1
        self.sink.barge_in()

    def cancel(self) -> None:
        """Drop the queued utterances and stop the running turn (Ctrl-C, SIGTERM)."""
        while True:
            try:
                kind, _ = self.work.get_nowait()
            except queue.Empty:
                break
            self.outstanding -= kind == "turn"
        if self.engine is not None:
            self.engine.stop()  # at the next LLM token or TTS frame, and no context is prepared after it
        self.barge_in()

    def stop(self) -> None:
        """Answer what is queued, then end."""
        self.work.put(("stop", None))

    def run(self) -> None:
        try:
            self._serve()
        finally:
            self.finished.set()

    def _serve(self) -> None:
        try:
            stages = build_stages(self.cfg, log=self.log)
            self.engine = TurnEngine(stages, Conversation(), log=self.log, jitter_s=self.cfg.audio.jitter_ms / 1000)
            self.engine.warmup()
            self.engine.recorder = self.recorder = self.recorder_factory(stages)
        except BaseException as exc:  # reported by the main thread as one line
            self.error = exc
            return
        finally:
            self.ready.set()
        speculation = None
        while True:
            kind, utterance = self.work.get()
            try:
                if kind == "stop":
                    return
                if kind == "drop" and speculation is not None:
                    speculation.drop()
                    speculation = None
                elif kind == "speculate":  # stops early once anything else is queued
                    speculation = self.engine.speculate(utterance, cancelled=lambda: not self.work.empty())
                elif kind == "turn":
                    gen = self.generation
                    turn = self.engine.run_turn(utterance, self.sink, interrupted=lambda: self.generation != gen,
                                                speculation=speculation)
                    self.unheard += turn is None and self.generation == gen
                    speculation = None
                    if self.sink.speaker.played_samples and self.generation == gen:
                        time.sleep(min(self.sink.speaker.output_latency, 1.0))  # still in the device's buffer
            except BaseException as exc:
                self.error = exc
                return
            finally:
                self.outstanding -= kind == "turn"


def _hand_over(step: Step, worker: _Worker, recorder: SessionRecorder | None, t: float) -> None:
    """Pass a floor decision to the worker."""
    if step.drop_speculation:
        worker.drop_speculation()
    if step.speculate is not None:
        worker.speculate(step.speculate)
    if step.barge_in:
        worker.barge_in()
        if recorder is not None:
            recorder.event("barge_in", t=t)
    for utterance in step.utterances:
        worker.submit(utterance)


def _close(worker: _Worker, floor: Floor, log: Log, stopped: bool) -> tuple[dict, bool]:
    """Answer and play what is pending (Ctrl-C / SIGTERM abandons it), then close the bundle.
    Returns the summary and whether the session was stopped by the user."""
    worker.stop()
    try:
        worker.finished.wait()
    except KeyboardInterrupt:
        if not stopped:
            log("stopping...")
        stopped = True
        worker.cancel()
        worker.stop()  # the cancel dropped the stop queued above
        worker.finished.wait(timeout=10)
    if worker.engine is None:
        return {}, stopped
    why = STOPPED if stopped else floor.why_silent(worker.unheard)
    return finish(worker.recorder, worker.engine.conversation, log, why), stopped


def _stdin_keys(keys: queue.Queue) -> None:
    for _ in sys.stdin:
        keys.put("toggle")
    keys.put("eof")


def run_live(cfg: AgentConfig, push_to_talk: bool, duration_s: float | None = None, key_script: Path | None = None,
             out: Path | None = None, log: Log = print) -> RunResult:
    """hands-free or push-to-talk on the real sound card, until Ctrl-C / SIGTERM, end of keys or `duration_s`
    seconds of mic audio. Utterances already ended by then are still answered and played before it returns.

    Half-duplex (`audio.half_duplex`, without `audio.barge_in`): the VAD is muted while the agent is speaking
    (from the end of the user's utterance until the reply has played out), so the agent never hears itself.
    Every mute, key and barge-in is recorded at the mic time of the block it applies to, so `replay` of the
    bundle feeds the VAD exactly as it was fed live.
    """
    from functools import partial

    from agent.devices import MicSource, PlaybackSink, SpeakerSink, check_devices
    from agent.echo import EchoCanceller, EchoReferenceSpeaker, guard_against_echo
    from pipelines.errors import VoiceAgentError

    a = cfg.audio
    if out is not None:
        check_new_bundle(out)
    # a bad key script fails at once, before any model loads
    script = _read_key_script(key_script) if key_script and push_to_talk else None
    check_devices(need_input=True, need_output=True, input_device=a.input_device or None,
                  output_device=a.output_device or None)
    mode = "push-to-talk" if push_to_talk else "hands-free"
    canceller = EchoCanceller(MIC_RATE) if a.echo_cancellation else None  # the mic minus what the speaker plays
    make_speaker = SpeakerSink if canceller is None else partial(EchoReferenceSpeaker, canceller)
    sink = PlaybackSink(make_speaker(24_000, device=a.output_device or None, jitter_ms=a.jitter_ms).start())

    def make_recorder(stages):
        if a.barge_in:  # the agent's own reply heard back is no turn
            guard_against_echo(stages, lambda text: log(f"(echo of the agent's own reply: {text!r}; no turn)"))
        return _open_recorder(cfg, mode, out, stages, log)

    worker = _Worker(cfg, sink, make_recorder, log)
    worker.start()
    log(f"{mode}: loading models...")
    try:
        worker.wait_ready()
    except BaseException:
        sink.speaker.close()
        raise
    tts_rate = worker.engine.stages.tts.sample_rate
    if tts_rate != sink.sample_rate:  # Marvis speaks at 24 kHz; another TTS may not
        sink.speaker.close()
        sink.use(make_speaker(tts_rate, device=a.output_device or None, jitter_ms=a.jitter_ms).start())
    recorder = worker.recorder
    floor = Floor(endpointer(cfg, endpointing=not push_to_talk), push_to_talk=push_to_talk,
                  half_duplex=a.half_duplex, barge_in=a.barge_in)
    keys: queue.Queue = queue.Queue()
    if push_to_talk and script is None:
        threading.Thread(target=_stdin_keys, args=(keys,), daemon=True).start()
        log("push-to-talk: press Enter to start talking, Enter again to stop (Ctrl-C quits)")
    elif push_to_talk:
        log(f"push-to-talk: {len(script)} scripted key actions from {key_script}")
    else:
        log("hands-free: listening (Ctrl-C quits)")

    interrupted = warned_zeros = False
    summary: dict = {}
    try:
        with MicSource(MIC_RATE, block_ms=a.block_ms, device=a.input_device or None) as mic:
            last_block = time.monotonic()
            while worker.error is None:
                block = mic.read(timeout=0.5)
                if block is None:
                    if not mic.active:
                        gone = "went away (PortAudio stopped its stream)"
                    elif time.monotonic() - last_block > MIC_STALL_S:
                        gone = f"stopped delivering audio ({MIC_STALL_S:.0f} s without a block)"
                    else:
                        continue
                    worker.cancel()  # the device is gone (unplugged, or its driver failed): save what was heard
                    kept = f"the session up to then is saved in {recorder.folder}" if recorder else "nothing recorded"
                    raise VoiceAgentError(f"the microphone {mic.name} {gone} after {mic.stream_time:.1f} s; {kept}; "
                                          f"plug it back in (or pick another with --audio.input_device) and start again")
                last_block = time.monotonic()
                if canceller is not None:
                    block = canceller.near_end(block)
                if mic.zeros_s >= DEAD_MIC_S and not warned_zeros:
                    warned_zeros = True
                    log(f"warning: the microphone has delivered only zeros for {mic.zeros_s:.0f} s: it is muted, "
                        f"unplugged, or this program may not use it (macOS: System Settings > Privacy > Microphone)")
                t = mic.stream_time - len(block) / MIC_RATE  # mic time at the start of this block
                if recorder is not None:
                    recorder.write_mic(block)
                actions = _key_actions(keys, script, t, floor.vad.in_speech) if push_to_talk else []
                step = floor.step(t, block, actions, worker.speaking or sink.speaker.is_playing, MIC_RATE)
                _record_step(recorder, t, step)
                _hand_over(step, worker, recorder, t)
                if "eof" in actions:
                    log("push-to-talk: end of input (stdin closed), stopping")
                    break
                if duration_s is not None and mic.stream_time >= duration_s:
                    break
                if duration_s is None and script is not None and not script:
                    break  # the key script is done
        _hand_over(floor.flush(), worker, recorder, mic.stream_time)
    except KeyboardInterrupt:
        log("stopping...")
        interrupted = True
        worker.cancel()
    finally:
        summary, interrupted = _close(worker, floor, log, interrupted)
        sink.speaker.close()
    if worker.error is not None:
        raise worker.error
    if interrupted:
        log("stopped")
    return RunResult(recorder.folder if recorder else None, worker.engine.conversation, summary)


def _read_key_script(path: Path) -> list[tuple[float, str]]:
    """Lines `press 1.5` / `release 3.0` (mic-stream seconds): scripted push-to-talk, for tests and demos."""
    from pipelines.errors import ConfigError

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the key script ({exc})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split("#")[0].split()
        if not parts:
            continue
        if len(parts) != 2 or parts[0] not in ("press", "release"):
            raise ConfigError(f"{path}:{n}: expected 'press SECONDS' or 'release SECONDS', got {line!r}")
        try:
            seconds = float(parts[1])
        except ValueError:
            raise ConfigError(f"{path}:{n}: {parts[1]!r} is not a number of seconds") from None
        if not seconds >= 0 or seconds == float("inf"):
            raise ConfigError(f"{path}:{n}: {parts[1]!r} is not a time in the mic stream (seconds >= 0)")
        out.append((seconds, parts[0]))
    return sorted(out, key=lambda k: k[0])  # stable: a press and a release at the same time keep their order


def _key_actions(keys: queue.Queue, script, t: float, in_speech: bool) -> list[str]:
    """The key actions due at mic time `t`: from the script, or Enter toggles from stdin ("eof" at its end)."""
    actions = []
    if script is not None:
        while script and script[0][0] <= t:
            actions.append(script.pop(0)[1])
        return actions
    while not keys.empty():
        k = keys.get()
        if k == "eof":
            actions.append("eof")
            break
        actions.append("release" if in_speech else "press")
        in_speech = not in_speech
    return actions
