"""The Realtime adapter's message handling, without a socket or models: every kind of bad input gets an `error`
event and the session goes on; the events a turn produces follow the protocol's order.

The worker is a stand-in (the models are not what these tests are about); the floor and VAD are real.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from agent.config import load_config
from agent.conversation import Turn
from agent.events import Said, Transcribed, TurnEnded, TurnWithdrawn
from agent.web.realtime import MAX_MESSAGE_BYTES, RATE, RealtimeSession


class StandInWorker:
    """Records what the adapter asks of the worker; `speaking` says whether a turn is under way."""

    inline = False  # threaded, as live

    def __init__(self, sink):
        self.sink, self.recorder, self.engine = sink, None, None
        self.speaking = False
        self.submitted, self.texts, self.barge_ins = [], [], 0

    def answer(self, utterance, text=None):
        if text is None:
            self.submitted.append(utterance)
        else:
            self.texts.append(text)

    def speculate(self, utterance):
        pass

    def drop_speculation(self):
        pass

    def barge_in(self):
        self.barge_ins += 1


@pytest.fixture()
def session():
    sent = []
    s = RealtimeSession(load_config("default"), sent.append, log=lambda m: None)
    s.worker = s.loop.worker = StandInWorker(s.sink)
    s.sent = sent
    return s


def send(session, event) -> list[dict]:
    """Handle one client event; the events the session sent back."""
    before = len(session.sent)
    session.handle(event if isinstance(event, (str, bytes)) else json.dumps(event))
    return session.sent[before:]


def errors(events) -> list[str]:
    return [e["error"]["code"] for e in events if e["type"] == "error"]


def quiet_room(audio: np.ndarray) -> np.ndarray:
    """A microphone's -66 dBFS room noise under the audio, as a real client sends (never digital zeros)."""
    return audio + (np.random.default_rng(0).standard_normal(audio.size) * 10 ** (-66 / 20)).astype(np.float32)


