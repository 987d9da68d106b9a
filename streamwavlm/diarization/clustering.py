"""Online clustering of speaker embeddings: who is this window, a known speaker or a new one?

Each speech window is compared by cosine with the speakers' centroids. It joins the best speaker when the
similarity reaches ``new_threshold``; below it, it is a candidate new speaker, and a new speaker opens only
when the windows that follow within the clustering lookahead (part of the latency budget) agree with it:
one noisy window then cannot open a spurious speaker, which is what lets the threshold sit high enough
that distinct voices are not merged (the failure of a single-threshold clusterer such as diart's, whose
errors on similar voices are almost all merges). With lookahead the window is also compared after
averaging with the following windows that resemble it, which halves the noise of a 1.5 s embedding.

Centroids resist drift by only learning from confident windows (similarity >= ``update_threshold``) and
follow a speaker's slow change by forgetting: the centroid is a running mean over at most ``memory``
windows. Hysteresis keeps the current speaker unless another beats it by ``hysteresis``. Two centroids
that converge past ``merge_threshold`` are merged (the later into the earlier), which repairs a speaker
split early in a conversation. Enrolled speakers (``profiles.py``) enter as named centroids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .window import Window


@dataclass(frozen=True)
class ClusterSettings:
    # defaults: tuned for resemblyzer on the development espeak-ng conversations (docs/benchmarks.md)
    new_threshold: float = 0.8  # cosine below which a window does not belong to a known speaker
    update_threshold: float = 0.85  # cosine from which a window updates its speaker's centroid
    merge_threshold: float = 0.88  # centroids at least this similar are one speaker
    hysteresis: float = 0.0  # cosine margin another speaker needs to take over from the current one
    confirm: int = 2  # agreeing windows (the candidate included) that open a new speaker, lookahead allowing
    memory: int = 60  # a centroid averages at most this many recent windows (follows slow drift)
    max_speakers: int = 20
    min_speech: float = 0.4  # windows with less speech than this fraction are not clustered
    open_speech: float = 0.75  # only windows with at least this much speech open a speaker (not mixed ones)

    def __post_init__(self) -> None:
        for name in ("new_threshold", "update_threshold", "merge_threshold"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a cosine and must be in [-1, 1], got {getattr(self, name)}")
        if self.confirm < 1 or self.memory < 1 or self.max_speakers < 1:
            raise ValueError("confirm, memory and max_speakers must be >= 1")
        if not (0.0 <= self.min_speech <= 1.0 and 0.0 <= self.open_speech <= 1.0):
            raise ValueError(f"min_speech ({self.min_speech}) and open_speech ({self.open_speech}) are fractions "
                             "in [0, 1]")

    def with_threshold(self, new_threshold: float) -> ClusterSettings:
        """These settings for another embedding's similarity scale: the update and merge thresholds keep
        their distance above the new-speaker threshold."""
        shift = new_threshold - self.new_threshold
        return dataclasses.replace(self, new_threshold=new_threshold,
                                   update_threshold=min(1.0, self.update_threshold + shift),
                                   merge_threshold=min(1.0, self.merge_threshold + shift))


@dataclass
class Speaker:
    """A cluster: a display name, a unit centroid, and how many windows it has learnt from."""

    name: str
    centroid: np.ndarray
    count: int = 1
    enrolled: bool = False


@dataclass(frozen=True)
class Assignment:
    speaker: int  # index into ``OnlineClustering.speakers`` (resolve merges with ``resolve``)
    confidence: float  # cosine between the window and the speaker's centroid


class OnlineClustering:
    """Commit windows in time order with ``commit``; ``peek`` gives a provisional answer without learning."""

    def __init__(self, settings: ClusterSettings = ClusterSettings(), enrolled: Sequence[Speaker] = ()) -> None:
        self.settings = settings
        self.speakers: list[Speaker] = [Speaker(s.name, s.centroid.copy(), s.count, True) for s in enrolled]
        self._alias: dict[int, int] = {}  # merged speaker -> the speaker it was merged into
        self._anonymous = 0
        self._current: int | None = None  # speaker of the last committed window
        self._current_end = -np.inf

    # ------------------------------------------------------------------ queries
    def resolve(self, speaker: int) -> int:
        while speaker in self._alias:
            speaker = self._alias[speaker]
        return speaker

    def _live(self) -> list[int]:
        return [i for i in range(len(self.speakers)) if i not in self._alias]

    def _similarities(self, vector: np.ndarray) -> tuple[list[int], np.ndarray]:
        live = self._live()
        if not live:
            return live, np.zeros(0)
        return live, np.stack([self.speakers[i].centroid for i in live]) @ vector

    def peek(self, window: Window) -> Assignment | None:
        """The speaker this window would join now (None: it would be a new speaker)."""
        live, sims = self._similarities(window.vector)
        if not live or sims.max() < self.settings.new_threshold:
            return None
        best = int(np.argmax(sims))
        return Assignment(live[best], float(sims[best]))

    # ------------------------------------------------------------------ learning
    def _smoothed(self, window: Window, context: Sequence[Window]) -> tuple[np.ndarray, int]:
        """The window averaged with the context windows that resemble it and share its stretch of speech
        (the same speaker, most likely: turns change at pauses), and how many windows agree, itself included."""
        thr = self.settings.new_threshold
        agree = [c for c in context if float(c.vector @ window.vector) >= thr
                 and (c.segment == window.segment if window.segment >= 0 else c.start < window.end)]
        v = window.vector + sum((c.vector for c in agree), np.zeros_like(window.vector))
        return v / np.linalg.norm(v), 1 + len(agree)

    def commit(self, window: Window, context: Sequence[Window] = ()) -> Assignment | None:
        """Assign ``window`` for good. ``context``: the speech windows that follow it within the lookahead and
        recent earlier windows of the same stretch of speech."""
        s = self.settings
        vector, agreeing = self._smoothed(window, context)
        live, sims = self._similarities(vector)
        best = int(np.argmax(sims)) if live else -1
        if live and self._current in live and window.start < self._current_end:
            cur = live.index(self._current)
            if cur != best and sims[cur] >= max(s.new_threshold, sims[best] - s.hysteresis):
                best = cur
        novel = not live or sims[best] < s.new_threshold
        if (novel and len(live) < s.max_speakers and window.speech >= s.open_speech
                and agreeing >= s.confirm):
            return self._settle(self._open(vector), window, 1.0)
        if not live:  # nothing to join and not clean enough to open a speaker: leave it unlabelled
            return None
        speaker = live[best]
        if sims[best] >= s.update_threshold:
            self._learn(speaker, vector)
        return self._settle(speaker, window, float(sims[best]))

    def _settle(self, speaker: int, window: Window, confidence: float) -> Assignment:
        self._current, self._current_end = speaker, window.end
        return Assignment(self.resolve(speaker), confidence)

    def _open(self, vector: np.ndarray) -> int:
        self._anonymous += 1
        self.speakers.append(Speaker(f"speaker_{self._anonymous}", vector.copy()))
        return len(self.speakers) - 1

    def _learn(self, speaker: int, vector: np.ndarray) -> None:
        sp = self.speakers[speaker]
        rate = 1.0 / min(sp.count + 1, self.settings.memory)
        c = (1 - rate) * sp.centroid + rate * vector
        sp.centroid = c / np.linalg.norm(c)
        sp.count += 1
        self._merge_into_older(speaker)

    def _merge_into_older(self, speaker: int) -> None:
        for other in self._live():
            if other == speaker or (self.speakers[other].enrolled and self.speakers[speaker].enrolled):
                continue  # two enrolled people stay two, however alike their voices
            if float(self.speakers[other].centroid @ self.speakers[speaker].centroid) < self.settings.merge_threshold:
                continue
            keep, gone = sorted((other, speaker))
            if self.speakers[gone].enrolled and not self.speakers[keep].enrolled:
                keep, gone = gone, keep  # a name outlives an anonymous label
            a, b = self.speakers[keep], self.speakers[gone]
            c = a.count * a.centroid + b.count * b.centroid
            a.centroid, a.count = c / np.linalg.norm(c), a.count + b.count
            self._alias[gone] = keep
            if self._current == gone:
                self._current = keep
            return
