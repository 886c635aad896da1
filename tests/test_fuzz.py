"""Properties that hold for any input (hypothesis, modest example counts): the audio reader, the config loader,
the bundle reader and the sentence splitter never fail in any way but their own one-line error."""

from __future__ import annotations

import json
import re
import tempfile
import tomllib
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, load_config
from agent.session import SessionData, read_session
from conftest import assert_config_holds
from pipelines.audio import load_audio
from pipelines.errors import AudioInputError, ConfigError, VoiceAgentError
from pipelines.llm.sentences import SentenceSplitter

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WAV_HEAD = bytes.fromhex("52494646") + b"\x24\x08\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80\x3e\x00\x00"


@FAST
@given(st.one_of(st.binary(max_size=2048), st.binary(max_size=2048).map(lambda b: WAV_HEAD + b)))
def test_any_bytes_are_audio_or_one_line(payload):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.wav"
        path.write_bytes(payload)
        try:
            audio = load_audio(path, 16_000)
        except AudioInputError as exc:
            assert "\n" not in str(exc)
            return
    assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all()


toml_value = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                       st.text(max_size=8))
config_key = st.sampled_from(["vad.energy_margin_db", "vad.silence_ms", "llm.max_tokens", "llm.temperature",
                              "audio.block_ms", "replay.chunk_ms", "session.record", "mode", "tts.top_k",
                              "tts.temperature", "tts.checkpoint", "asr.model", "nope.key", "llm"])


@FAST
@given(st.lists(st.tuples(config_key, toml_value.map(str)), max_size=3))
def test_any_override_is_a_config_or_one_line(pairs):
    try:
        cfg = load_config("default", pairs)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(cfg, AgentConfig)
    for dotted, value in dict(pairs).items():  # the last override of a key is the one that holds
        section, key = dotted.split(".") if "." in dotted else (None, dotted)
        assert_config_holds(cfg if section is None else getattr(cfg, section), {key: value},
                            AgentConfig() if section is None else getattr(AgentConfig(), section), f"{dotted}: ")


@FAST
@given(st.text(max_size=300))
def test_any_toml_text_is_a_config_or_one_line(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.toml"
        path.write_text(text, encoding="utf-8")
        try:
            cfg = load_config(str(path))
        except ConfigError as exc:
            assert "\n" not in str(exc)
            return
    assert isinstance(cfg, AgentConfig)
    written = tomllib.loads(text)  # it loaded: the file is TOML whose every value holds, the rest is the defaults
    assert_config_holds(cfg, written)
    if not written:
        assert cfg.to_dict() == AgentConfig().to_dict()


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                          max_leaves=8)
event = st.one_of(json_value, st.fixed_dictionaries({"type": st.sampled_from(["mute", "key", "turn"]),
                                                     "t": json_value, "on": json_value, "action": json_value}))


@FAST
@given(st.lists(event.map(json.dumps), max_size=6), st.one_of(json_value.map(json.dumps), st.binary(max_size=40)),
       st.binary(max_size=64))
def test_any_bundle_is_session_data_or_one_error(lines, meta, mic):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "events.jsonl").write_text("\n".join(lines) + "\n")
        (folder / "session.json").write_bytes(meta if isinstance(meta, bytes) else meta.encode())
        (folder / "mic.pcm").write_bytes(mic)
        try:
            data = read_session(folder, warn=lambda m: None)
        except VoiceAgentError as exc:
            assert "\n" not in str(exc)
            return
    assert isinstance(data, SessionData) and len(data.mic) == len(mic) // 2 > 0
    assert all(np.isfinite(t) for t, _ in data.keys)


@FAST
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab c.!?,;:\n…\"'1")), max_size=12), max_size=8))
def test_splitter_keeps_every_word(deltas):
    splitter = SentenceSplitter()
    sentences = [s for d in deltas for s in splitter.push(d)] + splitter.flush()
    assert all(s.strip() for s in sentences)
    assert re.sub(r"\s+", "", "".join(sentences)) == re.sub(r"\s+", "", "".join(deltas))
