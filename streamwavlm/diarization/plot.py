"""A PNG timeline of a conversation: one row per speaker, the reference (if given) above the hypothesis."""

from __future__ import annotations

from pathlib import Path

from .rttm import Segment


def plot_timeline(path: str | Path, hypothesis: list[Segment], reference: list[Segment] | None = None,
                  title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("hyp", s) for s in hypothesis] + [("ref", s) for s in reference or []]
    names = sorted({(kind, s.speaker) for kind, s in rows}, key=lambda x: (x[0] != "ref", x[1]))
    index = {n: i for i, n in enumerate(names)}
    end = max((s.end for _, s in rows), default=1.0)
    fig, ax = plt.subplots(figsize=(min(40, 4 + end / 10), 0.9 + 0.35 * max(1, len(names))))
    colors = plt.get_cmap("tab10")
    speakers = sorted({s.speaker for _, s in rows})
    for kind, s in rows:
        ax.broken_barh([(s.start, s.duration)], (index[(kind, s.speaker)] - 0.4, 0.8),
                       color=colors(speakers.index(s.speaker) % 10), alpha=0.6 if kind == "ref" else 1.0)
    ax.set_yticks(range(len(names)), [f"{kind}: {name}" for kind, name in names])
    ax.set_xlim(0, end)
    ax.set_xlabel("time (s)")
    ax.invert_yaxis()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
