"""Where Whisper's encoder spends its time on ONNX Runtime, and what does not make it faster.

    .venv/bin/python scripts/bench_asr_encoder.py [--runs 5] [--model checkpoints/stand-ins/whisper-base.en-mlx-fp32]

On the default model (tiny.en's encoder graph as the agent builds it, a random mel of its 30 s window; `--model`:
any mlx-whisper folder, e.g. a stand-in of the fetched set's), in one process:
1. the time per ONNX op type (the session's own profile);
2. the standard `Attention` op against ONNX Runtime's fused `MultiHeadAttention` at one encoder layer's shape;
3. the pool sleeping, spinning only inside a run, and spinning;
4. the weights at 8 and 4 bits (`MatMulNBits`, int8 arithmetic) against fp32, with how far the features move;
5. one thread against the agent's pool, idle and with another process on half and on one whole core.
Run it without LD_PRELOAD, as the CLI runs the default path.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_ms(run, runs: int) -> float:
    run()  # warm
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def attention_model(kind: str, positions: int, width: int, heads: int) -> bytes:
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, positions, width]) for n in "qkv"]
    output = helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, positions, width])
    opsets = [helper.make_opsetid("", 23)]
    if kind == "Attention":
        node = helper.make_node("Attention", ["q", "k", "v"], ["o"], q_num_heads=heads, kv_num_heads=heads)
    else:
        node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=heads)
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    graph = helper.make_graph([node], "attention", inputs, [output])
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", help="an mlx-whisper folder instead of the default config's")
    opts = ap.parse_args()

    import onnx
    import onnxruntime as ort

    from agent.bench.load import busy_core
    from agent.config import load_config
    from pipelines.asr.load import load_asr
    from pipelines.ortgraph import quantize, save, session

    section = load_config("default").asr
    if opts.model:
        section = dataclasses.replace(section, model=opts.model)
    asr = load_asr(section, ROOT)
    asr.warmup()  # builds the graphs into the cache if they are not there
    path = next(Path(asr.ort_cache).rglob("encoder.onnx"))
    mel = np.random.default_rng(0).standard_normal((1, 3000, 80)).astype(np.float32)
    feeds = {"mel": mel}

    profiled = session(path, 2, profile=True)
    for _ in range(opts.runs):
        profiled.run(None, feeds)
    trace = Path(profiled.end_profiling())
    per_op, count = collections.Counter(), collections.Counter()
    for e in json.loads(trace.read_text()):
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1000 / opts.runs
            count[e["args"]["op_name"]] += 1
    trace.unlink(missing_ok=True)
    print("1. ms a window by op type: " + ", ".join(f"{op} {ms:.1f} ({count[op] // opts.runs})"
                                                    for op, ms in per_op.most_common(6))
          + f"; all {sum(per_op.values()):.1f}")

    positions, width = 1500, asr._network().dims.n_audio_state
    heads = asr._network().dims.n_audio_head
    qkv = {n: np.random.default_rng(1).standard_normal((1, positions, width)).astype(np.float32) for n in "qkv"}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    outs, times = {}, {}
    for kind in ("Attention", "MultiHeadAttention"):
        s = ort.InferenceSession(attention_model(kind, positions, width, heads), options, providers=["CPUExecutionProvider"])
        outs[kind] = s.run(None, qkv)[0]
        times[kind] = median_ms(lambda s=s: s.run(None, qkv), opts.runs)
    print(f"2. one layer's attention [1, {positions}, {width}], {heads} heads: Attention {times['Attention']:.1f} ms, "
          f"MultiHeadAttention {times['MultiHeadAttention']:.1f} ms, max |difference| "
          f"{np.abs(outs['Attention'] - outs['MultiHeadAttention']).max():.1e}")

    spins = {label: median_ms(lambda s=session(path, 2, spin=spin): s.run(None, feeds), opts.runs)
             for label, spin in (("sleeping", False), ("spinning inside a run", "run"), ("spinning", True))}
    print("3. the pool: " + ", ".join(f"{k} {v:.1f} ms" for k, v in spins.items()))

    reference = session(path, 2).run(None, feeds)[0]
    cells = [f"fp32 {spins['sleeping']:.1f} ms"]
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (8, 4):
            folder = Path(tmp) / f"q{bits}"
            folder.mkdir()
            save(quantize(onnx.load(str(path)), bits, 32), folder / "encoder.onnx")
            s = session(folder / "encoder.onnx", 2)
            moved = np.linalg.norm(s.run(None, feeds)[0] - reference) / np.linalg.norm(reference)
            cells.append(f"{bits}-bit {median_ms(lambda s=s: s.run(None, feeds), opts.runs):.1f} ms "
                         f"(features moved {100 * moved:.1f} %)")
    print("4. weights: " + ", ".join(cells))

    pools = {threads: session(path, threads) for threads in (1, 2)}
    rows = []
    for load in (0.0, 0.5, 1.0):
        with busy_core(load):
            time.sleep(0.5)
            rows.append(f"{load:g} core taken: " + ", ".join(
                f"{threads} thread{'s' if threads > 1 else ''} {median_ms(lambda s=s: s.run(None, feeds), opts.runs):.0f} ms"
                for threads, s in pools.items()))
    print("5. " + "; ".join(rows))


if __name__ == "__main__":
    main()
