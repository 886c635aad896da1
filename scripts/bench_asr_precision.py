"""Whisper on ONNX Runtime at fp32 and with `asr.quantization = "8"`: word errors on real weights, and the time.

    .venv/bin/python scripts/bench_asr_precision.py [--models checkpoints/whisper-tiny.en,checkpoints/whisper-base]
        [--sessions DIR ...] [--timing-only checkpoints/stand-ins/whisper-base.en-mlx-fp32 ...]

For each model with real weights (tiny.en and the multilingual base ship offline; base.en and small.en do not),
both precisions transcribe the same turns: jfk and every turn of sessions/demo and sessions/ten-turns (as
tests/test_asr.py cuts them) and each `--sessions` bundle's scripted turns (scripts/make_demo_session.py makes
heldout-piper, heldout-espeak and real). Printed per precision: word errors per set and in all, the transcripts
that differ from fp32's, and the median time a turn on two cores. `--timing-only` folders (stand-ins: random
weights, whose words mean nothing) are only timed, teacher-forced on the turns' script. Run it without LD_PRELOAD,
as the agent runs the ONNX path.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

PRECISIONS = ("none", "8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="checkpoints/whisper-tiny.en,checkpoints/whisper-base")
    ap.add_argument("--sessions", type=Path, nargs="*", default=[], help="more session bundles with script events")
    ap.add_argument("--timing-only", nargs="*", default=[], help="model folders only timed (stand-ins)")
    opts = ap.parse_args()

    from bench_asr_window import set_errors, word_sets

    from agent.config import load_config
    from pipelines.asr.load import load_asr

    sets = word_sets(opts.sessions)
    turns = [turn for items in sets.values() for turn in items]
    base = load_config("default").asr
    for model in [m for m in opts.models.split(",") if m] + list(opts.timing_only):
        timing_only = model in opts.timing_only
        reference: list[str] = []
        for quantization in PRECISIONS:
            asr = load_asr(dataclasses.replace(base, model=model, language="en", quantization=quantization), ROOT)
            asr.warmup()
            texts, times = [], []
            for audio, text in turns:
                asr.reset()
                start = time.perf_counter()
                heard = asr.transcribe_forced(audio, 16000, text) if timing_only else asr.transcribe(audio)
                times.append(time.perf_counter() - start)
                texts.append(heard.text)
            line = f"{Path(model).name:28s} {asr.precision.label:13s} median {1000 * np.median(times):4.0f} ms a turn"
            if not timing_only:
                scored = set_errors(sets, texts)
                cells = [f"{name} {errors}/{words}" for name, errors, words in scored]
                errors_all, words_all = sum(e for _, e, _ in scored), sum(w for _, _, w in scored)
                line += f" | {' | '.join(cells)} | all {errors_all}/{words_all} ({100 * errors_all / words_all:.1f} %)"
                if reference:
                    line += f" | {sum(a != b for a, b in zip(reference, texts))} of {len(texts)} transcripts differ"
                reference = reference or texts
            print(line, flush=True)


if __name__ == "__main__":
    main()
