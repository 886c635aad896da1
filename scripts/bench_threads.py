"""Does a stage's ONNX Runtime pool collapse when another program takes a core? Measured, not assumed.

    .venv/bin/python scripts/bench_threads.py [--stages tts,llm,asr] [--load 1.0]

For each stage on the offline default models, its work is timed in three cases, each in a fresh process:
one thread on an idle machine, the agent's own pool (every core) on an idle machine, and the agent's pool with
a competing busy process on `--load` of one core (agent/bench/load.py). A pool collapses when its threads wait
at every op for one the machine has descheduled; the figure to hold is the last case over the first (the
busy-machine issue asks for at most 1.3).

- tts: the median time of a Marvis frame (the one-graph ORT frame; no Mimi), 30 frames, three times;
- tts-path: the stage path's real-time factor (`MarvisTTS.stream`: frames, chunks, Mimi) over a 60-frame sentence,
  four times; its one-thread case also keeps Mimi on one thread and the frame pool sleeping, the pool cases are the
  stage's own choice at each chunk (pipelines/cores.py);
- llm: the reply model's time per streamed delta over a reply, four replies;
- asr: Whisper tiny.en's transcript of a 3 s utterance of sessions/demo, four times.
The thread count is the one knob the agent does not expose, so the script sets it on the graphs' `OrtNet`.
Run it without LD_PRELOAD (as the CLI runs the default path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("tts", "tts-path", "llm", "asr")


def _pool(module: str, threads: int | None) -> None:
    """Make the graphs built by `module` use `threads` (None: the agent's own choice)."""
    import importlib

    mod = importlib.import_module(module)
    made = mod.OrtNet
    if threads is not None:
        mod.OrtNet = lambda *a, **k: made(*a, **{**k, "threads": threads})


def measure(stage: str, threads: int | None, load: float) -> list[float]:
    """Seconds per unit of `stage`'s work, with `threads` in its pool, beside a busy process on `load` of a core."""
    import numpy as np

    from agent.bench.load import busy_core
    from agent.config import load_config

    cfg = load_config("default")
    if stage == "tts-path":
        import dataclasses

        _pool("pipelines.tts.ort", threads)
        from agent.build import build_tts
        from pipelines.tts.stage import FRAME_S

        tts = build_tts(cfg, log=lambda m: None)
        if threads == 1:
            tts._use_cores = lambda: (tts.codec.use_threads(1), tts.frames.backend.use_spin(False))
        tts.warmup()
        gen = dataclasses.replace(tts.config, max_audio_length_ms=60 * 80, stop_on_eos=False)

        def work() -> float:
            start, frames = time.perf_counter(), 0
            for chunk in tts.stream("The capital of France is Paris, a city of art and light, of rivers and bridges.",
                                    0, config=gen):
                frames += chunk.codes.shape[1]
            return (time.perf_counter() - start) / (frames * FRAME_S)
        runs = 4
    elif stage == "tts":
        import dataclasses

        _pool("pipelines.tts.ort", threads)
        from agent.build import build_tts

        tts = build_tts(cfg, log=lambda m: None)
        gen = dataclasses.replace(tts.config, max_audio_length_ms=30 * 80, stop_on_eos=False)
        prompt = tts.build_prompt("The capital of France is Paris, a city of art and light.", 0, (), None, gen)

        def work() -> float:
            steps, last = [], time.perf_counter()
            for _ in tts.frames.frames(prompt, gen, tts.prefix):
                now = time.perf_counter()
                steps.append(now - last)
                last = now
            return float(np.median(steps[1:]))
        runs = 3
    elif stage == "llm":
        _pool("pipelines.llm.ort", threads)
        from agent.build import build_llm

        llm = build_llm(cfg)
        llm.warmup()

        def work() -> float:
            llm.reset()
            start, deltas = time.perf_counter(), 0
            for _ in llm.stream("Tell me a short story about a dog in the park."):
                deltas += 1
            return (time.perf_counter() - start) / max(1, deltas)
        runs = 4
    else:
        _pool("pipelines.asr.ort", threads)
        from agent.build import build_asr
        from agent.session import read_session

        asr = build_asr(cfg)
        asr.warmup()
        audio = np.asarray(read_session(ROOT / "sessions" / "demo").mic[8000:56000], np.float32)

        def work() -> float:
            asr.reset()  # no cached transcript: the model runs every time
            start = time.perf_counter()
            asr.transcribe(audio, 16000)
            return time.perf_counter() - start
        runs = 4
    work()  # warm
    with busy_core(load) if load > 0 else contextlib.nullcontext():
        time.sleep(0.5)
        return [work() for _ in range(runs)]


def main() -> None:
    p = argparse.ArgumentParser(prog="bench_threads")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--load", type=float, default=1.0, help="share of one core the competing process uses")
    p.add_argument("--one", nargs=3, metavar=("STAGE", "THREADS", "LOAD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # a child: one case, its figures on stdout
        stage, threads, load = args.one
        print(json.dumps(measure(stage, None if threads == "pool" else int(threads), float(load))))
        return
    stages = [s for s in args.stages.split(",") if s]
    if any(s not in STAGES for s in stages) or not 0 < args.load <= 1:
        sys.exit(f"error: --stages takes {', '.join(STAGES)}; --load is in (0, 1]")
    cases = [("1 thread, idle", "1", 0.0), ("pool, idle", "pool", 0.0), (f"pool, {args.load:g} core taken", "pool", args.load)]
    print(f"{'stage':<8} | " + " | ".join(f"{name:>22}" for name, _, _ in cases) + " | loaded / 1 thread idle")
    for stage in stages:
        medians = []
        for _, threads, load in cases:
            out = subprocess.run([sys.executable, __file__, "--one", stage, threads, str(load)], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            medians.append(sorted(figures)[len(figures) // 2])
        cells = [f"{m:18.2f} RTF" if stage == "tts-path" else f"{1000 * m:19.1f} ms" for m in medians]
        print(f"{stage:<8} | " + " | ".join(cells) + f" | {medians[2] / medians[0]:.2f}")


if __name__ == "__main__":
    main()
