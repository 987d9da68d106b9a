"""Online clustering of stretches of speech: is this stretch a known speaker or a new one?

The unit of decision is a stretch of uninterrupted speech (turns change at pauses), not a window: the
diarizer sums the unit embeddings of a stretch's windows and asks ``decide`` again as more of them arrive,
so a 1.6 s embedding's noise averages out over the stretch. Two voices that are hard to tell apart (on
espeak-ng voices resemblyzer's centroids reach cosine 0.94) are then separable: a single window of one is
as close to the other's centroid as to its own, the mean of a few seconds is not.

The threshold depends on how much evidence there is. The mean of ``n`` windows of a speaker is expected to
have cosine ``e(n) = (1 + spread / n) ** -0.5`` with the speaker's true direction (``spread``: the noise
power of one window relative to the voice), a centroid learnt from ``m`` windows ``e(m)``; a stretch joins
its most similar speaker when the cosine reaches ``new_threshold * e(n) * e(m)``. Early in a stretch, or
against a young centroid, the bar is low (noise, not a new voice); with seconds of speech against an
established speaker it approaches ``new_threshold``, high enough to keep similar voices apart. Below it a
stretch with at least ``confirm`` windows opens a speaker; with fewer it joins the nearest one. The first
stretch of a stream (no speaker known, none enrolled) opens a speaker on its first window: it cannot be
anyone known, and waiting for ``confirm`` windows would only leave its frames unlabelled at short latency.

Centroids learn only from finished stretches, as the running mean of their windows (``learn``), so the
not-yet-final frames of the current stretch never move a centroid that labels them; ``memory`` windows at
most, so a centroid follows a voice's slow change. Enrolled speakers (``profiles.py``) enter as named
centroids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClusterSettings:
    # defaults: tuned for resemblyzer on the development espeak-ng conversations (docs/benchmarks.md)
    new_threshold: float = 0.93  # cosine, for a long stretch against an established speaker, below which it is new
    spread: float = 0.6  # noise power of one window's embedding relative to the voice (sets e(n) above)
    confirm: int = 3  # windows a stretch needs before it may open a speaker (but the first one)
    purity: float = 0.8  # windows with at least this share of their speech in one stretch represent it alone
    memory: int = 600  # a centroid averages at most this many recent windows (follows slow drift)
    max_speakers: int = 20
    min_speech: float = 0.4  # windows with less speech than this fraction are not clustered

    def __post_init__(self) -> None:
        if not -1.0 <= self.new_threshold <= 1.0:
            raise ValueError(f"new_threshold is a cosine and must be in [-1, 1], got {self.new_threshold}")
        if self.spread < 0 or self.confirm < 1 or self.memory < 1 or self.max_speakers < 1:
            raise ValueError("spread must be >= 0 and confirm, memory and max_speakers >= 1")
        if not (0.0 <= self.min_speech <= 1.0 and 0.0 <= self.purity <= 1.0):
            raise ValueError(f"min_speech ({self.min_speech}) and purity ({self.purity}) are fractions in [0, 1]")

    def with_threshold(self, new_threshold: float) -> ClusterSettings:
        """These settings with another embedding's new-speaker threshold."""
        return dataclasses.replace(self, new_threshold=new_threshold)

    def expected(self, windows: int) -> float:
        """Expected cosine between the mean of ``windows`` windows of a voice and the voice itself."""
        return float((1.0 + self.spread / max(windows, 1)) ** -0.5)


@dataclass
class Speaker:
    """A cluster: a display name, a unit centroid, and how many windows it has learnt from."""

    name: str
    centroid: np.ndarray
    count: int = 1
    enrolled: bool = False


@dataclass(frozen=True)
class Assignment:
    speaker: int  # index into ``OnlineClustering.speakers``; NEW: a new speaker
    confidence: float  # cosine between the stretch and the speaker's centroid


NEW = -1


class OnlineClustering:
    """``decide`` which speaker a stretch is (no learning), ``open`` a speaker for it, ``learn`` from a
    finished stretch. A stretch is given as the sum of its windows' unit vectors and their count."""

    def __init__(self, settings: ClusterSettings = ClusterSettings(), enrolled: Sequence[Speaker] = ()) -> None:
        self.settings = settings
        self.speakers: list[Speaker] = [Speaker(s.name, s.centroid.copy(), s.count, True) for s in enrolled]
        self._anonymous = 0

    def decide(self, total: np.ndarray, count: int) -> Assignment:
        """The speaker the stretch belongs to; ``Assignment(NEW, 1)`` when it should open one (always when no
        speaker is known)."""
        if not self.speakers:
            return Assignment(NEW, 1.0)
        s = self.settings
        can_open = count >= s.confirm and len(self.speakers) < s.max_speakers
        vector = total / np.linalg.norm(total)
        sims = np.stack([sp.centroid for sp in self.speakers]) @ vector
        best = int(np.argmax(sims))
        bar = s.new_threshold * s.expected(count) * s.expected(self.speakers[best].count)
        if sims[best] < bar and can_open:
            return Assignment(NEW, 1.0)
        return Assignment(best, float(sims[best]))

    def open(self, total: np.ndarray, count: int) -> int:
        """A new anonymous speaker whose centroid is this stretch; its index."""
        self._anonymous += 1
        self.speakers.append(Speaker(f"speaker_{self._anonymous}", total / np.linalg.norm(total), count))
        return len(self.speakers) - 1

    def learn(self, speaker: int, total: np.ndarray, count: int, *, replace: bool = False) -> None:
        """Add a finished stretch to ``speaker``'s running mean (``replace``: the speaker was opened from the
        stretch's beginning, and now takes all of it)."""
        sp = self.speakers[speaker]
        if replace:
            sp.centroid, sp.count = total / np.linalg.norm(total), count
            return
        kept = min(sp.count, self.settings.memory - min(count, self.settings.memory - 1))
        c = kept * sp.centroid + total
        sp.centroid, sp.count = c / np.linalg.norm(c), kept + count
