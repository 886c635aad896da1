"""The turn engine with a real tiny Marvis and scripted ASR/LLM stand-ins (the turn logic is under test)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.conversation import Conversation
from agent.engine import Stages, TurnEngine
from agent.sinks import ReplaySink
from pipelines.asr.whisper import Transcript
from pipelines.tts.codec import FRAME_SIZE
from pipelines.tts.load import TTSConfig
from pipelines.tts.stage import start_buffer
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

    max_history_turns = 0  # no earlier reply is checked for copies

    def __init__(self, replies, log):
        self.replies, self.log, self.history = list(replies), log, []

    def stream(self, text, avoid=(), unlike=()):
        self.log.append(("avoid", list(avoid)))
        for word in self.replies.pop(0).split(" "):
            self.log.append(("llm", word))
            yield word + " "

    def prepare_next_turn(self) -> int:
        return 0

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
    def make(asr_texts, replies, keep_audio_turns=16, tts_config=None):
        log = []
        real_stream = tiny_tts.stream

        def stream(text, speaker=0, context=(), voice=None, config=None, cancelled=lambda: False, ahead=None,
                   waiting=None):
            log.append(("tts", text, [(s.speaker, s.text) for s in context]))
            return real_stream(text, speaker, context, voice, config, cancelled, ahead, waiting)

        tiny_tts.stream = stream
        stages = Stages(ScriptedASR(asr_texts), ScriptedLLM(replies, log), tiny_tts,
                        tts_config or TTSConfig(seed=0, max_audio_length_ms=480, chunk_frames=2, first_chunk_frames=1))
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
    # the LLM is told every reply said before, to say none of their five-word runs again
    assert [e[1] for e in log if e[0] == "avoid"] == [[], ["Hi."]]


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


def paused(utt: Utterance) -> Utterance:
    """The same utterance as the VAD reports it at the first silent frame: decided at the end of speech."""
    import dataclasses

    return dataclasses.replace(utt, decided_s=utt.end_s, reason="pause")


def test_speculation_is_kept_when_the_endpoint_confirms(make_engine):
    engine, log = make_engine(["hello there"], ["Hi. How are you?"])
    utt = utterance()
    spec = engine.speculate(paused(utt))
    assert spec.transcript == "hello there" and spec.deltas  # ASR and the LLM ran before the endpoint
    assert not any(e[0] == "tts" for e in log)  # nothing spoken yet
    turn = engine.run_turn(utt, ReplaySink(), speculation=spec)
    assert turn.transcript == "hello there" and turn.reply == "Hi. How are you?"
    assert engine.stages.asr.texts == []  # the ASR ran once, not again at the endpoint
    # the LLM was not restarted: its words were produced once each
    assert [e[1] for e in log if e[0] == "llm"] == ["Hi.", "How", "are", "you?"]
    assert turn.waterfall["asr_final"] == pytest.approx(turn.waterfall["endpoint"], abs=1.0)


def test_speculation_is_dropped_when_the_user_goes_on(make_engine):
    engine, log = make_engine(["hello", "hello there my friend"], ["Unused.", "Hi friend."])
    first = utterance(0.5)
    spec = engine.speculate(paused(first))
    longer = utterance(1.5, seed=3)  # the user spoke again: a different utterance ends the turn
    turn = engine.run_turn(longer, ReplaySink(), speculation=spec)
    assert spec.replies is None  # the speculative LLM stream was closed
    assert turn.transcript == "hello there my friend" and turn.reply == "Hi friend."
    assert engine.stages.llm.history == [("hello there my friend", "Hi friend.")]  # nothing else entered it
    assert [t.transcript for t in engine.conversation.turns] == ["hello there my friend"]


def test_next_context_is_prefilled_after_each_turn(make_engine):
    engine, log = make_engine(["hello there", "how are you"], ["Hi.", "Fine."])
    sink = ReplaySink()
    engine.run_turn(utterance(), sink)
    tts = engine.stages.tts
    held = tts.prefix.rows
    context, _ = engine.conversation.context(engine.stages.tts_config.context_segments)
    tokens, mask = tts.prompts.context_rows(context)
    assert held is not None and len(held) == len(tokens)  # the next turn's context is in the cache already
    engine.run_turn(utterance(seed=1), sink)
    # the first sentence of turn 2 ran only its own text rows through the backbone
    first_sentence_rows = len(tts.prompts.tokenizer.encode("[0]Fine."))
    assert tts.frames.last_prefill_rows <= first_sentence_rows + 2


def test_context_window_is_append_only_and_trimmed_in_steps():
    from agent.conversation import Turn
    from pipelines.messages import Segment

    conv = Conversation()
    starts = []
    for i in range(8):
        conv.append(Turn(i, f"t{i}", user=Segment(1, f"u{i}"), agent=Segment(0, f"a{i}")))
        segments, turns = conv.context(6)
        starts.append(turns[0])
        assert len(segments) <= 6
    # grows to 3 turns (6 segments); the 4th turn makes 8, so the window drops to at most half (the newest
    # turn) and grows again from there: the start moves rarely, in steps
    assert starts == [0, 0, 0, 3, 3, 3, 6, 6]


def test_stalls_are_measured_against_real_time_playback():
    from agent.metrics import playback_stalls

    rate = 1000
    # 0.2 s chunks, ready every 0.3 s: after a 0.2 s jitter buffer each later chunk is 0.1 s late
    timeline = [(0.3 * i, 200) for i in range(4)]
    got = playback_stalls(timeline, rate, jitter_s=0.2)
    assert got["stalls"] == 3 and got["stall_ms"] == pytest.approx(300, abs=1)
    # audio ready faster than real time plays without a gap
    assert playback_stalls([(0.1 * i, 200) for i in range(4)], rate, 0.2) == {"stall_ms": 0.0, "stalls": 0}


def test_speculation_cancelled_before_the_llm_still_answers(make_engine):
    """A speculation stopped right after the ASR (the endpoint came at once) keeps the transcript, and the
    turn runs the LLM itself: the reply is never lost."""
    engine, log = make_engine(["hello there"], ["Hi. How are you?"])
    utt = utterance()
    spec = engine.speculate(paused(utt), cancelled=lambda: True)
    assert spec.transcript == "hello there" and spec.replies is None and not spec.deltas
    turn = engine.run_turn(utt, ReplaySink(), speculation=spec)
    assert turn.reply == "Hi. How are you?"
    assert engine.stages.asr.texts == []  # the ASR ran once


def test_a_sentence_longer_than_the_frame_cap_is_spoken_in_pieces(make_engine):
    # 20 frames at most, 1 frame a character: a piece may have 20 characters
    cfg = TTSConfig(seed=0, max_audio_length_ms=1600, frames_per_char=1.0, min_text_frames=2, chunk_frames=4,
                    stop_on_eos=False)
    sentence = "The quick brown fox, who was very tired, jumped over the lazy dog."
    engine, log = make_engine(["hello"], [sentence], tts_config=cfg)
    turn = engine.run_turn(utterance(), ReplaySink())
    spoken = [e[1] for e in log if e[0] == "tts"]
    assert len(spoken) > 1 and all(len(p) <= 20 for p in spoken), spoken
    assert " ".join(spoken) == sentence  # every word, in order
    assert spoken[:2] == ["The quick brown fox,", "who was very tired,"]  # clause marks preferred
    assert turn.reply == sentence


def test_prebuffer_follows_the_measured_tts_rate(make_engine, tiny_tts):
    """Faster than real time: one frame of buffer (jitter_s). Slower: the least from which the stream's chunks over
    the first sentence's frame cap play without a gap, planned at a fifth slower than measured."""
    engine, _ = make_engine([], [])
    cfg = TTSConfig(seed=0, max_audio_length_ms=10_000, frames_per_char=1.0, min_text_frames=12, chunk_frames=8)
    saved = tiny_tts.frame_seconds, tiny_tts.decode_seconds
    try:
        tiny_tts.frame_seconds = None
        assert engine.prebuffer_s("Hello there.", cfg) == engine.jitter_s  # nothing measured yet
        tiny_tts.frame_seconds, tiny_tts.decode_seconds = 0.040, 0.016
        assert engine.prebuffer_s("Hello there.", cfg) == engine.jitter_s
        tiny_tts.frame_seconds, tiny_tts.decode_seconds = 0.100, 0.016  # 0.102 s a frame: RTF 1.275
        frames = 12 + len("Hello there.")
        need = engine.prebuffer_s("Hello there.", cfg)
        assert need == pytest.approx(start_buffer(frames, 2, tiny_tts.rate_margin() * 0.100, 0.016, 8))
        assert need > (1.275 - 1) * frames * 0.08  # at least what it falls behind at the rate measured
    finally:
        tiny_tts.frame_seconds, tiny_tts.decode_seconds = saved


