"""Config -> ready stages. Each stage is built in one place, in pipelines (`pipelines.{asr,llm,tts}.load`), from
its own config section, resolving where it runs once; this only composes them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from agent.config import ROOT, AgentConfig
from agent.engine import Stages


def build_tts(cfg: AgentConfig, checkpoint: str | None = None, log: Callable[[str], None] = print):
    """Marvis from `checkpoint` (or tts.checkpoint); the labelled random fallback when it is absent."""
    from pipelines.tts.load import load_tts

    return load_tts(cfg.tts, root=ROOT, checkpoint=checkpoint, log=log)


def asr_placement(cfg: AgentConfig):
    """Where Whisper runs (`pipelines.asr.load.asr_placement`)."""
    from pipelines.asr.load import asr_placement as placement

    return placement(cfg.asr, ROOT)


def llm_placement(cfg: AgentConfig):
    """Where the reply LLM runs, at what precision (`pipelines.llm.load.llm_placement`)."""
    from pipelines.llm.load import llm_placement as placement

    return placement(cfg.llm)


def build_asr(cfg: AgentConfig):
    from pipelines.asr.load import load_asr

    return load_asr(cfg.asr, root=ROOT)


def build_llm(cfg: AgentConfig):
    from pipelines.llm.load import load_llm

    return load_llm(cfg.llm, root=ROOT)


def build_stages(cfg: AgentConfig, log: Callable[[str], None] = print) -> Stages:
    stages = Stages(asr=build_asr(cfg), llm=build_llm(cfg), tts=build_tts(cfg, log=log), tts_config=cfg.tts,
                    first_clause_words=cfg.llm.first_clause_words, max_sentences=cfg.llm.max_sentences,
                    candidates=cfg.llm.candidates, fallback_reply=cfg.llm.fallback_reply)
    for what, stage in (("ASR", stages.asr), ("reply LLM", stages.llm)):
        if getattr(stage, "untrained", False):
            log(f"WARNING: {what} {stage.model_dir.name} [UNTRAINED stand-in: the published shape with random weights; "
                "it runs teacher-forced on a session's script to time the real model]")
    return stages


def stand_in_config(cfg: AgentConfig, log: Callable[[str], None] = print,
                    stand_ins: Path | None = None) -> tuple[AgentConfig, list[str]]:
    """`cfg` with each ASR or LLM model folder that is absent replaced by its stand-in of the published shape
    (agent/model_files.py; written first, in a child process so this one's peak memory is the agent's, when it is
    not there yet; `stand_ins`: look in that folder instead, and write nothing), and which of "asr", "llm" were
    replaced."""
    import subprocess
    import sys

    from agent.fetch import DOWNLOADS
    from agent.model_files import STAND_IN_SETS, STAND_INS, stand_in_path
    from pipelines.errors import CheckpointError
    from pipelines.paths import local_path
    from pipelines.standins import is_stand_in

    known = {DOWNLOADS[kind].target for kind in STAND_IN_SETS["fetched"]}
    replaced = []
    for kind, section in (("asr", cfg.asr), ("llm", cfg.llm)):
        model = local_path(section.model, ROOT)
        if model.is_dir():
            continue
        stand_in = stand_in_path(model, stand_ins or STAND_INS)
        if not is_stand_in(stand_in) and stand_ins is None and model.name in known:
            subprocess.run([sys.executable, "-m", "agent.cli", "models", "stand-in", "fetched"], check=True)
        if not is_stand_in(stand_in):
            raise CheckpointError(f"{section.model}: no such model folder, and no stand-in of that name "
                                  f"(stand-ins: {', '.join(sorted(known))})")
        log(f"{kind}: {section.model} is absent: its UNTRAINED stand-in {stand_in} runs instead")
        replaced.append(kind)
        cfg = dataclasses.replace(cfg, **{kind: dataclasses.replace(section, model=str(stand_in))})
    return cfg, replaced


def vad_config(cfg: AgentConfig, endpointing: bool = True):
    """The VAD settings with endpointing as the mode wants it (push-to-talk turns it off)."""
    return dataclasses.replace(cfg.vad, enabled_endpointing=endpointing)


_turn_models: dict[str, object] = {}  # Smart Turn is loaded once per process and shared by every Endpointer


def endpointer(cfg: AgentConfig, endpointing: bool = True, log: Callable[[str], None] = print):
    """The VAD endpointer as the mode wants it, with Smart Turn's end-of-turn model when `vad.smart_turn`."""
    from agent.session import MIC_RATE
    from pipelines.errors import CheckpointError
    from pipelines.vad import Endpointer

    turn_model = None
    if cfg.vad.smart_turn and endpointing:
        if "smart_turn" not in _turn_models:
            from pipelines.smart_turn import SmartTurn

            try:
                model = SmartTurn()  # its cut, vad.smart_turn_threshold, is the Endpointer's
                model.warmup()
                _turn_models["smart_turn"] = model
            except CheckpointError as exc:
                log(f"warning: no semantic end of turn ({exc}); turns end after vad.silence_ms of silence")
                _turn_models["smart_turn"] = None
        model = _turn_models["smart_turn"]
        turn_model = model.predict if model is not None else None
    return Endpointer(vad_config(cfg, endpointing), MIC_RATE, turn_model=turn_model)
