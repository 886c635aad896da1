"""The three ways to talk to the agent, over one turn engine.

- replay: a recorded session (or audio files) through the same VAD path, as fast as possible or paced
  like a mic (`realtime`), deterministic for a given seed.
- hands-free: PortAudio mic -> VAD endpointing -> turns; half-duplex by default.
- push-to-talk: a key starts and ends each turn; VAD endpointing is off.
Threads: audio callbacks only copy samples; one worker thread owns every MLX call (models are built,
warmed up and run there); the main thread moves mic blocks into the VAD and the recorder.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.build import build_stages, vad_config
from agent.config import AgentConfig
from agent.conversation import Conversation
from agent.devices import ReplaySink
from agent.engine import TurnEngine
from agent.metrics import draw_timeline, session_summary, summary_table, write_jsonl
from agent.session import MIC_RATE, SessionData, SessionRecorder, load_replay_source, new_bundle_dir
from pipelines.audio import resample
from pipelines.vad import Endpointer, SpeechEnded, SpeechStarted, Utterance

Log = Callable[[str], None]


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


def _open_recorder(cfg: AgentConfig, mode: str, out: Path | None, stages) -> SessionRecorder | None:
    if not cfg.session.record and out is None:
        return None
    folder = out or new_bundle_dir(cfg.resolve(cfg.session.dir), mode)
    return SessionRecorder(folder, _meta(cfg, mode, stages))


def finish(recorder: SessionRecorder | None, conversation: Conversation, log: Log) -> dict:
    rows = [t.waterfall for t in conversation.turns]
    summary = session_summary(rows)
    if conversation.turns:
        log(f"latency over {len(rows)} turns (ms after end of user speech):")
        log(summary_table(summary))
    if recorder is not None:
        folder = recorder.folder
        write_jsonl([{"turn": t.index, **t.waterfall} for t in conversation.turns], folder / "waterfall.jsonl")
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        (folder / "transcript.txt").write_text(
            "".join(f"[{t.index}] you:   {t.transcript}\n[{t.index}] agent: {t.reply}\n" for t in conversation.turns)
        )
        draw_timeline(rows, folder / "waterfall.png", title=f"latency waterfall: {folder.name}")
        recorder.close(turns=len(conversation.turns), summary=summary)
        log(f"session bundle: {folder} (transcript.txt, turns/*.wav, waterfall.jsonl, waterfall.png)")
    return summary


def _blocks(audio: np.ndarray, size: int) -> Iterator[tuple[float, np.ndarray]]:
    for start in range(0, len(audio), size):
        yield start / MIC_RATE, audio[start:start + size]


def replay_utterances(cfg: AgentConfig, data: SessionData, recorder: SessionRecorder | None = None,
                      progress: bool = False) -> Iterator[Utterance]:
    """Feed a session's mic audio through the VAD exactly as a live mic would, applying the recorded
    half-duplex mutes and push-to-talk keys; yield each utterance as its end is decided."""
    mic = resample(data.mic, data.rate, MIC_RATE) if data.rate != MIC_RATE else data.mic
    vad = Endpointer(vad_config(cfg, endpointing=not data.keys), MIC_RATE)
    keys = sorted(data.keys)
    size = max(1, int(cfg.replay.chunk_ms * MIC_RATE / 1000))
    muted = False
    wall0 = time.monotonic()
    blocks = _blocks(mic, size)
    if progress:
        from tqdm import tqdm

        blocks = tqdm(blocks, total=-(-len(mic) // size), unit="block", desc="replay", disable=None, leave=False)
    for t, block in blocks:
        if cfg.replay.realtime:
            time.sleep(max(0.0, wall0 + t - time.monotonic()))
        now_muted = any(a <= t < b for a, b in data.mutes)
        if now_muted != muted:
            muted = now_muted
            vad.mute(muted)
            if recorder:
                recorder.event("mute", on=muted)
        events = []
        while keys and keys[0][0] <= t:
            _, action = keys.pop(0)
            if recorder:
                recorder.event("key", action=action)
            if action == "press" and not vad.in_speech:
                if muted:  # a press takes the floor, as in live push-to-talk
                    muted = False
                    vad.mute(False)
                events.append(vad.begin())
            elif action == "release":
                utt = vad.end()
                if utt is not None:
                    events.append(SpeechEnded(utt))
        if recorder:
            recorder.write_mic(block)
        for ev in events + vad.process(block):
            if isinstance(ev, SpeechEnded):
                yield ev.utterance
    for ev in vad.flush():
        if isinstance(ev, SpeechEnded):
            yield ev.utterance


def run_replay(cfg: AgentConfig, sources: list[Path], out: Path | None = None, log: Log = print,
               progress: bool = True) -> RunResult:
    data = load_replay_source(sources, gap_s=cfg.vad.silence_ms / 1000 + 1.0)
    log(f"replay: {len(data.mic) / data.rate:.1f} s of audio from {', '.join(map(str, sources))}"
        + (" (push-to-talk keys from the bundle)" if data.keys else ""))
    stages = build_stages(cfg, log=log)
    engine = TurnEngine(stages, Conversation(), log=log)
    engine.warmup()
    recorder = _open_recorder(cfg, "replay", out, stages)
    engine.recorder = recorder
    sink = ReplaySink(stages.tts.sample_rate, keep=False)
    try:
        for utterance in replay_utterances(cfg, data, recorder, progress):
            engine.run_turn(utterance, sink)
    finally:
        summary = finish(recorder, engine.conversation, log)
    return RunResult(recorder.folder if recorder else None, engine.conversation, summary)


MIC_STALL_S = 10.0  # no mic block for this long: the device has stopped (unplugged, stream died)


class _PlaybackSink:
    """The speaker as the turn engine sees it: `end_of_stream()` returns once the reply has been played out
    (or cleared by a barge-in), like `ReplaySink`, whose writes are "played" at once. So the engine's check
    for an interruption after the reply sees a barge-in during playback and keeps only what was heard, and
    `first_sample_played` is in the turn's waterfall even when the TTS was done before the speaker started."""

    STALL_S = 10.0  # playback that makes no progress for this long is given up (the device stopped)

    def __init__(self, speaker):
        self.speaker = speaker
        self.on_first_sample: Callable[[float], None] | None = None  # set by the engine for each turn
        self._first = threading.Event()
        self._lock = threading.Lock()
        self._cut: int | None = None  # after a barge-in: samples of the reply that were played
        speaker.on_first_sample = self._first_sample

    @property
    def sample_rate(self) -> int:
        return self.speaker.sample_rate

    def _first_sample(self, wall: float) -> None:  # PortAudio's thread
        listener = self.on_first_sample
        try:
            if listener is not None:
                listener(wall)
        finally:
            self._first.set()

    def begin_utterance(self) -> None:
        with self._lock:
            self._cut = None
            self._first.clear()
            self.speaker.begin_utterance()

    def write(self, audio: np.ndarray) -> None:
        with self._lock:
            if self._cut is None:  # a chunk that was on its way when the user barged in is dropped
                self.speaker.write(audio)

    def barge_in(self) -> None:
        """Stop the reply now (any thread); the engine's `clear()` then reports what was heard."""
        with self._lock:
            played = self.speaker.clear()
            if self._cut is None:
                self._cut = played

    def end_of_stream(self) -> None:
        self.speaker.end_of_stream()
        played, progress = -1, time.monotonic()
        while not self.speaker.wait_idle(timeout=0.1):
            if self.speaker.played_samples != played:
                played, progress = self.speaker.played_samples, time.monotonic()
            elif time.monotonic() - progress > self.STALL_S:
                return
        if self.speaker.played_samples:  # the callback reports the first sample just after handing it out
            self._first.wait(0.5)

    def clear(self) -> int:
        with self._lock:
            played = self.speaker.clear()
            return played if self._cut is None else self._cut

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self.speaker.wait_idle(timeout)


