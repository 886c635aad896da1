"""Marvis-250M TTS speed and memory: ours (MLX and ONNX Runtime, by precision) vs mlx-audio vs transformers.

What is notable here:
- All implementations run the same seeded random weights of the real shape (ours, copied into mlx-audio
  by name, exported to transformers' names with q/k permuted to rotate-half), so the figures measure
  speed, not speech. Greedy frames per implementation cross-check that they compute the same thing; the
  quantised variants cannot be identical, so the cross-check says how far they agree.
- Ours is composed from the parts `load_tts` uses (a backend, `FrameGenerator`, the Mimi stream decoder), not
  a patched stage. Each implementation runs in its own process, so `ru_maxrss` is its peak alone.
- Two prompts: 20 text tokens, and the same after two context segments (~300 rows), the agent's usual case.
- MLX's Linux wheel ships a slow reference BLAS; when Debian's OpenBLAS is installed the MLX workers are
  started with it in LD_PRELOAD (the transformers worker keeps torch's own BLAS; ONNX Runtime has its own).
- Timings are warm (one short generation first, as the agent's `warmup()` does); seconds/frame is the mean
  of frames 2..N, the first frame (prompt prefill + one frame) is reported on its own.
- Other work on the machine moves the figures: the load average is printed before and after.

    voice-agent bench tts --frames 50 --json bench.json
    voice-agent bench tts --frames 8 --impl ours --ours onnx-q8,onnx-q4 --prompt context
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from agent.config import ROOT

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
PRESET = "marvis-250m"
FRAME_RATE = 12.5  # Mimi frames per second of audio
PROMPT_TOKENS = 20
CONTEXT_FRAMES = 140  # per context segment
TOP_K, TEMPERATURE = 50, 0.9
IMPLS = ("ours", "mlx-audio", "transformers")


# ---- shared by the workers -------------------------------------------------------------------------------


def prompt_rows(text_vocab: int, num_codebooks: int = 32, context: bool = False):
    """The prompt every implementation gets: tokens, mask [T, K+1], and how many rows are context.

    plain: 20 text tokens. context: two context segments first (10 text rows, 140 audio frames and the
    all-zero EOS frame each, ~11 s of speech: ~300 rows in all), then the same 20 text tokens.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    K = num_codebooks
    parts = []

    def text(n):
        t = np.zeros((n, K + 1), np.int32)
        t[:, -1] = rng.integers(3, text_vocab, n)
        m = np.zeros_like(t, dtype=bool)
        m[:, -1] = True
        parts.append((t, m))

    def audio(n):
        t = np.zeros((n + 1, K + 1), np.int32)
        t[:n, :K] = rng.integers(0, 2048, (n, K))
        m = np.zeros_like(t, dtype=bool)
        m[:, :K] = True
        parts.append((t, m))

    if context:
        text(10), audio(CONTEXT_FRAMES), text(10), audio(CONTEXT_FRAMES)
    n_context = sum(len(t) for t, _ in parts)
    text(PROMPT_TOKENS)
    return np.concatenate([t for t, _ in parts]), np.concatenate([m for _, m in parts]), n_context


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> None:
    """Start a new high-water mark (VmHWM) here, so generation's own peak reads apart from loading's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def generation_peak_mb() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def openblas_loaded() -> bool:
    # by file name: numpy's own libscipy_openblas is mapped in every worker and serves numpy only
    return os.path.basename(os.path.realpath(OPENBLAS)) in Path("/proc/self/maps").read_text()


def timed_frames(frames) -> tuple[list, list[float]]:
    """Drain a generator of frames; seconds from the start to each frame."""
    codes, stamps = [], []
    start = time.perf_counter()
    for c in frames:
        codes.append([int(x) for x in c])
        stamps.append(time.perf_counter() - start)
    return codes, stamps


def mlx_work(frames) -> dict:
    """Host syncs and primitive operations of one steady frame (the second of a generation), counted on a frame
    that is not timed (`mlxwork.HostSyncs`)."""
    from agent.bench.mlxwork import HostSyncs

    it = iter(frames)
    next(it)
    with HostSyncs() as work:
        next(it)
    return work.summary()


def summarise(stamps: list[float]) -> dict:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    per_frame = sum(gaps) / len(gaps) if gaps else stamps[0]
    return {
        "first_frame_s": stamps[0],
        "s_per_frame": per_frame,
        "median_s_per_frame": sorted(gaps)[len(gaps) // 2] if gaps else stamps[0],
        "frames_per_s": 1.0 / per_frame,
        "rtf": per_frame * FRAME_RATE,
    }


def run_result(load_s: float, greedy: list, codes: list, stamps: list[float], **extra) -> dict:
    """What every worker reports once its timed frames are done."""
    return {"load_s": load_s, "peak_rss_mb": peak_rss_mb(), "gen_peak_mb": generation_peak_mb(),
            "greedy_codes": greedy, "sampled_codes": codes[:2], "stamps": stamps, **summarise(stamps), **extra}


def load_ours(opts):
    """Our seeded random model (the weights every implementation shares), maybe cast to bf16."""
    import mlx.core as mx

    from pipelines.tts.weights import random_model

    return random_model(PRESET, seed=opts.seed, dtype=mx.bfloat16 if opts.dtype == "bf16" else None)


def our_backend(opts, ck):
    """The frame loop's backend exactly as `load_tts` builds it: MLX, or ONNX Runtime at a precision."""
    from pipelines.tts.generator import MLXFrames, OrtFrames

    if opts.backend == "mlx":
        if opts.quant:  # as load_tts quantises on MLX: the Linear layers, a scale every tts.quant_block weights
            from pipelines.ortgraph import Precision, quantize_mlx
            from pipelines.tts.load import TTSConfig

            quantize_mlx(ck.model, Precision(opts.quant, TTSConfig().quant_block), embeddings=False)
        return MLXFrames(ck.model)

    return OrtFrames(our_ort_model(opts, ck))


