"""The browser conversation's turn-taking, without a browser: the page's mic frames through the real VAD.

The worker is a stand-in that is "speaking" or not (the models are not what these tests are about); the
bundle is real, and the replay path must make the same decisions from it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent.config import load_config
from agent.modes import replay_utterances
from agent.session import SessionRecorder, read_session
from agent.web.page import PageSession
from virtual_audio import espeak_pcm16

FRAME = 320  # the page's 20 ms frames


class SpeakingWorker:
    """The session loop's worker without models: the sink and the bundle are the page session's own."""

    inline = False  # threaded, as live

    def __init__(self, speaking: bool, sink, recorder):
        self.speaking, self.sink, self.recorder = speaking, sink, recorder
        self.barge_ins = 0
        self.submitted = []

    def barge_in(self) -> None:
        self.barge_ins += 1

    def answer(self, utterance, text=None) -> None:
        self.submitted.append(utterance)

    def speculate(self, utterance) -> None:
        pass

    def drop_speculation(self) -> None:
        pass


@pytest.fixture(scope="module")
def question(tmp_path_factory) -> np.ndarray:
    pcm = espeak_pcm16("What is the capital of France?", tmp_path_factory.mktemp("speech"))
    if pcm is None:
        pytest.skip("espeak-ng is not installed (Debian: apt install espeak-ng)")
    return np.concatenate([np.zeros(8000, np.int16), pcm, np.zeros(16000, np.int16)])


def converse(tmp_path, mic: np.ndarray, push_to_talk: bool, full_duplex: bool, speaking: bool, keys=()):
    sent = []
    conversation = PageSession(load_config("default"), sent.append, push_to_talk, full_duplex, log=lambda m: None)
    recorder = SessionRecorder(tmp_path / "bundle", {"mode": conversation.mode})
    conversation.worker = conversation.loop.worker = SpeakingWorker(speaking, conversation.sink, recorder)
    conversation.loop.listeners.add(recorder.listen)  # the bundle follows the session as a listener
    conversation.started = time.monotonic() - 3600  # the frames come faster than real time here
    keys = dict(keys)  # frame index -> key down?
    for i, start in enumerate(range(0, len(mic), FRAME)):
        if i in keys:
            conversation.key(keys[i])
        conversation.mic(mic[start:start + FRAME].astype("<i2").tobytes())
    conversation.recorder.close()
    return conversation.worker, sent, read_session(tmp_path / "bundle")


def test_half_duplex_mutes_the_mic_while_the_agent_speaks(tmp_path, question):
    worker, sent, data = converse(tmp_path, question, push_to_talk=False, full_duplex=False, speaking=True)
    assert worker.submitted == [] and worker.barge_ins == 0
    assert data.mutes and data.mutes[0][0] == 0.0
    assert {"type": "listening", "on": False} in sent
    assert list(replay_utterances(load_config("default"), data)) == []


def test_full_duplex_speech_barges_in_and_is_a_turn(tmp_path, question):
    worker, sent, data = converse(tmp_path, question, push_to_talk=False, full_duplex=True, speaking=True)
    assert worker.barge_ins == 1 and len(worker.submitted) == 1
    assert [e["type"] for e in data.events if e["type"] == "barge_in"] == ["barge_in"]
    again = list(replay_utterances(load_config("default"), data))
    assert [(u.start_s, u.end_s) for u in again] == [(u.start_s, u.end_s) for u in worker.submitted]


def test_push_to_talk_keys_make_the_turn_and_replay_the_same(tmp_path, question):
    frames = len(question) // FRAME
    worker, sent, data = converse(tmp_path, question, push_to_talk=True, full_duplex=False, speaking=False,
                                  keys={5: True, frames - 5: False})
    (utterance,) = worker.submitted
    assert utterance.reason == "manual" and utterance.start_s == pytest.approx(5 * 0.02)
    assert utterance.end_s == pytest.approx((frames - 5) * 0.02)
    assert [a for _, a in data.keys] == ["press", "release"]
    (again,) = replay_utterances(load_config("push_to_talk"), data)
    assert (again.start_s, again.end_s) == pytest.approx((utterance.start_s, utterance.end_s), abs=0.031)


def test_a_page_session_in_which_nobody_spoke_says_why(tmp_path):
    """The session loop's close gives the floor's reason (it once logged '<Floor object ...>' instead)."""
    import threading
    from types import SimpleNamespace

    from agent.conversation import Conversation

    lines = []
    page = PageSession(load_config("default"), [].append, False, False, log=lines.append)

    class Idle:
        sink, recorder, unheard, speaking = page.sink, None, 0, False
        finished = threading.Event()
        engine = SimpleNamespace(conversation=Conversation())

        def cancel(self):
            pass

        def stop(self):
            self.finished.set()

    page.worker = page.loop.worker = Idle()
    page.started = time.monotonic() - 3600
    for _ in range(50):
        page.mic(np.zeros(FRAME, "<i2").tobytes())
    page.close()
    assert lines == ["no turn taken: no speech found in 1.0 s of mic audio (too quiet? check the input level, "
                     "vad.energy_margin_db, or that the right microphone is used)"], lines
    assert not page.spoke


class HeardQuestion:
    def transcribe(self, audio, sample_rate=16000):
        from pipelines.asr.whisper import Transcript

        return Transcript("What is the capital of France?", 0.0, "en")

    def warmup(self):
        pass


class Answers:
    system_prompt = ""
    max_history_turns = 2

    def stream(self, text, avoid=(), unlike=()):
        yield from ("Paris ", "is ", "the ", "capital.")

    def prepare_next_turn(self) -> int:
        return 0

    def commit(self, user, reply):
        pass

    def reset(self):
        pass

    def warmup(self):
        pass


def test_the_page_narrates_the_turn_when_nothing_is_recorded(question, tiny_args, tiny_tokenizer, mimi):
    """The page's transcript, reply and turn messages are a session listener of their own: with
    `session.record = false` (no bundle) the page still hears the whole turn."""
    from concurrent.futures import ThreadPoolExecutor

    from agent.engine import Stages
    from pipelines.tts.load import TTSConfig
    from pipelines.tts.prompt import TextTokenizer
    from pipelines.tts.stage import MarvisTTS
    from pipelines.tts.weights import random_model

    cfg = load_config("default", [("session.record", "false")])
    assert cfg.session.record is False
    owner = ThreadPoolExecutor(1)  # the server's one model thread: MLX work stays on the thread that built it
    tts = owner.submit(lambda: MarvisTTS(random_model(tiny_args, seed=0), TextTokenizer(tiny_tokenizer), mimi)).result()
    stages = Stages(HeardQuestion(), Answers(), tts, TTSConfig(seed=0, max_audio_length_ms=480))
    sent = []

    def send(message):  # the page: it plays each reply at once and says so
        sent.append(message)
        if isinstance(message, dict) and message["type"] == "end":
            page.sink.report_played(message["id"], page.sink._written, final=False)

    page = PageSession(cfg, send, False, False, log=lambda m: None, stages=stages, owner=owner)
    page.start()
    page.started = time.monotonic() - 3600  # the frames come faster than real time here
    for start in range(0, len(question), FRAME):
        page.mic(question[start:start + FRAME].astype("<i2").tobytes())
    deadline = time.monotonic() + 120
    while not any(isinstance(m, dict) and m.get("type") == "turn" for m in sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert page.close() is None  # no bundle
    owner.shutdown()
    assert page.loop.error is None
    messages = [m for m in sent if isinstance(m, dict)]
    kinds = [m["type"] for m in messages]
    assert {"type": "transcript", "text": "What is the capital of France?"} in messages
    # the reply may start on the speculation at the first pause, before the endpoint's transcript
    assert max(kinds.index("transcript"), kinds.index("reply_start")) < kinds.index("turn")
    assert "".join(m["text"] for m in messages if m["type"] == "reply") == "Paris is the capital."
    (turn,) = [m for m in messages if m["type"] == "turn"]
    assert turn["reply"] == "Paris is the capital." and turn["transcript"] == "What is the capital of France?"
    assert kinds.count("speech") == 2 and kinds.index("listening") < kinds.index("turn")  # the floor narrates too
    assert any(isinstance(m, bytes) for m in sent)  # the reply's audio went to the page


def test_the_page_is_told_when_a_reply_is_withdrawn():
    # the user went on after the words had ended the turn: the page drops that transcript and reply
    from agent.events import TurnWithdrawn

    sent = []
    page = PageSession(load_config("default"), sent.append, False, False, log=lambda m: None)
    page.narrate(TurnWithdrawn(1.0, "Paris"))
    assert sent[-1] == {"type": "withdrawn"}
