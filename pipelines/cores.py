"""How many CPU cores are free for this process right now: measured, not assumed.

A thread pool sized to every core collapses when another program takes one: its threads wait at each op for the
one that was descheduled. `CoreMeter` reads the machine's busy time (/proc/stat) and this process's own CPU time
between two looks; the cores the other programs used are busy minus ours, and the rest are free. Where /proc is
not there (macOS), every core counts as free: Macs run the models on Metal, not in these pools.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STAT = Path("/proc/stat")


def _machine_busy() -> tuple[float, float] | None:
    """(busy seconds, total seconds) of all cores since boot, or None without /proc."""
    try:
        fields = STAT.read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class CoreMeter:
    """`free()`: the cores other programs left free since the last look (at least `least` seconds ago, else the
    last figure stands), as a float in [0, cores]."""

    def __init__(self, cores: int | None = None, least: float = 0.25):
        self.cores = cores or os.cpu_count() or 1
        self.least = least
        self._last = self._look()
        self._free = float(self.cores)

    def _look(self) -> tuple[float, float, float, float] | None:
        machine = _machine_busy()
        if machine is None:
            return None
        return time.monotonic(), machine[0], machine[1], _own_cpu()

    def others(self) -> float:
        """Cores the other programs kept busy since the last look."""
        return self.cores - self.free()

    def free(self) -> float:
        now = self._look()
        if now is None or self._last is None:
            return float(self.cores)
        wall = now[0] - self._last[0]
        if wall < self.least:
            return self._free
        span = now[2] - self._last[2]  # seconds of all cores together
        if span <= 0:
            return self._free
        busy = now[1] - self._last[1]
        ours = now[3] - self._last[3]
        others = max(0.0, (busy - ours) / span * self.cores)
        self._last = now
        self._free = max(0.0, min(float(self.cores), self.cores - others))
        return self._free


def threads_for(free: float, cores: int) -> int:
    """A pool size for `free` cores: one thread for each whole core free, at least one (a pool never waits on a
    thread the machine cannot run)."""
    return max(1, min(cores, int(free + 0.25)))
