"""Does `mx.compile` pay in the MLX frame? The 31-step depth loop, plain and with parts compiled.

    .venv/bin/python scripts/bench_mlx_compile.py [--runs 7]

Marvis-250M with seeded random weights, laid out as `MLXFrames` runs it (`prepare_for_cpu`); one frame's depth
loop (31 steps of the decoder, head and sampler, sampled with top-k 50 at temperature 0.9) from a fixed backbone
state. Variants: nothing compiled; the sampler compiled; the sampler and each decoder block's MLP compiled. The
median of `--runs` loops each, and whether the codes equal the plain loop's. OpenBLAS is preloaded when
installed, as the CLI does for MLX.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    opts = ap.parse_args()
    if os.path.exists(OPENBLAS) and "openblas" not in os.environ.get("LD_PRELOAD", ""):
        env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [OPENBLAS, os.environ.get("LD_PRELOAD")])))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    import mlx.core as mx
    import numpy as np

    from pipelines.tts.generator import MLXFrames, sample_mlx
    from pipelines.tts.weights import random_model

    model = MLXFrames(random_model("marvis-250m", seed=0).model).model
    K = model.num_codebooks
    h = mx.random.normal((1, model.args.backbone.embed_dim), key=mx.random.key(1))
    c0 = mx.array([5])
    mx.eval(h)

    def plain_sampler(logits, key):
        return sample_mlx(logits, 0.9, 50, key)

    compiled_sampler = mx.compile(plain_sampler)

    def depth_loop(sampler):
        keys = list(mx.random.split(mx.random.key(0), K))
        cache = model.make_decoder_cache()
        x = mx.concatenate([h[:, None, :], model.embed_audio(0, c0)], axis=1)
        codes = []
        for k in range(1, K):
            c = sampler(model.codebook_logits(model.decoder_hidden(x, cache), k), keys[k])
            codes.append(c)
            x = model.embed_audio(k, c)
        mx.eval(codes)
        return np.array(mx.stack(codes))

    def timed(sampler):
        codes = depth_loop(sampler)
        times = []
        for _ in range(opts.runs):
            start = time.perf_counter()
            depth_loop(sampler)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1000, codes

    rows = [("nothing compiled", *timed(plain_sampler)), ("sampler compiled", *timed(compiled_sampler))]
    for layer in model.decoder.layers:  # each block's MLP as one compiled function (its weights as constants)
        layer.mlp = _compiled(layer.mlp)
    rows.append(("sampler + each MLP compiled", *timed(compiled_sampler)))

    base = rows[0][1]
    print(f"MLX depth loop (31 steps), Marvis-250M random weights, median of {opts.runs}, ms; "
          f"OpenBLAS preloaded: {'openblas' in os.environ.get('LD_PRELOAD', '')}")
    for name, ms, codes in rows:
        same = "same codes" if np.array_equal(codes, rows[0][2]) else "DIFFERENT codes"
        print(f"  {name:<30} {ms:7.1f}  ({ms / base:.2f}x)  {same}")


def _compiled(module):
    import mlx.core as mx
    import mlx.nn as nn

    class Compiled(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module
            self._fn = mx.compile(lambda x: module(x))

        def __call__(self, x):
            return self._fn(x)

    return Compiled()


if __name__ == "__main__":
    main()
