"""What a streamed Mimi decode costs by chunk length, with the decoder transformer's Linears as the agent runs them
(`(W @ x.T).T`, codec.py `_ColumnLinear`) and as PyTorch's own `nn.Linear`, in one run.

    .venv/bin/python scripts/bench_mimi_chunks.py [--runs 3] [--threads 2] [--load 0]

Random Mimi (seed 0), 32 codebooks, random codes; per chunk length the median over `--runs` streams of six calls
each (the first call of a stream, which warms it, is left out). A call's cost is mostly fixed (the decoder's ~40 M
weights are read whatever the chunk's length), which is what the TTS stage's chunk rule and playback buffer weigh.
The two decodes are also compared: they must agree to float rounding.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--load", type=float, default=0.0, help="share of one core another process keeps busy meanwhile")
    opts = ap.parse_args()
    if not 0.0 <= opts.load <= 1.0:
        raise SystemExit("--load is a share of one core, in 0..1")

    from agent.bench.load import busy_core

    with busy_core(opts.load):
        measure(opts)


def measure(opts) -> None:
    import torch

    from pipelines.tts.codec import MimiCodec, _ColumnLinear

    codec = MimiCodec(None, seed=0)
    codec.use_threads(opts.threads)
    linears = [m for m in codec.mimi.decoder_transformer.modules() if type(m) is _ColumnLinear]
    rng = np.random.default_rng(0)

    def stream(n: int) -> tuple[list[float], np.ndarray]:
        times, out = [], []
        with codec.stream_decoder() as dec:
            dec.decode(rng.integers(0, 2048, (32, 2)))
            for _ in range(6):
                codes = rng.integers(0, 2048, (32, n))
                t0 = time.perf_counter()
                out.append(dec.decode(codes))
                times.append(time.perf_counter() - t0)
        return times, np.concatenate(out)

    def time_all(label: str) -> dict[int, float]:
        result = {}
        for n in (1, 2, 3, 4, 5, 8):
            times = [t for _ in range(opts.runs) for t in stream(n)[0]]
            result[n] = float(np.median(times))
        print(f"{label:22s}" + "".join(f"{1000 * result[n]:8.1f}" for n in result))
        return result

    print(f"Mimi streamed decode, ms a call (median), torch {torch.__version__}, {opts.threads} threads, "
          f"another process on {opts.load:g} of a core")
    print(f"{'frames a chunk':22s}" + "".join(f"{n:8d}" for n in (1, 2, 3, 4, 5, 8)))
    ours = time_all("(W @ x.T).T  (agent)")
    state = rng.bit_generator.state
    fast = stream(3)[1]
    for m in linears:
        m.__class__ = torch.nn.Linear
    plain = time_all("nn.Linear")
    rng.bit_generator.state = state
    reference = stream(3)[1]
    for m in linears:
        m.__class__ = _ColumnLinear
    print("ratio agent / nn.Linear: " + ", ".join(f"{n} frames {ours[n] / plain[n]:.2f}" for n in ours))
    print(f"same decode: max |difference| {np.abs(fast - reference).max():.2e} (float rounding: below 1e-5)")


if __name__ == "__main__":
    main()
