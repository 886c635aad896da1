"""Stand-ins replayed on a session's script: the words an utterance holds, scripted replies, and a whole replay
through the session loop with stand-in Whisper and Llama (small shapes, written by the same writers)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from agent.config import ROOT, load_config
from agent.scripted import REPLIES, Script, ScriptedReply
from agent.session import read_events
from conftest import require_checkpoints
from pipelines.llm.form import reply_problems
from pipelines.vad import Utterance

EVENTS = [{"type": "script", "t": 1.0, "duration_s": 2.0, "text": "I'd like to book a table for two"},
          {"type": "script", "t": 5.0, "duration_s": 1.0, "text": "Thanks, goodbye."}]


def utt(start: float, end: float) -> Utterance:
    import numpy as np

    return Utterance(audio=np.zeros(160, np.float32), sample_rate=16000, start_s=start, end_s=end,
                     decided_s=end + 0.1, reason="silence", audio_start_s=start)


def test_an_utterance_holds_the_scripted_words_its_time_covers():
    script = Script(EVENTS)
    assert script.words(utt(0.9, 3.0)) == "I'd like to book a table for two"
    assert script.words(utt(0.9, 2.0)) == "I'd like to book"  # a pause half way: half the words
    assert script.words(utt(0.9, 6.0)) == "I'd like to book a table for two Thanks, goodbye."  # one turn of two
    assert script.words(utt(3.5, 4.5)) == ""  # nothing scripted was said then
    assert script.reply("I'd like to book a table for two") == REPLIES[0]
    assert script.reply("I'd like to book a table for two Thanks, goodbye.") == REPLIES[1]  # the turn it ends in
    assert not Script([{"type": "transcript", "text": "x"}])


def test_the_scripted_replies_pass_the_form_checks_in_any_order():
    for i, reply in enumerate(REPLIES):
        assert reply_problems(reply, [r for r in REPLIES if r != reply]) == [], reply


def test_a_stand_in_is_taken_only_for_a_model_that_is_absent(tmp_path):
    from agent.bench.agent import scripted_stages
    from agent.build import stand_in_config
    from pipelines.errors import CheckpointError, ConfigError
    from pipelines.standins import STAND_IN

    cfg = load_config("fetched", on_cpu=False)  # the published set (small.en), wherever this runs
    assert stand_in_config(load_config("default"), stand_ins=tmp_path) == (load_config("default"), [])
    with pytest.raises(CheckpointError, match="no such model folder, and no stand-in"):
        stand_in_config(cfg, log=lambda _: None, stand_ins=tmp_path)  # none written there
    for name in ("whisper-small.en-mlx", "llama-3.2-1b-instruct-4bit"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STAND_IN).write_text("{}")
    said = []
    replaced, kinds = stand_in_config(cfg, log=said.append, stand_ins=tmp_path)
    assert kinds == ["asr", "llm"] and replaced.asr.model == str(tmp_path / "whisper-small.en-mlx")
    assert replaced.llm.model == str(tmp_path / "llama-3.2-1b-instruct-4bit") and len(said) == 2
    assert "UNTRAINED stand-in" in said[0]
    with pytest.raises(ConfigError, match="session's script"):  # nothing scripted: nothing to teacher-force
        scripted_stages(cfg, [], stand_ins=tmp_path)
    default = load_config("default")
    typo = dataclasses.replace(default, asr=dataclasses.replace(default.asr, model="checkpoints/whisper-tnyy.en"))
    with pytest.raises(CheckpointError, match="whisper-tnyy.en: no such model folder"):  # at once: nothing written
        stand_in_config(typo, log=lambda _: None)


@pytest.mark.slow
def test_a_session_replays_on_stand_ins_teacher_forced(tmp_path, tiny_tts):
    """Whisper and Llama stand-ins (small shapes, random weights) replay the demo session: every turn's transcript
    is the script's, every reply the scripted one, and the bundle says the models are untrained."""
    smollm = require_checkpoints("smollm2-135m-instruct", "whisper-tiny.en")
    from agent.engine import Stages
    from agent.modes import run_replay
    from pipelines.asr.whisper import WhisperASR
    from pipelines.llm.reply import ReplyLLM
    from pipelines.ortgraph import Placement
    from pipelines.standins import LLAMA_32_1B, WHISPER_SMALL_EN, write_llama, write_whisper
    from pipelines.tts.load import TTSConfig

    dims = {**WHISPER_SMALL_EN, "n_audio_state": 64, "n_audio_head": 2, "n_audio_layer": 1, "n_text_state": 64,
            "n_text_head": 2, "n_text_layer": 1}
    config = {**LLAMA_32_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    cfg = load_config("demo")
    session = ROOT / "sessions" / "demo"
    script = Script(read_events(session / "events.jsonl", lambda _: None))
    asr = WhisperASR(write_whisper(tmp_path / "whisper", dims), placement=Placement("onnx"),
                     ort_cache=tmp_path / "ort-asr")
    llm = ReplyLLM(write_llama(tmp_path / "llama", smollm, config), cfg.llm.system_prompt,
                   placement=Placement("onnx"), ort_cache=tmp_path / "ort-llm", max_tokens=cfg.llm.max_tokens)
    judge = ReplyLLM(smollm, cfg.llm.system_prompt, placement=Placement("onnx"), ort_cache=tmp_path / "ort-judge",
                     examples=[tuple(e) for e in cfg.llm.examples])
    stages = Stages(asr, ScriptedReply(llm, script.reply, judge), tiny_tts,
                    TTSConfig(seed=0, max_audio_length_ms=480, chunk_frames=2, first_chunk_frames=1),
                    max_sentences=2, words=script.words)
    for stage in (asr, stages.llm, tiny_tts):
        stage.warmup()
    result = run_replay(cfg, [session], out=tmp_path / "bundle", log=lambda _: None, progress=False, stages=stages)
    turns = result.conversation.turns
    assert [t.transcript for t in turns] == [t.text for t in script.turns]
    assert [t.reply for t in turns] == list(REPLIES[: len(turns)])
    meta = json.loads((result.bundle / "session.json").read_text())
    assert meta["asr_untrained"] is True and meta["llm_untrained"] is True


def test_a_real_asr_is_teacher_forced_too_when_the_reply_model_is_a_stand_in(monkeypatch, capsys):
    """The CPU set hears with the offline tiny.en beside a stand-in Llama: the real ASR must hear the script's words
    too, or its transcripts (which differ from the script) would all get the first scripted reply, refused as a
    repeat from the second turn on. The models are not what this is about: building them is faked."""
    from types import SimpleNamespace

    import agent.build
    import pipelines.llm.load
    from agent.bench.agent import scripted_stages

    class Stage:
        def warmup(self):
            pass

    built = SimpleNamespace(asr=Stage(), llm=Stage(), tts=Stage(), words=None)
    cfg = load_config("default")
    monkeypatch.setattr(agent.build, "stand_in_config", lambda c, stand_ins=None: (c, ["llm"]))
    monkeypatch.setattr(agent.build, "build_stages", lambda c: built)
    monkeypatch.setattr(pipelines.llm.load, "load_llm", lambda *a, **k: Stage())
    stages = scripted_stages(cfg, EVENTS)
    assert stages is built and isinstance(stages.llm, ScriptedReply)
    assert stages.words is not None, "the real ASR was left to hear freely"
    words = [stages.words(utt(1.0, 3.0)), stages.words(utt(5.0, 6.0))]
    assert words == [e["text"] for e in EVENTS]
    assert [stages.llm.reply(w) for w in words] == list(REPLIES[:2])  # each turn its own scripted reply
    assert "teacher-forced on the script too" in capsys.readouterr().out
