"""`voice-agent fetch`: download the real models to where the loaders look. Needs a network.

Without one it fails fast with one line. Everything lands under checkpoints/; the TTS picks up Marvis
and Mimi there with no config change, Whisper and the LLM via `--config fetched`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from agent.config import CHECKPOINTS
from pipelines.errors import VoiceAgentError

HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class Download:
    repo: str
    target: str  # folder under checkpoints/
    files: tuple[str, ...] = ()  # empty: the whole repository


DOWNLOADS = {
    "marvis": Download("Marvis-AI/marvis-tts-250m-v0.2", "marvis-tts-250m-v0.2"),
    "mimi": Download("kyutai/moshiko-pytorch-bf16", "mimi", ("tokenizer-e351c8d8-checkpoint125.safetensors",)),
    "whisper": Download("mlx-community/whisper-small.en-mlx", "whisper-small.en-mlx"),
    # a CPU's Whisper when it has four cores or more (on two, configs/fetched-cpu.toml runs the offline tiny.en):
    # small.en's 30 s window alone takes ~1.9 s on two cores, base.en's ~0.4 s
    "whisper-cpu": Download("mlx-community/whisper-base.en-mlx-fp32", "whisper-base.en-mlx-fp32"),
    "llm": Download("mlx-community/Llama-3.2-1B-Instruct-4bit", "llama-3.2-1b-instruct-4bit"),
}


def resolve_model(spec: str, root: Path = CHECKPOINTS) -> tuple[str, Path | str]:
    """('local', path) for an existing path (absolute, relative, or under checkpoints/); ('hub', id) for
    `org/name`; anything else is an error naming what was looked for."""
    p = Path(spec).expanduser()
    for candidate in (p, root / spec):
        if candidate.exists():
            return "local", candidate.resolve()
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~")) and not p.suffix:
        return "hub", spec
    raise VoiceAgentError(f"{spec}: no such local model (looked in ./ and {root}) and not a hub id like org/name")


def hub_reachable(timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def default_kinds(on_cpu: bool | None = None) -> list[str]:
    """What `voice-agent fetch` gets with no kinds named: everything `--config fetched` runs here, so on Apple
    silicon small.en, and on a CPU (no Apple GPU: `configs/fetched.toml` swaps to the CPU set) no Whisper, since
    that set hears with the offline tiny.en. Either Whisper can still be named."""
    if on_cpu is None:
        from pipelines.ortgraph import prefer_onnx

        on_cpu = prefer_onnx()
    skip = {"whisper", "whisper-cpu"} if on_cpu else {"whisper-cpu"}
    return [name for name in DOWNLOADS if name not in skip]


def fetch(what: list[str] | None = None, root: Path = CHECKPOINTS, reachable=hub_reachable, log=print) -> list[Path]:
    names = what or default_kinds()
    unknown = [n for n in names if n not in DOWNLOADS]
    if unknown:
        raise VoiceAgentError(f"unknown model kind {', '.join(unknown)}; choose from {', '.join(DOWNLOADS)}")
    if not reachable():
        raise VoiceAgentError(
            f"cannot reach {HUB_HOST}: no network. Copy the model folders into {root} by hand "
            "(see checkpoints/README.md); the offline defaults keep working meanwhile"
        )
    from huggingface_hub import snapshot_download

    done = []
    for name in names:
        d = DOWNLOADS[name]
        target = root / d.target
        log(f"fetch: {d.repo} -> {target}")
        snapshot_download(repo_id=d.repo, local_dir=str(target), allow_patterns=list(d.files) or None)
        done.append(target)
    return done
