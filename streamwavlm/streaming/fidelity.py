"""How far streaming drifts from the offline model, per layer, over a grid of stream settings.

The streaming encoder is exact only in reference mode (one chunk, full context, 63-frame lookahead, and
no utterance-level statistics); every cheaper setting truncates attention, the positional convolution or
the GroupNorm / waveform statistics (``docs/fidelity.md``). How much that costs depends on the weights, so
it has to be measured with the checkpoint a user will deploy: :func:`measure` streams one utterance through
:class:`~streamwavlm.streaming.StreamPool` for each setting and compares every hidden state with the plain
offline forward over the same audio; :func:`plot` draws the result next to the algorithmic latency so that
a setting can be chosen on the trade-off.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..audio.validate import SAMPLE_RATE
from ..model.wavlm import WavLM
from .pool import StreamPool
from .settings import NormPolicy, StreamSettings
from .whole import stream_audio

DEFAULT_CHUNKS = (8, 16, 50)
DEFAULT_LEFTS = (50, 250)
DEFAULT_LOOKAHEADS = (0, 8, 32)


@dataclass(frozen=True)
class FidelityRow:
    """One setting's agreement with the offline model; ``cosine[i]`` and ``rel_error[i]`` are layer i's."""

    settings: StreamSettings
    latency_ms: float
    cosine: tuple[float, ...]  # mean over frames of cos(stream_t, offline_t), layers 0..L
    rel_error: tuple[float, ...]  # ||stream - offline||_F / ||offline||_F over all frames, layers 0..L
    rtf: float  # streaming compute time / audio duration (one stream, this process's threads)

    @property
    def mean_cosine(self) -> float:
        return sum(self.cosine) / len(self.cosine)

    @property
    def worst_rel_error(self) -> float:
        return max(self.rel_error)

    @property
    def norm_label(self) -> str:
        """The policy, with the warmup where it matters (only ``frozen`` stops updating)."""
        s = self.settings
        return f"frozen {s.warmup:g}s" if s.norm == NormPolicy.FROZEN else s.norm.value

    @property
    def label(self) -> str:
        s = self.settings
        return f"C{s.chunk} L{s.left} P{s.lookahead} {self.norm_label}"

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "chunk": s.chunk, "left": s.left, "lookahead": s.lookahead, "norm": s.norm.value,
            "warmup": s.warmup, "latency_ms": self.latency_ms, "rtf": self.rtf,
            "cosine": list(self.cosine), "rel_error": list(self.rel_error),
            "mean_cosine": self.mean_cosine, "worst_rel_error": self.worst_rel_error,
        }


def streams_statistics(model: WavLM) -> bool:
    """Whether the model has utterance-level statistics that streaming can only approximate (the GroupNorm
    front end of Base/Base+, or waveform normalisation): only then does the norm policy change anything."""
    return model.frontend.group_norm or model.cfg.normalize


def settings_grid(
    model: WavLM,
    chunks: Iterable[int] = DEFAULT_CHUNKS,
    lefts: Iterable[int] = DEFAULT_LEFTS,
    lookaheads: Iterable[int] = DEFAULT_LOOKAHEADS,
    norms: Iterable[NormPolicy] | None = None,
    warmup: float = 3.0,
) -> list[StreamSettings]:
    """The cross product of the axes, each setting validated for ``model``. ``norms=None`` means both
    policies where the model has streamed statistics, else ``running`` alone (the policies coincide)."""
    if norms is None:
        norms = tuple(NormPolicy) if streams_statistics(model) else (NormPolicy.RUNNING,)
    grid = [StreamSettings(chunk=c, left=left, lookahead=p, norm=n, warmup=warmup)
            for c, left, p, n in itertools.product(chunks, lefts, lookaheads, norms)]
    for s in grid:
        s.validate(model.cfg)
    return grid


def compare(stream: Tensor, offline: Tensor) -> tuple[float, float]:
    """Mean per-frame cosine similarity and relative Frobenius error of ``stream`` against ``offline``
    (both ``(T, D)``), in float64 so that near-exact settings are not lost in rounding."""
    s, o = stream.double(), offline.double()
    cos = F.cosine_similarity(s, o, dim=-1).mean().item()
    return cos, ((s - o).norm() / o.norm()).item()


@torch.no_grad()
def stream_hidden(model: WavLM, wav: Tensor, settings: StreamSettings) -> Tensor:
    """Every hidden state ``(L+1, T, D)`` of ``wav`` (1-D, 16 kHz) streamed through a one-slot
    :class:`StreamPool` (the setting's ``layers`` and ``final_norm`` overridden: all layers, raw ``h_L``, so
    that they line up with the offline ``hidden_states``), handed over one chunk's worth at a time."""
    s = replace(settings, layers=tuple(range(model.cfg.num_layers + 1)), final_norm=False)
    outputs = stream_audio(StreamPool(model, s), wav, "stream", pieces=model.cfg.hop * s.chunk)
    return torch.cat([o.frames for o in outputs], dim=1)