class _Worker(threading.Thread):
    """The MLX owner: builds the stages, warms them up, then answers utterances one at a time.

    An utterance counts as outstanding from `submit()` until its reply has been played out (including what
    is still in the device's buffer): that is when the agent is "speaking" for half-duplex purposes.
    """

    def __init__(self, cfg: AgentConfig, sink: _PlaybackSink, recorder_factory, log: Log):
        super().__init__(name="mlx-owner", daemon=True)
        self.cfg, self.sink, self.log = cfg, sink, log
        self.recorder_factory = recorder_factory
        self.utterances: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.generation = 0  # bumped by barge-in / cancel: the running turn sees it changed and stops
        self.error: BaseException | None = None
        self.engine: TurnEngine | None = None

    @property
    def speaking(self) -> bool:
        """An utterance is queued, being answered, or its reply is still playing."""
        return self.utterances.unfinished_tasks > 0

    def submit(self, utterance: Utterance) -> None:
        self.utterances.put(utterance)

    def barge_in(self) -> None:
        """Stop the reply under way: the running turn ends, keeping what the user heard."""
        self.generation += 1
        self.sink.barge_in()

    def cancel(self) -> None:
        """Drop the queued utterances and stop the running turn (Ctrl-C)."""
        while True:
            try:
                self.utterances.get_nowait()
            except queue.Empty:
                break
            self.utterances.task_done()
        self.barge_in()

    def stop(self) -> None:
        """Answer what is queued, then end."""
        self.utterances.put(None)

    def run(self) -> None:
        try:
            stages = build_stages(self.cfg, log=self.log)
            self.engine = TurnEngine(stages, Conversation(), log=self.log)
            self.engine.warmup()
            self.engine.recorder = self.recorder_factory(stages)
        except BaseException as exc:  # reported by the main thread as one line
            self.error = exc
            return
        finally:
            self.ready.set()
        while True:
            utterance = self.utterances.get()
            try:
                if utterance is None:
                    return
                gen = self.generation
                self.engine.run_turn(utterance, self.sink, interrupted=lambda: self.generation != gen)
                if self.sink.speaker.played_samples and self.generation == gen:
                    time.sleep(min(self.sink.speaker.output_latency, 1.0))  # still in the device's buffer
            except BaseException as exc:
                self.error = exc
                return
            finally:
                self.utterances.task_done()


