"""Config -> ready stages. Each stage loads itself from its own config section; this only composes them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from agent.config import ROOT, AgentConfig
from agent.engine import Stages


def build_tts(cfg: AgentConfig, checkpoint: str | None = None, log: Callable[[str], None] = print):
    """Marvis from `checkpoint` (or tts.checkpoint); the labelled random fallback when it is absent."""
    from pipelines.tts.load import load_tts

    return load_tts(cfg.tts, root=ROOT, checkpoint=checkpoint, log=log)


def asr_placement(cfg: AgentConfig):
    """Where Whisper runs: `asr.backend` resolved for this machine, at fp32 (`pipelines.asr.whisper.runs_on`)."""
    from pipelines.asr.whisper import runs_on, weights_fp16
    from pipelines.ortgraph import resolve

    placement = resolve(cfg.asr.backend, "none")
    return placement._replace(backend=runs_on(placement.backend, weights_fp16(cfg.resolve(cfg.asr.model))))


def llm_placement(cfg: AgentConfig):
    from pipelines.ortgraph import resolve

    return resolve(cfg.llm.backend, cfg.llm.quantization)


def build_asr(cfg: AgentConfig):
    from pipelines.asr.whisper import WhisperASR
    from pipelines.ortgraph import weights_key

    asr_dir = cfg.resolve(cfg.asr.model)
    placement = asr_placement(cfg)
    asr_cache = None
    if placement.backend == "onnx" and asr_dir.is_dir():
        asr_cache = cfg.resolve(cfg.asr.ort_cache) / f"whisper-{weights_key(asr_dir)}"  # encoder + decoder graphs
    return WhisperASR(asr_dir, language=cfg.asr.language or None, initial_prompt=cfg.asr.initial_prompt or None,
                      placement=placement, ort_cache=asr_cache, fallback=cfg.asr.temperature_fallback)


def build_llm(cfg: AgentConfig):
    from pipelines.llm.reply import ReplyLLM
    from pipelines.ortgraph import weights_key

    model_dir = cfg.resolve(cfg.llm.model)
    placement = llm_placement(cfg)
    bits = placement.precision.bits
    ort_cache = None
    if placement.backend == "onnx" and model_dir.is_dir():
        ort_cache = cfg.resolve(cfg.llm.ort_cache) / f"llm-{weights_key(model_dir)}-{'fp32' if bits is None else f'q{bits}'}"
    return ReplyLLM(model_dir, cfg.llm.system_prompt, max_history_turns=cfg.llm.max_history_turns,
                    max_tokens=cfg.llm.max_tokens, temperature=cfg.llm.temperature, seed=cfg.llm.seed,
                    placement=placement, ort_cache=ort_cache,
                    examples=[tuple(e) for e in cfg.llm.examples], no_repeat_ngram=cfg.llm.no_repeat_ngram)


def build_stages(cfg: AgentConfig, log: Callable[[str], None] = print) -> Stages:
    return Stages(asr=build_asr(cfg), llm=build_llm(cfg), tts=build_tts(cfg, log=log), tts_config=cfg.tts,
                  first_clause_words=cfg.llm.first_clause_words, max_sentences=cfg.llm.max_sentences)


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
                model = SmartTurn(threshold=cfg.vad.smart_turn_threshold)
                model.warmup()
                _turn_models["smart_turn"] = model
            except CheckpointError as exc:
                log(f"warning: no semantic end of turn ({exc}); turns end after vad.silence_ms of silence")
                _turn_models["smart_turn"] = None
        model = _turn_models["smart_turn"]
        turn_model = model.predict if model is not None else None
    return Endpointer(vad_config(cfg, endpointing), MIC_RATE, turn_model=turn_model)
