"""Config -> a ready TTS stage: which checkpoint (or the labelled random fallback), tokenizer, Mimi and backend.

`TTSConfig` is the one home of every TTS knob: it extends the per-call `GenerationConfig` with what is fixed
at load time, and the agent's `[tts]` config section is this dataclass. The backend is chosen here:
`auto` runs the frame loop on ONNX Runtime on a CPU (MLX's CPU kernels are the slow part, docs/performance.md §2) and on
MLX where MLX has a GPU (Metal); either can be forced. ONNX graphs are built once per checkpoint and
precision and cached under `ort_cache`, keyed by a hash of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import CheckpointError
from pipelines.paths import local_path
from pipelines.tts.generator import GenerationConfig

DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("auto", "mlx", "onnx")
QUANTIZATIONS = ("auto", "none", "8", "4")


@dataclass(frozen=True)
class TTSConfig(GenerationConfig):
    checkpoint: str = "checkpoints/marvis-tts-250m-v0.2"  # used when present; otherwise `fallback`
    fallback: str = "random:marvis-250m"  # the offline default: real shape, seeded random weights
    mimi: str = "checkpoints/mimi/tokenizer-e351c8d8-checkpoint125.safetensors"
    tokenizer: str = "checkpoints/smollm2-135m-instruct"  # used when the checkpoint carries none
    dtype: str = "float32"  # MLX weights
    backend: str = "auto"  # auto | mlx | onnx
    # auto: 4-bit on ONNX Runtime (the frame loop is faster than real time on two cores only there; Marvis'
    # makers publish 4-bit MLX weights too), the checkpoint's own on MLX | none (fp32) | 8 | 4
    quantization: str = "auto"
    quant_block: int = 64  # int8/int4 weights per scale (32 | 64 | 128), on ONNX and MLX; 64: the makers' MLX 4-bit
    ort_cache: str = "checkpoints/.ort"
    seed: int = 0
    speaker: int = 0  # the agent's voice
    user_speaker: int = 1
    context_segments: int = 6  # most conversation segments the agent passes as context (window: agent/conversation.py)

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("dtype", DTYPES), ("backend", BACKENDS), ("quantization", QUANTIZATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"tts.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        from pipelines.ortgraph import QUANT_BLOCKS

        if self.quant_block not in QUANT_BLOCKS:
            raise ValueError(f"tts.quant_block must be one of {', '.join(map(str, QUANT_BLOCKS))}, got {self.quant_block!r}")
        for name in ("speaker", "user_speaker", "context_segments"):
            if getattr(self, name) < 0:
                raise ValueError(f"tts.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("checkpoint", "fallback"):
            spec = getattr(self, name)
            if spec.startswith("random:"):
                from pipelines.tts.model import PRESETS

                if spec.split(":", 1)[1] not in PRESETS:
                    raise ValueError(f"tts.{name} {spec!r}: no such preset; known: "
                                     + ", ".join(f"random:{p}" for p in PRESETS))


def resolve_backend(config: TTSConfig):
    """Where the frame loop runs on this machine: a `pipelines.ortgraph.Placement` (backend, precision)."""
    from pipelines.ortgraph import resolve

    return resolve(config.backend, config.quantization, auto_bits="4", block=config.quant_block)


def load_tts(config: TTSConfig, root: Path | None = None, checkpoint: str | None = None,
             log: Callable[[str], None] = print, progress: bool = True):
    """Marvis from `checkpoint` (or config.checkpoint); the labelled random fallback when that is absent."""
    import mlx.core as mx

    from pipelines.tts.codec import MimiCodec
    from pipelines.tts.generator import MLXFrames, OrtFrames
    from pipelines.tts.prompt import TextTokenizer
    from pipelines.tts.stage import MarvisTTS
    from pipelines.tts.weights import check_tokenizer, load_checkpoint, random_model

    def resolve(p: str) -> Path:
        return local_path(p, root)

    dtype = getattr(mx, config.dtype)
    spec = checkpoint or config.checkpoint
    if spec.startswith("random:"):
        loaded, key = random_model(spec.split(":", 1)[1], seed=config.seed, dtype=dtype), spec
    elif resolve(spec).exists():
        loaded, key = load_checkpoint(resolve(spec), dtype=dtype), None
    elif checkpoint is not None:
        raise CheckpointError(f"{spec}: no such TTS checkpoint")
    elif config.fallback.startswith("random:"):
        spec = config.fallback
        loaded, key = random_model(spec.split(":", 1)[1], seed=config.seed, dtype=dtype), spec
    else:
        spec = config.fallback
        loaded, key = load_checkpoint(resolve(spec), dtype=dtype), None
    tokenizer_dir = loaded.tokenizer_dir or resolve(config.tokenizer)
    check_tokenizer(tokenizer_dir, loaded.args)
    tokenizer = TextTokenizer(tokenizer_dir)
    mimi_path = resolve(config.mimi)
    if not mimi_path.is_file() and loaded.codec_files:  # a transformers repo carries its own Mimi
        codec = MimiCodec.from_transformers(loaded.codec_files, num_codebooks=loaded.args.audio_num_codebooks,
                                            config=loaded.codec_config)
    else:
        codec = MimiCodec(mimi_path if mimi_path.is_file() else None, num_codebooks=loaded.args.audio_num_codebooks,
                          seed=config.seed)

    backend, precision = resolve_backend(config)
    bits = precision.bits
    if backend == "onnx":
        from pipelines.ortgraph import cache_folder, weights_key
        from pipelines.tts.ort import OrtFrameModel

        if key is None:
            key = weights_key(resolve(spec))
        else:  # a random model is its preset, seed and dtype
            key = f"{key.replace(':', '-')}-seed{config.seed}-{config.dtype}"
        folder = cache_folder(resolve(config.ort_cache), key, precision)
        frames = OrtFrames(OrtFrameModel(loaded.model, precision, cache_dir=folder, progress=progress))
        loaded.model = None  # the graphs hold every weight now: free the MLX copy (~1 GB for Marvis-250M in fp32)
    else:
        if bits is not None:  # tts.quantization 8 | 4 with a scale every tts.quant_block weights (the Linear layers)
            from pipelines.ortgraph import quantize_mlx

            quantize_mlx(loaded.model, precision, embeddings=False)
            loaded.model.quantization_bits = bits
        frames = MLXFrames(loaded.model)
    tts = MarvisTTS(loaded, tokenizer, codec, config, backend=frames)
    if tts.untrained:
        log("WARNING: " + tts.describe())
        log("WARNING: the agent's voice is UNTRAINED noise until real Marvis/Mimi weights are in checkpoints/ "
            "(see checkpoints/README.md, `voice-agent fetch`)")
    else:
        log(tts.describe())
    if frames.quantization:
        log(f"note: the TTS runs {frames.quantization}-bit weights (--tts.quantization none for fp32); "
            "with untrained weights nobody can hear whether that costs quality")
    return tts

