"""One stream's online diarization: speech frames + speaker windows -> clustering -> turns, with a latency.

The latency ``L`` is how long a frame's label may still change: a frame ending at time ``t`` is final once
the stream has reached ``t + L``, and is labelled from the windows that ended by then, using the window
whose centre is nearest to it (with ``L`` of at least half a window, that window is centred on the
frame). The clustering commits a window ``max(0, L - window/2)`` seconds after its end, so it can look at
the windows that follow it (see ``clustering.py``) and still be committed when the frames it labels become
final. Until then frames carry provisional labels, reported as provisional turns. Non-speech frames never
get a speaker.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .clustering import Assignment, Speaker
from .rttm import Segment
from .turns import FrameLabel, Turn, TurnEvent, TurnTracker, runs
from .window import Window

UNKNOWN = "unknown"  # provisional label of speech that would open a new speaker


class Clusterer(Protocol):
    speakers: list[Speaker]

    def resolve(self, speaker: int) -> int: ...
    def peek(self, window: Window) -> Assignment | None: ...
    def commit(self, window: Window, context: list[Window]) -> Assignment | None: ...


@dataclass
class _Entry:
    window: Window
    assignment: Assignment | None = None
    committed: bool = False


class Diarizer:
    """Feed ``add_speech`` (VAD frames, in order) and ``add_window`` (in order of end time), then ``advance``
    to the stream time reached; ``finish`` at the end of the stream. ``turns`` holds the final turns."""

    def __init__(self, clustering: Clusterer, *, latency: float = 2.0, frame: float = 0.032,
                 min_speech: float = 0.4) -> None:
        if latency < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {latency}")
        if frame <= 0:
            raise ValueError(f"frame must be > 0 seconds, got {frame}")
        self.clustering = clustering
        self.latency = latency
        self.frame = frame
        self.min_speech = min_speech
        self.turns: list[Turn] = []
        self._speech = np.zeros(0, bool)  # VAD decision per frame from frame ``_speech_first``
        self._runs = np.zeros(0, int)  # index of each frame's stretch of speech (-1: silence)
        self._run_count = 0
        self._speech_first = 0
        self._vad = False  # whether speech frames are being supplied at all
        self._entries: deque[_Entry] = deque()
        self._ends: deque[float] = deque()
        self._uncommitted = 0  # index of the first entry not committed yet
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
        previous = bool(self._speech[-1]) if len(self._speech) else False
        starts = flags & ~np.concatenate([[previous], flags[:-1]])
        runs = self._run_count - 1 + np.cumsum(starts)
        self._run_count += int(starts.sum())
        self._speech = np.concatenate([self._speech, flags])
        self._runs = np.concatenate([self._runs, np.where(flags, runs, -1)])

    def speech_frames(self) -> tuple[np.ndarray, int]:
        """The VAD decisions still held (at least 10 s before the final frames) and the index of the first."""
        return self._speech, self._speech_first

    def _run_of(self, k: int) -> int:
        i = k - self._speech_first
        return int(self._runs[i]) if 0 <= i < len(self._runs) else -1

    def _is_speech(self, k: int) -> bool:
        i = k - self._speech_first
        return bool(self._speech[i]) if 0 <= i < len(self._speech) else not self._vad

    def add_window(self, window: Window) -> None:
        """A speaker embedding; its speech fraction is taken from the VAD frames when there are any."""
        if self._vad:
            a, b = int(window.start / self.frame), max(int(np.ceil(window.end / self.frame)), 1)
            lo, hi = max(a - self._speech_first, 0), max(b - self._speech_first, 0)
            flags, runs = self._speech[lo:hi], self._runs[lo:hi]
            window.speech = float(np.mean(flags)) if len(flags) else 0.0
            if flags.any():
                ids, counts = np.unique(runs[flags], return_counts=True)
                window.segment = int(ids[np.argmax(counts)])
        self._entries.append(_Entry(window))
        self._ends.append(window.end)

    # ------------------------------------------------------------------ stepping
    def _commit_due(self, now: float, everything: bool, through: int = -1) -> None:
        """Commit the windows whose lookahead has passed by ``now`` (all with ``everything``; at least those
        up to index ``through``, with the context there is, when a final frame needs them)."""
        entries = self._entries
        for i in range(self._uncommitted, len(entries)):
            e = entries[i]
            lookahead = max(0.0, self.latency - (e.window.end - e.window.start) / 2)
            limit = min(e.window.end + lookahead, now) + 1e-9
            if not everything and i > through and e.window.end + lookahead > now + 1e-9:
                break
            self._uncommitted = i + 1
            e.committed = True
            if e.window.speech < self.min_speech:
                continue
            context = [entries[j].window for j in range(max(0, i - 8), i)
                       if e.window.segment >= 0 and entries[j].window.segment == e.window.segment]
            for j in range(i + 1, len(entries)):
                c = entries[j].window
                if c.end > limit:
                    break
                if c.speech >= self.min_speech:
                    context.append(c)
            e.assignment = self.clustering.commit(e.window, context)

    def _label(self, k: int, peeks: dict[int, Assignment | None], final: bool) -> FrameLabel:
        """Label of frame ``k`` from the windows that ended within the latency after it (``peeks`` caches
        the provisional assignments of uncommitted windows for one step)."""
        if not self._is_speech(k):
            return None
        centre, horizon = (k + 0.5) * self.frame, (k + 1) * self.frame + self.latency + 1e-9
        last = bisect.bisect_right(self._ends, horizon)
        run = self._run_of(k)
        best: tuple[tuple[bool, float], Assignment | None] | None = None
        for i in range(last - 1, -1, -1):
            e = self._entries[i]
            span = e.window.end - e.window.start
            if e.window.end < centre - span:
                break
            # prefer windows of the frame's own stretch of speech, then the nearest
            key = (run >= 0 and e.window.segment != run, abs(e.window.center - centre))
            if e.window.speech < self.min_speech or key[1] > span or (best is not None and key >= best[0]):
                continue
            if final and not e.committed:
                self._commit_due(self.now, False, through=i)
            if e.committed:
                assignment = e.assignment
            else:
                if i not in peeks:
                    peeks[i] = self.clustering.peek(e.window)
                assignment = peeks[i]
            if e.committed and assignment is None:
                continue
            best = (key, assignment)
        if best is None:
            return None
        if best[1] is None:
            return (UNKNOWN, 0.0)
        speaker = self.clustering.resolve(best[1].speaker)
        return (self.clustering.speakers[speaker].name, best[1].confidence)

    def advance(self, now: float) -> list[TurnEvent]:
        """Move to stream time ``now`` (seconds): commit, finalise frames, report turn events."""
        return self._step(max(now, self.now), everything=False)

    def finish(self) -> list[TurnEvent]:
        """End of stream: everything becomes final."""
        return self._step(self.now, everything=True)

    def _step(self, now: float, everything: bool) -> list[TurnEvent]:
        self.now = now
        self._commit_due(now, everything)
        end_frames = int(np.ceil(now / self.frame - 1e-9))
        final_to = end_frames if everything else max(self._final, int((now - self.latency) / self.frame + 1e-9))
        peeks: dict[int, Assignment | None] = {}
        new_final = [self._label(k, peeks, True) for k in range(self._final, final_to)]
        self._final = final_to
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
        provisional = [] if everything else [self._label(k, peeks, False) for k in range(final_to, end_frames)]
        live = runs(self._open + provisional, self._open_first, self.frame)
        self._prune()
        return self._tracker.update(done, live)

    def _prune(self) -> None:
        """Forget windows and VAD frames that can no longer label a frame."""
        horizon = self._final * self.frame - 10.0
        while self._entries and self._entries[0].committed and self._entries[0].window.end < horizon:
            self._entries.popleft()
            self._ends.popleft()
            self._uncommitted -= 1
        drop = int(horizon / self.frame) - self._speech_first
        if drop > 0:
            self._speech, self._runs = self._speech[drop:], self._runs[drop:]
            self._speech_first += drop

    def segments(self) -> list[Segment]:
        """The final turns as RTTM segments."""
        return [Segment(t.start, t.end, t.label) for t in self.turns]
