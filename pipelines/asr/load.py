"""Config -> a ready ASR stage: where Whisper runs (resolved once, here) and its ONNX graph cache.

`section` is the agent's `[asr]` config section (anything with its fields: model, language, initial_prompt,
backend, ort_cache, temperature_fallback; quantization if it has one); relative paths in it are under `root`.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.ortgraph import Placement
from pipelines.paths import local_path


def asr_placement(section, root: Path | None = None) -> Placement:
    """Where Whisper runs: `asr.backend` resolved for this machine, at fp32 (float16 weights are widened on ONNX
    Runtime), or on ONNX Runtime with `asr.quantization` "8" every matrix in int8 (pipelines/asr/ort.py).
    Resolved here only: the stage is built with it, the CLI's BLAS check asks it."""
    from pipelines.ortgraph import Precision, resolve

    placement = resolve(section.backend, "none")
    if placement.backend == "onnx" and getattr(section, "quantization", "none") == "8":
        return Placement("onnx", Precision(8, dynamic=True))
    return placement


def load_asr(section, root: Path | None = None):
    """A `WhisperASR` of `section.model`, placed by `asr_placement`; on ONNX its graphs are cached under
    `section.ort_cache`, named by the weights and the precision."""
    from pipelines.asr.whisper import WhisperASR
    from pipelines.ortgraph import cache_folder, weights_key

    model_dir = local_path(section.model, root)
    placement = asr_placement(section, root)
    cache = None
    if placement.backend == "onnx" and model_dir.is_dir():  # encoder + decoder graphs
        cache = cache_folder(local_path(section.ort_cache, root), f"whisper-{weights_key(model_dir)}",
                             placement.precision)
    return WhisperASR(model_dir, language=section.language or None, initial_prompt=section.initial_prompt or None,
                      placement=placement, ort_cache=cache, fallback=section.temperature_fallback)