def our_ort_model(opts, ck, profile: bool = False):
    from pipelines.ortgraph import Precision, cache_folder
    from pipelines.tts.load import TTSConfig
    from pipelines.tts.ort import OrtFrameModel

    precision = Precision(opts.quant or None, TTSConfig().quant_block)
    cache = cache_folder(ROOT / "checkpoints" / ".ort", f"bench-{PRESET}-seed{opts.seed}", precision)
    return OrtFrameModel(ck.model, precision, cache_dir=cache, progress=True, profile=profile)


def read_bandwidth_gbs(threads: int = 2, mb: int = 512) -> float:
    """This host's memory read bandwidth now: `threads` threads summing their halves of a large array (numpy
    releases the GIL), best of 5. Batch-1 frames are bound by it: the byte limit below divides by it."""
    import threading

    import numpy as np

    data = np.ones(mb * 2**20 // 8, np.float64)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(5):
        workers = [threading.Thread(target=np.sum, args=(part,)) for part in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def frame_bytes(args, bits: int | None, block: int) -> dict[str, float]:
    """Weight bytes one frame reads: the backbone once, the depth decoder 31 times, one audio head a step
    (embedding rows are a few KB). Blockwise weights: bits/8 a weight plus a 4-byte scale per block."""
    def matmul_bytes(n_in: int, n_out: int) -> float:
        n = n_in * n_out
        return n * 4 if bits is None else n * bits / 8 + (n / block) * 4

    def stack(t) -> float:
        qkv = (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
        return t.num_layers * (matmul_bytes(t.embed_dim, qkv) + matmul_bytes(t.num_heads * t.head_dim, t.embed_dim)
                               + matmul_bytes(t.embed_dim, 2 * t.intermediate_dim)
                               + matmul_bytes(t.intermediate_dim, t.embed_dim))

    K, V = args.audio_num_codebooks, args.audio_vocab_size
    backbone = stack(args.backbone) + matmul_bytes(args.backbone.embed_dim, V)
    step = stack(args.decoder) + matmul_bytes(args.backbone.embed_dim, args.decoder.embed_dim)
    heads = (K - 1) * matmul_bytes(args.decoder.embed_dim, V)
    return {"backbone": backbone, "depth": (K - 1) * step + heads, "total": backbone + (K - 1) * step + heads}


def profile_frame(opts, ck, n: int = 12) -> dict[str, float]:
    """ms a frame per part of the one frame graph, from ONNX Runtime's own node timings (profiling adds a
    little to each node; the wall time is reported beside)."""
    import re
    from collections import Counter

    import numpy as np

    model = our_ort_model(opts, ck, profile=True)
    K = ck.args.audio_num_codebooks
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    rows = np.zeros((20, K + 1), np.int64)
    rows[:, -1] = rng.integers(3, 1000, 20)
    mask = np.zeros_like(rows, np.float32)
    mask[:, -1] = 1
    codes, _ = model.run(rows, mask, cache)
    frame_mask = np.r_[np.ones(K), 0][None].astype(np.float32)
    start = time.perf_counter()
    for _ in range(n):
        codes, _ = model.run(np.r_[codes, 0][None], frame_mask, cache, rng.random(K, dtype=np.float32), TEMPERATURE, TOP_K)
    wall = (time.perf_counter() - start) / n
    trace_file = Path(model.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink(missing_ok=True)
    parts: Counter = Counter()
    runs = sum(1 for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name, op = e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "")
        head = name.split("/")[0] if "/" in name else ""
        weights = op in ("MatMulNBits", "MatMul")
        if head == "bb":
            part = "backbone matmuls" if weights else "backbone other"
        elif re.fullmatch(r"d\d+", head):
            part = "depth matmuls" if weights else "depth other (norms, attention, rope)"
        elif re.fullmatch(r"h\d+", head):
            part = "audio heads"
        elif head == "emb":
            part = "row embedding"
        else:
            part = "sampling + glue"
        parts[part] += e["dur"] / 1000
    out = {k: v / max(runs, 1) for k, v in parts.items()}
    out["wall (profiled)"] = wall * 1000
    return out


def worker_path(opts) -> dict:
    """The path users run: `load_tts` as the agent builds it, then `MarvisTTS.stream` (frames, chunking, Mimi)
    of one sentence after 0, ~500 and ~1500 context rows prefilled as the agent does between turns."""
    import numpy as np

    from pipelines.messages import Segment
    from pipelines.tts.load import TTSConfig, load_tts

    q = "none" if not opts.quant else str(opts.quant)
    cfg = TTSConfig(backend="onnx", quantization=q, ort_cache=str(ROOT / "checkpoints" / ".ort"))
    t0 = time.perf_counter()
    tts = load_tts(cfg, root=ROOT, log=lambda m: None, progress=True)
    tts.warmup()
    load_s = time.perf_counter() - t0
    K = tts.num_codebooks
    rng = np.random.default_rng(opts.seed)
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet woods."
    result = {"load_s": load_s, "backend": "onnx", "contexts": {}, "sentence_chars": len(text)}
    for rows in (0, 500, 1500):
        context, n = [], 0
        while n < rows:
            frames = min(300, rows - n - 12)
            if frames <= 0:
                break
            codes = rng.integers(0, 2048, (K, frames)).astype(np.int32)
            context.append(Segment(len(context) % 2, "Words said before in this conversation.", codes=codes))
            n += frames + 12
        if context:
            tts.prepare_context(context)
        ready, sizes = [], []
        start = time.perf_counter()
        for chunk in tts.stream(text, 0, context):
            ready.append(time.perf_counter() - start)
            sizes.append(chunk.num_frames)
        steady = (ready[-1] - ready[0]) / max(1, sum(sizes) - sizes[0])
        result["contexts"][str(rows)] = {"context_rows": n, "frames": sum(sizes), "first_chunk_s": ready[0],
                                         "s_per_frame": steady, "rtf": steady * FRAME_RATE, "chunks": sizes,
                                         "mimi_call_s": tts.decode_seconds}
    bits = None if not opts.quant else opts.quant
    ck = load_ours(opts)
    result["bandwidth_gbs"] = read_bandwidth_gbs()
    result["frame_bytes"] = frame_bytes(ck.args, bits, cfg.quant_block)
    result["byte_limit_s"] = result["frame_bytes"]["total"] / (result["bandwidth_gbs"] * 1e9)
    result["profile_ms"] = profile_frame(opts, ck)
    result["peak_rss_mb"] = peak_rss_mb()
    return result



# ---- workers: one implementation each, in its own process -------------------------------------------------


def worker_ours(opts) -> dict:
    import numpy as np

    from pipelines.tts.codec import MimiCodec
    from pipelines.tts.generator import FrameGenerator, GenerationConfig, PrefixCache
    from pipelines.tts.prompt import Prompt

    t0 = time.perf_counter()
    ck = load_ours(opts)
    frames_gen = FrameGenerator(our_backend(opts, ck))
    load_s = time.perf_counter() - t0
    tokens, mask, n_context = prompt_rows(ck.args.text_vocab_size, ck.args.audio_num_codebooks, opts.context)
    reset_peak_rss()

    def cfg(greedy=False):
        return GenerationConfig(temperature=0.0 if greedy else TEMPERATURE, top_k=TOP_K, seed=opts.seed,
                                stop_on_eos=False)

    def frames(n, greedy=False, prefix=None, rows=slice(None)):
        # no prefix cache: every run prefills its whole prompt, as the peers do
        return frames_gen.frames(Prompt(tokens[rows], mask[rows], 0, n), cfg(greedy), prefix)

    greedy, _ = timed_frames(frames(opts.greedy_frames, greedy=True))
    timed_frames(frames(2))  # warm-up
    codes, stamps = timed_frames(frames(opts.frames))
    result = run_result(load_s, greedy, codes, stamps, backend=frames_gen.backend.name)
    if opts.backend == "mlx":
        result["mlx_work"] = mlx_work(frames(2))

    # first audio chunk as the agent gets it: the default first_chunk_frames, decoded by a warm Mimi in its
    # streaming state; the median of three runs (one is at the mercy of the shared machine)
    n_first = GenerationConfig().first_chunk_frames
    result["first_chunk_frames"] = n_first
    codec = MimiCodec(seed=0)  # moshi's Mimi, random weights
    with codec.stream_decoder() as warm:
        warm.decode(np.zeros((ck.args.audio_num_codebooks, 2), np.int32))

    def first_chunk(prefix=None):
        start = time.perf_counter()
        with codec.stream_decoder() as decoder:
            chunk = np.stack(list(frames(n_first, prefix=prefix)), axis=1)
            before_mimi = time.perf_counter()
            decoder.decode(chunk)
        end = time.perf_counter()
        return end - start, end - before_mimi

    def median3(run):
        times = sorted((run() for _ in range(3)), key=lambda t: t[0])
        return times[1]

    result["first_chunk_s"], result["first_chunk_decode_s"] = median3(first_chunk)
    if n_context:
        # the agent prefills the context ahead of time (after the previous turn): only the 20 text rows remain
        def prefilled():
            prefix = PrefixCache()
            start = time.perf_counter()
            frames_gen.prefill(tokens[:n_context], mask[:n_context], prefix)
            ahead = time.perf_counter() - start
            return (*first_chunk(prefix), ahead)

        result["first_chunk_prefilled_s"], result["first_chunk_prefilled_decode_s"], result["prefill_context_s"] = \
            median3(prefilled)
    result["peak_rss_with_mimi_mb"] = peak_rss_mb()
    return result


def sesame_config(args) -> dict:
    """mlx-audio's SesameModel config (transformers-style keys) for our model shape."""
    from pipelines.tts.model import LLAMA3_ROPE

    def part(t):
        return dict(num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                    head_dim=t.head_dim, hidden_size=t.embed_dim, intermediate_size=t.intermediate_dim,
                    rms_norm_eps=t.norm_eps, max_position_embeddings=t.max_seq_len, attention_bias=False,
                    mlp_bias=False, rope_theta=t.rope_base, rope_scaling=dict(LLAMA3_ROPE))

    decoder = dict(part(args.decoder), attention_dropout=0.0, backbone_hidden_size=args.backbone.embed_dim,
                   hidden_act="silu", initializer_range=0.02, model_type="csm_depth_decoder",
                   num_codebooks=args.audio_num_codebooks, use_cache=True, vocab_size=args.audio_vocab_size)
    return dict(part(args.backbone), model_type="sesame", text_vocab_size=args.text_vocab_size,
                audio_vocab_size=args.audio_vocab_size, audio_num_codebooks=args.audio_num_codebooks,
                depth_decoder_config=decoder)


def mlx_audio_frames(model, tokens, mask, n: int, sampler):
    """`n` frames of codes from mlx-audio's Sesame `model`: the loop of its `Model.generate` (`generate_frame`,
    the new row fed back), without its EOS check; the prompt rows `tokens`, `mask` [T, K+1]."""
    import mlx.core as mx
    import numpy as np

    model.reset_caches()
    t, m = mx.array(tokens)[None], mx.array(mask)[None]
    pos = mx.arange(t.shape[1], dtype=mx.int32)[None]
    frame_mask = mx.array(np.r_[np.ones(tokens.shape[1] - 1, bool), False])[None, None]
    for _ in range(n):
        sample = model.generate_frame(t, m, pos, sampler)
        mx.eval(sample)  # generate()'s one sync a frame is its EOS test, `if mx.all(sample == 0)`
        yield np.array(sample)[0]
        t = mx.concatenate([sample.astype(mx.int32), mx.zeros((1, 1), mx.int32)], axis=1)[:, None]
        m, pos = frame_mask, pos[:, -1:] + 1


def worker_mlx_audio(opts) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_audio.lm.sample_utils import make_sampler
    from mlx_audio.tts.models.sesame.sesame import SesameModel

    t0 = time.perf_counter()
    ck = load_ours(opts)
    args = ck.args
    model = SesameModel(sesame_config(args))
    # our parameters by name; this also replaces mlx-audio's all-zero audio_head with our random one
    model.load_weights(tree_flatten(ck.model.parameters()), strict=True)
    del ck
    if opts.quant:  # the same layers at the same group size as ours (`our_backend`)
        from pipelines.ortgraph import Precision, quantize_mlx
        from pipelines.tts.load import TTSConfig

        quantize_mlx(model, Precision(opts.quant, TTSConfig().quant_block), embeddings=False)
    mx.eval(model.parameters())
    model.setup_caches(1)
    load_s = time.perf_counter() - t0
    reset_peak_rss()

    tokens, mask, _ = prompt_rows(args.text_vocab_size, args.audio_num_codebooks, opts.context)

    def frames(n, sampler):
        return mlx_audio_frames(model, tokens, mask, n, sampler)

    greedy, _ = timed_frames(frames(opts.greedy_frames, make_sampler(temp=0.0)))
    mx.random.seed(opts.seed)
    sampler = make_sampler(temp=TEMPERATURE, top_k=TOP_K)
    timed_frames(frames(2, sampler))  # warm-up
    codes, stamps = timed_frames(frames(opts.frames, sampler))
    return run_result(load_s, greedy, codes, stamps, mlx_work=mlx_work(frames(2, sampler)))


def to_transformers_name(key: str) -> str:
    """Our parameter names -> CsmForConditionalGeneration's (the inverse of weights.py's renames)."""
    renames = {
        "audio_embeddings.weight": "backbone_model.embed_tokens.embed_audio_tokens.weight",
        "projection.weight": "depth_decoder.model.inputs_embeds_projector.weight",
        "audio_head": "depth_decoder.codebooks_head.weight",
        "text_embeddings.weight": "embed_text_tokens.weight",
        "codebook0_head.weight": "lm_head.weight",
    }
    if key in renames:
        return renames[key]
    if key.startswith("backbone."):
        return "backbone_model." + key[len("backbone."):]
    if key.startswith("decoder."):
        return "depth_decoder.model." + key[len("decoder."):]
    raise KeyError(key)


def worker_export_transformers(opts) -> dict:
    """Write our fp32 random weights as a transformers CSM checkpoint (model.safetensors) in opts.export."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    ck = load_ours(opts)
    args = ck.args
    weights = {}
    for key, value in tree_flatten(ck.model.parameters()):
        name = to_transformers_name(key)
        if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            part = args.backbone if key.startswith("backbone.") else args.decoder
            heads = part.num_heads if ".q_proj." in key else part.num_kv_heads
            # interleaved RoPE pairs (ours) -> rotate-half halves (transformers): rows (h, d/2, 2) -> (h, 2, d/2)
            out_dim, in_dim = value.shape
            value = value.reshape(heads, out_dim // heads // 2, 2, in_dim).transpose(0, 2, 1, 3)
            value = value.reshape(out_dim, in_dim)
        weights[name] = mx.contiguous(value)
    mx.save_safetensors(str(Path(opts.export) / "model.safetensors"), weights, metadata={"format": "pt"})
    return {}


def csm_config(args):
    from transformers import CsmConfig

    from pipelines.tts.model import LLAMA3_ROPE

    rope = {**LLAMA3_ROPE, "rope_theta": args.backbone.rope_base}

    def part(t):
        return dict(hidden_size=t.embed_dim, intermediate_size=t.intermediate_dim, num_hidden_layers=t.num_layers,
                    num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
                    rms_norm_eps=t.norm_eps, rope_parameters=dict(rope))

    decoder = dict(part(args.decoder), backbone_hidden_size=args.backbone.embed_dim, vocab_size=args.audio_vocab_size,
                   num_codebooks=args.audio_num_codebooks)
    return CsmConfig(**part(args.backbone), text_vocab_size=args.text_vocab_size, vocab_size=args.audio_vocab_size,
                     num_codebooks=args.audio_num_codebooks, max_position_embeddings=args.max_seq_len,
                     depth_decoder_config=decoder)


def worker_transformers(opts) -> dict:
    import numpy as np
    import torch
    from transformers import CsmForConditionalGeneration
    from transformers.utils import logging as hf_logging

    from pipelines.tts.model import ModelArgs

    torch.set_num_threads(2)
    hf_logging.set_verbosity_error()  # the unused codec_model is missing from the export: randomly initialised
    args = ModelArgs.preset(PRESET)
    K = args.audio_num_codebooks
    t0 = time.perf_counter()
    csm_config(args).save_pretrained(opts.export)  # from_pretrained wants config.json beside the weights
    model = CsmForConditionalGeneration.from_pretrained(opts.export, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    reset_peak_rss()
    tokens, mask, _ = prompt_rows(args.text_vocab_size, K, opts.context)

    def sample(logits: torch.Tensor, gen: torch.Generator | None) -> int:
        if gen is None:
            return int(logits.argmax())
        top, idx = torch.topk(logits.float() / TEMPERATURE, TOP_K)
        return int(idx[torch.multinomial(torch.softmax(top, -1), 1, generator=gen)])

    @torch.inference_mode()
    def frames(n, gen):
        t = torch.from_numpy(tokens).long()
        text = model.embed_text_tokens(t[:, -1])
        audio = model.backbone_model.embed_tokens(t[None, :, :K])[0]
        embeds = torch.where(torch.from_numpy(mask[:, -1])[:, None], text, audio)[None]
        out = model.backbone_model(inputs_embeds=embeds, use_cache=True)
        for _ in range(n):
            cache, h = out.cache, out.last_hidden_state[:, -1]
            codes = [sample(model.lm_head(h)[0], gen)]
            dec = model.depth_decoder(input_ids=torch.tensor([[0, codes[0]]]), backbone_last_hidden_state=h,
                                      use_cache=True, logits_to_keep=1)
            for k in range(1, K):
                codes.append(sample(dec.logits[0, -1], gen))
                if k < K - 1:
                    dec = model.depth_decoder(input_ids=torch.tensor([[codes[-1]]]), cache=dec.cache, use_cache=True,
                                              logits_to_keep=1)
            yield np.array(codes)
            row = model.backbone_model.embed_tokens(torch.tensor([[codes]]))
            out = model.backbone_model(inputs_embeds=row, cache=cache, use_cache=True)

    greedy, _ = timed_frames(frames(opts.greedy_frames, None))
    gen = torch.Generator().manual_seed(opts.seed)
    timed_frames(frames(2, gen))  # warm-up
    codes, stamps = timed_frames(frames(opts.frames, gen))
    return run_result(load_s, greedy, codes, stamps, torch_threads=torch.get_num_threads())


WORKERS = {"ours": worker_ours, "mlx-audio": worker_mlx_audio, "transformers": worker_transformers,
           "export-transformers": worker_export_transformers, "path": worker_path}


def worker_main(opts) -> None:
    result = WORKERS[opts.worker](opts)
    result["openblas_loaded"] = openblas_loaded()
    Path(opts.result).write_text(json.dumps(result))


# ---- the parent: runs the workers, prints the table ---------------------------------------------------------


def worker_env(impl: str, variant: str, use_openblas: bool) -> tuple[dict, str]:
    """OpenBLAS for workers that run MLX, as the agent preloads it (agent/cli.py): not for torch (its own BLAS)
    nor for ours on ONNX Runtime, whose Mimi (torch) its idle threads slow down."""
    env = dict(os.environ)
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    runs_mlx = impl == "mlx-audio" or (impl == "ours" and variant.startswith("mlx"))
    if not runs_mlx or not use_openblas:
        preload = [p for p in preload if "openblas" not in p]
    elif os.path.exists(OPENBLAS) and not any("openblas" in p for p in preload):
        preload.append(OPENBLAS)
    env["LD_PRELOAD"] = ":".join(preload)
    return env, env["LD_PRELOAD"] or "-"


def run_worker(impl: str, variant: str, context: bool, opts, export: str) -> dict:
    """One implementation in its own process; `variant` is ours' backend-precision or the peer's dtype."""
    backend, _, precision = variant.rpartition("-")
    dtype = "bf16" if precision == "bf16" else "fp32"
    quant = int(precision[1:]) if precision.startswith("q") else 0
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, "-m", "agent.bench.tts", "--worker", impl, "--backend", backend or "mlx", "--dtype", dtype,
           "--quant-bits", str(quant), "--frames", str(opts.frames), "--greedy-frames", str(opts.greedy_frames),
           "--seed", str(opts.seed), "--export", export, "--result", result_file] + (["--context"] if context else [])
    env, preload = worker_env(impl, variant, not opts.no_openblas)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"error": f"exit {proc.returncode}: {tail[0]}", "ld_preload": preload}
        result = json.loads(Path(result_file).read_text())
    finally:
        os.unlink(result_file)
    result.update(ld_preload=preload, wall_s=wall)
    return result


def versions() -> str:
    names = ["mlx", "mlx-lm", "mlx-audio", "onnxruntime", "torch", "transformers", "moshi", "numpy"]
    out = []
    for n in names:
        try:
            out.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 ** 2 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{platform.system()} {platform.machine()}, {cpu}, nproc {os.cpu_count()}, {mem} GiB RAM, load avg {load}"


def row_label(impl: str, variant: str) -> str:
    return f"{impl} {variant}"


def print_table(rows: list[dict]) -> None:
    head = ["implementation", "prompt", "s/frame", "median", "RTF", "1st frame s", "1st chunk s (Mimi s)",
            "prefilled 1st chunk s", "peak MB", "load s", "BLAS"]
    lines = [head]
    for r in rows:
        res = r["result"]
        if "error" in res:
            lines.append([r["label"], "failed: " + res["error"]])
            continue
        chunk = f"{res['first_chunk_s']:.3f} ({res['first_chunk_decode_s']:.3f})" if "first_chunk_s" in res else "-"
        warm = (f"{res['first_chunk_prefilled_s']:.3f} (+{res['prefill_context_s']:.2f} ahead)"
                if "first_chunk_prefilled_s" in res else "-")
        if r["impl"] == "transformers":
            blas = "torch"
        elif res.get("backend") == "onnx":
            blas = "ONNX Runtime"
        else:
            blas = "OpenBLAS" if res.get("openblas_loaded") else "MLX's own"
        lines.append([r["label"], r["prompt"], f"{res['s_per_frame']:.3f}", f"{res['median_s_per_frame']:.3f}",
                      f"{res['rtf']:.2f}", f"{res['first_frame_s']:.3f}", chunk, warm, f"{res['peak_rss_mb']:.0f}",
                      f"{res['load_s']:.1f}", blas])
    widths = [max(len(line[i]) for line in lines if len(line) == len(head)) for i in range(len(head))]
    for i, line in enumerate(lines):
        if len(line) != len(head):  # a failed implementation: its error on one line
            print(f"  {line[0]:<{widths[0]}}  {line[1]}")
            continue
        print("  " + "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def print_mlx_work(rows: list[dict]) -> None:
    """What a frame would cost a GPU (launches, waits), counted on MLX's graph of one untimed steady frame."""
    work = [r for r in rows if "mlx_work" in r["result"]]
    if not work:
        return
    print()
    print("an MLX frame's work (one steady frame, untimed; MLX's graph on this backend: on a CPU, fast ops such as\n"
          "RoPE and attention expand into their parts, so a GPU runs fewer): host syncs (the host waits for the\n"
          "device), primitive operations, and the kinds that move weights")
    for r in work:
        w = r["result"]["mlx_work"]
        kinds = w["ops_by_kind"]
        print(f"  {r['label']:<22} {r['prompt']:<8} syncs {w['host_syncs']:.0f}  ops {w['ops']:.0f}  "
              f"Matmul {kinds.get('Matmul', 0):.0f}  Gather {kinds.get('Gather', 0):.0f}  "
              f"QuantizedMatmul {kinds.get('QuantizedMatmul', 0):.0f}")


def print_path(rows: list[dict]) -> None:
    """The stage-path table: what `voice-agent tts` and the agent's replies get, by context length."""
    if not rows:
        return
    print()
    print("the path users run (load_tts + MarvisTTS.stream: frames, adaptive chunks, streaming Mimi), one sentence:")
    print("  variant              context rows  frames  1st chunk s  s/frame  RTF   last Mimi call s  chunks")
    for r in rows:
        res = r["result"]
        if "error" in res:
            print(f"  {r['label']}: failed: {res['error']}")
            continue
        for c in res["contexts"].values():
            print(f"  {r['variant']:<20} {c['context_rows']:>12}  {c['frames']:>6}  {c['first_chunk_s']:>11.3f}  "
                  f"{c['s_per_frame']:>7.3f}  {c['rtf']:.2f}  {c['mimi_call_s']:>16.4f}  {c['chunks'][:8]}...")
    for r in rows:
        res = r["result"]
        if "error" in res:
            continue
        fb = res["frame_bytes"]
        print(f"  {r['variant']}: a frame reads {fb['total'] / 1e6:.0f} MB of weights (backbone {fb['backbone'] / 1e6:.0f}, "
              f"depth loop {fb['depth'] / 1e6:.0f}); this host reads {res['bandwidth_gbs']:.1f} GB/s (2 threads) -> "
              f"byte limit {res['byte_limit_s'] * 1000:.0f} ms a frame (RTF {res['byte_limit_s'] * FRAME_RATE:.2f}); "
              f"measured {res['contexts']['0']['s_per_frame'] * 1000:.0f} ms with Mimi")
        prof = res["profile_ms"]
        wall = prof.pop("wall (profiled)")
        print(f"    where a frame's time goes (ONNX Runtime node timings, ms; profiled frame {wall:.1f} ms wall): "
              + ", ".join(f"{k} {v:.1f}" for k, v in sorted(prof.items(), key=lambda kv: -kv[1])))


OUR_VARIANTS = ("mlx-fp32", "mlx-bf16", "mlx-q8", "mlx-q4", "onnx-fp32", "onnx-q8", "onnx-q4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=50, help="frames to time per implementation (default 50)")
    ap.add_argument("--impl", default=",".join(IMPLS), help="comma list of: " + ", ".join(IMPLS))
    ap.add_argument("--ours", default="mlx-fp32,onnx-fp32,onnx-q8,onnx-q4",
                    help="comma list of our backend-precision variants: " + ", ".join(OUR_VARIANTS))
    ap.add_argument("--path", default="onnx-q4,onnx-q8",
                    help="comma list of ONNX variants (onnx-fp32, onnx-q8, onnx-q4) timed on the path users run: "
                         "load_tts + MarvisTTS.stream (chunking, Mimi) after 0/500/1500 context rows, with the "
                         "host's bandwidth, the byte limit and where a frame's time goes; '' for none")
    ap.add_argument("--peer-dtype", default="fp32", help="comma list of fp32, bf16, q8, q4 for mlx-audio (q: its Linear "
                    "layers quantised as ours on MLX; transformers: fp32)")
    ap.add_argument("--prompt", default="plain,context", help="comma list of: plain (20 text tokens), context "
                    f"(+ two context segments, {2 * (CONTEXT_FRAMES + 11)} rows)")
    ap.add_argument("--greedy-frames", type=int, default=50, help="greedy frames for the cross-check (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-openblas", action="store_true", help="run MLX with its bundled BLAS")
    ap.add_argument("--json", help="write all figures (and per-frame times) to this file")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="mlx", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--quant-bits", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--context", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--export", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.worker:
        opts.quant = opts.quant_bits
        return worker_main(opts)

    def items(text, allowed, what):
        out = [x.strip() for x in text.split(",") if x.strip()]
        for x in out:
            if x not in allowed:
                ap.error(f"unknown {what} {x!r}; choose from {', '.join(allowed)}")
        return out

    impls = items(opts.impl, IMPLS, "implementation")
    paths = items(opts.path, ("onnx-fp32", "onnx-q8", "onnx-q4"), "path variant")
    ours = items(opts.ours, OUR_VARIANTS, "variant")
    peer_dtypes = items(opts.peer_dtype, ("fp32", "bf16", "q8", "q4"), "dtype")
    prompts = items(opts.prompt, ("plain", "context"), "prompt")
    if opts.frames < 2:
        ap.error("--frames must be at least 2 (the first frame is reported on its own)")
    if any(not v.startswith("onnx") for v in paths):
        ap.error("--path takes ONNX variants")

    plan = []
    for prompt in prompts:
        for impl in impls:
            variants = ours if impl == "ours" else (["fp32"] if impl == "transformers" else peer_dtypes)
            plan += [(impl, v, prompt) for v in variants]

    has_openblas = os.path.exists(OPENBLAS)
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print("machine:", machine())
    print("versions:", versions())
    print(f"LD_PRELOAD of this process: {os.environ.get('LD_PRELOAD') or '-'}")
    if opts.no_openblas:
        print("MLX workers: MLX's bundled BLAS (--no-openblas)")
    elif has_openblas:
        print(f"MLX workers: re-executed with LD_PRELOAD={OPENBLAS} (MLX's Linux wheel ships a slow reference BLAS)")
    else:
        print(f"MLX workers: {OPENBLAS} not installed, MLX's bundled BLAS")
    print(f"OPENBLAS_NUM_THREADS: {os.environ.get('OPENBLAS_NUM_THREADS', '-')}; transformers: torch, 2 threads")
    print(f"workload: {PRESET} shape, RANDOM weights (seed {opts.seed}), prompts {', '.join(prompts)}, "
          f"{opts.frames} frames, top-k {TOP_K} / temp {TEMPERATURE}, EOS off; each implementation in its own process")
    print(flush=True)

    export = tempfile.mkdtemp(prefix="bench_tts_")
    rows = []
    try:
        if "transformers" in impls:
            print("exporting the random weights to transformers' CSM format ...", file=sys.stderr, flush=True)
            res = run_worker("export-transformers", "fp32", False, opts, export)
            if "error" in res:
                print(f"export failed: {res['error']}", file=sys.stderr)
        for impl, variant, prompt in plan:
            label = row_label(impl, variant)
            print(f"running {label} on the {prompt} prompt ...", file=sys.stderr, flush=True)
            rows.append({"impl": impl, "variant": variant, "prompt": prompt, "label": label,
                         "result": run_worker(impl, variant, prompt == "context", opts, export)})
        for variant in paths:
            print(f"running ours {variant} on the path users run ...", file=sys.stderr, flush=True)
            rows.append({"impl": "path", "variant": variant, "prompt": "sentence", "label": f"ours {variant} (stage)",
                         "result": run_worker("path", variant, False, opts, export)})
    finally:
        shutil.rmtree(export, ignore_errors=True)

    path_rows = [r for r in rows if r["impl"] == "path"]
    rows = [r for r in rows if r["impl"] != "path"]
    print_table(rows)
    print_path(path_rows)
    print()
    print("  s/frame: mean of frames 2..N (median: their median, steadier on a shared machine).\n"
          "  RTF = s/frame x 12.5 (below 1 is faster than real time). 1st frame: whole-prompt prefill + frame 1.\n"
          "  1st chunk: ours, first_chunk_frames (the default's) + a warm moshi Mimi decode, whole prompt prefilled on\n"
          "  the spot (Mimi's share in brackets); median of 3. prefilled 1st chunk: the agent's case, the context rows\n"
          "  prefilled ahead of time (after the previous turn; that time in brackets), so only the 20 text rows +\n"
          "  the first chunk's frames + Mimi remain.\n"
          "  peak MB: ru_maxrss of the implementation's own process (loading included).")

    ok = {(r["impl"], r["variant"], r["prompt"]): r["result"] for r in rows if "error" not in r["result"]}
    print()
    print(f"greedy cross-check ({opts.greedy_frames} frames x 32 codes, same weights and prompt):")
    for prompt in prompts:
        ref = ok.get(("ours", "mlx-fp32", prompt))
        for (impl, variant, p), res in ok.items():
            if p != prompt or ref is None or (impl, variant) == ("ours", "mlx-fp32"):
                continue
            a, b = ref["greedy_codes"], res["greedy_codes"]
            same = sum(x == y for fa, fb in zip(a, b) for x, y in zip(fa, fb))
            total = sum(len(f) for f in a)
            first = next((i for i, (fa, fb) in enumerate(zip(a, b)) if fa != fb), None)
            verdict = "MATCH" if a == b else (f"DIFFER: {same}/{total} codes equal, first differing frame {first} "
                                              "(after it the frames feed back different codes)")
            print(f"  {prompt}: ours mlx-fp32 vs {impl} {variant}: {verdict}")
        for (impl, variant, p), res in ok.items():  # ours on MLX vs mlx-audio at the same precision
            backend, _, precision = variant.rpartition("-")
            peer = ok.get(("mlx-audio", precision, p))
            if impl != "ours" or p != prompt or backend != "mlx" or precision == "fp32" or not peer:
                continue
            verdict = "MATCH" if res["greedy_codes"] == peer["greedy_codes"] else "DIFFER"
            print(f"  {prompt}: ours {variant} vs mlx-audio {precision}: {verdict}")

    print()
    print("ratios of time per frame, ours / peer (below 1: ours is faster), of the means and of the medians:")
    for (impl, variant, prompt), res in ok.items():
        if impl != "ours":
            continue
        backend, _, precision = variant.rpartition("-")
        same_dtype = ("mlx-audio", precision if backend == "mlx" else "fp32")
        for peer in [same_dtype, ("transformers", "fp32")]:
            if (*peer, prompt) in ok:
                ref = ok[(*peer, prompt)]
                mean = res["s_per_frame"] / ref["s_per_frame"]
                median = res["median_s_per_frame"] / ref["median_s_per_frame"]
                print(f"  {prompt}: ours {variant} / {row_label(*peer)}: {mean:.2f} mean, {median:.2f} median "
                      f"(ours at {1 / mean:.2f}x / {1 / median:.2f}x the peer's speed)")
    print_mlx_work(rows)
    print()
    print(f"load avg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if opts.json:
        meta = {"command": [sys.executable, *sys.argv], "machine": machine(), "versions": versions(),
                "openblas": None if opts.no_openblas or not has_openblas else OPENBLAS, "frames": opts.frames,
                "prompts": prompts, "top_k": TOP_K, "temperature": TEMPERATURE, "preset": PRESET}
        Path(opts.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"\nwrote {opts.json}")


if __name__ == "__main__":
    main()
