"""The MLX frame's time at past commits, in one run: where did it get slower (or faster)?

    .venv/bin/python scripts/bisect_mlx_frame.py 14c7fad 0e6b53b 98a6a2a ad0e28f HEAD --frames 10

Each commit is checked out into a temporary git worktree and timed in its own process on its own code (with
this checkout's virtualenv): Marvis-250M with seeded random weights, a 20-row text prompt, sampled frames
(top-k 50, temperature 0.9), the median seconds a frame. The frame is that commit's `MLXFrames.frame` when
it has one, else the model-level loop every commit since the first port can run (`backbone_hidden`,
`decoder_hidden`, `codebook_logits`, `embed_audio`), after `prepare_for_cpu` where it exists. mlx-audio's
`generate_frame` on the same weights is timed in the same run, so each commit's ratio to it is read against
a peer measured beside it. OpenBLAS is preloaded as the CLI does for MLX (when installed). On a shared
machine run it idle; the figures of one run compare with each other, not with another day's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"

HARNESS = r'''
import json, sys, time
import numpy as np
import mlx.core as mx
from pipelines.tts.weights import random_model

impl, frames = sys.argv[1], int(sys.argv[2])
ck = random_model("marvis-250m", seed=0)
args = ck.args
K = args.audio_num_codebooks
rng = np.random.default_rng(0)
tokens = np.zeros((20, K + 1), np.int32)
tokens[:, -1] = rng.integers(3, args.text_vocab_size, 20)
mask = np.zeros_like(tokens, dtype=bool)
mask[:, -1] = True
frame_mask = np.r_[np.ones(K, bool), False][None]


def sampler(logits, key):
    logits = logits / 0.9
    kth = mx.sort(logits, axis=-1)[..., -50:-49]
    return mx.random.categorical(mx.where(logits < kth, -mx.inf, logits), key=key)


if impl == "ours":
    try:
        from pipelines.tts.generator import GenerationConfig, MLXFrames
    except ImportError:
        MLXFrames = None
    if MLXFrames is not None:
        backend = MLXFrames(ck.model)
        cfg = GenerationConfig(temperature=0.9, top_k=50, seed=0)
        cache, keys = backend.make_cache(), backend.rng(cfg)
        step = lambda t, m: backend.frame(t, m, cache, cfg, keys)  # noqa: E731
        how = "MLXFrames.frame"
    else:
        model = ck.model.prepare_for_cpu() if hasattr(ck.model, "prepare_for_cpu") else ck.model
        bcache, key = model.make_backbone_cache(), [mx.random.key(0)]

        def step(t, m):
            key[0], sub = mx.random.split(key[0])
            ks = mx.random.split(sub, K)
            h = model.backbone_hidden(mx.array(t)[None], mx.array(m)[None], bcache)
            c = sampler(model.codebook0_head(h), ks[0])
            codes, dcache = [c], model.make_decoder_cache()
            x = mx.concatenate([h[:, None, :], model.embed_audio(0, c)], axis=1)
            for k in range(1, K):
                c = sampler(model.codebook_logits(model.decoder_hidden(x, dcache), k), ks[k])
                codes.append(c)
                x = model.embed_audio(k, c)
            out = mx.stack(codes, axis=-1)
            mx.eval(out)
            return np.array(out)[0]
        how = "model-level loop"
else:
    from mlx.utils import tree_flatten
    from mlx_audio.lm.sample_utils import make_sampler
    from mlx_audio.tts.models.sesame.sesame import SesameModel
    sys.path.insert(0, sys.argv[3])
    from agent.bench.tts import sesame_config
    model = SesameModel(sesame_config(args))
    model.load_weights(tree_flatten(ck.model.parameters()), strict=True)
    mx.eval(model.parameters())
    model.setup_caches(1)
    sample_fn = make_sampler(temp=0.9, top_k=50)
    pos = [mx.arange(20, dtype=mx.int32)[None]]

    def step(t, m):
        s = model.generate_frame(mx.array(t)[None], mx.array(m)[None], pos[0], sample_fn)
        mx.eval(s)
        pos[0] = pos[0][:, -1:] + 1
        return np.array(s)[0]
    how = "mlx-audio generate_frame"

t, m = tokens, mask
times = []
for i in range(frames + 1):
    start = time.perf_counter()
    codes = step(t, m)
    if i:
        times.append(time.perf_counter() - start)
    t, m = np.r_[codes, 0][None].astype(np.int32), frame_mask
times.sort()
print(json.dumps({"how": how, "median_s": times[len(times) // 2], "mean_s": sum(times) / len(times)}))
'''


def run(code_dir: Path, impl: str, frames: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code_dir))
    if os.path.exists(OPENBLAS) and "openblas" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(filter(None, [OPENBLAS, env.get("LD_PRELOAD")]))
    proc = subprocess.run([sys.executable, "-c", HARNESS, impl, str(frames), str(ROOT)], cwd=code_dir, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("commits", nargs="+", help="commits to time, oldest first (HEAD: this checkout's last commit; "
                                                "'work': this checkout's files as they are)")
    ap.add_argument("--frames", type=int, default=10, help="frames timed per commit (default 10)")
    opts = ap.parse_args()

    rows = [("mlx-audio (peer)", run(ROOT, "mlx-audio", opts.frames))]
    with tempfile.TemporaryDirectory(prefix="bisect_mlx_") as tmp:
        for commit in opts.commits:
            if commit == "work":
                rows.append(("work tree", run(ROOT, "ours", opts.frames)))
                continue
            tree = Path(tmp) / commit
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), commit], check=True)
            try:
                subject = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %ad %s", "--date=short",
                                          commit], capture_output=True, text=True).stdout.strip()
                rows.append((subject[:70], run(tree, "ours", opts.frames)))
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        rows.append(("mlx-audio (peer, again)", run(ROOT, "mlx-audio", opts.frames)))

    peer = [r["median_s"] for _, r in rows if "error" not in r and r["how"].startswith("mlx-audio")]
    peer_s = sorted(peer)[len(peer) // 2] if peer else None
    print(f"MLX frame, Marvis-250M random weights, {opts.frames} frames, median s/frame; ratio to mlx-audio's median")
    for name, r in rows:
        if "error" in r:
            print(f"  {name:<72} failed: {r['error']}")
            continue
        ratio = f"{r['median_s'] / peer_s:.2f}" if peer_s else "-"
        print(f"  {name:<72} {r['median_s']:.3f}  (mean {r['mean_s']:.3f})  ratio {ratio}  [{r['how']}]")


if __name__ == "__main__":
    main()
