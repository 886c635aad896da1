"""No network at run time: a replay runs with every outbound IP socket refused, and tries none.

The block is a sitecustomize on PYTHONPATH, so it is in place before the agent imports anything; attempts are
written to a file, because a library may swallow the error and go on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agent.config import ROOT
from conftest import require_checkpoints

SITECUSTOMIZE = '''
import os, socket

def _refuse(self, address, *a, **k):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        with open(os.environ["NETWORK_ATTEMPTS"], "a") as f:
            f.write(f"{address!r}\\n")
        raise OSError("network blocked by the test")
    return _connect(self, address, *a, **k)

def _refuse_ex(self, address):
    try:
        _refuse(self, address)
    except OSError:
        return 111
    return _connect_ex(self, address)

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
socket.socket.connect, socket.socket.connect_ex = _refuse, _refuse_ex
'''


@pytest.mark.slow
@pytest.mark.long
def test_replay_with_the_network_blocked(tmp_path):
    require_checkpoints("whisper-tiny.en")
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    attempts = tmp_path / "attempts.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
               NETWORK_ATTEMPTS=str(attempts), HF_HUB_OFFLINE="", TRANSFORMERS_OFFLINE="")
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9), 1)"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and attempts.read_text().count("\n") == 1  # the block works
    attempts.unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "replay", str(ROOT / "tests" / "fixtures" / "jfk.flac"), "--no-progress",
         "--out", str(tmp_path / "run"), "--tts.max_audio_length_ms", "160", "--llm.max_tokens", "8"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not attempts.exists(), attempts.read_text()
