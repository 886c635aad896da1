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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.metrics import draw_timeline, write_jsonl
from pipelines.audio import float_to_pcm16, load_audio, pcm16_to_float, save_audio
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
            if self.failed is None:
                try:
                    self._mic.write(float_to_pcm16(block))
                    self._mic.flush()
                except OSError as exc:
                    self._failing(exc)

    def event(self, kind: str, t: float | None = None, **data) -> None:
        with self._lock:
            if self.failed is not None:
                return
            row = {"type": kind, "t": round(self.mic_time if t is None else t, 4), "wall": round(time.time(), 4), **data}
            try:
                self._events.write(json.dumps(row, default=str) + "\n")
                self._events.flush()
            except OSError as exc:
                self._failing(exc)

    def turn_audio(self, index: int, who: str, audio: np.ndarray, rate: int) -> Path | None:
        if self.failed is not None:
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


def read_events(path: Path) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a half-written last line after a crash
    return rows


def read_session(folder: Path) -> SessionData:
    folder = Path(folder)
    mic_path = folder / "mic.pcm"
    if not mic_path.is_file():
        raise AudioInputError(f"{folder}: not a session bundle (no mic.pcm); pass audio files or a bundle folder")
    meta = {}
    if (folder / "session.json").is_file():
        try:
            meta = json.loads((folder / "session.json").read_text())
        except json.JSONDecodeError:
            meta = {}
    raw = mic_path.read_bytes()
    raw = raw[: len(raw) - len(raw) % 2]  # a block cut mid-sample by a crash
    rate = int(meta.get("mic_rate", MIC_RATE))
    events = read_events(folder / "events.jsonl")
    mutes, keys, start = [], [], None
    for e in events:
        if e.get("type") == "mute":
            if e.get("on") and start is None:
                start = float(e["t"])
            elif not e.get("on") and start is not None:
                mutes.append((start, float(e["t"])))
                start = None
        elif e.get("type") == "key":
            keys.append((float(e["t"]), str(e.get("action"))))
    if start is not None:
        mutes.append((start, float("inf")))
    return SessionData(pcm16_to_float(raw), rate, mutes, keys, meta, events)


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
