"""What an MLX frame costs a GPU, counted on any machine: host synchronisations and primitive operations.

What is notable here:
- On Metal a frame's time is set less by arithmetic than by kernel launches and by each time the host
  waits for the device. Neither shows on a CPU's clock, so `HostSyncs` counts them: every `mx.eval`, and
  every conversion that forces an unevaluated array (numpy's `np.array`/`np.asarray`, `.item()`,
  `.tolist()`, `int()`/`float()`/`bool()`), is a sync when its graph still has work in it.
- The work is read from MLX's own graph export (`mx.export_to_dot`): one rectangle per primitive, labelled
  by kind (Matmul, Gather, ...). An array already evaluated exports as a bare source node: no work, no sync.
- Counting patches those entry points for the duration of a `with` block in this process only; it slows
  what it watches, so it runs on a frame that is not timed.
"""

from __future__ import annotations

import io
import re
from collections import Counter

_LABEL = re.compile(r'label ="([^"]+)", shape=rectangle')


def graph_ops(*arrays) -> Counter:
    """Primitive operations still to run to evaluate `arrays` (MLX arrays or trees of them), by kind."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    leaves = [a for _, a in tree_flatten(list(arrays)) if isinstance(a, mx.array)]
    if not leaves:
        return Counter()
    out = io.StringIO()
    mx.export_to_dot(out, *leaves)
    return Counter(_LABEL.findall(out.getvalue()))


class HostSyncs:
    """While active, counts each time the host waits on MLX for a graph with work in it, and that work."""

    def __init__(self):
        self.syncs = 0
        self.ops: Counter = Counter()
        self._saved: list[tuple[object, str, object]] = []

    def _seen(self, *arrays) -> None:
        work = graph_ops(*arrays)
        if work:
            self.syncs += 1
            self.ops.update(work)

    def _wrap(self, owner, name: str, arrays_of) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self._seen(*arrays_of(args))
            return original(*args, **kwargs)

        self._saved.append((owner, name, original))
        setattr(owner, name, counted)

    def __enter__(self) -> "HostSyncs":
        import mlx.core as mx
        import numpy as np

        def everything(args):
            return args

        def first(args):
            return [a for a in args[:1] if isinstance(a, mx.array)]

        for name in ("eval", "async_eval"):
            self._wrap(mx, name, everything)
        for name in ("array", "asarray"):
            self._wrap(np, name, first)
        for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
            self._wrap(mx.array, name, first)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def summary(self, frames: int = 1) -> dict:
        """Per frame: syncs, primitive operations, and the operations by kind (most first)."""
        return {"host_syncs": self.syncs / frames, "ops": sum(self.ops.values()) / frames,
                "ops_by_kind": {k: v / frames for k, v in self.ops.most_common()}}
