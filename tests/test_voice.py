"""The speak step alone (agent/voice.py `ReplyVoice`), on a model-free TTS stage (tests/tone_tts.py)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.sinks import ReplaySink
from agent.voice import ReplyVoice, speech_pieces
from pipelines.messages import Segment
from tone_tts import RATE, ToneConfig, ToneTTS

CFG = ToneConfig()


def test_a_sentence_is_said_in_pieces_that_fit_each_with_the_earlier_ones_as_context():
    tts = ToneTTS(codes=True, max_chars=20)
    sink = ReplaySink(RATE)
    sink.begin_utterance()
    said = []
    voice = ReplyVoice(tts, CFG, 0, [Segment(1, "hi", np.zeros(5, np.float32), RATE)], sink=sink,
                       least_prebuffer_s=0.1, said=said.append)
    sentence = "The quick brown fox, who was very *tired*, jumped."
    voice.say(sentence)
    pieces = ["The quick brown fox,", "who was very tired,", "jumped."]  # no markdown read aloud
    assert speech_pieces(tts, sentence, CFG) == pieces == said == [text for text, _ in tts.calls]
    assert tts.calls[1][1] == [(1, "hi", 5), (0, "The quick brown fox,", 200)]
    assert tts.calls[2][1][-1] == (0, "who was very tired,", 190)
    assert voice.text == "The quick brown fox, who was very tired, jumped."
    segment = voice.segment()
    assert segment.sample_rate == RATE and segment.audio.size == (20 + 19 + 7) * 10 == sink.played_samples
    assert segment.codes.shape == (2, 4 + 4 + 2)  # each chunk's frames: ceil(samples / 50)
    assert voice.prebuffer == pytest.approx(0.1)
    assert sum(n for _, n, *_ in voice.timeline) == segment.audio.size
    assert set(voice.playback()) == {"stall_ms", "stalls", "prebuffer_ms", "tts_rtf"}


@pytest.mark.parametrize("codes", [True, False])
def test_keep_played_keeps_whole_pieces_and_the_heard_part_of_the_cut_one(codes):
    tts = ToneTTS(codes=codes)
    voice = ReplyVoice(tts, CFG, 0)
    voice.say("Hello there.")  # 120 samples, 3 frames
    voice.say("How are you?")
    voice.say("Bye now.")
    voice.keep_played(150)
    assert voice.text == "Hello there. How are you?"  # the piece cut off is the one the user heard begin
    assert voice.audio.size == 150
    if codes:
        assert voice.codes.shape == (2, 3 + 1)  # 30 samples of the second piece need its first frame
    else:
        assert voice.codes is None and voice.segment().codes is None
    voice.keep_played(0)
    assert voice.segment() is None and voice.text == ""


def test_most_s_cuts_the_audio_there_and_closes_the_stream():
    tts = ToneTTS()
    voice = ReplyVoice(tts, CFG, 0, most_s=0.25)
    voice.say("Hello there, how are you today?")  # 310 samples in 4 chunks
    assert voice.full and voice.audio.size == 250
    assert tts.made == 3  # the fourth chunk was never asked for
    voice.say("More.")
    assert len(tts.calls) == 1 and voice.audio.size == 250


def test_cancelled_stops_the_piece_and_says_nothing_more():
    tts = ToneTTS()
    voice = ReplyVoice(tts, CFG, 0, cancelled=lambda: tts.made >= 2)
    voice.say("Hello there, how are you today?")
    assert voice.stopped and voice.halted() and voice.audio.size == 100  # the second chunk came too late
    voice.say("Another sentence.")
    assert len(tts.calls) == 1


def test_prebuffer_is_the_stages_rule_at_the_first_chunk():
    tts = ToneTTS(prebuffer_extra_s=0.4)
    sink = ReplaySink(RATE)
    marks = []
    sink.on_first_sample = marks.append
    sink.begin_utterance()
    voice = ReplyVoice(tts, CFG, 0, sink=sink, least_prebuffer_s=0.08)
    voice.say("Hi there.")  # 90 samples: shorter than the buffer
    assert voice.prebuffer == pytest.approx(0.48) and marks == []  # nothing played yet: the buffer is not full
    voice.say("How are you doing today, my good friend?")  # 400 more
    assert marks  # 0.48 s buffered: playback started
