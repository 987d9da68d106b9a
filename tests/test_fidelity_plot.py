"""The fidelity plot's labels: none overlaps another label or a marker, even for settings that coincide."""

from __future__ import annotations

from itertools import combinations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from streamwavlm.streaming.fidelity import place_labels


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_labels_of_crowded_points_do_not_overlap() -> None:
    fig = Figure(figsize=(4, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    # equal latencies with cosines a hair apart (what C8/P8 and C16/P0 give), and two identical points
    points = [(345.0, 0.9593, "C8/P8"), (345.0, 0.9588, "C16/P0"), (345.0, 0.9586, "C16/P1"),
              (505.0, 0.9615, "C16/P8"), (185.0, 0.9515, "C8/P0"), (185.0, 0.9515, "C4/P2")]
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    texts = place_labels(ax, points)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert sorted(t.get_text() for t in texts) == sorted(["C8/P8", "C16/P0", "C16/P1", "C16/P8", "C8/P0, C4/P2"])
    assert not any(_overlap(a, b) for a, b in combinations(boxes, 2))
    for x, y, _ in points:  # nor any marker
        px, py = ax.transData.transform((x, y))
        assert not any(b.x0 < px < b.x1 and b.y0 < py < b.y1 for b in boxes)
