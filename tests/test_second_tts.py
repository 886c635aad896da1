"""A second, real TTS through the same `TTSStage` Protocol as Marvis: a replay end to end on espeak-ng.

Real speech (espeak-ng's, as wav files) through the real VAD, session loop and Whisper tiny.en; the reply
LLM is a stand-in that answers from the transcript (the LLM is not under test); the agent's voice is
`tests/espeak_tts.py`: 22050 Hz, no codes, its own config. Nothing in the product was changed for it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from agent.config import load_config
from conftest import require_checkpoints

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Thank you, goodbye."]


class AnswersFromTheTranscript:
    """A reply LLM stand-in: a fixed answer built from what the ASR heard, streamed word by word."""

    max_history_turns = 2
    system_prompt = ""

    def __init__(self):
        self.history: list[tuple[str, str]] = []

    @staticmethod
    def answer(heard: str) -> str:
        words = re.findall(r"[a-z']+", heard.lower())
        return f"I heard you say {words[-1]}. That makes {len(words)} words."

    def warmup(self) -> None:
        pass

    def reset(self) -> None:
        self.history.clear()

    def stream(self, user_text: str, avoid=(), unlike=()):
        for word in self.answer(user_text).split(" "):
            yield word + " "

    def prepare_next_turn(self) -> int:
        return 0

    def commit(self, user_text: str, reply: str) -> None:
        self.history.append((user_text, reply))


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/bootstrap.sh installs it with apt)")
    require_checkpoints("whisper-tiny.en")
    from agent.build import build_asr
    from agent.engine import Stages
    from agent.modes import run_replay
    from espeak_tts import EspeakConfig, EspeakTTS

    folder = tmp_path_factory.mktemp("second-tts")
    files = []
    for n, question in enumerate(QUESTIONS):
        path = folder / f"user{n}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), question], check=True, capture_output=True)
        files.append(path)
    cfg = load_config("replay")
    asr = build_asr(cfg)
    asr.warmup()
    tts = EspeakTTS()
    stages = Stages(asr=asr, llm=AnswersFromTheTranscript(), tts=tts, tts_config=EspeakConfig(),
                    first_clause_words=cfg.llm.first_clause_words, max_sentences=cfg.llm.max_sentences)
    lines: list[str] = []
    result = run_replay(cfg, files, out=folder / "bundle", log=lines.append, progress=False, stages=stages)
    return result, stages, lines


def test_the_replay_speaks_every_turn_in_espeaks_voice(replay):
    result, stages, lines = replay
    turns = result.conversation.turns
    assert len(turns) == 2, lines
    assert "capital" in turns[0].transcript.lower() and "france" in turns[0].transcript.lower()
    assert "goodbye" in turns[1].transcript.lower()
    tts = stages.tts
    for turn in turns:
        assert not turn.interrupted
        assert turn.reply == AnswersFromTheTranscript.answer(turn.transcript)
        agent = turn.agent
        assert agent.sample_rate == 22_050 and agent.codes is None
        # what the agent kept of its turn is espeak-ng's audio of each sentence, unchanged, in order
        first, second = re.findall(r"[^.]+\.", turn.reply)
        expected = np.concatenate([tts.synthesise(first.strip()), tts.synthesise(second.strip())])
        np.testing.assert_array_equal(agent.audio, expected)
    # a reply that is fine enters the LLM's history
    assert stages.llm.history == [(t.transcript, t.reply) for t in turns]


def test_the_waterfall_runs_to_the_first_sample_played(replay):
    result, _, _ = replay
    for turn in result.conversation.turns:
        wf = turn.waterfall
        assert wf["first_sample_played"] >= wf["first_tts_chunk"] >= wf["first_sentence"] >= wf["asr_final"]
        assert wf["prebuffer_ms"] == pytest.approx(80.0)  # espeak-ng makes a piece whole: one jitter buffer
        assert wf["tts_rtf"] > 0 and wf["stalls"] == 0


def test_the_tts_got_the_conversation_as_context(replay):
    result, stages, _ = replay
    first, second = result.conversation.turns
    (a, b), (c, d) = (re.findall(r"[^.]+\.", t.reply) for t in (first, second))
    a, b, c, d = (s.strip() for s in (a, b, c, d))
    earlier = [(1, first.transcript), (0, first.reply)]
    # every sentence in the agent's voice, with the turns before and the reply's earlier sentences as context
    assert stages.tts.calls == [(a, 0, []), (b, 0, [(0, a)]), (c, 0, earlier), (d, 0, [*earlier, (0, c)])]


def test_the_bundle_holds_the_agents_audio_at_its_rate(replay):
    result, _, _ = replay
    for turn in result.conversation.turns:
        audio, rate = sf.read(result.bundle / "turns" / f"{turn.index:04d}-agent.wav", dtype="float32")
        assert rate == 22_050 and len(audio) == turn.agent.audio.size
    assert "espeak-ng" in (result.bundle / "session.json").read_text()
