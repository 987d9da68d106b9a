"""Speaker turns from frame labels, and the start / update / final / cancel events a live consumer sees.

A turn is a maximal run of speech frames with one speaker. Frames older than the latency are final and
never change; the frames after them are provisional and may be relabelled as more audio arrives. Turns are
identified by a per-stream ``turn`` number: ``start`` announces a turn (provisional), ``update`` reports a
new end, label or confidence, ``final`` is its last word, and ``cancel`` retracts a provisional turn that
a revision absorbed into another (its frames now belong to the turn they were merged with).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EventKind = Literal["start", "update", "final", "cancel"]


@dataclass(frozen=True)
class Turn:
    start: float
    end: float
    label: str
    confidence: float


@dataclass(frozen=True)
class TurnEvent:
    event: EventKind
    turn: int
    label: str
    start: float
    end: float
    confidence: float


FrameLabel = tuple[str, float] | None  # (speaker label, confidence), None for non-speech


def runs(labels: list[FrameLabel], first: int, frame: float) -> list[Turn]:
    """Turns of consecutive frames with the same label; ``first`` is the index of ``labels[0]``."""
    out: list[Turn] = []
    i = 0
    while i < len(labels):
        lab = labels[i]
        if lab is None:
            i += 1
            continue
        j = i
        while j < len(labels) and labels[j] is not None and labels[j][0] == lab[0]:  # type: ignore[index]
            j += 1
        confidence = sum(labels[k][1] for k in range(i, j)) / (j - i)  # type: ignore[index]
        out.append(Turn(round((first + i) * frame, 3), round((first + j) * frame, 3), lab[0], round(confidence, 3)))
        i = j
    return out


class TurnTracker:
    """Turns the frame timeline into events; call ``update`` after each diarizer step. A growing turn is
    reported every ``step`` seconds of growth (not at every audio chunk); a label change at once."""

    def __init__(self, step: float = 0.5) -> None:
        self.step = step
        self._next = 0
        self._announced: dict[float, tuple[int, Turn]] = {}  # provisional turns by start time

    def _id(self, turn: Turn) -> int:
        if turn.start in self._announced:
            return self._announced[turn.start][0]
        self._next += 1
        return self._next

    def update(self, final: list[Turn], live: list[Turn]) -> list[TurnEvent]:
        """``final``: turns that just became final; ``live``: the turns not final yet (provisional)."""
        events = []
        for t in final:
            events.append(TurnEvent("final", self._id(t), t.label, t.start, t.end, t.confidence))
            self._announced.pop(t.start, None)
        seen = set()
        for t in live:
            seen.add(t.start)
            old = self._announced.get(t.start)
            if old is None:
                self._announced[t.start] = (self._id(t), t)
                events.append(TurnEvent("start", self._announced[t.start][0], t.label, t.start, t.end, t.confidence))
            elif old[1].label != t.label or abs(old[1].end - t.end) >= self.step:
                self._announced[t.start] = (old[0], t)
                events.append(TurnEvent("update", old[0], t.label, t.start, t.end, t.confidence))
        for start in [s for s in self._announced if s not in seen]:
            turn_id, t = self._announced.pop(start)
            events.append(TurnEvent("cancel", turn_id, t.label, t.start, t.end, t.confidence))
        return events
