"""s/frame of the Marvis frame loop: MLX fp32 vs ONNX Runtime fp32 / q8 / q4, real-size shape, random weights.

Greedy frames after warm-up, prefill of `--rows` prompt rows, and the graph build time (into a temp folder,
so every run pays it). Usage: voice-agent bench ort [--frames 20] [--rows 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.ortgraph import Precision
from pipelines.tts.generator import GenerationConfig, MLXFrames, OrtFrames
from pipelines.tts.ort import OrtFrameModel
from pipelines.tts.weights import random_model


def rows(n: int, K: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n text rows then one audio row: tokens, mask [n, K+1]."""
    t = np.zeros((n, K + 1), np.int32)
    m = np.zeros_like(t, bool)
    t[:, -1], m[:, -1] = rng.integers(3, 1000, n), True
    return t, m


def run(backend, prompt, frames: int, warmup: int) -> tuple[float, float, np.ndarray]:
    cfg = GenerationConfig(temperature=0)
    cache = backend.make_cache()
    t0 = time.perf_counter()
    backend.prefill(prompt[0][:-1], prompt[1][:-1], cache)
    prefill = time.perf_counter() - t0
    tok, mask = prompt[0][-1:], prompt[1][-1:]
    codes, times = [], []
    for i in range(warmup + frames):
        t0 = time.perf_counter()
        c = backend.frame(tok, mask, cache, cfg, None)
        times.append(time.perf_counter() - t0)
        codes.append(c)
        tok = np.zeros_like(tok)
        tok[0, :-1], mask = c, np.zeros_like(mask)
        mask[0, :-1] = True
    return prefill, float(np.mean(times[warmup:])), np.array(codes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--only", default="fp32,mlx,q8,q4")
    a = p.parse_args()
    ck = random_model("marvis-250m", seed=0)
    K = ck.args.audio_num_codebooks
    prompt = rows(a.rows + 1, K, np.random.default_rng(0))
    print(f"{'backend':8} {'build s':>8} {'prefill s':>10} {'s/frame':>8}  greedy == fp32")
    ref = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.only.split(","):
            if name == "mlx":
                build, backend = 0.0, MLXFrames(ck.model)
            else:
                bits = {"fp32": None, "q8": 8, "q4": 4}[name]
                t0 = time.perf_counter()
                ort = OrtFrameModel(ck.model, Precision(bits), cache_dir=Path(tmp) / name)
                build, backend = time.perf_counter() - t0, OrtFrames(ort)
            prefill, per_frame, codes = run(backend, prompt, a.frames, a.warmup)
            if name == "fp32":
                ref = codes
            agree = "" if ref is None else f"{(codes == ref).mean():.3f} of codes"
            print(f"{name:8} {build:8.1f} {prefill:10.3f} {per_frame:8.3f}  {agree}", flush=True)


if __name__ == "__main__":
    main()
