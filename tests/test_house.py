"""The house rules that a reader relies on: the agent holds a conversation without loading a model, and
`pipelines` never imports `agent`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_conversation_imports_no_torch_and_no_mlx():
    """agent/conversation.py (and the Segment it holds) load with torch and MLX made unimportable."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['mlx'] = None; sys.modules['mlx.core'] = None\n"
            "import agent.conversation, pipelines.messages\n"
            "c = agent.conversation.Conversation(); print('ok', type(pipelines.messages.Segment(0, 'hi')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.strip() == "ok Segment"


def test_pipelines_never_import_agent():
    offenders = []
    for path in (ROOT / "pipelines").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "agent" or n.startswith("agent.")]
    assert offenders == []
