"""The terminal's transports for the session loop (agent/loop.py): the sound card and recorded sessions.

- replay: a recorded session (or audio files) through the same VAD path, as fast as possible or paced
  like a mic (`realtime`), deterministic for a given seed.
- hands-free: PortAudio mic -> VAD endpointing -> turns; half-duplex by default.
- push-to-talk: a key starts and ends each turn; VAD endpointing is off.
Each only reads mic blocks (and key actions) and feeds them to a `SessionLoop` with its sink; who holds the
floor, what is recorded and how a session closes are the loop's, the same as for the browser page.
Threads: audio callbacks only copy samples; the loop's worker thread runs the ASR, the LLM and the TTS; the main
thread moves mic blocks through the floor (the VAD, and Smart Turn when it is on). `--realtime` replay runs the
same way, on the stream clock: audio keeps coming while a turn is answered, as from a mic. Fast replay runs the worker inline: each utterance is answered before feeding on,
which keeps it deterministic for a seed.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.config import AgentConfig
from agent.conversation import Conversation
from agent.engine import Stages
from agent.loop import Inline, OwnThread, listen, open_session
from agent.session import (
    MIC_RATE,
    SessionData,
    check_new_bundle,
    load_replay_source,
)
from agent.sinks import ReplaySink
from pipelines.audio import resample
from pipelines.messages import TTS_SAMPLE_RATE
from pipelines.vad import Utterance

Log = Callable[[str], None]


MIC_STALL_S = 10.0  # no mic block for this long: the device has stopped (unplugged, stream died)
DEAD_MIC_S = 3.0  # only exact zeros for this long: a muted or denied microphone


@dataclass
class RunResult:
    bundle: Path | None
    conversation: Conversation
    summary: dict


def _replay_blocks(cfg: AgentConfig, data: SessionData, progress: bool = False
                   ) -> Iterator[tuple[float, np.ndarray, list[str]]]:
    """A session's mic audio block by block at the mic rate, with the recorded push-to-talk keys due at each
    block; with `replay.realtime` on the stream clock (a block is due when a mic would have delivered it)."""
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
        yield t, block, due


def replay_utterances(cfg: AgentConfig, data: SessionData) -> Iterator[Utterance]:
    """Where replay ends each user turn: a session's mic audio through the session's own turn-taking (recorded
    half-duplex mutes and push-to-talk keys applied), with no model loaded."""
    return listen(cfg, _replay_blocks(cfg, data), push_to_talk=bool(data.keys), mutes=data.mutes)


def run_replay(cfg: AgentConfig, sources: list[Path], out: Path | None = None, log: Log = print,
               progress: bool = True, stages: Stages | None = None) -> RunResult:
    """Replay a session (or audio files) through the session loop. Fast replay answers each utterance before
    feeding on (deterministic for a seed); `replay.realtime` feeds blocks when a mic would deliver them while
    the worker answers, as live. `stages`: models already built (warmed by their owner), instead of the config's.
    The recorded half-duplex mutes and push-to-talk keys are applied as they were live."""
    if out is not None:
        check_new_bundle(out)  # before any model loads; the bundle being read is never written to
    data = load_replay_source(sources, gap_s=cfg.vad.silence_ms / 1000 + 1.0)
    log(f"replay: {len(data.mic) / data.rate:.1f} s of audio from {', '.join(map(str, sources))}"
        + (" (push-to-talk keys from the bundle)" if data.keys else ""))
    loop = open_session(cfg, "replay", ReplaySink(keep=False), push_to_talk=bool(data.keys), mutes=data.mutes,
                        stages=stages, run=OwnThread() if cfg.replay.realtime else Inline(), out=out, log=log)
    loop.start()
    stopped = False
    try:
        for t, block, keys in _replay_blocks(cfg, data, progress):
            if loop.error is not None:
                break
            loop.feed(t, block, keys)
        if loop.error is None:
            loop.flush(len(data.mic) / data.rate)
    except KeyboardInterrupt:
        stopped = True
        if cfg.replay.realtime:
            log("stopping...")
        else:
            raise
    finally:
        summary, stopped = loop.close(stopped)
    if loop.error is not None:
        raise loop.error
    return RunResult(loop.bundle, loop.conversation, summary)


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

    from agent.devices import MicSource, SpeakerSink, check_devices
    from agent.echo import EchoCanceller, EchoReferenceSpeaker
    from agent.sinks import PlaybackSink
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

    def open_speaker(rate: int):
        return make_speaker(rate, device=a.output_device or None, jitter_ms=a.jitter_ms).start()

    sink = PlaybackSink(open_speaker(TTS_SAMPLE_RATE), reopen=open_speaker)
    loop = open_session(cfg, mode, sink, push_to_talk=push_to_talk, out=out, log=log)
    log(f"{mode}: loading models...")
    try:
        loop.start()
    except BaseException:
        sink.close()
        raise
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
            while loop.error is None:
                block = mic.read(timeout=0.5)
                if block is None:
                    if not mic.active:
                        gone = "went away (PortAudio stopped its stream)"
                    elif time.monotonic() - last_block > MIC_STALL_S:
                        gone = f"stopped delivering audio ({MIC_STALL_S:.0f} s without a block)"
                    else:
                        continue
                    loop.cancel()  # the device is gone (unplugged, or its driver failed): save what was heard
                    kept = f"the session up to then is saved in {loop.bundle}" if loop.bundle else "nothing recorded"
                    raise VoiceAgentError(f"the microphone {mic.name} {gone} after {mic.stream_time:.1f} s; {kept}; "
                                          "plug it back in (or pick another with --audio.input_device) and start again")
                last_block = time.monotonic()
                if canceller is not None:
                    block = canceller.near_end(block)
                if mic.zeros_s >= DEAD_MIC_S and not warned_zeros:
                    warned_zeros = True
                    log(f"warning: the microphone has delivered only zeros for {mic.zeros_s:.0f} s: it is muted, "
                        f"unplugged, or this program may not use it (macOS: System Settings > Privacy > Microphone)")
                t = mic.stream_time - len(block) / MIC_RATE  # mic time at the start of this block
                actions = _key_actions(keys, script, t, loop.in_speech) if push_to_talk else []
                loop.feed(t, block, [a for a in actions if a != "eof"])
                if "eof" in actions:
                    log("push-to-talk: end of input (stdin closed), stopping")
                    break
                if duration_s is not None and mic.stream_time >= duration_s:
                    break
                if duration_s is None and script is not None and not script:
                    break  # the key script is done
        loop.flush(mic.stream_time)
    except KeyboardInterrupt:
        log("stopping...")
        interrupted = True
    finally:
        summary, interrupted = loop.close(interrupted)
        sink.close()
    if loop.error is not None:
        raise loop.error
    if interrupted:
        log("stopped")
    return RunResult(loop.bundle, loop.conversation, summary)


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
