"""The turn engine with a real tiny Marvis and scripted ASR/LLM stand-ins (the turn logic is under test)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.conversation import Conversation
from agent.devices import ReplaySink
from agent.engine import Stages, TurnEngine
from pipelines.asr.whisper import Transcript
from pipelines.tts.codec import FRAME_SIZE
from pipelines.tts.load import TTSConfig
from pipelines.vad import Utterance


class ScriptedASR:
    def __init__(self, texts):
        self.texts = list(texts)

    def transcribe(self, audio, sample_rate=16000):
        return Transcript(self.texts.pop(0), 0.0, "en")

    def warmup(self):
        pass


class ScriptedLLM:
    """Yields the reply word by word and logs each step, so the test can see what ran when."""

    def __init__(self, replies, log):
        self.replies, self.log, self.history = list(replies), log, []

    def stream(self, text):
        for word in self.replies.pop(0).split(" "):
            self.log.append(("llm", word))
            yield word + " "

    def commit(self, user, reply):
        self.history.append((user, reply))

    def warmup(self):
        pass


def utterance(seconds=1.0, seed=0):
    audio = (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.05).astype(np.float32)
    return Utterance(audio=audio, start_s=0.0, end_s=seconds, decided_s=seconds + 0.6, reason="silence",
                     audio_start_s=0.0)


@pytest.fixture()
def make_engine(tiny_tts):
    def make(asr_texts, replies, keep_audio_turns=16):
        log = []
        real_stream = tiny_tts.stream

        def stream(text, speaker=0, context=(), voice=None, config=None):
            log.append(("tts", text, [(s.speaker, s.text) for s in context]))
            return real_stream(text, speaker, context, voice, config)

        tiny_tts.stream = stream
        stages = Stages(ScriptedASR(asr_texts), ScriptedLLM(replies, log), tiny_tts,
                        TTSConfig(seed=0, max_audio_length_ms=480, chunk_frames=2, first_chunk_frames=1))
        engine = TurnEngine(stages, Conversation(keep_audio_turns), log=lambda m: None)
        return engine, log

    return make


def test_first_sentence_is_spoken_before_the_llm_finishes(make_engine):
    engine, log = make_engine(["hello"], ["**Paris** is the capital. It is in France. Bye"])
    turn = engine.run_turn(utterance(), ReplaySink())
    kinds = [e[0] for e in log]
    first_tts = kinds.index("tts")
    assert ("llm", "France.") in log[first_tts:]  # the LLM was still streaming when the TTS started
    spoken = [e[1] for e in log if e[0] == "tts"]
    assert spoken == ["Paris is the capital.", "It is in France.", "Bye"]  # markdown is never read aloud
    assert turn.reply == "Paris is the capital. It is in France. Bye"
    # each sentence gets the earlier sentences of the same reply as context: one voice within a reply
    contexts = [e[2] for e in log if e[0] == "tts"]
    assert contexts[0] == [] and contexts[2] == [(0, "Paris is the capital."), (0, "It is in France.")]
    assert turn.agent.codes.shape[1] * FRAME_SIZE == turn.agent.audio.size
    wf = turn.waterfall
    assert wf["endpoint"] == pytest.approx(600) and wf["first_sample_played"] >= wf["first_tts_chunk"] >= wf["first_sentence"]


def test_context_carries_earlier_turns(make_engine):
    engine, log = make_engine(["hello there", "how are you"], ["Hi.", "Fine thanks."])
    sink = ReplaySink()
    engine.run_turn(utterance(), sink)
    second = engine.run_turn(utterance(seed=1), sink)
    ctx = [e[2] for e in log if e[0] == "tts"][-1]
    assert ctx == [(1, "hello there"), (0, "Hi.")]
    assert second.context_turns == [0]
    assert engine.stages.llm.history == [("hello there", "Hi."), ("how are you", "Fine thanks.")]


def test_no_words_no_turn(make_engine):
    engine, log = make_engine(["  "], ["unused"])
    assert engine.run_turn(utterance(), ReplaySink()) is None
    assert engine.conversation.turns == [] and log == []


def test_barge_in_keeps_only_what_was_played(make_engine):
    engine, log = make_engine(["hello"], ["Paris is the capital. It is in France. It is big."])
    sink = ReplaySink()
    chunks = []
    real_write = sink.write
    sink.write = lambda audio: (chunks.append(len(audio)), real_write(audio))
    # the user starts talking once two chunks have been played
    turn = engine.run_turn(utterance(), sink, interrupted=lambda: len(chunks) >= 2)
    assert turn.interrupted
    played = sum(chunks)
    assert turn.agent.audio.size == played < 3 * 6 * FRAME_SIZE
    assert turn.reply == "Paris is the capital."  # the sentence that was cut off is what the user heard
    assert turn.agent.codes.shape[1] == -(-played // FRAME_SIZE)
    assert engine.stages.llm.history == [("hello", "Paris is the capital.")]
    assert not any(e[0] == "tts" and e[1].startswith("It is big") for e in log)


def test_memory_stays_flat_over_many_turns(make_engine):
    n = 30
    engine, _ = make_engine([f"turn {i}" for i in range(n)], ["Ok."] * n, keep_audio_turns=4)
    sink = ReplaySink(keep=False)
    for i in range(n):
        engine.run_turn(utterance(0.3, seed=i), sink)
    turns = engine.conversation.turns
    assert len(turns) == n and turns[-1].transcript == f"turn {n - 1}"
    with_audio = [t.index for t in turns if t.user is not None or t.agent is not None]
    assert with_audio == list(range(n - 4, n))
    assert sink.audio().size == 0 and sink.played_samples > 0
    assert len(engine.stages.tts.prompts._codes_cache) <= engine.stages.tts.prompts.codes_cache_size
