"""Session bundles: written as they happen, read back by replay.

A bundle is a folder:
    session.json     what ran (mode, models, config, whether the TTS is untrained); rewritten at the end
    mic.pcm          everything the mic delivered, s16le mono at `mic_rate`, appended and flushed live
    events.jsonl     one JSON object a line, appended and flushed live; `t` is mic-stream seconds
    turns/NNNN-user.wav, NNNN-agent.wav   each turn's audio, written when the turn ends
    waterfall.jsonl, summary.json, waterfall.png, transcript.txt   written when the session closes
Killing the process loses at most the last unflushed block; a truncated bundle (odd byte count, a
half-written last line, no session.json) still replays. A bundle is never written twice: the recorder refuses
a folder that already holds files. When the disk fills, recording stops with one warning; the session goes on.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.events import Event, TurnEnded
from agent.metrics import draw_timeline, write_jsonl
from pipelines.audio import float_to_pcm16, load_audio, save_audio
from pipelines.errors import AudioInputError, ConfigError

FORMAT = "voice-agent-session"
MIC_RATE = 16_000


def new_bundle_dir(root: Path, mode: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{stamp}-{mode}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{mode}-{n}"
    return path


def check_new_bundle(folder: Path) -> None:
    """A bundle folder must be new or empty: a recording is never appended to or overwritten by a later run."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"{folder}: already exists and is not an empty folder; a session bundle is never "
                          f"overwritten, pass a new --out (or leave it out for a fresh name)")


class SessionRecorder:
    """Thread-safe: the mic loop and the MLX worker both write to it.

    An OSError while writing (disk full, file too large) stops all recording with one `warn` line; the caller's
    session goes on. What was flushed before stays a valid bundle.
    """

    def __init__(self, folder: Path, meta: dict, mic_rate: int = MIC_RATE, warn=print):
        self.folder = Path(folder)
        check_new_bundle(self.folder)
        (self.folder / "turns").mkdir(parents=True, exist_ok=True)
        self.meta = {"format": FORMAT, "version": 1, "mic_rate": mic_rate, "created": time.time(), **meta}
        self._write_meta()
        self._mic = open(self.folder / "mic.pcm", "xb")
        self._events = open(self.folder / "events.jsonl", "x", encoding="utf-8")
        self.mic_samples = 0
        self.mic_rate = mic_rate
        self.warn = warn
        self.failed: OSError | None = None  # recording stopped after this error
        self._lock = threading.RLock()  # events.jsonl lines from two threads never interleave

    def _failing(self, exc: OSError) -> None:
        if self.failed is None:
            self.failed = exc
            self.warn(f"warning: recording stopped, cannot write the session bundle {self.folder} ({exc}); "
                      f"the conversation goes on")

    def _write_meta(self) -> None:
        tmp = self.folder / "session.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2, default=str))
        tmp.replace(self.folder / "session.json")  # atomic: never a half-written session.json

    @property
    def mic_time(self) -> float:
        return self.mic_samples / self.mic_rate

    def write_mic(self, block: np.ndarray) -> None:
        with self._lock:
            self.mic_samples += len(block)  # the mic clock runs on, recorded or not
            if self.failed is None and not self._mic.closed:
                try:
                    self._mic.write(float_to_pcm16(block))
                    self._mic.flush()
                except OSError as exc:
                    self._failing(exc)

    def event(self, kind: str, t: float | None = None, **data) -> None:
        with self._lock:
            if self.failed is not None or self._events.closed:  # a late writer after close() is ignored
                return
            row = {"type": kind, "t": round(self.mic_time if t is None else t, 4), "wall": round(time.time(), 4), **data}
            try:
                self._events.write(json.dumps(row, default=str) + "\n")
                self._events.flush()
            except OSError as exc:
                self._failing(exc)

    def listen(self, event: Event) -> None:
        """The recorder as a session listener (agent.events): each recorded event is a row of events.jsonl at its
        mic time (the recorder's clock when it has none); a finished turn also writes its audio."""
        if isinstance(event, TurnEnded):
            turn = event.turn
            for who, segment in (("user", turn.user), ("agent", turn.agent)):
                if segment is not None and segment.audio is not None:
                    self.turn_audio(turn.index, who, segment.audio, segment.sample_rate)
        if event.recorded:
            self.event(event.kind, getattr(event, "t", None), **event.row())

    def turn_audio(self, index: int, who: str, audio: np.ndarray, rate: int) -> Path | None:
        if self.failed is not None or self._mic.closed:
            return None
        try:
            return save_audio(self.folder / "turns" / f"{index:04d}-{who}.wav", audio, rate)
        except OSError as exc:
            self._failing(exc)
            return None

    def finish(self, turns: list, summary: dict) -> list[str]:
        """Write the closing files (waterfall, summary, transcript, plot) and close; return the names written."""
        rows = [t.waterfall for t in turns]
        written = []
        with self._lock:
            if self.failed is None:
                try:
                    write_jsonl([{"turn": t.index, **t.waterfall} for t in turns], self.folder / "waterfall.jsonl")
                    (self.folder / "summary.json").write_text(json.dumps(summary, indent=2))
                    (self.folder / "transcript.txt").write_text("".join(
                        f"[{t.index}] you:   {t.transcript}\n[{t.index}] agent: {t.reply}\n" for t in turns))
                    written = ["transcript.txt", "summary.json", "waterfall.jsonl"]
                    if draw_timeline(rows, self.folder / "waterfall.png", title=f"latency waterfall: {self.folder.name}"):
                        written.append("waterfall.png")
                except OSError as exc:
                    self._failing(exc)
            self.close(turns=len(turns), summary=summary)
        if turns and (self.folder / "turns").is_dir() and any((self.folder / "turns").iterdir()):
            written.insert(1, "turns/*.wav")
        return written

    def close(self, **final) -> None:
        with self._lock:
            if self._mic.closed:
                return
            for f in (self._mic, self._events):
                try:
                    f.close()
                except OSError as exc:
                    self._failing(exc)
            self.meta.update(final, closed=time.time())
            try:
                self._write_meta()
            except OSError as exc:
                self._failing(exc)