def test_replay_sink_first_sample_waits_for_the_prebuffer():
    sink = ReplaySink(1000)
    marks = []
    sink.on_first_sample = marks.append
    sink.begin_utterance()
    sink.set_prebuffer(0.25)  # 250 samples
    sink.write(np.zeros(100, np.float32))
    sink.write(np.zeros(100, np.float32))
    assert marks == []
    sink.write(np.zeros(100, np.float32))
    assert len(marks) == 1
    sink.write(np.zeros(100, np.float32))
    assert len(marks) == 1 and sink.played_samples == 400
    sink.begin_utterance()  # a reply shorter than its buffer plays once it is all there
    sink.set_prebuffer(1.0)
    sink.write(np.zeros(100, np.float32))
    sink.end_of_stream()
    assert len(marks) == 2


# ---- the steps alone, on a model-free TTS without codes (tests/tone_tts.py) ----------------------------------

def tone_engine(asr_texts, replies, **tts):
    from tone_tts import ToneConfig, ToneTTS

    log, events = [], []
    stages = Stages(ScriptedASR(asr_texts), ScriptedLLM(replies, log), ToneTTS(**tts), ToneConfig())
    return TurnEngine(stages, Conversation(), emit=events.append, log=lambda m: None), log, events


def test_the_engine_knows_no_particular_tts():
    from pathlib import Path

    import agent.engine
    import agent.voice

    for module in (agent.engine, agent.voice):
        source = Path(module.__file__).read_text()
        assert "pipelines.tts" not in source and "getattr(" not in source, module.__name__


