"""Does Whisper hear as well with fewer encoder positions? Word errors of the full 30 s window against trimmed windows.

    .venv/bin/python scripts/bench_asr_window.py [--floors 8,12,15,20] [--sessions DIR ...]

The encoder is most of an utterance's ASR time (tiny.en: ~200 ms of ~330 on two cores), and its cost grows with
the positions it encodes, so a shorter window would be the biggest cut in the time from the end of speech to the
transcript. `asr.trim` encodes the utterance plus 2 s of the padding's mel, at least `floor_s` (pipelines/asr/
whisper.py). This prints the word errors of tiny.en on the shipped turns (jfk and every turn of sessions/demo and
sessions/ten-turns, as tests/test_asr.py cuts them) and on each `--sessions` bundle (each `script` event's audio,
cut from 0.2 s before to 0.3 s after it), for the full window and for each floor. Bundles not shipped are made by
scripts/make_demo_session.py (heldout-piper, heldout-espeak, real). The trimmed encoder runs MLX's parts, so run
it with the system OpenBLAS preloaded (LD_PRELOAD, as `voice-agent` does for MLX) or it is slow; the words are
what is measured here, not the time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def scripted_turns(folder: Path) -> list[tuple[np.ndarray, str]]:
    """(16 kHz audio, text) of each scripted turn of a session bundle."""
    from agent.scripted import Script
    from agent.session import read_session
    from pipelines.audio import resample

    session = read_session(folder)
    rate = session.rate
    turns = []
    for turn in Script(session.events).turns:
        audio = session.mic[int(max(0.0, turn.start_s - 0.2) * rate): int((turn.end_s + 0.3) * rate)]
        turns.append((audio if rate == 16000 else resample(audio, rate, 16000), turn.text))
    return turns


def word_sets(sessions: list[Path]) -> dict[str, list[tuple[np.ndarray, str]]]:
    """The sets of (audio, text) turns the ASR benches score: the shipped utterances, then each bundle's script."""
    from test_asr import shipped_utterances

    sets = {"shipped": shipped_utterances()}
    for folder in sessions:
        sets[folder.name] = scripted_turns(folder)
    return sets


def set_errors(sets: dict[str, list[tuple[np.ndarray, str]]], heard: list[str]) -> list[tuple[str, int, int]]:
    """(set name, word errors, words) of each set, `heard` holding a transcript for every turn of every set in
    order."""
    from test_asr import word_count, word_errors

    out, i = [], 0
    for name, items in sets.items():
        errors = sum(word_errors(text, h) for (_, text), h in zip(items, heard[i:i + len(items)]))
        out.append((name, errors, sum(word_count(text) for _, text in items)))
        i += len(items)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--floors", default="8,12,15,20", help="comma list of floor_s values to try")
    ap.add_argument("--sessions", type=Path, nargs="*", default=[], help="more session bundles with script events")
    opts = ap.parse_args()

    from agent.config import load_config
    from pipelines.asr.load import asr_placement, load_asr
    from pipelines.asr.whisper import WhisperASR
    sets = word_sets(opts.sessions)
    section = load_config("default").asr
    default = load_asr(section, ROOT)  # the agent's own model, placement and graph cache
    cases = [("full window", {"trim": False})]
    cases += [(f"floor {f:g} s", {"trim": True, "floor_s": f, "margin_s": 2.0})
              for f in (float(x) for x in opts.floors.split(",") if x.strip())]
    print("window         | " + " | ".join(f"{name:>18}" for name in sets) + " |  all")
    for label, kw in cases:
        asr = WhisperASR(default.model_dir, placement=asr_placement(section, ROOT), ort_cache=default.ort_cache, **kw)
        asr.warmup()
        heard = []
        for audio, _ in (turn for items in sets.values() for turn in items):
            asr.reset()
            heard.append(asr.transcribe(audio).text)
        scored = set_errors(sets, heard)
        cells = [f"{errors:>4}/{words:<4} {100 * errors / words:5.1f} %" for _, errors, words in scored]
        errors_all, words_all = sum(e for _, e, _ in scored), sum(w for _, _, w in scored)
        print(f"{label:14s} | " + " | ".join(f"{c:>18}" for c in cells) + f" | {errors_all}/{words_all}", flush=True)


if __name__ == "__main__":
    main()
