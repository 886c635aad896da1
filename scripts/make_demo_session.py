"""Build the shipped demo session (sessions/demo): three user turns spoken by espeak-ng.

The bundle is in the format `voice-agent replay` reads (agent/session.py). Deterministic: the same
espeak-ng gives the same bundle. Run: python scripts/make_demo_session.py [OUT_DIR]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.audio import float_to_pcm16, load_audio  # noqa: E402

RATE = 16_000
TURNS = [
    "Hello there! What is the capital of France?",
    "What colour is the sky on a clear day?",
    "Thank you very much. Goodbye!",
]
GAP_S = 1.6  # silence after each turn: longer than the VAD's 600 ms end-of-turn


def speak(text: str, folder: Path) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = folder / "turn.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), text], check=True)
    return load_audio(wav, RATE)


def main(out: Path) -> None:
    rng = np.random.default_rng(0)
    parts = [np.zeros(int(0.5 * RATE), np.float32)]
    events = []
    with tempfile.TemporaryDirectory() as tmp:
        for text in TURNS:
            t = sum(len(p) for p in parts) / RATE
            audio = 0.7 * speak(text, Path(tmp))
            events.append({"type": "script", "t": round(t, 3), "text": text, "duration_s": round(len(audio) / RATE, 3)})
            parts += [audio, np.zeros(int(GAP_S * RATE), np.float32)]
    mic = np.concatenate(parts)
    mic += (rng.standard_normal(len(mic)) * 10 ** (-66 / 20)).astype(np.float32)  # a quiet room, not digital zero
    out.mkdir(parents=True, exist_ok=True)
    (out / "mic.pcm").write_bytes(float_to_pcm16(mic))
    (out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (out / "session.json").write_text(json.dumps({
        "format": "voice-agent-session", "version": 1, "mode": "recorded", "mic_rate": RATE,
        "source": "scripts/make_demo_session.py (espeak-ng en-us, 150 wpm)", "turns": TURNS,
    }, indent=2) + "\n")
    print(f"wrote {out}: {len(mic) / RATE:.1f} s, {len(TURNS)} turns")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "sessions" / "demo")
