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


class _Worker(threading.Thread):
    """The MLX owner: builds the stages, warms them up, then answers utterances one at a time."""

    def __init__(self, cfg: AgentConfig, sink, recorder_factory, log: Log):
        super().__init__(name="mlx-owner", daemon=True)
        self.cfg, self.sink, self.log = cfg, sink, log
        self.recorder_factory = recorder_factory
        self.utterances: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.busy = threading.Event()
        self.generation = 0  # bumped by barge-in: the running turn sees it changed and stops
        self.error: BaseException | None = None
        self.engine: TurnEngine | None = None

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
            if utterance is None:
                return
            self.busy.set()
            gen = self.generation
            try:
                self.engine.run_turn(utterance, self.sink, interrupted=lambda: self.generation != gen)
                if hasattr(self.sink, "wait_idle"):
                    self.sink.wait_idle(timeout=120)
            except BaseException as exc:
                self.error = exc
                return
            finally:
                self.busy.clear()


def _stdin_keys(keys: queue.Queue) -> None:
    for _ in sys.stdin:
        keys.put("toggle")
    keys.put("eof")


def run_live(cfg: AgentConfig, push_to_talk: bool, duration_s: float | None = None, key_script: Path | None = None,
             out: Path | None = None, log: Log = print) -> RunResult:
    """hands-free or push-to-talk on the real sound card, until Ctrl-C, end of keys or `duration_s`."""
    from agent.devices import MicSource, SpeakerSink, check_devices

    a = cfg.audio
    check_devices(need_input=True, need_output=True, input_device=a.input_device or None,
                  output_device=a.output_device or None)
    mode = "push-to-talk" if push_to_talk else "hands-free"
    speaker = SpeakerSink(24_000, device=a.output_device or None, jitter_ms=a.jitter_ms).start()
    holder: dict = {}

    def make_recorder(stages):
        holder["recorder"] = _open_recorder(cfg, mode, out, stages)
        return holder["recorder"]

    worker = _Worker(cfg, speaker, make_recorder, log)
    worker.start()
    log(f"{mode}: loading models...")
    worker.ready.wait()
    if worker.error is not None:
        speaker.close()
        raise worker.error
    recorder: SessionRecorder | None = holder.get("recorder")
    vad = Endpointer(vad_config(cfg, endpointing=not push_to_talk), MIC_RATE)
    keys: queue.Queue = queue.Queue()
    script = _read_key_script(key_script) if key_script else None
    if push_to_talk and script is None:
        threading.Thread(target=_stdin_keys, args=(keys,), daemon=True).start()
        log("push-to-talk: press Enter to start talking, Enter again to stop (Ctrl-C quits)")
    else:
        log("hands-free: listening (Ctrl-C quits)")
    muted = False
    try:
        with MicSource(MIC_RATE, block_ms=a.block_ms, device=a.input_device or None) as mic:
            while worker.error is None:
                block = mic.read(timeout=0.5)
                if block is None:
                    continue
                t = recorder.mic_time if recorder else mic.stream_time
                if recorder:
                    recorder.write_mic(block)
                speaking = worker.busy.is_set() or speaker.is_playing
                if a.half_duplex and not a.barge_in and speaking != muted:
                    muted = speaking
                    vad.mute(muted)
                    if recorder:
                        recorder.event("mute", on=muted)
                events = _key_events(vad, keys, script, t, recorder)
                if events == "eof":
                    break
                for ev in events + vad.process(block):
                    if isinstance(ev, SpeechStarted) and a.barge_in and speaking:
                        worker.generation += 1
                        speaker.clear()
                        if recorder:
                            recorder.event("barge_in")
                    elif isinstance(ev, SpeechEnded):
                        worker.utterances.put(ev.utterance)
                if duration_s is not None and t >= duration_s:
                    break
        if not push_to_talk:
            for ev in vad.flush():
                if isinstance(ev, SpeechEnded):
                    worker.utterances.put(ev.utterance)
    except KeyboardInterrupt:
        log("stopping...")
    worker.utterances.put(None)
    worker.join(timeout=600)
    speaker.close()
    if worker.error is not None:
        raise worker.error
    summary = finish(recorder, worker.engine.conversation, log)
    return RunResult(recorder.folder if recorder else None, worker.engine.conversation, summary)


def _read_key_script(path: Path) -> list[tuple[float, str]]:
    """Lines `press 1.5` / `release 3.0` (mic-stream seconds): scripted push-to-talk, for tests and demos."""
    from pipelines.errors import ConfigError

    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split("#")[0].split()
        if not parts:
            continue
        if len(parts) != 2 or parts[0] not in ("press", "release"):
            raise ConfigError(f"{path}:{n}: expected 'press SECONDS' or 'release SECONDS', got {line!r}")
        try:
            out.append((float(parts[1]), parts[0]))
        except ValueError:
            raise ConfigError(f"{path}:{n}: {parts[1]!r} is not a number of seconds") from None
    return sorted(out)


def _key_events(vad: Endpointer, keys: queue.Queue, script, t: float, recorder):
    actions = []
    if script is not None:
        while script and script[0][0] <= t:
            actions.append(script.pop(0)[1])
    else:
        while not keys.empty():
            k = keys.get()
            if k == "eof":
                return "eof"
            actions.append("release" if vad.in_speech else "press")
    events = []
    for action in actions:
        if recorder:
            recorder.event("key", action=action)
        if action == "press" and not vad.in_speech:
            events.append(vad.begin())
        elif action == "release":
            utt = vad.end()
            if utt is not None:
                events.append(SpeechEnded(utt))
    return events
