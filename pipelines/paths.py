"""Paths in a stage's config: absolute, or relative to the project root the stage is loaded from."""

from __future__ import annotations

from pathlib import Path


def local_path(path: str | Path, root: Path | None = None) -> Path:
    """`path` with `~` expanded; a relative one under `root` (as given, when root is None)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or root is None else Path(root) / p