def test_a_tts_without_codes_is_cut_to_what_was_played():
    from tone_tts import RATE

    engine, log, _ = tone_engine(["hello"], ["Paris is the capital. It is in France. It is big."])
    sink = ReplaySink(RATE)
    chunks = []
    real_write = sink.write
    sink.write = lambda audio: (chunks.append(len(audio)), real_write(audio))
    # 100-sample chunks, 10 samples a character: the first sentence is 100+100+10, the user speaks 100 into the next
    turn = engine.run_turn(utterance(), sink, interrupted=lambda: len(chunks) >= 4)
    assert turn.interrupted and turn.reply == "Paris is the capital. It is in France."
    assert turn.agent.codes is None and turn.agent.audio.size == sum(chunks) == 310
    assert turn.agent.sample_rate == RATE
    assert engine.stages.llm.history == [("hello", turn.reply)]
    assert not any(e[0] == "llm" and e[1] == "big." for e in log)  # the LLM was read no further
    assert engine.stages.tts.prepared  # the next turn's context was handed to the stage


def test_transcribe_and_reply_are_steps_of_their_own():
    from agent.engine import TurnClock

    engine, log, _ = tone_engine(["heard"], ["One two. Three four."])
    utt = utterance()
    timing = TurnClock(utt, engine.clock)
    assert engine.transcribe(utt, timing, text="  typed words ") == "typed words"
    assert engine.stages.asr.texts == ["heard"]  # typed text needs no ASR
    assert engine.transcribe(utt, timing) == "heard" and engine.stages.asr.texts == []
    assert list(engine.reply("heard", timing, until=lambda: True)) == ["One "]
    assert [e for e in log if e[0] == "llm"] == [("llm", "One")]  # cut short: the LLM was read no further
    assert {"asr_final", "llm_first_token"} <= set(timing.waterfall.offsets())


def test_a_reply_that_copies_an_earlier_one_is_kept_out_of_the_llms_history():
    from agent.events import ReplyKeptOut

    engine, _, events = tone_engine(["hello", "hello again"], ["I am fine, thank you.", "I am fine, thank you."])
    engine.stages.llm.max_history_turns = 2
    engine.run_turn(utterance(), ReplaySink(1000))
    second = engine.run_turn(utterance(seed=1), ReplaySink(1000))
    assert second.reply == "I am fine, thank you."
    assert engine.stages.llm.history == [("hello", "I am fine, thank you.")]
    assert [e.problems for e in events if isinstance(e, ReplyKeptOut)] == [["the same as an earlier reply"]]