def measure(
    model: WavLM,
    wav: Tensor,
    settings_grid: Sequence[StreamSettings],
    progress: Callable[[FidelityRow], None] | None = None,
) -> list[FidelityRow]:
    """Stream ``wav`` (16 kHz mono, 1-D) once per setting and compare every layer with ``model(wav)``.

    Each setting's ``layers`` and ``final_norm`` are overridden (all layers, raw ``h_L``) so that the
    streams produce exactly the offline ``hidden_states``. Audio arrives one chunk's worth at a time, as a
    live source would deliver it; the RTF covers queueing, stepping and the final flush. ``progress`` is
    called with each row as soon as it is measured (a full grid over long audio takes minutes).
    """
    cfg = model.cfg
    model.eval()
    wav = wav.to(next(model.parameters()).device)
    offline = [h[0] for h in model(wav[None]).hidden_states]
    seconds = wav.numel() / SAMPLE_RATE
    all_layers = tuple(range(cfg.num_layers + 1))
    rows = []
    for given in settings_grid:
        start = time.perf_counter()
        streamed = stream_hidden(model, wav, given)  # (L+1, T, D)
        rtf = (time.perf_counter() - start) / seconds
        if streamed.shape[1] != offline[0].shape[0]:
            raise RuntimeError(f"{given}: the stream made {streamed.shape[1]} frames, the offline model "
                               f"{offline[0].shape[0]}")
        pairs = [compare(streamed[i], offline[i]) for i in all_layers]
        row = FidelityRow(given, given.latency_ms(cfg), tuple(c for c, _ in pairs),
                          tuple(e for _, e in pairs), rtf)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def pareto_front(rows: Sequence[FidelityRow]) -> list[FidelityRow]:
    """The settings no other setting beats on both latency and final-layer cosine, fastest first: the
    only ones worth choosing when those two are what matters."""
    front: list[FidelityRow] = []
    for row in sorted(rows, key=lambda r: (r.latency_ms, -r.cosine[-1])):
        if not front or row.cosine[-1] > front[-1].cosine[-1]:
            front.append(row)
    return front


