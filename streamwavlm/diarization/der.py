"""Diarization error rate (DER) and Jaccard error rate (JER), with the semantics of pyannote.metrics.

Written from the definitions (NIST RT / DIHARD II evaluation plans) so that the ``der`` command needs no
heavy dependency; tests hold it equal to pyannote.metrics 4.x to 1e-6, including its conventions:

- The scored region (UEM) is the span from the earliest to the latest turn of reference and hypothesis.
- ``collar`` seconds *in total* (half before, half after) around every reference turn boundary, and with
  ``skip_overlap`` every region where two reference turns overlap, are removed from the scored region.
- Hypothesis speakers are mapped one-to-one to reference speakers by the Hungarian algorithm on their
  overlap time; DER = (missed + false alarm + confusion) / reference speech, where overlapping reference
  speech counts once per speaker. JER averages, over reference speakers, 1 - |ref & hyp| / |ref | hyp| of
  its mapped hypothesis speaker (1 for an unmapped one).
- Totals over several files add the components (``Score.add``), not the rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from .rttm import Segment

Interval = tuple[float, float]


@dataclass
class Score:
    """DER and JER components of one file, or summed over files."""

    total: float = 0.0  # reference speech (s), each overlapping speaker counted
    missed: float = 0.0
    false_alarm: float = 0.0
    confusion: float = 0.0
    speakers: int = 0  # reference speakers (JER's denominator)
    speaker_error: float = 0.0  # sum of per-speaker Jaccard errors

    @property
    def der(self) -> float:
        errors = self.missed + self.false_alarm + self.confusion
        return errors / self.total if self.total > 0 else float(errors > 0)

    @property
    def jer(self) -> float:
        return self.speaker_error / self.speakers if self.speakers else 1.0

    def add(self, other: Score) -> Score:
        return Score(self.total + other.total, self.missed + other.missed,
                     self.false_alarm + other.false_alarm, self.confusion + other.confusion,
                     self.speakers + other.speakers, self.speaker_error + other.speaker_error)


def _union(intervals: list[Interval]) -> list[Interval]:
    """Sorted, merged intervals (touching ones joined)."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _subtract(region: Interval, holes: list[Interval]) -> list[Interval]:
    """``region`` minus merged, sorted ``holes``."""
    out, cursor = [], region[0]
    for a, b in holes:
        if b <= cursor or a >= region[1]:
            continue
        if a > cursor:
            out.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < region[1]:
        out.append((cursor, region[1]))
    return out


def _crop(segments: list[Segment], region: list[Interval]) -> list[Segment]:
    out = []
    for s in segments:
        for a, b in region:
            lo, hi = max(s.start, a), min(s.end, b)
            if hi - lo > 1e-6:  # pyannote's segment precision: shorter pieces are empty
                out.append(Segment(lo, hi, s.speaker))
    return out


def scored_region(reference: list[Segment], hypothesis: list[Segment], collar: float = 0.0,
                  skip_overlap: bool = False) -> list[Interval]:
    """The intervals that are scored: the joint extent minus collars and (optionally) reference overlap."""
    turns = [s for s in reference + hypothesis if s.duration > 1e-6]
    if not turns:
        return []
    extent = (min(s.start for s in turns), max(s.end for s in turns))
    holes: list[Interval] = []
    if collar > 0:
        for s in reference:
            holes += [(s.start - collar / 2, s.start + collar / 2), (s.end - collar / 2, s.end + collar / 2)]
    if skip_overlap:
        for i, s in enumerate(reference):
            for t in reference[i + 1:]:
                lo, hi = max(s.start, t.start), min(s.end, t.end)
                if hi > lo:
                    holes.append((lo, hi))
    return _subtract(extent, _union(holes))


def _activity(segments: list[Segment], labels: list[str], edges: np.ndarray) -> np.ndarray:
    """(labels, intervals) count of each label's turns covering each elementary interval."""
    index = {label: i for i, label in enumerate(labels)}
    delta = np.zeros((len(labels), len(edges)))
    for s in segments:
        delta[index[s.speaker], np.searchsorted(edges, s.start)] += 1
        delta[index[s.speaker], np.searchsorted(edges, s.end)] -= 1
    return np.cumsum(delta, axis=1)[:, :-1]


def score(reference: list[Segment], hypothesis: list[Segment], *, collar: float = 0.0,
          skip_overlap: bool = False) -> Score:
    """DER and JER components of one file (times in seconds)."""
    region = scored_region(reference, hypothesis, collar, skip_overlap)
    ref, hyp = _crop(reference, region), _crop(hypothesis, region)
    ref_labels = sorted({s.speaker for s in ref})
    hyp_labels = sorted({s.speaker for s in hyp})
    edges = np.unique([t for s in ref + hyp for t in (s.start, s.end)])
    if len(edges) < 2:
        return Score(speakers=len(ref_labels), speaker_error=float(len(ref_labels)))
    durations = np.diff(edges)
    r, h = _activity(ref, ref_labels, edges), _activity(hyp, hyp_labels, edges)
    overlap = (r * durations) @ h.T  # (ref, hyp) co-occurrence in seconds
    rows, cols = linear_sum_assignment(-overlap)
    pairs = [(i, j) for i, j in zip(rows, cols, strict=True) if overlap[i, j] > 0]

    correct = sum(np.minimum(r[i], h[j]) for i, j in pairs) if pairs else np.zeros_like(durations)
    n_ref, n_hyp = r.sum(0), h.sum(0)
    result = Score(
        total=float(durations @ n_ref),
        missed=float(durations @ np.maximum(0, n_ref - n_hyp)),
        false_alarm=float(durations @ np.maximum(0, n_hyp - n_ref)),
        confusion=float(durations @ (np.minimum(n_ref, n_hyp) - correct)),
        speakers=len(ref_labels),
    )
    mapped = dict(pairs)
    for i in range(len(ref_labels)):
        j = mapped.get(i)
        if j is None:
            result.speaker_error += 1.0
            continue
        in_ref, in_hyp = r[i] > 0, h[j] > 0
        union = float(durations @ (in_ref | in_hyp))
        result.speaker_error += 1.0 - float(durations @ (in_ref & in_hyp)) / union
    return result
