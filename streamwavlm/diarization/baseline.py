"""The baseline: diart's incremental clustering, rebuilt from its description, on the same windows.

diart (pyannote segmentation + embeddings on a rolling 5 s chunk) keeps one centroid per global speaker as a
running sum. Per chunk, a local speaker is active if its segmentation peaks at ``tau_active`` and "long" if
its mean activity reaches ``rho_update``; active local speakers are mapped one-to-one to centroids by
cosine distance, a distance above ``delta_new`` opens a new centroid (up to ``max_speakers``), and long
speakers add their embedding to the centroid they were mapped to. Here a window has one embedding, so
the local speaker is the window itself, its activity its speech fraction, and the one-to-one mapping
reduces to the nearest centroid. It commits every window as it arrives; a frame is labelled by the
window, among those that ended within the latency after it, whose centre is nearest (preferring windows
of the frame's own stretch of speech), as diart's output aggregation lets the latency choose among more
windows. ``WindowDiarizer`` is the diarizer with that window-wise labelling.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

import numpy as np

from .clustering import Assignment, Speaker
from .diarizer import Diarizer
from .turns import FrameLabel
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

    def commit(self, window: Window) -> Assignment | None:
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


class WindowDiarizer(Diarizer):
    """``Diarizer`` with diart's window-wise decisions: ``IncrementalClustering`` commits each window."""

    def __init__(self, clustering: IncrementalClustering, *, latency: float = 2.0, frame: float = 0.032,
                 min_speech: float = 0.4) -> None:
        super().__init__(clustering, latency=latency, frame=frame, min_speech=min_speech)  # type: ignore[arg-type]
        self.baseline = clustering
        self._windows: deque[tuple[Window, Assignment]] = deque()
        self._ends: deque[float] = deque()

    def _add(self, window: Window, purity: float) -> None:
        if window.speech < self.min_speech:
            return
        assignment = self.baseline.commit(window)
        if assignment is not None:
            self._windows.append((window, assignment))
            self._ends.append(window.end)

    def _labels(self, first: int, last: int, final: bool) -> list[FrameLabel]:
        return [self._label(k) for k in range(first, last)]

    def _label(self, k: int) -> FrameLabel:
        if self._run_of(k) < 0:
            return None
        centre, horizon = (k + 0.5) * self.frame, (k + 1) * self.frame + self.latency + 1e-9
        run = self._run_of(k)
        best: tuple[tuple[bool, float], Assignment] | None = None
        for i in range(bisect.bisect_right(self._ends, horizon) - 1, -1, -1):
            window, assignment = self._windows[i]
            span = window.end - window.start
            if window.end < centre - span:
                break
            key = (run >= 0 and window.segment != run, abs(window.center - centre))
            if key[1] <= span and (best is None or key < best[0]):
                best = (key, assignment)
        if best is None:
            return None
        return (self.baseline.speakers[best[1].speaker].name, round(best[1].confidence, 3))

    def _learn(self, everything: bool) -> None:
        """diart learns as it commits."""

    def _prune(self) -> None:
        super()._prune()
        horizon = self._final * self.frame - 10.0
        while self._ends and self._ends[0] < horizon:
            self._windows.popleft()
            self._ends.popleft()