def pcm_b64(samples: np.ndarray) -> str:
    return base64.b64encode((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def still_works(session) -> None:
    out = send(session, {"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief."}})
    assert [e["type"] for e in out] == ["session.updated"] and out[0]["session"]["instructions"] == "Be brief."


@pytest.mark.parametrize("raw, code", [
    ("not json {", "invalid_json"),
    ('["a list"]', "invalid_event"),
    ('{"no": "type"}', "invalid_event"),
    ('{"type": "session.explode"}', "unknown_event"),
    (b"\x00\x01binary", "invalid_message"),
    ('{"type": "input_audio_buffer.append", "audio": "' + "A" * (MAX_MESSAGE_BYTES + 10) + '"}', "message_too_large"),
    ('{"type": "input_audio_buffer.append", "audio": "not base64!!"}', "invalid_audio"),
    ('{"type": "input_audio_buffer.append", "audio": "AAAA"}', "invalid_audio"),  # 3 bytes: not PCM16
    ('{"type": "input_audio_buffer.append"}', "missing_field"),
    ('{"type": "response.cancel"}', "response_cancel_not_active"),
    ('{"type": "response.create"}', "no_input"),
    ('{"type": "input_audio_buffer.commit"}', "input_audio_buffer_commit_empty"),
    ('{"type": "conversation.item.create", "item": {"type": "message", "role": "system", "content": []}}',
     "unsupported_item"),
    ('{"type": "conversation.item.truncate", "item_id": "item_9", "content_index": 0, "audio_end_ms": 5}',
     "item_not_playing"),
    ('{"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"format": '
     '{"type": "audio/pcmu"}}}}}', "unsupported_format"),
])
def test_bad_input_gets_an_error_event_and_the_session_goes_on(session, raw, code):
    assert errors(send(session, raw)) == [code]
    still_works(session)


def test_commit_on_an_empty_buffer_without_turn_detection(session):
    send(session, {"type": "session.update", "session": {"type": "realtime",
                                                         "audio": {"input": {"turn_detection": None}}}})
    assert errors(send(session, {"type": "input_audio_buffer.commit"})) == ["input_audio_buffer_commit_empty"]
    still_works(session)


def test_manual_turn_commit_then_response_create(session, question_24k):
    send(session, {"type": "session.update", "session": {"type": "realtime",
                                                         "audio": {"input": {"turn_detection": None}}}})
    for start in range(0, len(question_24k), 4800):
        assert not errors(send(session, {"type": "input_audio_buffer.append",
                                         "audio": pcm_b64(question_24k[start:start + 4800])}))
    out = send(session, {"type": "input_audio_buffer.commit"})
    assert [e["type"] for e in out] == ["input_audio_buffer.committed", "conversation.item.added",
                                        "conversation.item.done"]
    assert session.worker.submitted == []  # no turn detection: the client asks for the response
    send(session, {"type": "response.create"})
    (utterance,) = session.worker.submitted
    assert utterance.duration_s == pytest.approx(len(question_24k) / RATE, abs=0.1)
    # a second commit has nothing new
    assert errors(send(session, {"type": "input_audio_buffer.commit"})) == ["input_audio_buffer_commit_empty"]


def test_server_vad_detects_the_turn_and_answers_it(session, question_24k):
    silence = quiet_room(np.zeros(RATE, np.float32))
    events = []
    for start in range(0, len(question_24k) + RATE, 2400):
        chunk = np.concatenate([question_24k, silence])[start:start + 2400]
        events += send(session, {"type": "input_audio_buffer.append", "audio": pcm_b64(chunk)})
    kinds = [e["type"] for e in events]
    assert kinds == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                     "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    assert events[0]["item_id"] == events[1]["item_id"] == events[2]["item_id"]
    assert len(session.worker.submitted) == 1  # create_response: answered at once


def test_a_text_message_is_answered_on_response_create(session):
    out = send(session, {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there!"}]}})
    assert [e["type"] for e in out] == ["conversation.item.added", "conversation.item.done"]
    send(session, {"type": "response.create"})
    assert session.worker.texts == ["Hello there!"]


def test_engine_events_become_the_response_events(session):
    session._transcribing.append(("item_user", True))
    session._event(Transcribed("What is the capital of France?", 1.0, 2.5, 3.2, "vad"))
    session.sink.begin_utterance()
    session._event(Said("Paris."))
    session.sink.write(np.full(480, 0.1, np.float32))
    session._event(TurnEnded(Turn(0, "What is the capital of France?", reply="Paris.")))
    kinds = [e["type"] for e in session.sent]
    assert kinds == ["conversation.item.input_audio_transcription.completed", "response.created",
                     "response.output_item.added", "response.content_part.added",
                     "response.output_audio_transcript.delta", "response.output_audio.delta",
                     "response.output_audio.done", "response.output_audio_transcript.done",
                     "response.content_part.done", "response.output_item.done", "response.done"]
    audio = base64.b64decode(session.sent[5]["delta"])
    assert len(audio) == 2 * 480
    assert session.sent[-1]["response"]["status"] == "completed"
    assert session.sent[-1]["response"]["output"][0]["content"][0]["transcript"] == "Paris."


def test_a_withdrawn_reply_is_a_cancelled_response(session):
    # the user went on speaking after the words had ended the turn: the response started on it ends, cancelled
    session._transcribing.append(("item_user", True))
    session._event(Transcribed("What is the capital of France", 1.0, 2.5, 2.62, "words"))
    session._event(TurnWithdrawn(1.0))
    done = [e for e in session.sent if e["type"] == "response.done"]
    assert len(done) == 1 and done[0]["response"]["status"] == "cancelled"
    assert session._response is None  # the next turn's response can start


def test_heard_after_a_cut_is_what_the_client_played(session):
    session._transcribing.append(("item_user", True))
    session._event(Transcribed("Tell me a story.", 0.0, 1.0, 1.7, "vad"))
    item = session._response.item_id
    session.sink.begin_utterance()
    session.sink.write(np.full(RATE, 0.1, np.float32))  # a second of reply sent
    session._answering = 1
    send(session, {"type": "response.cancel"})
    assert session.worker.barge_ins == 1
    out = send(session, {"type": "conversation.item.truncate", "item_id": item, "content_index": 0,
                         "audio_end_ms": 250})
    assert [e["type"] for e in out] == ["conversation.item.truncated"]
    assert session.sink.clear() == RATE // 4  # the client's word, not what was sent


@pytest.fixture(scope="module")
def question_24k(tmp_path_factory) -> np.ndarray:
    from pipelines.audio import resample
    from virtual_audio import espeak_pcm16

    pcm = espeak_pcm16("What is the capital of France?", tmp_path_factory.mktemp("speech"))
    if pcm is None:
        pytest.skip("espeak-ng is not installed (Debian: apt install espeak-ng)")
    speech = resample(pcm.astype(np.float32) / 32768, 16000, RATE)
    return quiet_room(np.concatenate([np.zeros(RATE // 2, np.float32), speech, np.zeros(RATE // 4, np.float32)]))
