"""Config presets, dotted overrides and their errors."""

from __future__ import annotations

import tomllib

import pytest

from agent.cli import _split_overrides
from agent.config import CONFIG_DIR, AgentConfig, load_config
from conftest import assert_config_holds
from pipelines.errors import ConfigError


def _toml(path) -> dict:
    """A preset as written, with the file it `extends` under it."""
    data = tomllib.loads(path.read_text())
    data.pop("on_cpu", None)  # which config stands in on a CPU, not a value of this one
    parent = data.pop("extends", None)
    if parent is None:
        return data

    def merge(base: dict, over: dict) -> dict:
        return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                           for k, v in over.items()}}

    return merge(_toml(path.parent / parent), data)


@pytest.mark.parametrize("preset", ["default", "push_to_talk", "replay", "demo", "marvis-100m", "whisper-base", "fetched",
                                    "fetched-cpu"])
def test_presets_load(preset):
    cfg = load_config(preset, on_cpu=False)  # as written (`fetched` swaps itself on a CPU: below)
    written = _toml(CONFIG_DIR / f"{preset}.toml")
    assert written and isinstance(cfg, AgentConfig)
    assert_config_holds(cfg, written)  # every value the preset (and what it extends) sets is the one loaded


def test_the_fetched_set_is_fitted_to_a_cpu_where_it_runs_on_one(tmp_path, capsys):
    """`--config fetched` is the published set (Whisper small.en) on Apple silicon; on a CPU it names the set
    fitted to one (the offline tiny.en, the Llama at 4 bits), says so, and `voice-agent fetch` gets what that
    machine runs."""
    from agent import config
    from agent.config import cpu_swap
    from agent.fetch import default_kinds

    config._TOLD.clear()
    published, on_cpu = load_config("fetched", on_cpu=False), load_config("fetched", on_cpu=True)
    assert published.asr.model.endswith("whisper-small.en-mlx") and published.llm.quantization == "auto"
    assert on_cpu.to_dict() == load_config("fetched-cpu").to_dict()
    assert on_cpu.asr.model == load_config("default").asr.model and on_cpu.llm.quantization == "4"
    load_config("fetched", on_cpu=True)
    assert capsys.readouterr().err.count("fetched-cpu.toml") == 1  # said once
    assert cpu_swap(CONFIG_DIR / "fetched-cpu.toml", on_cpu=True) is None  # its own parent's on_cpu is not followed
    assert {"llm", "marvis", "mimi"} <= set(default_kinds(on_cpu=True))
    assert "whisper-cpu" not in default_kinds(on_cpu=True) and "whisper" not in default_kinds(on_cpu=True)
    assert "whisper" in default_kinds(on_cpu=False) and "whisper-cpu" not in default_kinds(on_cpu=False)
    bad = tmp_path / "bad.toml"
    bad.write_text('on_cpu = "missing.toml"\n')
    with pytest.raises(ConfigError, match="on_cpu"):
        load_config(str(bad), on_cpu=False)


def test_preset_values_and_extends():
    assert load_config("push_to_talk").mode == "push-to-talk"
    demo = load_config("demo")
    assert demo.mode == "replay" and demo.tts.frames_per_char == 0.8 and demo.tts.max_audio_length_ms == 10_000
    assert demo.vad.silence_ms == 700  # inherited from default.toml through replay.toml


def test_default_toml_lists_the_dataclass_defaults():
    assert load_config("default").to_dict() == AgentConfig().to_dict()


def test_dotted_overrides_are_typed():
    pairs, unknown = _split_overrides(["--vad.silence_ms", "500", "--audio.barge_in=true", "--tts.temperature", "0.5"])
    assert unknown == []
    cfg = load_config("default", pairs)
    assert cfg.vad.silence_ms == 500 and cfg.audio.barge_in is True and cfg.tts.temperature == 0.5


@pytest.mark.parametrize("pair, message", [
    (("vad.silence_msec", "5"), "unknown config key 'vad.silence_msec'"),
    (("nope.x", "1"), "unknown config key 'nope'"),
    (("vad.silence_ms", "soon"), "vad.silence_ms: expected an integer"),
    (("vad.silence_ms", "1.5"), "vad.silence_ms: expected an integer"),
    (("audio.barge_in", "maybe"), "audio.barge_in: expected true/false"),
    (("vad", "1"), "'vad' is a section"),
    (("vad.frame_ms", "25"), "vad.frame_ms must be 10, 20 or 30"),
    (("vad.aggressiveness", "7"), "aggressiveness"),
])
def test_bad_overrides_name_the_key(pair, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("default", [pair])


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "%s"\n[tts]\nsped = 2\n' % (load_config.__globals__["CONFIG_DIR"] / "default.toml"))
    with pytest.raises(ConfigError, match="unknown config key 'tts.sped'"):
        load_config(str(bad))
    broken = tmp_path / "broken.toml"
    broken.write_text("[vad\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(str(broken))
    with pytest.raises(ConfigError, match="no config 'nosuch'"):
        load_config("nosuch")
