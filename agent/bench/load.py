"""A competing process for benchmarks: a busy loop using a given share of one core, as a browser tab, a video call
or a build beside the agent would.

    with busy_core(0.5):   # another process on half of one core (busy 5 ms of every 10 ms) until the block ends
        ...

The loop runs in a child process (its own GIL, its own scheduling entity, like any other program), and is
stopped when the block ends, or killed with the benchmark.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

PERIOD_S = 0.01  # one busy + idle cycle: short, so the load is even at the scale of a TTS frame

_LOOP = """
import os, sys, time
share, period = float(sys.argv[1]), float(sys.argv[2])
ppid = os.getppid()
while os.getppid() == ppid:  # ends with its parent
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < share * period:
        pass
    if share < 1.0:
        time.sleep((1.0 - share) * period)
"""


def parse_loads(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]: shares of one core, each in [0, 1]."""
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--load: {text!r} is not a comma-separated list of core shares (e.g. 0,0.5,1)") from None
    if not loads or any(not 0.0 <= x <= 1.0 for x in loads):
        raise SystemExit(f"--load: {text!r}: each share of one core is in 0..1")
    return loads


@contextlib.contextmanager
def busy_core(share: float) -> Iterator[subprocess.Popen | None]:
    """Another process using `share` of one core while the block runs (0: none)."""
    if share <= 0:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", _LOOP, str(share), str(PERIOD_S)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