def _stdin_keys(keys: queue.Queue) -> None:
    for _ in sys.stdin:
        keys.put("toggle")
    keys.put("eof")


def run_live(cfg: AgentConfig, push_to_talk: bool, duration_s: float | None = None, key_script: Path | None = None,
             out: Path | None = None, log: Log = print) -> RunResult:
    """hands-free or push-to-talk on the real sound card, until Ctrl-C, end of keys or `duration_s` seconds
    of mic audio. Utterances already ended by then are still answered and played before it returns.

    Half-duplex (`audio.half_duplex`, without `audio.barge_in`): the VAD is muted while the agent is speaking
    (from the end of the user's utterance until the reply has played out), so the agent never hears itself.
    In push-to-talk a key press always takes the floor: it stops a reply under way and starts a turn.
    Every mute, key and barge-in is recorded at the mic time of the block it applies to, so `replay` of the
    bundle feeds the VAD exactly as it was fed live.
    """
    from functools import partial

    from agent.devices import REPLAY_HINT, MicSource, SpeakerSink, check_devices
    from agent.echo import EchoCanceller, EchoReferenceSpeaker, guard_against_echo
    from pipelines.errors import VoiceAgentError

    a = cfg.audio
    # a bad key script fails at once, before any model loads
    script = _read_key_script(key_script) if key_script and push_to_talk else None
    check_devices(need_input=True, need_output=True, input_device=a.input_device or None,
                  output_device=a.output_device or None)
    mode = "push-to-talk" if push_to_talk else "hands-free"
    canceller = EchoCanceller(MIC_RATE) if a.echo_cancellation else None  # the mic minus what the speaker plays
    make_speaker = SpeakerSink if canceller is None else partial(EchoReferenceSpeaker, canceller)
    speaker = make_speaker(24_000, device=a.output_device or None, jitter_ms=a.jitter_ms).start()
    sink = _PlaybackSink(speaker)
    holder: dict = {}

    def make_recorder(stages):
        if a.barge_in:  # the agent's own reply heard back is no turn
            guard_against_echo(stages, lambda text: log(f"(echo of the agent's own reply: {text!r}; no turn)"))
        recorder = _open_recorder(cfg, mode, out, stages)
        holder["recorder"] = recorder
        return holder["recorder"]

    worker = _Worker(cfg, sink, make_recorder, log)
    worker.start()
    log(f"{mode}: loading models...")
    try:
        worker.ready.wait()
    except KeyboardInterrupt:
        speaker.close()
        raise
    if worker.error is not None:
        speaker.close()
        raise worker.error
    tts_rate = worker.engine.stages.tts.sample_rate
    if tts_rate != speaker.sample_rate:  # Marvis speaks at 24 kHz; another TTS may not
        speaker.close()
        speaker = make_speaker(tts_rate, device=a.output_device or None, jitter_ms=a.jitter_ms).start()
        sink.speaker = speaker
        speaker.on_first_sample = sink._first_sample
    recorder: SessionRecorder | None = holder.get("recorder")
    vad = Endpointer(vad_config(cfg, endpointing=not push_to_talk), MIC_RATE)
    keys: queue.Queue = queue.Queue()
    if push_to_talk and script is None:
        threading.Thread(target=_stdin_keys, args=(keys,), daemon=True).start()
        log("push-to-talk: press Enter to start talking, Enter again to stop (Ctrl-C quits)")
    elif push_to_talk:
        log(f"push-to-talk: {len(script)} scripted key actions from {key_script}")
    else:
        log("hands-free: listening (Ctrl-C quits)")

    def record(kind: str, t: float, **data) -> None:
        if recorder is not None:
            recorder.event(kind, t=t, **data)

    muted = False
    interrupted = False
    summary: dict = {}
    try:
        with MicSource(MIC_RATE, block_ms=a.block_ms, device=a.input_device or None) as mic:
            last_block = time.monotonic()
            while worker.error is None:
                block = mic.read(timeout=0.5)
                if block is not None and canceller is not None:
                    block = canceller.near_end(block)
                if block is None:
                    if time.monotonic() - last_block > MIC_STALL_S:
                        raise VoiceAgentError(f"the microphone stopped delivering audio ({MIC_STALL_S:.0f} s "
                                              f"without a block); check the device, or {REPLAY_HINT}")
                    continue
                last_block = time.monotonic()
                t = mic.stream_time - len(block) / MIC_RATE  # mic time at the start of this block
                if recorder is not None:
                    recorder.write_mic(block)
                actions = _key_actions(keys, script, t, vad.in_speech) if push_to_talk else []
                speaking = worker.speaking or speaker.is_playing
                pressed = push_to_talk and "press" in actions
                holding = push_to_talk and (vad.in_speech or pressed)
                mute = a.half_duplex and not a.barge_in and speaking and not holding
                if mute != muted:
                    muted = mute
                    vad.mute(muted)
                    record("mute", t, on=muted)
                events = _key_events(vad, actions, t, recorder)
                for ev in events + vad.process(block):
                    if isinstance(ev, SpeechStarted) and speaking and (a.barge_in or (pressed and a.half_duplex)):
                        worker.barge_in()
                        record("barge_in", t)
                    elif isinstance(ev, SpeechEnded):
                        worker.submit(ev.utterance)
                if "eof" in actions:
                    log("push-to-talk: end of input (stdin closed), stopping")
                    break
                if duration_s is not None and mic.stream_time >= duration_s:
                    break
                if duration_s is None and script is not None and not script:
                    break  # the key script is done
        for ev in vad.flush():  # a turn still open at the end (speaking, or the key held) is answered too
            if isinstance(ev, SpeechEnded):
                worker.submit(ev.utterance)
    except KeyboardInterrupt:
        log("stopping...")
        interrupted = True
        worker.cancel()
    finally:
        worker.stop()
        try:
            while worker.is_alive():  # answer and play what is pending; Ctrl-C again to abandon it
                worker.join(timeout=0.5)
        except KeyboardInterrupt:
            worker.cancel()
            worker.join(timeout=10)
        speaker.close()
        if worker.engine is not None:
            summary = finish(recorder, worker.engine.conversation, log)
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


def _key_events(vad: Endpointer, actions: list[str], t: float, recorder) -> list:
    """Apply key actions to the (unmuted, manual) VAD, recording each one at `t` as replay will apply it."""
    events = []
    for action in actions:
        if action not in ("press", "release"):
            continue
        if recorder is not None:
            recorder.event("key", t=t, action=action)
        if action == "press" and not vad.in_speech:
            events.append(vad.begin())
        elif action == "release":
            utt = vad.end()
            if utt is not None:
                events.append(SpeechEnded(utt))
    return events
