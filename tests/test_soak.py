"""Hours of use in minutes: a long scripted replay on the offline models, memory and latency sampled per turn.

    bash scripts/test.sh -m soak                 # 200 turns (~6 min here)
    SOAK_TURNS=45 bash scripts/test.sh -m soak   # a shorter proof run (~2 min; 15 turns are too few to see 1 MB a turn)

The session is the shipped demo's three user turns repeated; replies are kept short so the run measures
the agent's bookkeeping (context window, LLM history, caches, bundle writing), not synthesis speed.

A leak is judged on the memory glibc's malloc has handed out and not had back (`mallinfo2`: exact, where a freed
block reused would hide a leak from the resident size for a while) and on the process's anonymous memory (what
malloc does not see). Its resident size also counts the pages of the weight files
that ONNX Runtime maps read-only: the TTS's embedding tables are read a row at a time (a text token, an audio
code), so those pages come in as the conversation meets new tokens and codes. They are clean, bounded by the
files' size and dropped by the kernel under pressure; the test reports them and checks that the file-backed
growth is theirs.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import proc_status_mb

ROOT = Path(__file__).resolve().parents[1]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    """glibc's `mallinfo2` (2.33 and later), or None."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return mallinfo2


MALLINFO2 = _mallinfo2()


pytestmark = [pytest.mark.soak,
              pytest.mark.skipif(not os.path.exists("/proc/self/smaps") or MALLINFO2 is None,
                                 reason="reads memory from /proc and glibc's mallinfo2 (Linux, glibc 2.33 or later)")]


def malloc_in_use_mb() -> float:
    """What malloc has handed out and not had back, in MB (glibc's `mallinfo2`, every arena, mmapped blocks too)."""
    info = MALLINFO2()
    return (info.uordblks + info.hblkhd) / 2**20


WEIGHT_FILES = (".onnx", ".data", ".safetensors", ".npz", ".gguf", ".bin")


def mapped_weights_mb() -> tuple[float, float]:
    """(resident, size) in MB of the process's mappings of model weight files."""
    resident = size = 0
    weights = False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if not parts[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path, maybe spaced]
                path = parts[5].rstrip("\n").removesuffix(" (deleted)") if len(parts) > 5 else ""
                weights = path.endswith(WEIGHT_FILES)
            elif weights and parts[0] == "Rss:":
                resident += int(parts[1])
            elif weights and parts[0] == "Size:":
                size += int(parts[1])
    return resident / 1024, size / 1024


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
    samples: list[float] = []  # resident
    anon: list[float] = []  # anonymous resident: where a leak shows
    in_use: list[float] = []  # malloc's blocks handed out: where a leak shows first
    filed: list[float] = []  # file-backed resident: mostly the weight files' pages
    weights: list[float] = []  # the weight files' resident pages

    def log(line: str) -> None:
        if re.match(r"\s*turn \d+:", line):  # one waterfall line per finished turn
            resident, anonymous, file_backed = proc_status_mb("self", "VmRSS", "RssAnon", "RssFile")
            samples.append(resident)
            anon.append(anonymous)
            in_use.append(malloc_in_use_mb())
            filed.append(file_backed)
            weights.append(mapped_weights_mb()[0])

    result = run_replay(cfg, [bundle], out=tmp_path / "out", log=log, progress=False)
    conv = result.conversation
    n = len(conv.turns)
    assert n >= 0.9 * 3 * repeats, f"only {n} turns of {3 * repeats}"
    warm = max(5, n // 10)
    # memory is judged over the second half: a leak grows all along, while caches fill early and level off
    # (anonymous memory, one 200-turn run: +41 MB between turns 21 and 31, then within 2446-2465 MB to turn 200)
    settled = max(5, n // 2)

    def slope_of(values: list[float]) -> float:  # MB per turn over the second half
        return float(np.polyfit(np.arange(len(values) - settled), np.array(values[settled:]), 1)[0])

    slope, file_slope, malloc_slope = slope_of(anon), slope_of(filed), slope_of(in_use)
    weights_size = mapped_weights_mb()[1]
    first = np.array([t.waterfall["first_sample_played"] for t in conv.turns if "first_sample_played" in t.waterfall])
    early, late = np.median(first[warm:warm + n // 4]), np.median(first[-(n // 4):])
    print(f"\nsoak: {n} turns, RSS peak {max(samples):.0f} MB; after turn {settled}, malloc in use "
          f"{malloc_slope * 1000:.1f} KB/turn (peak {max(in_use):.0f} MB), anonymous "
          f"{slope * 1000:.1f} KB/turn (peak {max(anon):.0f} MB), file-backed {file_slope * 1000:.1f} KB/turn "
          f"(mapped weights {weights[-1]:.0f} of {weights_size:.0f} MB resident); "
          f"first sample p50 {early:.0f} ms early vs {late:.0f} ms late")
    assert min(in_use) > 100, "mallinfo2 sees almost nothing: another allocator is preloaded, so this cannot judge"
    assert weights_size > 0, "no mapping of a weight file found in /proc/self/smaps"
    assert malloc_slope < 0.5, f"malloc's memory in use grows {malloc_slope:.2f} MB a turn"
    assert slope < 0.5, f"anonymous memory grows {slope:.2f} MB a turn"
    # what grows besides is the weight files' pages (within their size, by construction)
    other = (filed[-1] - weights[-1]) - (filed[settled] - weights[settled])
    assert other < 0.5 * (n - settled), f"file-backed memory other than the weights grows {other:.0f} MB"
    assert late < 1.5 * early + 200, "latency grows with the conversation"
    window = cfg.tts.context_segments
    assert all(len(t.context_turns) * 2 <= window + 2 for t in conv.turns)  # the TTS context stays in its window
    assert sum(t.user is not None for t in conv.turns) <= conv.keep_audio_turns  # old audio is dropped
