"""Hours of use in minutes: a long scripted replay on the offline models, memory and latency sampled per turn.

    bash scripts/test.sh -m soak                 # 200 turns (~15 min here)
    SOAK_TURNS=30 bash scripts/test.sh -m soak   # a shorter proof run

The session is the shipped demo's three user turns repeated; replies are kept short so the run measures
the agent's bookkeeping (context window, LLM history, caches, bundle writing), not synthesis speed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.soak


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_long_conversation_stays_flat(tmp_path):
    from agent.config import load_config
    from agent.modes import run_replay
    from agent.session import read_session

    turns = int(os.environ.get("SOAK_TURNS", "200"))
    demo = read_session(ROOT / "sessions" / "demo")
    repeats = -(-turns // 3)
    bundle = tmp_path / "soak-source"
    bundle.mkdir()
    pcm = np.clip(np.round(np.tile(demo.mic, repeats) * 32768), -32768, 32767).astype("<i2")
    (bundle / "mic.pcm").write_bytes(pcm.tobytes())
    (bundle / "session.json").write_text('{"format": "voice-agent-session", "mic_rate": %d}' % demo.rate)

    cfg = load_config("demo", [("tts.max_audio_length_ms", "160"), ("llm.max_tokens", "8")])
    samples: list[float] = []

    def log(line: str) -> None:
        if re.match(r"\s*turn \d+:", line):  # one waterfall line per finished turn
            samples.append(rss_mb())

    result = run_replay(cfg, [bundle], out=tmp_path / "out", log=log, progress=False)
    conv = result.conversation
    n = len(conv.turns)
    assert n >= 0.9 * 3 * repeats, f"only {n} turns of {3 * repeats}"
    warm = max(5, n // 10)
    rss = np.array(samples[warm:])
    slope = np.polyfit(np.arange(rss.size), rss, 1)[0]  # MB per turn after warm-up
    first = np.array([t.waterfall["first_sample_played"] for t in conv.turns if "first_sample_played" in t.waterfall])
    early, late = np.median(first[warm:warm + n // 4]), np.median(first[-(n // 4):])
    print(f"\nsoak: {n} turns, RSS peak {max(samples):.0f} MB, slope after turn {warm}: {slope * 1000:.1f} KB/turn; "
          f"first sample p50 {early:.0f} ms early vs {late:.0f} ms late")
    assert slope < 0.5, f"RSS grows {slope:.2f} MB a turn"
    assert late < 1.5 * early + 200, "latency grows with the conversation"
    window = cfg.tts.context_segments
    assert all(len(t.context_turns) * 2 <= window + 2 for t in conv.turns)  # the TTS context stays in its window
    assert sum(t.user is not None for t in conv.turns) <= conv.keep_audio_turns  # old audio is dropped
