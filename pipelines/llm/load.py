"""Config -> a ready reply stage: where the LLM runs and at what precision (resolved once, here), and its ONNX
graph cache.

`section` is the agent's `[llm]` config section (anything with its fields: model, system_prompt, examples,
max_history_turns, max_tokens, temperature, seed, no_repeat_ngram, backend, quantization, ort_cache); relative
paths in it are under `root`.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.ortgraph import Placement
from pipelines.paths import local_path


def llm_placement(section) -> Placement:
    """`llm.backend` and `llm.quantization` resolved for this machine: auto is 8-bit on ONNX Runtime, the
    checkpoint's own on MLX; 8 and 4 are honoured on both (blocks of `pipelines.ortgraph.QUANT_BLOCK`)."""
    from pipelines.ortgraph import resolve

    return resolve(section.backend, section.quantization)


def load_llm(section, root: Path | None = None):
    """A `ReplyLLM` of `section.model`, placed by `llm_placement`; on ONNX its graphs are cached under
    `section.ort_cache`, named by the weights and the precision."""
    from pipelines.llm.reply import ReplyLLM
    from pipelines.ortgraph import cache_folder, weights_key

    model_dir = local_path(section.model, root)
    placement = llm_placement(section)
    cache = None
    if placement.backend == "onnx" and model_dir.is_dir():
        cache = cache_folder(local_path(section.ort_cache, root), f"llm-{weights_key(model_dir)}", placement.precision)
    return ReplyLLM(model_dir, section.system_prompt, max_history_turns=section.max_history_turns,
                    max_tokens=section.max_tokens, temperature=section.temperature, seed=section.seed,
                    placement=placement, ort_cache=cache, examples=[tuple(e) for e in section.examples],
                    no_repeat_ngram=section.no_repeat_ngram)
