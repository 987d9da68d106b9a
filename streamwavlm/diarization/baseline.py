"""The baseline: diart's incremental clustering, rebuilt from its description, on the same windows.

diart (pyannote segmentation + embeddings on a rolling 5 s chunk) keeps one centroid per global speaker as a
running sum. Per chunk, a local speaker is active if its segmentation peaks at ``tau_active`` and "long" if
its mean activity reaches ``rho_update``; active local speakers are mapped one-to-one to centroids by
cosine distance, a distance above ``delta_new`` opens a new centroid (up to ``max_speakers``), and long
speakers add their embedding to the centroid they were mapped to. Here a window has one embedding, so
the local speaker is the window itself, its activity its speech fraction, and the one-to-one mapping
reduces to the nearest centroid. It commits every window at once; the latency only lets the frame
labelling (shared with ``OnlineClustering``) choose among more windows, as diart's output aggregation does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .clustering import Assignment, Speaker
from .window import Window


@dataclass(frozen=True)
class BaselineSettings:
    delta_new: float = 1.0  # cosine distance above which a new speaker opens (diart's default)
    tau_active: float = 0.6
    rho_update: float = 0.3
    max_speakers: int = 20


class IncrementalClustering:
    def __init__(self, settings: BaselineSettings = BaselineSettings()) -> None:
        self.settings = settings
        self.speakers: list[Speaker] = []
        self._sums: list[np.ndarray] = []

    def resolve(self, speaker: int) -> int:
        return speaker

    def peek(self, window: Window) -> Assignment | None:
        return None

    def commit(self, window: Window, context: Sequence[Window] = ()) -> Assignment | None:
        s = self.settings
        if window.speech < s.tau_active:
            return None
        distances = np.array([1.0 - float(c @ window.vector) / float(np.linalg.norm(c)) for c in self._sums])
        if not len(distances) or (distances.min() > s.delta_new and len(self._sums) < s.max_speakers):
            self._sums.append(window.vector.copy())
            self.speakers.append(Speaker(f"speaker_{len(self._sums)}", window.vector.copy()))
            return Assignment(len(self._sums) - 1, 1.0)
        best = int(np.argmin(distances))
        if window.speech >= s.rho_update:
            self._sums[best] += window.vector
            self.speakers[best].centroid = self._sums[best] / np.linalg.norm(self._sums[best])
        return Assignment(best, 1.0 - float(distances[best]))
