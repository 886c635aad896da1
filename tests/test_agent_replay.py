"""The whole agent on the offline default models: the shipped demo session replayed end to end.

Real webrtcvad, Whisper tiny.en, SmolLM2-135M and the Marvis-250M-shaped TTS (untrained random
weights: its audio is noise, but every frame goes through the real model and Mimi). One replay,
shared by the assertions below (it takes a couple of minutes on 2 cores).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.config import ROOT, load_config
from agent.metrics import STAGES
from agent.session import read_events, read_session
from conftest import require_checkpoints

pytestmark = pytest.mark.slow

SPOKEN = [("capital", "france"), ("sky", "clear"), ("thank", "goodbye")]


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    from agent.modes import run_replay

    cfg = load_config("demo")
    contexts = []
    from agent import engine as engine_mod

    real_stream = None

    def spy(self_tts):  # record the TTS context of every call, to check turn N sees turns < N
        nonlocal real_stream
        real_stream = self_tts.stream

        def stream(text, speaker=0, context=(), voice=None, config=None, cancelled=lambda: False, ahead=None,
                   waiting=None):
            contexts.append([(s.speaker, s.text) for s in context])
            return real_stream(text, speaker, context, voice, config, cancelled, ahead, waiting)

        self_tts.stream = stream

    out = tmp_path_factory.mktemp("runs") / "demo"
    lines = []
    orig_warmup = engine_mod.TurnEngine.warmup

    def warmup(self):
        spy(self.stages.tts)
        orig_warmup(self)

    engine_mod.TurnEngine.warmup = warmup
    try:
        result = run_replay(cfg, [ROOT / "sessions" / "demo"], out=out, log=lines.append, progress=False)
    finally:
        engine_mod.TurnEngine.warmup = orig_warmup
    return result, contexts, lines


def test_turns_transcripts_and_replies(replay):
    result, _, lines = replay
    turns = result.conversation.turns
    assert len(turns) == 3, lines
    for turn, words in zip(turns, SPOKEN):
        assert all(w in turn.transcript.lower() for w in words), turn.transcript
        assert turn.reply.strip(), f"turn {turn.index} has no reply"
        assert turn.agent is not None and turn.agent.audio.size > 0
        assert turn.agent.codes.shape[0] == 32 and turn.agent.codes.shape[1] * 1920 == turn.agent.audio.size
    assert "paris" in turns[0].reply.lower()
    assert any("UNTRAINED" in line for line in lines)


def test_segments_in_order_and_context_sees_only_the_past(replay):
    result, contexts, _ = replay
    turns = result.conversation.turns
    for turn in turns:
        assert turn.user.speaker == 1 and turn.agent.speaker == 0
        assert turn.user.text == turn.transcript and turn.agent.text == turn.reply
        assert all(i < turn.index for i in turn.context_turns)
    assert turns[0].context_turns == [] and turns[2].context_turns == [0, 1]
    # the TTS was called with the conversation so far: turn 2's first call carries turns 0 and 1
    texts = [t for ctx in contexts for _, t in ctx]
    assert turns[0].transcript in texts and turns[1].reply in texts
    first_call_of_turn2 = next(c for c in contexts if any(t == turns[1].transcript for _, t in c))
    assert (1, turns[0].transcript) in first_call_of_turn2 and (0, turns[0].reply) in first_call_of_turn2


def test_bundle_written_and_replayable(replay):
    result, _, _ = replay
    folder = result.bundle
    meta = json.loads((folder / "session.json").read_text())
    assert meta["tts_untrained"] is True and meta["turns"] == 3
    for i in range(3):
        assert (folder / "turns" / f"{i:04d}-user.wav").is_file()
        assert (folder / "turns" / f"{i:04d}-agent.wav").is_file()
    assert (folder / "waterfall.png").stat().st_size > 1000
    # the replay's own bundle holds the same mic audio, so it can be replayed in turn
    again = read_session(folder)
    original = read_session(ROOT / "sessions" / "demo")
    np.testing.assert_array_equal(again.mic, original.mic)
    turns = [e for e in read_events(folder / "events.jsonl") if e["type"] == "turn"]
    assert [t["index"] for t in turns] == [0, 1, 2]


def test_waterfall_is_causal(replay):
    result, _, _ = replay
    rows = [json.loads(line) for line in (result.bundle / "waterfall.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert [s for s in STAGES if s in row] == STAGES, row
        values = [row[s] for s in STAGES]
        assert values == sorted(values), row
        vad = load_config("demo").vad  # in stream time: the words ended the turn at the pause, or the silence did
        assert row["endpoint"] in (pytest.approx(vad.pause_ms, abs=40), pytest.approx(vad.silence_ms, abs=40)), row
    summary = json.loads((result.bundle / "summary.json").read_text())
    assert summary["first_sample_played"]["n"] == 3
    assert summary["first_sample_played"]["p50"] <= summary["first_sample_played"]["p90"]