@dataclass
class SessionData:
    mic: np.ndarray  # float32 mono at `rate`
    rate: int
    mutes: list[tuple[float, float]] = field(default_factory=list)  # mic-time spans the agent was speaking
    keys: list[tuple[float, str]] = field(default_factory=list)  # push-to-talk presses/releases
    meta: dict = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)


def _warn_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _event_time(e: dict) -> float | None:
    t = e.get("t")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        return None
    return float(t)


def read_events(path: Path, warn=_warn_stderr) -> list[dict]:
    """The JSON objects of events.jsonl whose `t` (if any) is a time; a damaged line is skipped with one warning."""
    rows, damaged = [], []
    if not path.is_file():
        return rows
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if n < len(lines):  # the last line may be half-written by a crash: expected, no warning
                damaged.append(f"line {n}: not JSON")
            continue
        if not isinstance(row, dict):
            damaged.append(f"line {n}: {type(row).__name__}, not an object")
        elif "t" in row and _event_time(row) is None:
            damaged.append(f"line {n}: t={row['t']!r} is not a time in seconds")
        else:
            rows.append(row)
    if damaged:
        warn(f"warning: {path}: skipped {len(damaged)} damaged line(s) ({'; '.join(damaged[:3])}"
             f"{'; ...' if len(damaged) > 3 else ''})")
    return rows


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise AudioInputError(f"{path}: damaged, not UTF-8 text; delete it to replay the mic audio at "
                              f"{MIC_RATE} Hz") from None
    except (json.JSONDecodeError, RecursionError):
        raise AudioInputError(f"{path}: damaged, not JSON; delete it to replay the mic audio at {MIC_RATE} Hz") from None
    if not isinstance(meta, dict):
        raise AudioInputError(f"{path}: damaged, a JSON {type(meta).__name__} instead of an object")
    rate = meta.get("mic_rate", MIC_RATE)
    if isinstance(rate, bool) or not isinstance(rate, int) or not 8_000 <= rate <= 192_000:
        raise AudioInputError(f"{path}: damaged, mic_rate {rate!r} is not a sample rate in 8000..192000 Hz")
    return meta


def read_session(folder: Path, warn=_warn_stderr) -> SessionData:
    """Only the bundle's own fixed names are opened: nothing named inside its files is followed."""
    folder = Path(folder)
    mic_path = folder / "mic.pcm"
    if not mic_path.is_file():
        raise AudioInputError(f"{folder}: not a session bundle (no mic.pcm); pass audio files or a bundle folder")
    meta = _read_meta(folder / "session.json")
    rate = meta.get("mic_rate", MIC_RATE)
    samples = mic_path.stat().st_size // 2  # a block cut mid-sample by a crash is dropped
    if samples == 0:
        raise AudioInputError(f"{mic_path}: empty, the session recorded no audio; nothing to replay")
    mic = np.fromfile(mic_path, dtype="<i2", count=samples).astype(np.float32) / 32768.0
    events = read_events(folder / "events.jsonl", warn)
    mutes, keys, start = [], [], None
    for e in events:
        t = _event_time(e)
        if e.get("type") in ("mute", "key") and t is None:
            warn(f"warning: {folder / 'events.jsonl'}: a {e.get('type')} event without a time, skipped")
            continue
        if e.get("type") == "mute":
            if e.get("on") and start is None:
                start = t
            elif not e.get("on") and start is not None:
                mutes.append((start, t))
                start = None
        elif e.get("type") == "key":
            keys.append((t, str(e.get("action"))))
    if start is not None:
        mutes.append((start, float("inf")))
    return SessionData(mic, rate, mutes, keys, meta, events)


def audio_files_as_session(paths: list[Path], gap_s: float, rate: int = MIC_RATE) -> SessionData:
    """Plain audio files, one user turn each, separated by `gap_s` of silence (enough to end a turn)."""
    parts = []
    gap = np.zeros(int(gap_s * rate), np.float32)
    for p in paths:
        parts += [gap[: rate // 2] if not parts else gap, load_audio(p, rate)]
    parts.append(gap)
    return SessionData(np.concatenate(parts), rate, meta={"source": [str(p) for p in paths]})


def load_replay_source(paths: list[Path], gap_s: float) -> SessionData:
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return read_session(paths[0])
    for p in paths:
        if Path(p).is_dir():
            raise AudioInputError(f"{p}: replay takes one session folder, or audio files, not both")
    return audio_files_as_session([Path(p) for p in paths], gap_s)
