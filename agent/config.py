"""Agent configuration: dataclasses filled from `configs/*.toml` plus dotted CLI overrides.

A preset may `extends = "default.toml"`. Unknown keys are an error that names the key, so a typo in a
config never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError
from pipelines.tts.load import TTSConfig
from pipelines.vad import VADConfig


def knob(default, lo=None, hi=None):
    """A field with its allowed range [lo, hi], checked when the config loads."""
    return field(default=default, metadata={"range": (lo, hi)})

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
CHECKPOINTS = ROOT / "checkpoints"


@dataclass
class ASRSection:
    model: str = "checkpoints/whisper-tiny.en"
    language: str = ""  # "" = detect (tiny.en is English only)
    initial_prompt: str = ""
    # the encoder's 30 s window on: auto (a CPU: onnx; a Mac GPU: mlx) | mlx | onnx
    backend: str = field(default="auto", metadata={"choices": ("auto", "mlx", "onnx")})
    ort_cache: str = "checkpoints/.ort"
    # onnx only: "8" runs every matrix in int8 (the encoder's in int8 arithmetic, activations quantised as the run
    # goes; the decoder's weights 8-bit): ~0.65 of the fp32 time a turn, word errors within the noise
    # (docs/performance.md). MLX runs the weights as stored
    quantization: str = field(default="8", metadata={"choices": ("none", "8")})
    temperature_fallback: bool = False  # mlx-whisper's hotter retries after a failed greedy decode: up to 6 decodes


DEFAULT_EXAMPLES = (
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("Can you tell me a joke about cats?", "Why did the cat sit on the computer? To keep an eye on the mouse."),
    ("I'm going to the beach tomorrow.", "That sounds lovely. Don't forget your sunscreen!"),
)


@dataclass
class LLMSection:
    model: str = "checkpoints/smollm2-135m-instruct"
    # SmolLM2-135M answers well to its trained prompt; longer instructions made it drift (even into French)
    system_prompt: str = ("You are a helpful voice assistant talking with a person. Reply with one short, direct "
                          "sentence that answers the question.")
    # example exchanges put after the system prompt ([[user, reply], ...]): they show the 135M model the form of a
    # spoken answer (bench replies: form 81 -> 95 %, with no_repeat_ngram and a short history)
    examples: list = field(default_factory=lambda: [list(e) for e in DEFAULT_EXAMPLES])
    no_repeat_ngram: int = knob(4, 0, 100)  # a reply never repeats a run of this many tokens (0: off)
    max_tokens: int = knob(48, 1, 4096)
    max_history_turns: int = knob(2, 0, 1000)  # SmolLM2-135M copies its own earlier replies: keep the last exchanges only
    temperature: float = knob(0.0, 0.0, 10.0)
    seed: int = knob(0, 0, 2**32 - 1)
    max_sentences: int = knob(2, 0, 100)  # a reply is spoken up to this many sentences, then the LLM stops (0: no limit)
    first_clause_words: int = knob(6, 0, 1000)  # a long first sentence goes to the TTS at its first clause break after this many words (0: off)
    # a reply's first piece is checked before it is spoken: one with problems (markup, a dialogue, too long, an earlier
    # reply again) is not said, and the LLM is asked for one that starts otherwise, up to `candidates` in all; then
    # `fallback_reply` is said ("" : nothing)
    candidates: int = knob(3, 1, 10)
    fallback_reply: str = "Sorry, could you say that another way?"
    # where the forward pass runs: auto (a CPU: onnx, a Mac GPU: mlx); auto bits: 8 on onnx, the checkpoint's on mlx
    backend: str = field(default="auto", metadata={"choices": ("auto", "mlx", "onnx")})
    quantization: str = field(default="auto", metadata={"choices": ("auto", "none", "8", "4")})
    ort_cache: str = "checkpoints/.ort"


@dataclass
class AudioSection:
    input_device: str = ""  # "" = PortAudio default
    output_device: str = ""
    block_ms: int = knob(30, 5, 1000)
    jitter_ms: int = knob(80, 0, 10_000)  # least audio buffered before a reply plays (more when the TTS is slower than real time)
    half_duplex: bool = True  # ignore the mic while the agent speaks
    barge_in: bool = False  # user speech during playback stops the agent (needs echo-free audio)
    echo_cancellation: bool = False  # WebRTC AEC3 on the mic (agent/echo.py): barge-in on speakers


@dataclass
class SessionSection:
    dir: str = "runs"  # where bundles are written
    record: bool = True


@dataclass
class ReplaySection:
    realtime: bool = False
    chunk_ms: int = knob(30, 1, 10_000)


# The agent ends a turn on its words (VADConfig's own defaults are the VAD alone: silence only). Chosen from
# `voice-agent bench turns` (README, "When the turn ends"): judged at a 120 ms pause, the turn ends there when the
# reply model gives a finished message at least 0.03; words it scores under 0.001 ("Can you recommend a book about")
# wait 1.5 s of silence; the rest 700 ms. Speech within 1 s of an early end continues the turn.
AGENT_VAD = dict(pause_ms=120, words=True, words_threshold=0.03, words_unfinished=0.001, hold_ms=1500, reopen_ms=1000)


@dataclass
class AgentConfig:
    mode: str = field(default="hands-free", metadata={"choices": ("hands-free", "push-to-talk", "replay")})
    vad: VADConfig = field(default_factory=lambda: VADConfig(**AGENT_VAD))  # the stage's config: validated on load
    asr: ASRSection = field(default_factory=ASRSection)
    llm: LLMSection = field(default_factory=LLMSection)
    tts: TTSConfig = field(default_factory=TTSConfig)  # the stage's own config: validated on load
    audio: AudioSection = field(default_factory=AudioSection)
    session: SessionSection = field(default_factory=SessionSection)
    replay: ReplaySection = field(default_factory=ReplaySection)

    def resolve(self, path: str) -> Path:
        """A config path: absolute, or relative to the project root."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else ROOT / p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = typ(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected {'an integer' if typ is int else 'a number'}, got {value!r}") from None
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if typ is float and not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _check_ranges(obj: Any, prefix: str = "") -> None:
    """Every `knob` of the mutable sections within its range (the stages' own frozen configs check themselves)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{prefix}{f.name}.")
        elif "range" in f.metadata:
            lo, hi = f.metadata["range"]
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ConfigError(f"{prefix}{f.name}: must be in {lo}..{hi}, got {value!r}")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{prefix}{f.name}: must be one of {', '.join(f.metadata['choices'])}, got {value!r}")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    target = obj.target if isinstance(obj, _Draft) else obj
    hints = typing.get_type_hints(type(target))
    names = {f.name for f in dataclasses.fields(target)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{dotted}' is a section; set its keys, e.g. {dotted}.<key>")
            if type(current).__dataclass_params__.frozen:  # a stage's own frozen config: rebuild it
                draft = _Draft(current)
                _apply(draft, value, dotted + ".")
                try:
                    setattr(obj, key, dataclasses.replace(current, **draft.changes))
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
            else:
                _apply(current, value, dotted + ".")
        else:
            coerced = _coerce(value, hints[key], dotted)
            if isinstance(obj, _Draft):
                obj.changes[key] = coerced
            else:
                setattr(obj, key, coerced)


class _Draft:
    """Collects typed changes for a frozen dataclass, which `_apply` cannot set attributes on."""

    def __init__(self, target):
        self.target, self.changes = target, {}

    def __getattr__(self, name):
        return getattr(self.target, name)


def _parse_toml(path: Path) -> dict[str, Any]:
    """One config file's own table (no `extends` followed), or a one-line ConfigError."""
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    if path in seen:
        raise ConfigError(f"{path}: `extends` loops back to itself")
    data = _parse_toml(path)
    data.pop("on_cpu", None)  # only the config named on the command line swaps itself (`cpu_swap`)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: `extends` must be a file name, got {parent!r}")
    base = _read_toml((path.parent / parent).resolve(), seen + (path,))
    return _merge(base, data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """[("vad.silence_ms", "500")] -> {"vad": {"silence_ms": "500"}} (types are checked on apply)."""
    out: dict[str, Any] = {}
    for dotted, value in pairs:
        parts = dotted.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{dotted}' conflicts with another override")
        node[parts[-1]] = value
    return out


def config_path(name: str) -> Path:
    """A preset name (`replay`), a file name in configs/, or a path."""
    p = Path(name)
    if p.suffix == ".toml" and p.is_file():
        return p
    candidate = CONFIG_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.toml")))
    raise ConfigError(f"no config '{name}' (presets: {known})")


_TOLD: set[tuple[str, Path]] = set()  # the swaps already said on stderr


def cpu_swap(path: Path, on_cpu: bool | None = None) -> Path | None:
    """The config that stands in for the one at `path` on this machine: its top-level `on_cpu = "file.toml"` when
    the models run on a CPU here (ONNX Runtime's `auto`: no Apple GPU; `on_cpu` forces the answer), else None.
    `configs/fetched.toml` names the set fitted to a CPU so: the published set stays on Apple silicon."""
    if not path.is_file():
        return None  # `_read_toml` says so
    swap = _parse_toml(path).get("on_cpu")
    if swap is None:
        return None
    if not isinstance(swap, str) or not (path.parent / swap).is_file():
        raise ConfigError(f"{path}: `on_cpu` must name a config file beside it, got {swap!r}")
    if on_cpu is None:
        from pipelines.ortgraph import prefer_onnx

        on_cpu = prefer_onnx()
    return (path.parent / swap).resolve() if on_cpu else None


def load_config(name: str | None = "default", overrides: list[tuple[str, str]] = (),
                on_cpu: bool | None = None) -> AgentConfig:
    """The config `name` (a preset, a file in configs/ or a path) with `overrides`; a config with `on_cpu` is
    replaced by the one it names when the models run on a CPU here (`cpu_swap`), and a line on stderr says so."""
    cfg = AgentConfig()
    if name:
        path = config_path(name)
        swap = cpu_swap(path, on_cpu)
        if swap is not None and (name, swap) not in _TOLD:  # once a process: some verbs load a config twice
            _TOLD.add((name, swap))
            print(f"config {name}: the models run on this machine's CPU, so {swap.name} (the same set fitted to a "
                  f"CPU) is used", file=sys.stderr)
        _apply(cfg, _read_toml(swap or path))
    if overrides:
        _apply(cfg, parse_overrides(list(overrides)))
    _check_ranges(cfg)
    examples = cfg.llm.examples
    if not isinstance(examples, list) or not all(
            isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e) for e in examples):
        raise ConfigError(f"llm.examples: expected a list of [user, reply] string pairs, got {examples!r}")
    return cfg