def test_a_rebuffer_makes_one_pause_where_the_rate_dropped():
    """Playback as a speaker does it: a reply whose second piece comes at half real time stutters chunk after
    chunk; with the re-buffer threshold its piece set, it pauses once and then plays through."""
    from agent.metrics import audio_ahead, play, playback_stalls

    rate, frame = 1000, 80  # 80 samples a frame at 1 kHz: 80 ms
    fast = [(0.04 * i, frame) for i in range(1, 11)]  # 10 frames faster than real time
    slow_at = fast[-1][0]
    slow = [(slow_at + 0.16 * i, frame) for i in range(1, 11)]  # 10 frames at half real time
    plain = playback_stalls(fast + slow, rate, 0.08)
    assert plain["stalls"] >= 5
    held = playback_stalls(fast + [(t, n, 0.32) for t, n in slow], rate, 0.08)
    assert held["stalls"] == 1
    assert plain["stall_ms"] <= held["stall_ms"] <= plain["stall_ms"] + 100  # about the same silence, in one piece
    so_far = fast + [(t, n, 0.32) for t, n in slow[:6]]  # the 5th slow chunk ran dry; 2 of 4 are in
    heard = play(so_far, rate, 0.08, complete=False)
    assert heard.start is not None and heard.stalls == 1 and heard.waiting_s == pytest.approx(0.16)
    assert audio_ahead(so_far, rate, 0.08, now=slow[5][0]) == pytest.approx(0.16)
    assert play(so_far, rate, 0.08).waiting_s == 0  # a whole utterance plays what it has at its end


class CandidateLLM(ScriptedLLM):
    """Candidates in order; the next is given only when asked for a reply `unlike` the ones rejected so far."""

    def stream(self, text, avoid=(), unlike=()):
        self.log.append(("unlike", list(unlike)))
        for word in self.replies[len(unlike)].split(" "):
            self.log.append(("llm", word))
            yield word + " "


def test_a_first_sentence_with_problems_is_not_spoken_and_another_candidate_is():
    from agent.events import ReplyRejected, ReplyText, Said
    from tone_tts import RATE, ToneConfig, ToneTTS

    def run(replies, candidates=3, fallback=""):
        log, events = [], []
        stages = Stages(ScriptedASR(["hello"]), CandidateLLM(replies, log), ToneTTS(), ToneConfig(),
                        candidates=candidates, fallback_reply=fallback)
        engine = TurnEngine(stages, Conversation(), emit=events.append, log=lambda m: None)
        turn = engine.run_turn(utterance(), ReplaySink(RATE))
        said = "".join(e.text for e in events if isinstance(e, ReplyText))
        return turn, said, [e for e in events if isinstance(e, ReplyRejected)], [e.text for e in events if isinstance(e, Said)], log

    turn, said, rejected, spoken, log = run(["A: Hello there. B: Hi.", "Hello there, nice to meet you."])
    assert turn.reply == "Hello there, nice to meet you."
    assert "A:" not in said and not any("A:" in s for s in spoken)  # neither spoken nor sent to a client
    assert [(r.text, r.problems) for r in rejected] == [("A: Hello there.", ["dialogue label (A:)"])]
    assert [e[1] for e in log if e[0] == "unlike"] == [[], ["A: Hello there."]]
    # one candidate: spoken as it comes, unchecked (as before the checks)
    turn, *_ = run(["A: Hello there. B: Hi.", "unused"], candidates=1)
    assert turn.reply.startswith("A: Hello there.")
    # none passes: the fallback is said
    turn, said, rejected, spoken, _ = run(["A: one.", "B: two.", "C: three."], fallback="Sorry, say that again?")
    assert len(rejected) == 3 and turn.reply == "Sorry, say that again?" and said == "Sorry, say that again?"


def test_choosing_a_reply_stops_when_the_turn_is_cut_and_an_empty_retry_is_no_reply():
    from agent.engine import checked_reply

    log = []
    closed = []

    class Endless:
        """A reply with no sentence break, never finishing on its own; records when it is closed."""

        def stream(self, text, avoid=(), unlike=()):
            try:
                while True:
                    log.append("token")
                    yield "word "
            finally:
                closed.append(True)

    tokens = []
    out = list(checked_reply(Endless(), "hi", [], candidates=3, fallback_reply="F",
                             on_token=lambda: tokens.append(1), stop=lambda: len(tokens) >= 5))
    assert out == [] and len(log) == 5 and closed == [True]  # cut while choosing: nothing said, the stream closed
    # a retry that comes back empty is no reply: the fallback is said (an empty first reply stays empty, as before)
    assert "".join(checked_reply(CandidateLLM(["A: one.", ""], []), "hi", [], candidates=2, fallback_reply="F")) == "F"
    assert "".join(checked_reply(CandidateLLM([""], []), "hi", [], candidates=2, fallback_reply="F")).strip() == ""
