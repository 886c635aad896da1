"""The per-turn latency waterfall: end of user speech -> ... -> first sample played.

Offsets are milliseconds after the end of user speech. The endpoint delay is measured in audio-stream
time (the VAD waits for `silence_ms` of silence); everything after it is wall-clock time from the
endpoint decision, so replays faster than real time still report what a user would wait.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.messages import TIME_EPS

STAGES = ["endpoint", "asr_final", "llm_first_token", "first_sentence", "first_tts_chunk", "first_sample_played"]
LABELS = {
    "endpoint": "endpoint",
    "asr_final": "asr",
    "llm_first_token": "llm 1st tok",
    "first_sentence": "1st sentence",
    "first_tts_chunk": "1st tts chunk",
    "first_sample_played": "1st sample",
}


class Waterfall:
    """Collects one turn's stage times. `mark(stage)` stamps wall time; offsets are computed on read."""

    def __init__(self, endpoint_delay_s: float, decided_wall: float):
        self.endpoint_ms = endpoint_delay_s * 1000.0
        self.decided_wall = decided_wall
        self.wall: dict[str, float] = {}

    def mark(self, stage: str, wall: float) -> None:
        if stage not in STAGES:
            raise KeyError(stage)
        self.wall.setdefault(stage, wall)

    def offsets(self) -> dict[str, float]:
        out = {"endpoint": round(self.endpoint_ms, 1)}
        for stage in STAGES[1:]:
            if stage in self.wall:
                out[stage] = round(self.endpoint_ms + (self.wall[stage] - self.decided_wall) * 1000.0, 1)
        return out


@dataclass
class Playback:
    """How a speaker plays a timeline (`play`)."""

    start: float | None = None  # wall time of the first sample (None: not started)
    end: float = 0.0  # wall time the audio out so far has played out
    stall_s: float = 0.0  # silence inserted after the first sample
    stalls: int = 0  # underruns
    waiting_s: float = 0.0  # audio queued while playback waits to (re)buffer


def play(timeline: list[tuple], sample_rate: int, jitter_s: float, complete: bool = True) -> Playback:
    """Play `timeline` — (wall time a chunk was ready, its samples[, re-buffer seconds[, start buffer seconds]])
    in order — as a speaker does: start once `jitter_s` of audio is buffered (or the chunk's own start buffer, the
    one in force when it came: a plan may change while the listener waits), or with the last chunk, then in real
    time. A chunk not ready when the audio before it has played out is an underrun; playback resumes once the
    chunk's re-buffer threshold (seconds from it on) is queued again, or as soon as it is ready without one.
    `complete`: the timeline is the whole utterance (what is left plays out at its end); otherwise playback may
    still be waiting for audio."""
    rate = float(sample_rate)
    out, buffered = Playback(), 0.0
    for ready, samples, *rest in timeline:
        buffered += samples / rate
        need = rest[1] if len(rest) > 1 else jitter_s
        if buffered >= need - TIME_EPS:  # whole frames of buffer: a float sum of chunks must not fall just short
            out.start = ready
            break
    if out.start is None and complete and timeline:
        out.start = timeline[-1][0]
    if out.start is None:
        out.waiting_s = buffered
        return out
    position, i = out.start, 0
    while i < len(timeline):
        ready, samples, *rest = timeline[i]
        if ready > position:  # ran dry: wait for this chunk, and for the re-buffer threshold from it on
            threshold, resume, queued, j = (rest[0] if rest else 0.0), ready, 0.0, i
            while j < len(timeline) and (queued < threshold or j == i):
                resume = max(resume, timeline[j][0])
                queued += timeline[j][1] / rate
                j += 1
            out.stalls += 1
            if queued < threshold and not complete:  # not enough audio yet: still waiting
                out.end, out.waiting_s = position, queued
                return out
            out.stall_s += resume - position
            position = resume
        position += samples / rate
        i += 1
    out.end = position
    return out


def playback_stalls(timeline: list[tuple], sample_rate: int, jitter_s: float) -> dict[str, float]:
    """What a listener hears after the first sample: silence inserted because the next audio was not ready."""
    heard = play(timeline, sample_rate, jitter_s)
    return {"stall_ms": round(heard.stall_s * 1000.0, 1), "stalls": heard.stalls}


def audio_ahead(timeline: list[tuple], sample_rate: int, jitter_s: float, now: float) -> float:
    """Seconds of audio still queued for the listener at `now`, playback run as `play` runs it (all that is
    queued while playback waits to start or to re-buffer)."""
    heard = play(timeline, sample_rate, jitter_s, complete=False)
    if heard.waiting_s:
        return heard.waiting_s
    return max(0.0, heard.end - now)


