"""One stream's online diarization: speech frames + speaker windows -> stretch clustering -> turns, with a
latency.

The latency ``L`` is how long a frame's label may still change: a frame ending at time ``t`` is final once
the stream has reached ``t + L``. Speech comes in stretches (runs of speech frames; turns change at
pauses), and every frame of a stretch is labelled by the clustering's decision (``clustering.py``) on the
mean of that stretch's windows that have arrived by then: with more latency a frame is decided with more
of its stretch. A long stretch is thus decided anew at every step until it ends; its final frames keep the
label they were given, the later ones may get another (a revision, reported as a new turn). When a
stretch has ended and its last frame is final, the clustering learns from all of it. Frames not final yet
carry provisional labels, reported as provisional turns. Non-speech frames never get a speaker, nor do the
frames of a stretch none of whose windows has arrived (a miss rather than a guess). Without speech
activity detection the stream is cut into stretches of ``BLOCK`` seconds, and a window belongs to the one
holding its centre.

A window belongs to the stretch holding most of its speech frames; it represents it alone when at least
``purity`` of them are in it (a window that straddles a turn change is kept out while the stretch has a
cleaner one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .background import Background
from .clustering import NEW, Assignment, OnlineClustering
from .rttm import Segment
from .turns import FrameLabel, Turn, TurnEvent, TurnTracker, runs
from .vad import frames_of
from .window import Window

UNKNOWN = "unknown"  # provisional label of speech that would open a new speaker
BLOCK = 2.0  # seconds per stretch when there is no speech activity detection


@dataclass
class _Stretch:
    """The windows of one stretch of speech so far: sums of unit vectors, pure and all."""

    pure: np.ndarray | None = None
    pure_count: int = 0
    mixed: np.ndarray | None = None
    mixed_count: int = 0
    last: int = -1  # index of its last frame, once a non-speech frame has followed it
    speaker: int | None = None  # the speaker opened for this stretch, if it opened one

    def add(self, vector: np.ndarray, pure: bool) -> None:
        if pure:
            self.pure = vector.copy() if self.pure is None else self.pure + vector
            self.pure_count += 1
        else:
            self.mixed = vector.copy() if self.mixed is None else self.mixed + vector
            self.mixed_count += 1

    def evidence(self) -> tuple[np.ndarray, int] | None:
        if self.pure is not None:
            return self.pure, self.pure_count
        return (self.mixed, self.mixed_count) if self.mixed is not None else None


class Diarizer:
    """Feed ``add_speech`` (VAD frames, in order) and ``add_window`` (in order of end time), then ``advance``
    to the stream time reached; ``finish`` at the end of the stream. ``turns`` holds the final turns."""

    def __init__(self, clustering: OnlineClustering, *, latency: float = 2.0, frame: float = 0.032,
                 min_speech: float = 0.4, background: Background | None = None) -> None:
        if latency < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {latency}")
        if frame <= 0:
            raise ValueError(f"frame must be > 0 seconds, got {frame}")
        self.clustering = clustering
        self.background = background  # projects every window (``background.py``) before it is clustered
        self.latency = latency
        self.frame = frame
        self.min_speech = min_speech
        self.turns: list[Turn] = []
        self._speech = np.zeros(0, bool)  # VAD decision per frame from frame ``_speech_first``
        self._runs = np.zeros(0, int)  # index of each frame's stretch of speech (-1: silence)
        self._run_count = 0
        self._speech_first = 0
        self._vad = False  # whether speech frames are being supplied at all
        self._stretches: dict[int, _Stretch] = {}
        self._learnt = 0  # stretches before this index have been learnt from (later windows of them are late)
        self._final = 0  # frames before this index are final
        self._open: list[FrameLabel] = []  # final frames of the run that may still continue
        self._open_first = 0
        self._tracker = TurnTracker()
        self.now = 0.0

    # ------------------------------------------------------------------ input
    def add_speech(self, flags: np.ndarray) -> None:
        """Append VAD decisions for the next frames."""
        self._vad = True
        flags = np.asarray(flags, bool)
        if not len(flags):
            return
        previous = bool(self._speech[-1]) if len(self._speech) else False
        if previous and not flags[0]:
            self._close(self._run_count - 1, self._speech_first + len(self._speech) - 1)
        starts = flags & ~np.concatenate([[previous], flags[:-1]])
        runs = self._run_count - 1 + np.cumsum(starts)
        ends = np.flatnonzero(flags[:-1] & ~flags[1:])
        first = self._speech_first + len(self._speech)
        for i in ends:
            self._close(int(runs[i]), first + int(i))
        self._run_count += int(starts.sum())
        self._speech = np.concatenate([self._speech, flags])
        self._runs = np.concatenate([self._runs, np.where(flags, runs, -1)])

    def _close(self, run: int, last: int) -> None:
        if run >= self._learnt:
            self._stretches.setdefault(run, _Stretch()).last = last

    def speech_frames(self) -> tuple[np.ndarray, int]:
        """The VAD decisions still held (at least 10 s before the final frames) and the index of the first."""
        return self._speech, self._speech_first

    def _run_of(self, k: int) -> int:
        """Frame ``k``'s stretch of speech; -1 for silence."""
        if not self._vad:
            return int(k * self.frame / BLOCK)
        i = k - self._speech_first
        return int(self._runs[i]) if 0 <= i < len(self._runs) else -1

    def add_window(self, window: Window) -> None:
        """A speaker embedding; its speech fraction and stretch are taken from the VAD frames when there are
        any (without VAD every window is speech)."""
        purity = 1.0
        if self._vad:
            a, b = frames_of(window.start, window.end, self.frame)
            lo, hi = max(a - self._speech_first, 0), max(b - self._speech_first, 0)
            flags, runs = self._speech[lo:hi], self._runs[lo:hi]
            window.speech = float(np.mean(flags)) if len(flags) else 0.0
            if flags.any():
                ids, counts = np.unique(runs[flags], return_counts=True)
                window.segment, purity = int(ids[np.argmax(counts)]), float(counts.max() / counts.sum())
        else:
            window.segment = int(window.center / BLOCK)
            self._close(window.segment, int(np.ceil((window.segment + 1) * BLOCK / self.frame - 1e-9)) - 1)
        self._add(window, purity)

    def _add(self, window: Window, purity: float) -> None:
        if window.speech >= self.min_speech and window.segment >= self._learnt:
            stretch = self._stretches.setdefault(window.segment, _Stretch())
            vector = self.background.apply(window.vector) if self.background is not None else window.vector
            stretch.add(vector, purity >= self.clustering.settings.purity)

    # ------------------------------------------------------------------ labels
    def _decide(self, run: int, final: bool) -> FrameLabel:
        """The label of a frame of stretch ``run`` now (``final``: it is final, so a new speaker opens)."""
        stretch = self._stretches.get(run)
        evidence = stretch.evidence() if stretch is not None else None
        if evidence is None:
            return None
        assignment = self.clustering.decide(*evidence)
        if assignment.speaker == NEW:
            if not final:
                return (UNKNOWN, 0.0)
            stretch.speaker = self.clustering.open(*evidence)  # type: ignore[union-attr]
            assignment = Assignment(stretch.speaker, 1.0)  # type: ignore[union-attr]
        return (self.clustering.speakers[assignment.speaker].name, round(assignment.confidence, 3))

    def _labels(self, first: int, last: int, final: bool) -> list[FrameLabel]:
        """Labels of frames ``[first, last)``: one decision per stretch per step."""
        decided: dict[int, FrameLabel] = {}
        out: list[FrameLabel] = []
        for k in range(first, last):
            run = self._run_of(k)
            if run < 0:
                out.append(None)
                continue
            if run not in decided:
                decided[run] = self._decide(run, final)
            out.append(decided[run])
        return out

    def _learn(self, everything: bool) -> None:
        """Let the clustering learn from the stretches that ended and whose frames are all final."""
        for run in [r for r, s in self._stretches.items() if everything or 0 <= s.last < self._final]:
            stretch = self._stretches.pop(run)
            self._learnt = max(self._learnt, run + 1)
            evidence = stretch.evidence()
            if evidence is None:
                continue
            if stretch.speaker is not None:
                self.clustering.learn(stretch.speaker, *evidence, replace=True)
                continue
            assignment = self.clustering.decide(*evidence)
            if assignment.speaker == NEW:
                self.clustering.open(*evidence)
            else:
                self.clustering.learn(assignment.speaker, *evidence)

    # ------------------------------------------------------------------ stepping
    def advance(self, now: float) -> list[TurnEvent]:
        """Move to stream time ``now`` (seconds): finalise frames, learn, report turn events."""
        return self._step(max(now, self.now), everything=False)

    def finish(self) -> list[TurnEvent]:
        """End of stream: everything becomes final."""
        return self._step(self.now, everything=True)

    def _step(self, now: float, everything: bool) -> list[TurnEvent]:
        self.now = now
        end_frames = int(np.ceil(now / self.frame - 1e-9))
        final_to = end_frames if everything else max(self._final, int((now - self.latency) / self.frame + 1e-9))
        if self._vad and not everything:  # never before the frame's speech decision is known
            final_to = max(self._final, min(final_to, self._speech_first + len(self._speech)))
        new_final = self._labels(self._final, final_to, True)
        self._final = final_to
        self._learn(everything)
        if not self._open:
            self._open_first = final_to - len(new_final)
        labels = self._open + new_final
        turns = runs(labels, self._open_first, self.frame)
        last_label = labels[-1] if labels else None
        still_open = turns[-1] if turns and last_label is not None and not everything else None
        done = turns[:-1] if still_open else turns
        if still_open is not None:
            start = round(still_open.start / self.frame)
            self._open = labels[start - self._open_first:]
            self._open_first = start
        else:
            self._open, self._open_first = [], final_to
        self.turns += done
        provisional = [] if everything else self._labels(final_to, end_frames, False)
        live = runs(self._open + provisional, self._open_first, self.frame)
        self._prune()
        return self._tracker.update(done, live)

    def _prune(self) -> None:
        """Forget VAD frames that can no longer label a frame or place a window."""
        drop = int((self._final * self.frame - 10.0) / self.frame) - self._speech_first
        if drop > 0:
            self._speech, self._runs = self._speech[drop:], self._runs[drop:]
            self._speech_first += drop

    def segments(self) -> list[Segment]:
        """The final turns as RTTM segments."""
        return [Segment(t.start, t.end, t.label) for t in self.turns]
