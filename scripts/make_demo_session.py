"""Build the shipped sessions from espeak-ng speech: sessions/demo (three user turns) and
sessions/ten-turns (ten turns of varied length: a question, a long request, and one sentence with a
~0.5 s pause in the middle that must stay one turn).

The bundles are in the format `voice-agent replay` reads (agent/session.py). Deterministic: the same
espeak-ng gives the same bundles. Run: python scripts/make_demo_session.py [OUT_ROOT]
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

from pipelines.audio import float_to_pcm16, load_audio, resample  # noqa: E402

RATE = 16_000
TURNS = [
    "Hello there! What is the capital of France?",
    "What colour is the sky on a clear day?",
    "Thank you very much. Goodbye!",
]
TEN_TURNS = [
    "Hi!",
    "Can you help me plan a dinner for Saturday?",
    "I would like to | book a table for four people at an Italian restaurant.",
    "Yes.",
    "What time do most restaurants close on Saturday night?",
    "Please write a short message to my friends that says we meet at seven in the evening, "
    "that the restaurant is near the old train station, and that they should bring an umbrella "
    "because it will probably rain.",
    "No, make it shorter.",
    "How much should I tip the waiter?",
    "Thanks, that is all for today.",
    "Goodbye!",
]
GAP_S = 1.6  # silence after each turn: longer than the VAD's 600 ms end-of-turn
PAUSE_S = 0.5  # the mid-sentence pause at "|": shorter than the 600 ms end-of-turn


def speak(text: str, folder: Path) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = folder / "turn.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), text], check=True)
    return load_audio(wav, RATE)


def trimmed(audio: np.ndarray, level: float = 1e-3) -> np.ndarray:
    """espeak-ng's leading and trailing silence cut off, so a scripted pause is the pause heard."""
    loud = np.flatnonzero(np.abs(audio) > level)
    return audio[loud[0] : loud[-1] + 1] if loud.size else audio


def say(text: str, folder: Path) -> np.ndarray:
    """A turn's audio; '|' in the text is a PAUSE_S silence inside the sentence."""
    pieces = [trimmed(speak(piece.strip(), folder)) for piece in text.split("|")]
    pause = np.zeros(int(PAUSE_S * RATE), np.float32)
    return np.concatenate([x for piece in pieces for x in (piece, pause)][:-1])


def build(out: Path, turns: list[str], mic_rate: int = RATE) -> None:
    rng = np.random.default_rng(0)
    parts = [np.zeros(int(0.5 * RATE), np.float32)]
    events = []
    with tempfile.TemporaryDirectory() as tmp:
        for text in turns:
            t = sum(len(p) for p in parts) / RATE
            audio = 0.7 * (say(text, Path(tmp)) if "|" in text else speak(text, Path(tmp)))
            text = text.replace(" | ", " ")
            events.append({"type": "script", "t": round(t, 3), "text": text, "duration_s": round(len(audio) / RATE, 3)})
            parts += [audio, np.zeros(int(GAP_S * RATE), np.float32)]
    mic = resample(np.concatenate(parts), RATE, mic_rate)
    mic += (rng.standard_normal(len(mic)) * 10 ** (-66 / 20)).astype(np.float32)  # a quiet room, not digital zero
    out.mkdir(parents=True, exist_ok=True)
    (out / "mic.pcm").write_bytes(float_to_pcm16(mic))
    (out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (out / "session.json").write_text(json.dumps({
        "format": "voice-agent-session", "version": 1, "mode": "recorded", "mic_rate": mic_rate,
        "source": "scripts/make_demo_session.py (espeak-ng en-us, 150 wpm)",
        "turns": [text.replace(" | ", " ") for text in turns],
    }, indent=2) + "\n")
    print(f"wrote {out}: {len(mic) / mic_rate:.1f} s, {len(turns)} turns")


SESSIONS = {
    "demo": lambda out: build(out, TURNS),
    # 8 kHz keeps 50 s of PCM under 1 MB; espeak-ng's voice has little above 4 kHz anyway
    "ten-turns": lambda out: build(out, TEN_TURNS, mic_rate=8000),
}


def main(root: Path, names: list[str]) -> None:
    for name in names:
        SESSIONS[name](root / name)


if __name__ == "__main__":
    # python scripts/make_demo_session.py [OUT_ROOT [demo|ten-turns ...]]; default: both into sessions/
    args = sys.argv[1:]
    main(Path(args[0]) if args else ROOT / "sessions", args[1:] or list(SESSIONS))