def summary_line(turn_index: int, offsets: dict[str, float]) -> str:
    parts = [f"{LABELS[s]} {offsets[s]:.0f}" for s in STAGES if s in offsets]
    line = f"turn {turn_index}: " + " | ".join(parts) + " ms after end of speech"
    if "stall_ms" in offsets:
        line += f"; then {offsets['stall_ms']:.0f} ms of stalls ({offsets['stalls']:.0f})"
    return line


# per-turn figures summarised beside the stages, not drawn as one: silence after the first sample, the audio
# buffered before playback started (sized from the TTS's measured rate), and the RTF the reply's TTS achieved
EXTRA = ["stall_ms", "prebuffer_ms", "tts_rtf"]


def session_summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for stage in STAGES + EXTRA:
        values = [r[stage] for r in rows if stage in r]
        if values:
            digits = 3 if stage == "tts_rtf" else 1  # a ratio; the rest are ms
            out[stage] = {
                "p50": round(float(np.percentile(values, 50)), digits),
                "p90": round(float(np.percentile(values, 90)), digits),
                "n": len(values),
            }
    return out


def summary_table(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{'stage':<22}{'p50 ms':>10}{'p90 ms':>10}{'turns':>7}"]
    for stage in STAGES + EXTRA:
        if stage in summary:
            s = summary[stage]
            digits = 2 if stage == "tts_rtf" else 0  # a ratio, not ms
            lines.append(f"{stage:<22}{s['p50']:>10.{digits}f}{s['p90']:>10.{digits}f}{s['n']:>7}")
    return "\n".join(lines)


def draw_timeline(rows: list[dict[str, float]], path: Path, title: str = "") -> Path | None:
    """One horizontal bar per turn, a segment per stage. Returns None when nothing to draw."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the legend goes below the plot, never over the bars' ends (where the stalls are drawn)
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.5 * len(rows)), layout="constrained")
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(STAGES)))
    for y, row in enumerate(rows):
        start = 0.0
        for stage, colour in zip(STAGES, colours):
            if stage not in row:
                continue
            end = row[stage]
            ax.barh(y, end - start, left=start, color=colour, edgecolor="white",
                    label=LABELS[stage] if y == 0 else None)
            start = end
        if row.get("stall_ms"):  # silences after the first sample, summed, drawn after it
            ax.barh(y, row["stall_ms"], left=start, color="none", edgecolor="tab:red", hatch="//",
                    label="stalls after 1st sample" if not any(r.get("stall_ms") for r in rows[:y]) else None)
    ax.set_yticks(range(len(rows)), [f"turn {i}" for i in range(len(rows))])
    ax.invert_yaxis()
    ax.set_xlabel("ms after end of user speech")
    ax.set_title(title or "latency waterfall")
    fig.legend(loc="outside lower center", ncols=4, fontsize=7, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def endpoint_report(events: list[dict], decided_s: list[float]) -> dict | None:
    """Turn-taking against a session's script: `events` holds its `script` events (mic time `t`, `duration_s`),
    `decided_s` the stream times at which the agent decided each user turn was over. An endpoint decided while
    a scripted turn was still being spoken cut the user off (a false endpoint); a scripted turn with no endpoint
    decided between its end and the next one's start was merged into the next or never heard (missed).
    None when the session has no script."""
    script = sorted((e["t"], e["t"] + e["duration_s"]) for e in events
                    if e.get("type") == "script" and isinstance(e.get("duration_s"), (int, float)))
    if not script:
        return None
    cut = [d for d in decided_s if any(a < d < b for a, b in script)]
    nexts = [a for a, _ in script[1:]] + [math.inf]
    missed = sum(not any(b <= d < n for d in decided_s) for (_, b), n in zip(script, nexts))
    return {"scripted_turns": len(script), "endpoints": len(decided_s), "false_endpoints": len(cut),
            "cut_at_s": [round(d, 2) for d in cut], "missed_turns": missed}


def _spoken_words(text: str) -> list[str]:
    from pipelines.llm.form import words

    return words(text.lower().replace("colour", "color"))  # Whisper writes American spelling: not a mishearing


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words): the Levenshtein distance between the lower-cased words, punctuation
    ignored; word error rate = edits / reference words."""
    ref, hyp = _spoken_words(reference), _spoken_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1], len(ref)
