"""Config -> ready stages. The one place that knows which loader each model kind goes through."""

from __future__ import annotations

from collections.abc import Callable

from agent.config import AgentConfig
from agent.engine import Stages
from pipelines.errors import CheckpointError, ConfigError
from pipelines.tts.generator import GenerationConfig

DTYPES = ("float32", "bfloat16", "float16")


def tts_generation_config(cfg: AgentConfig) -> GenerationConfig:
    t = cfg.tts
    return GenerationConfig(
        temperature=t.temperature, top_k=t.top_k, seed=t.seed, max_audio_length_ms=t.max_audio_length_ms,
        frames_per_char=t.frames_per_char, min_text_frames=t.min_text_frames, chunk_frames=t.chunk_frames,
        first_chunk_frames=t.first_chunk_frames,
    )


def build_tts(cfg: AgentConfig, checkpoint: str | None = None, log: Callable[[str], None] = print):
    """Marvis from `checkpoint` (or tts.checkpoint); the labelled random fallback when it is absent."""
    import mlx.core as mx

    from pipelines.tts.codec import MimiCodec
    from pipelines.tts.generator import MarvisTTS, TextTokenizer
    from pipelines.tts.weights import load_checkpoint, random_model

    t = cfg.tts
    if t.dtype not in DTYPES:
        raise ConfigError(f"tts.dtype must be one of {', '.join(DTYPES)}, not {t.dtype!r}")
    dtype = getattr(mx, t.dtype)
    spec = checkpoint or t.checkpoint
    if spec.startswith("random:"):
        loaded = random_model(spec.split(":", 1)[1], seed=t.seed, dtype=dtype)
    elif cfg.resolve(spec).exists():
        loaded = load_checkpoint(cfg.resolve(spec), dtype=dtype)
    elif checkpoint is not None:
        raise CheckpointError(f"{spec}: no such TTS checkpoint")
    elif t.fallback.startswith("random:"):
        loaded = random_model(t.fallback.split(":", 1)[1], seed=t.seed, dtype=dtype)
    else:
        loaded = load_checkpoint(cfg.resolve(t.fallback), dtype=dtype)
    tokenizer = TextTokenizer(loaded.tokenizer_dir or cfg.resolve(t.tokenizer))
    mimi_path = cfg.resolve(t.mimi)
    codec = MimiCodec(mimi_path if mimi_path.is_file() else None, num_codebooks=loaded.args.audio_num_codebooks,
                      seed=t.seed)
    tts = MarvisTTS(loaded, tokenizer, codec, tts_generation_config(cfg))
    if tts.untrained:
        log("WARNING: " + tts.describe())
        log("WARNING: the agent's voice is UNTRAINED noise until real Marvis/Mimi weights are in checkpoints/ "
            "(see checkpoints/README.md, `voice-agent fetch`)")
    else:
        log(tts.describe())
    return tts


def build_stages(cfg: AgentConfig, log: Callable[[str], None] = print) -> Stages:
    from pipelines.asr.whisper import WhisperASR
    from pipelines.llm.reply import ReplyLLM

    asr = WhisperASR(cfg.resolve(cfg.asr.model), language=cfg.asr.language or None,
                     initial_prompt=cfg.asr.initial_prompt or None)
    llm = ReplyLLM(cfg.resolve(cfg.llm.model), cfg.llm.system_prompt, max_history_turns=cfg.llm.max_history_turns,
                   max_tokens=cfg.llm.max_tokens, temperature=cfg.llm.temperature, seed=cfg.llm.seed)
    tts = build_tts(cfg, log=log)
    return Stages(asr=asr, llm=llm, tts=tts, tts_config=tts_generation_config(cfg), agent_speaker=cfg.tts.speaker,
                  user_speaker=cfg.tts.user_speaker, context_segments=cfg.tts.context_turns)


def vad_config(cfg: AgentConfig, endpointing: bool = True):
    """The VAD settings with endpointing as the mode wants it (push-to-talk turns it off)."""
    import dataclasses

    return dataclasses.replace(cfg.vad, enabled_endpointing=endpointing)
