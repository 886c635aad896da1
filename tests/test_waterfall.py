"""The latency waterfall PNG: its legend sits below the plot, clear of the bars' ends where stalls are drawn."""

from __future__ import annotations

from agent.metrics import STAGES, draw_timeline


def test_the_legend_is_below_the_bars(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    for turns in (1, 3):
        rows = [{**{stage: 300.0 * (i + 1) for i, stage in enumerate(STAGES)}, "stall_ms": 500.0}] * turns
        assert draw_timeline(rows, tmp_path / f"w{turns}.png") == tmp_path / f"w{turns}.png"
        assert (tmp_path / f"w{turns}.png").stat().st_size > 0
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        (legend,) = fig.legends or [ax.get_legend()]
        box, plot = legend.get_window_extent(renderer), ax.get_tightbbox(renderer)
        assert box.y1 <= plot.y0  # display coordinates: y grows upwards
        assert [t.get_text() for t in legend.get_texts()][-1] == "stalls after 1st sample"
        close(fig)
