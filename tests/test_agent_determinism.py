"""Replay is deterministic for a seed: same transcripts, replies and agent codes, run after run."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from agent.config import load_config
from agent.modes import run_replay
from conftest import require_checkpoints
from pipelines.audio import load_audio, save_audio
from pipelines.tts.weights import random_model, save_checkpoint

pytestmark = pytest.mark.slow


def test_same_seed_same_conversation(tmp_path, jfk_path, tiny_args, tiny_tokenizer):
    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    tts = save_checkpoint(random_model(tiny_args, seed=3).model, tmp_path / "tiny-tts")
    shutil.copy(tiny_tokenizer / "tokenizer.json", tts)
    clip = save_audio(tmp_path / "turn.wav", load_audio(jfk_path, 16000)[: 2 * 16000 + 2400], 16000)

    def run(seed, name):
        cfg = load_config("replay", [("tts.checkpoint", str(tts)), ("tts.max_audio_length_ms", "400")])
        cfg.tts = dataclasses.replace(cfg.tts, seed=seed)
        cfg.llm.seed = seed
        result = run_replay(cfg, [clip], out=tmp_path / name, log=lambda m: None, progress=False)
        (turn,) = result.conversation.turns
        return turn

    a, b, c = run(7, "a"), run(7, "b"), run(8, "c")
    assert "fellow american" in a.transcript.lower()
    assert (a.transcript, a.reply) == (b.transcript, b.reply)
    np.testing.assert_array_equal(a.agent.codes, b.agent.codes)
    assert a.agent.codes.shape == c.agent.codes.shape and (a.agent.codes != c.agent.codes).any()