def place_labels(ax: Any, points: Sequence[tuple[float, float, str]], obstacles: Sequence[tuple[float, float]] = (),
                 fontsize: float = 7) -> list[Any]:
    """Label each point ``(x, y, text)`` next to it where the label overlaps no other label and no marker
    (the labelled points and ``obstacles``, in data coordinates).

    Settings of equal latency and similar cosine land on top of each other; fixed offsets would print their
    labels over one another. Points at the same place share one label. Each label tries offsets around its
    point, nearest first, and takes the first that is free (else the least crowded). Returns the texts.
    """
    fig = ax.get_figure()
    fig.canvas.draw()  # final layout: positions in pixels are only known after a draw
    renderer = fig.canvas.get_renderer()
    merged: dict[tuple[float, float], list[str]] = {}
    for x, y, text in points:
        px = ax.transData.transform((x, y))
        key = next((k for k in merged if abs(k[0] - px[0]) < 3 and abs(k[1] - px[1]) < 3), (px[0], px[1]))
        merged.setdefault(key, []).append(text)
    dot = 5.0  # half the size of a marker, pixels
    markers = [*merged, *(tuple(ax.transData.transform(p)) for p in obstacles)]
    taken = [(x - dot, y - dot, x + dot, y + dot) for x, y in markers]
    offsets = [(dx, dy) for r in (4, 10, 18) for dx, dy in ((r, r), (r, -r - 6), (-r, r), (-r, -r - 6), (r, 0))]
    placed = []
    for (x, y), texts in sorted(merged.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        best = None
        for dx, dy in offsets:
            align = "left" if dx > 0 else "right"
            t = ax.annotate(", ".join(texts), ax.transData.inverted().transform((x, y)), textcoords="offset points",
                            xytext=(dx, dy), fontsize=fontsize, ha=align, va="bottom", annotation_clip=False)
            box = t.get_window_extent(renderer)
            hits = sum(box.x0 < b[2] and b[0] < box.x1 and box.y0 < b[3] and b[1] < box.y1 for b in taken)
            if best is None or hits < best[0]:
                if best is not None:
                    best[1].remove()
                best = (hits, t, (box.x0, box.y0, box.x1, box.y1))
            else:
                t.remove()
            if hits == 0:
                break
        assert best is not None
        taken.append(best[2])
        placed.append(best[1])
    return placed


def plot(rows: Sequence[FidelityRow], path: str | Path, title: str = "") -> Path:
    """A PNG: a heatmap of per-layer cosine (settings x layers) and final-layer cosine against latency.

    The heatmap scales to large grids where one curve per setting would be unreadable; the colour range
    starts at the lowest cosine measured, so small differences near 1 stay visible.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not rows:
        raise ValueError("nothing to plot: no settings were measured")
    cos = torch.tensor([r.cosine for r in rows]).numpy()
    n_rows, n_layers = cos.shape
    vmin = min(float(cos.min()), 0.99)
    fig = Figure(figsize=(8 + 0.45 * n_layers, max(5.0, 0.32 * n_rows + 2.2)), layout="constrained")
    FigureCanvasAgg(fig)
    heat, scatter = fig.subplots(1, 2, width_ratios=[1.2 + 0.1 * n_layers, 2.0])

    im = heat.imshow(cos, aspect="auto", cmap="viridis", vmin=vmin, vmax=1.0, interpolation="nearest")
    heat.set_xticks(range(n_layers), [str(i) for i in range(n_layers)])
    heat.set_yticks(range(n_rows), [f"{r.label}  {r.latency_ms:.0f} ms" for r in rows], fontsize=8)
    heat.set_xlabel("layer (hidden_states index)")
    heat.set_title("mean frame cosine, stream vs offline")
    if n_rows * n_layers <= 400:  # values fit in the cells
        mid = (vmin + 1.0) / 2
        for (i, j), c in zip(itertools.product(range(n_rows), range(n_layers)), cos.ravel(), strict=True):
            heat.text(j, i, f"{c:.3f}", ha="center", va="center", fontsize=6.5,
                      color="black" if c > mid else "white")
    fig.colorbar(im, ax=heat, label="cosine", shrink=0.6, aspect=30)

    # frozen: hollow and larger, so that a running point under it (they often coincide) stays visible
    markers = {NormPolicy.RUNNING: ("o", 30), NormPolicy.FROZEN: ("s", 70)}
    lefts = sorted({r.settings.left for r in rows})
    colours = {left: f"C{k % 10}" for k, left in enumerate(lefts)}
    labels: dict[tuple[int, int, int], tuple[float, float, str]] = {}
    for r in sorted(rows, key=lambda r: -r.cosine[-1]):
        s = r.settings
        marker, size = markers[s.norm]
        hollow = s.norm == NormPolicy.FROZEN
        scatter.scatter(r.latency_ms, r.cosine[-1], marker=marker, s=size, zorder=3, linewidths=1.2,
                        facecolors="none" if hollow else colours[s.left], edgecolors=colours[s.left])
        # norm policies often coincide: one label per (C, L, P), at its best point
        labels.setdefault((s.chunk, s.left, s.lookahead), (r.latency_ms, r.cosine[-1], f"C{s.chunk}/P{s.lookahead}"))
    front = pareto_front(rows)
    scatter.step([r.latency_ms for r in front], [r.cosine[-1] for r in front], where="post", color="grey",
                 linestyle="--", linewidth=1, zorder=2)
    handles = [Line2D([], [], color=colours[left], marker="o", linestyle="", label=f"left {left} frames")
               for left in lefts]
    handles += [Line2D([], [], color="black", marker=markers[n][0], linestyle="", label=n.value,
                       markerfacecolor="none" if n == NormPolicy.FROZEN else "black")
                for n in markers if any(r.settings.norm == n for r in rows)]
    handles.append(Line2D([], [], color="grey", linestyle="--", label="best cosine at this latency"))
    scatter.legend(handles=handles, fontsize=8, loc="lower right")
    scatter.set_xlabel("algorithmic latency (ms) = (C + P) x 20 ms + 25 ms")
    scatter.set_ylabel(f"cosine at the last layer ({n_layers - 1})")
    scatter.set_title("last layer: fidelity vs latency")
    scatter.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    place_labels(scatter, list(labels.values()), [(r.latency_ms, r.cosine[-1]) for r in rows])
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
