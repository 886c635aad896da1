"""End-of-turn benchmark: a labelled set of pauses and the rules that decide whether a pause ends the turn.

    voice-agent bench turns [--config default] [--cache DIR] [--json out.json] [--groups espeak,piper,real]
                            [--no-smart-turn] [--dotted.key value ...]

The pause events. Scripted turns are said by espeak-ng (the shipped sessions' texts and the held-out
`heldout-espeak` one, scripts/make_demo_session.py), by Piper (the held-out `heldout-piper` conversation and the
`pauses` and `ten-turns` texts) and by people (tests/fixtures: the jfk clip, whose speaker pauses 1.1 s, 1.1 s and
0.63 s inside his turn (cut before the applause at its end); the ARCTIC sentence as recorded and cut at three word gaps with 400-800 ms of its own room
tone put in). Each turn, after 0.5 s of room and followed by 2 s more, goes through the real VAD
(`pipelines.vad.Endpointer`, the config's VAD with a silence end far away): every `SpeechPaused` is a pause event,
its length the silence until `SpeechResumed` (none after the last speech). The last pause of a turn is its end;
every one before it is a hold, whether the script put it there or the VAD heard one inside a word.

The features of an event, on the utterance so far that `SpeechPaused` carries: the transcript (ASR), the reply
LLM's text end-of-turn score p (`end_of_turn`, no history), Smart Turn's probability s (when its model is
installed), and what each took. They are cached by the audio and the models, so a re-run only prints.

A rule maps an event to the silence w (ms after the last voiced audio) at which it ends the turn. A hold is cut off
when w < its pause. At true ends the wait is w; a rule that reads the words or asks Smart Turn cannot decide before
its inputs exist: the pause is known `vad.pre_roll_ms` after the last voice (SpeechPaused) and the compute
(ASR + LLM score, Smart Turn, or both in turn) follows, so "wait+compute" is max(w, pre_roll + compute).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.config import ROOT

RATE = 16_000
LEAD_S = 0.5  # room before each turn
TAIL_S = 2.0  # room after it: longer than any rule waits
GROUPS = ("espeak", "piper", "real")
ARCTIC_PAUSES_MS = (400, 600, 800)  # held pauses put into the ARCTIC sentence, one per cut
JFK_END_S = 10.62  # the jfk clip's applause rises from 10.7 s: the speaker's turn is what comes before it


@dataclasses.dataclass
class Turn:
    group: str  # espeak | piper | real
    source: str  # where its text comes from: a session name, or the clip
    text: str
    audio: np.ndarray  # 16 kHz float32, speech only (no lead or tail)
    pauses: list[tuple[float, float, str]]  # known pauses in `audio`: (start s, end s, origin)
    room_db: float | None = None  # recordings: their room tone's level (dBFS); synthetic: None (a quiet room)
    other: str = "vad"  # origin of a hold the VAD finds where no known pause is ("speaker": a person's own)


# ---------------------------------------------------------------- the turns


def _sessions():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import make_demo_session
    finally:
        sys.path.pop(0)
    return make_demo_session


def scripted_turns(cache: Path, groups=GROUPS) -> list[Turn]:
    """The synthetic turns, made once into `cache` (the same tools give the same samples)."""
    m = _sessions()
    plan = []
    if "espeak" in groups:
        plan += [("demo", t, "espeak", {}) for t in m.TURNS]
        plan += [("ten-turns", t, "espeak", {}) for t in m.TEN_TURNS]
        plan += [("pauses", t, "espeak", {}) for t in m.PAUSES]
        plan += [("heldout-espeak", t, "espeak", {"espeak_voice": "en-us+f3", "rate": 160}) for t in m.HELDOUT_ESPEAK]
    if "piper" in groups:
        plan += [("heldout-piper", t, "piper", {}) for t in m.HELDOUT_PIPER]
        plan += [("pauses", t, "piper", {}) for t in m.PAUSES]
        plan += [("ten-turns", t, "piper", {}) for t in m.TEN_TURNS]
    return [synthetic_turn(cache, source, text, voice, **espeak) for source, text, voice, espeak in plan]


def synthetic_turn(cache: Path, source: str, text: str, voice: str = "espeak", **espeak) -> Turn:
    m = _sessions()
    key = hashlib.sha256(json.dumps([voice, espeak, text]).encode()).hexdigest()[:16]
    wav, meta = cache / "audio" / f"{key}.npy", cache / "audio" / f"{key}.json"
    if wav.is_file() and meta.is_file():
        audio, pauses = np.load(wav), json.loads(meta.read_text())["pauses"]
    else:
        pauses = []
        with tempfile.TemporaryDirectory() as tmp:
            audio = m.turn_audio(text, Path(tmp), voice, pauses, **espeak).astype(np.float32)
        wav.parent.mkdir(parents=True, exist_ok=True)
        np.save(wav, audio)
        meta.write_text(json.dumps({"voice": voice, "espeak": espeak, "text": text, "pauses": pauses}))
    return Turn(voice, source, m.said(text), audio, [(a, b, "scripted") for a, b in pauses])


def room_db(audio: np.ndarray) -> float:
    """A recording's room tone: the RMS (dBFS) of its quietest 10 % of 30 ms frames."""
    n = int(0.03 * RATE)
    rms = np.sqrt(np.mean(np.square(audio[: len(audio) // n * n].reshape(-1, n), dtype=np.float64), axis=1))
    return float(20 * np.log10(np.percentile(rms, 10) + 1e-12))


def word_gaps(audio: np.ndarray, start_s: float, end_s: float, count: int, spacing_s: float = 0.5) -> list[float]:
    """`count` places between words of a recording, found by energy: the quietest 20 ms frames inside speech
    [start_s + 0.3, end_s - 0.3], at least `spacing_s` apart, in time order."""
    hop = int(0.02 * RATE)
    frames = audio[: len(audio) // hop * hop].reshape(-1, hop)
    level = 10 * np.log10(np.mean(np.square(frames, dtype=np.float64), axis=1) + 1e-12)
    lo, hi = int((start_s + 0.3) / 0.02), int((end_s - 0.3) / 0.02)
    picked: list[int] = []
    for i in lo + np.argsort(level[lo:hi], kind="stable"):
        if all(abs(int(i) - j) * 0.02 >= spacing_s for j in picked):
            picked.append(int(i))
        if len(picked) == count:
            break
    return sorted((i + 0.5) * 0.02 for i in picked)


def without_digital_silence(audio: np.ndarray) -> tuple[np.ndarray, float]:
    """A recording from its first 10 ms above -70 dBFS, and the seconds cut. The jfk clip opens with 60 ms of
    digital zero: the room it was recorded in was never that quiet, and the VAD would take it for the noise floor
    (then the hiss of the next pauses counts as speech and the first 1.1 s pause goes unheard)."""
    n = int(0.01 * RATE)
    blocks = audio[: len(audio) // n * n].reshape(-1, n)
    loud = np.flatnonzero(10 * np.log10(np.mean(np.square(blocks, dtype=np.float64), axis=1) + 1e-12) > -70)
    first = int(loud[0]) * n if loud.size else 0
    return audio[first:], first / RATE


def real_turns() -> list[Turn]:
    """The people: jfk as recorded (his pauses are his own, inside one turn), ARCTIC as recorded, and ARCTIC cut
    at a word gap with its own room tone (the stretch before the speech, repeated) put in."""
    from pipelines.audio import load_audio

    fixtures = ROOT / "tests" / "fixtures"
    for name in ("jfk.flac", "arctic_a0007.wav"):
        if not (fixtures / name).is_file():
            raise SystemExit(f"tests/fixtures/{name} is missing (copy it from ../shared/fixtures)")
    jfk, cut = without_digital_silence(load_audio(fixtures / "jfk.flac", RATE)[: int(JFK_END_S * RATE)])
    arctic, a_cut = without_digital_silence(load_audio(fixtures / "arctic_a0007.wav", RATE))
    m = _sessions()
    (_, jfk_spans), (_, [(a_start, a_end, a_text)]) = m.REAL
    jfk_spans = [(a - cut, b - cut, text) for a, b, text in jfk_spans]
    a_start, a_end = a_start - a_cut, a_end - a_cut
    jfk_text = " ".join(text for _, _, text in jfk_spans)
    turns = [Turn("real", "jfk", jfk_text, jfk, [(a, b, "speaker") for (_, a, _), (b, _, _) in zip(jfk_spans, jfk_spans[1:])],
                  room_db(jfk), other="speaker"),
             Turn("real", "arctic", a_text, arctic, [], room_db(arctic))]
    tone = arctic[: int((a_start - 0.05) * RATE)]  # the room before the first word
    for at, ms in zip(word_gaps(arctic, a_start, a_end, len(ARCTIC_PAUSES_MS)), ARCTIC_PAUSES_MS):
        cut, n = int(at * RATE), int(ms / 1000 * RATE)
        filler = np.tile(tone, -(-n // tone.size))[:n]
        audio = np.concatenate([arctic[:cut], filler, arctic[cut:]])
        turns.append(Turn("real", f"arctic+{ms}ms@{at:.2f}s", a_text, audio, [(at, at + ms / 1000, "spliced")],
                          room_db(arctic)))
    return turns


# ---------------------------------------------------------------- the events


def bench_vad_config(cfg):
    """The agent's VAD with the end of turn taken out of its hands: only the pauses are wanted."""
    from agent.build import vad_config

    return dataclasses.replace(vad_config(cfg), silence_ms=5000, max_utterance_ms=600_000, smart_turn=False,
                               speculate=True)


def with_room(turn: Turn) -> np.ndarray:
    """LEAD_S of room, the turn, TAIL_S of room. Synthetic turns sit in a quiet room (-66 dBFS, as the sessions);
    recordings in noise at their own room tone's level. Seeded: the same turn gives the same samples."""
    rng = np.random.default_rng(0)
    lead, tail = np.zeros(int(LEAD_S * RATE), np.float32), np.zeros(int(TAIL_S * RATE), np.float32)
    if turn.room_db is None:
        audio = np.concatenate([lead, turn.audio, tail])
        return audio + (rng.standard_normal(audio.size) * 10 ** (-66 / 20)).astype(np.float32)
    noise = lambda x: (rng.standard_normal(x.size) * 10 ** (turn.room_db / 20)).astype(np.float32)  # noqa: E731
    return np.concatenate([noise(lead), turn.audio, noise(tail)])


def detect_events(turn: Turn, vad_config) -> list[dict]:
    """Run the VAD over the turn in its room; one event per SpeechPaused, labelled (see the module doc).
    Each event holds `audio` (the utterance so far, 16 kHz), dropped before it is written anywhere."""
    from pipelines.vad import Endpointer, SpeechPaused, SpeechResumed

    endpointer = Endpointer(vad_config, RATE)
    audio = with_room(turn)
    found, hop = [], int(0.03 * RATE)
    for i in range(0, audio.size, hop):  # as a microphone delivers it
        for e in endpointer.process(audio[i:i + hop]):
            if isinstance(e, SpeechPaused):
                found.append({"audio": e.utterance.audio, "end_s": e.utterance.end_s, "pause_ms": math.inf})
            elif isinstance(e, SpeechResumed) and found:
                found[-1]["pause_ms"] = round((e.t - found[-1]["end_s"]) * 1000)
    endpointer.flush()
    events = []
    for k, f in enumerate(found):
        end = k == len(found) - 1
        at = f["end_s"] - LEAD_S  # in the turn's own audio
        origin = "end" if end else next(
            (o for a, b, o in turn.pauses if a - 0.1 <= at <= b + 0.05), turn.other)  # within a word or a breath
        events.append({"group": turn.group, "source": turn.source, "text": turn.text, "index": k,
                       "label": "end" if end else "hold", "origin": origin, "at_s": round(at, 3),
                       "pause_ms": f["pause_ms"], "audio": f["audio"]})
    return events


# ---------------------------------------------------------------- the features


def model_key(cfg) -> str:
    """The ASR's and the LLM's settings (Smart Turn's answer is kept beside, under its file's size)."""
    parts = [dataclasses.asdict(cfg.asr), dataclasses.asdict(cfg.llm)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def audio_key(audio: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(audio, np.float32).tobytes()).hexdigest()[:20]


class Features:
    """transcript, p, s and their times per event, cached in `cache/features-<models>.json` by the audio."""

    def __init__(self, cfg, cache: Path, smart_turn: bool = True, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.turn_model, path, self.smart_turn_note = None, None, ""
        if smart_turn:
            from pipelines.errors import CheckpointError
            from pipelines.smart_turn import find_smart_turn

            try:
                path = find_smart_turn()
            except CheckpointError as exc:
                self.smart_turn_note = f"Smart Turn skipped: {exc}"
        else:
            self.smart_turn_note = "Smart Turn skipped: --no-smart-turn"
        self.smart_turn_path = path
        self.smart_turn_id = f"{path.name}:{path.stat().st_size}" if path is not None else None
        self.file = cache / f"features-{model_key(cfg)}.json"
        self.known = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self.asr = self.llm = None

    def _load(self) -> None:
        from agent.build import build_asr, build_llm

        self.log("loading the ASR, the LLM" + (" and Smart Turn" if self.smart_turn_path else ""))
        self.asr, self.llm = build_asr(self.cfg), build_llm(self.cfg)
        if self.smart_turn_path is not None:
            from pipelines.smart_turn import SmartTurn

            self.turn_model = SmartTurn(self.smart_turn_path)
            self.turn_model.warmup()
        self.asr.transcribe(np.zeros(RATE, np.float32), RATE)  # first-call costs are not an event's
        self.llm.end_of_turn("Hello there")

    def cached(self, audio: np.ndarray) -> bool:
        got = self.known.get(audio_key(audio))
        return got is not None and (self.smart_turn_id is None or got.get("smart_turn") == self.smart_turn_id)

    def of(self, audio: np.ndarray) -> dict:
        key = audio_key(audio)
        if self.cached(audio):
            got = dict(self.known[key])
            return got if self.smart_turn_id else dict(got, s=None, smart_turn_ms=None)
        if self.asr is None:
            self._load()
        t0 = time.perf_counter()
        text = self.asr.transcribe(audio, RATE).text.strip()
        t1 = time.perf_counter()
        p = self.llm.end_of_turn(text)  # no history: the reply LLM as it is before any turn
        t2 = time.perf_counter()
        got = {"transcript": text, "p": p, "asr_ms": round((t1 - t0) * 1000, 1), "llm_ms": round((t2 - t1) * 1000, 1),
               "s": None, "smart_turn_ms": None}
        if self.turn_model is not None:
            got["s"] = self.turn_model.predict(audio, RATE)
            got["smart_turn_ms"] = round((time.perf_counter() - t2) * 1000, 1)
            got["smart_turn"] = self.smart_turn_id
        if key not in self.known or self.smart_turn_id:  # an answer without Smart Turn keeps an earlier one with it
            self.known[key] = got
        return got

    def save(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(self.known, indent=1))


# ---------------------------------------------------------------- the rules


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    wait: Callable[[dict], float]  # event -> ms of silence after the last voice at which the turn ends
    needs: tuple[str, ...] = ()  # "words" (ASR + LLM score), "smart" (Smart Turn)
    early: Callable[[dict], bool] | None = None  # the words ended the turn at the pause: it may be reopened


def configured(vad) -> Rule:
    """The rule the config sets (vad.words, its thresholds, vad.silence_ms, vad.hold_ms)."""
    if not vad.words:
        return Rule(f"config: silence {vad.silence_ms}", lambda e: vad.silence_ms)
    pause = vad.pause_ms or vad.pre_roll_ms
    hold = max(vad.hold_ms, vad.silence_ms)

    def wait(e):
        if e["p"] >= vad.words_threshold:
            return pause
        return hold if e["p"] < vad.words_unfinished else vad.silence_ms

    return Rule(f"config: words(p>={vad.words_threshold:g}: {pause}, p<{vad.words_unfinished:g}: {hold}, "
                f"else {vad.silence_ms})", wait, ("words",), lambda e: e["p"] >= vad.words_threshold)

def words(thr: float, short: int, long: int) -> Rule:
    return Rule(f"words(p>={thr:g}: {short}, else {long})", lambda e: short if e["p"] >= thr else long, ("words",),
                lambda e: e["p"] >= thr)


def words_hold(thr: float, short: int) -> Rule:
    return Rule(f"words+hold(p>={thr:g}: {short}, p<0.001: 1500, else 700)",
                lambda e: short if e["p"] >= thr else 1500 if e["p"] < 0.001 else 700, ("words",),
                lambda e: e["p"] >= thr)


def words_or_smart(thr: float, short: int, long: int) -> Rule:
    return Rule(f"words|smart(p>={thr:g} or s>0.5: {short}, else {long})",
                lambda e: short if e["p"] >= thr or e["s"] > 0.5 else long, ("words", "smart"))


def rules(smart_turn: bool = True) -> list[Rule]:
    out = [Rule(f"silence {ms}", lambda e, ms=ms: ms) for ms in (300, 500, 700, 1000, 1500)]
    if smart_turn:
        out.append(Rule("smart turn (s>0.5: 200, else 700)", lambda e: 200 if e["s"] > 0.5 else 700, ("smart",)))
    thresholds = (0.01, 0.03, 0.1, 0.3)
    out += [words(t, short, long) for t in thresholds for short in (200, 300) for long in (700, 1000, 1500)]
    out += [words_hold(t, short) for t in thresholds for short in (200, 300)]
    if smart_turn:
        out += [words_or_smart(t, 200, long) for t in thresholds for long in (700, 1000)]
    return out


def compute_ms(rule: Rule, e: dict) -> float:
    """What the rule's inputs cost on this event (ms), run one after another."""
    ms = 0.0
    if "words" in rule.needs:
        ms += e["asr_ms"] + e["llm_ms"]
    if "smart" in rule.needs:
        ms += e["smart_turn_ms"]
    return ms


def p90(xs: list[float]) -> float:
    return float(np.percentile(xs, 90)) if xs else math.nan


def ready_ms(rule: Rule, e: dict, pause_at_ms: float) -> float:
    """When the rule's turn end comes: its wait, and no sooner than its inputs are computed after the pause."""
    w = float(rule.wait(e))
    return max(w, pause_at_ms + compute_ms(rule, e)) if rule.needs else w


def talked_over(rule: Rule, e: dict, pause_at_ms: float, reopen_ms: float) -> bool:
    """A hold the rule cut off and the user's going on does not reopen: only a turn the words ended early can be
    reopened, and only by speech that starts within `reopen_ms` of that end."""
    if rule.wait(e) >= e["pause_ms"]:
        return False
    reopened = rule.early is not None and rule.early(e) and e["pause_ms"] <= ready_ms(rule, e, pause_at_ms) + reopen_ms
    return not reopened


def evaluate(rule: Rule, events: list[dict], pause_at_ms: float, groups=GROUPS, reopen_ms: float = 0.0) -> dict:
    """False cut-offs per group and overall (and those no reopening undoes), the wait at true ends (bare and with
    the compute), missed ends."""
    row = {"rule": rule.name}
    for group in [*groups, "all"]:
        holds = [e for e in events if e["label"] == "hold" and group in (e["group"], "all")]
        cut = sum(rule.wait(e) < e["pause_ms"] for e in holds)
        row[group] = {"cut": cut, "holds": len(holds), "pct": 100 * cut / len(holds) if holds else math.nan}
    row["talked_over"] = sum(talked_over(rule, e, pause_at_ms, reopen_ms) for e in events if e["label"] == "hold")
    ends = [e for e in events if e["label"] == "end"]
    waits = [float(rule.wait(e)) for e in ends]
    ready = [ready_ms(rule, e, pause_at_ms) for e in ends]
    row.update(ends=len(ends), mean_wait=float(np.mean(waits)) if waits else math.nan, p90_wait=p90(waits),
               mean_ready=float(np.mean(ready)) if ready else math.nan, p90_ready=p90(ready),
               missed=sum(w >= e["pause_ms"] for w, e in zip(waits, ends)))
    return row


def table(rows: list[dict], groups=GROUPS) -> str:
    cell = lambda c: f"{c['cut']}/{c['holds']} {c['pct']:.0f}%" if c["holds"] else "-"  # noqa: E731
    width = max(len(r["rule"]) for r in rows)
    head = (f"{'rule':<{width}} | " + " | ".join(f"{g:>12}" for g in [*groups, "all"])
            + " | talked over | mean wait | p90 wait | mean w+compute | p90 w+compute | missed ends")
    lines = [f"{'':<{width}}   false cut-offs (cut / holds)", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['rule']:<{width}} | " + " | ".join(f"{cell(r[g]):>12}" for g in [*groups, "all"])
                     + f" | {r['talked_over']:11d} | {r['mean_wait']:9.0f} | {r['p90_wait']:8.0f} | {r['mean_ready']:14.0f} | "
                       f"{r['p90_ready']:13.0f} | {r['missed']:>4}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def collect(cfg, cache: Path, groups=GROUPS, log: Callable[[str], None] = print) -> list[dict]:
    """Every labelled pause event of the chosen groups, with `audio` still on."""
    turns = scripted_turns(cache, groups)
    if "real" in groups:
        turns += real_turns()
    vad = bench_vad_config(cfg)
    events = [e for turn in turns for e in detect_events(turn, vad)]
    missing = [t for t in turns if not any(e["source"] == t.source and e["text"] == t.text and e["group"] == t.group
                                           for e in events)]
    for t in missing:
        log(f"warning: the VAD heard no speech in {t.group} {t.source}: {t.text!r}")
    for group in groups:
        known = [(t, a, b) for t in turns if t.group == group for a, b, o in t.pauses if o != "speaker"]
        heard = [e for e in events if e["group"] == group and e["origin"] in ("scripted", "spliced")]
        if len(heard) < len(known):
            heard_at = {(e["source"], e["text"], e["at_s"]) for e in heard}
            unheard = [f"{b - a:.2f} s in {t.text!r}" for t, a, b in known
                       if not any(k[:2] == (t.source, t.text) and a - 0.1 <= k[2] <= b + 0.05 for k in heard_at)]
            log(f"{group}: {len(heard)} of {len(known)} put-in pauses are heard as pauses; not: {'; '.join(unheard)} "
                f"(silence shorter than the {getattr(vad, 'pause_ms', None) or vad.pre_roll_ms} ms a SpeechPaused "
                "waits for)")
    return events


def main() -> None:
    from agent.cli import parse_with_config

    p = argparse.ArgumentParser(prog="voice-agent bench turns")
    p.add_argument("--config", default="default")
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench-turns",
                   help="where the made speech and the per-event features are kept (default runs/bench-turns)")
    p.add_argument("--groups", default=",".join(GROUPS), help="voices to use: espeak,piper,real")
    p.add_argument("--no-smart-turn", action="store_true", help="leave Smart Turn out")
    p.add_argument("--json", type=Path, help="write the events (features, labels) and the table here")
    args, cfg = parse_with_config(p)
    groups = tuple(g for g in args.groups.split(",") if g)
    if not groups or set(groups) - set(GROUPS):
        p.error(f"--groups: a comma-separated choice of {','.join(GROUPS)}, got {args.groups!r}")
    started = time.perf_counter()
    print(f"# {' '.join(sys.argv)}")
    print(f"# {platform.machine()} {os.cpu_count()} cores, OpenBLAS preloaded: {'openblas' in os.environ.get('LD_PRELOAD', '')}")
    events = collect(cfg, args.cache, groups)
    features = Features(cfg, args.cache, smart_turn=not args.no_smart_turn)
    if features.smart_turn_note:
        print(features.smart_turn_note)
    fresh = sum(not features.cached(e["audio"]) for e in events)
    if fresh:
        print(f"computing the features of {fresh} of {len(events)} events (cached in {features.file})")
    for e in events:
        e.update(features.of(e.pop("audio")))
    features.save()
    smart = features.smart_turn_path is not None and all(e["s"] is not None for e in events)
    vad = bench_vad_config(cfg)  # SpeechPaused comes this long after the last voiced frame (vad.pause_ms, if set)
    pause_at = getattr(vad, "pause_ms", None) or vad.pre_roll_ms
    print(f"{len(events)} pause events: " + ", ".join(
        f"{g} {sum(e['group'] == g for e in events)} ("
        + ", ".join(f"{o} {n}" for o in ("scripted", "speaker", "spliced", "vad", "end")
                    if (n := sum(e['group'] == g and e['origin'] == o for e in events)))
        + ")" for g in groups))
    print("holds by origin: scripted = a pause the script put in; speaker = a person's own; spliced = room tone put "
          "into a recording at a word gap; vad = a pause the VAD heard inside the speech (a stop, a breath)")
    for name, key in (("ASR", "asr_ms"), ("LLM end_of_turn", "llm_ms"), ("Smart Turn", "smart_turn_ms")):
        xs = [e[key] for e in events if e[key] is not None]
        if xs:
            print(f"{name}: mean {np.mean(xs):.0f} ms, p90 {p90(xs):.0f} ms per event")
    ends, holds = [e for e in events if e["label"] == "end"], [e for e in events if e["label"] == "hold"]
    print(f"p at true ends: median {np.median([e['p'] for e in ends]):.3f}, min {min(e['p'] for e in ends):.4f}; "
          f"at holds: median {np.median([e['p'] for e in holds]):.4f}, max {max(e['p'] for e in holds):.3f}")
    reopen = cfg.vad.reopen_ms or 1000
    rows = [evaluate(rule, events, pause_at, groups, reopen) for rule in [configured(cfg.vad), *rules(smart)]]
    print(f"\nwaits in ms of silence after the last voice; w+compute = max(w, {pause_at} + ASR + score)"
          f" for the rules that need them; talked over = false cut-offs a reopening within {reopen} ms does not undo"
          " (only a turn the words ended early reopens)")
    print(table(rows, groups))
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(finite({"events": events, "table": rows}), indent=1))


def finite(x):
    """JSON has no inf or NaN: null (an end's pause never ends; a group without holds has no share)."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


if __name__ == "__main__":
    main()
