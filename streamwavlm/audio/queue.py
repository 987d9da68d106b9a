"""One stream's audio waiting for the encoder, and the one ledger of what happened to every sample.

The engine keeps a :class:`SampleQueue` per stream: sources ``put`` validated 16 kHz pieces (a jump in a
piece's start index is filled with silence so frame times stay on the stream's timeline), the scheduler
``take``s exactly one encoder step's samples, and the overload policy ``drop_oldest``. Pieces are kept as
the arrays the source produced (no copy on the way in); a step that lies within one piece is a view of it,
otherwise one copy joins the pieces. Every sample is accounted for:
``received + gap_filled == taken + dropped + len(queue)``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Ledger:
    """The counters of an empty queue, so another engine can continue a stream's ledger where this one left
    it (a stream handed over between workers). ``origin``: the stream index of the first sample the ledger
    accounts for (non-zero for a stream taken over mid-way without its history)."""

    origin: int = 0
    received: int = 0
    gap_filled: int = 0
    taken: int = 0
    dropped: int = 0

    @property
    def next_start(self) -> int:
        """The stream index of the first sample not accounted for."""
        return self.origin + self.received + self.gap_filled


class SampleQueue:
    def __init__(self, ledger: Ledger | None = None) -> None:
        ledger = ledger or Ledger()
        self._pieces: deque[tuple[np.ndarray, float]] = deque()  # (samples, arrival time of their last sample)
        self._len = 0
        self.origin = ledger.origin  # stream index of the first sample accounted for
        self.received = ledger.received  # samples put by the source
        self.gap_filled = ledger.gap_filled  # samples of silence inserted where the source's indices jumped
        self.taken = ledger.taken  # samples handed to the encoder
        self.dropped = ledger.dropped  # samples discarded by the overload policy
        self.next_start = ledger.next_start  # stream index the next piece is expected to start at
        self.last_arrival = 0.0  # arrival time of the newest sample taken
        # (taken count when dropping, cumulative dropped)
        self._drops: deque[tuple[int, int]] = deque([(ledger.taken, ledger.dropped)] if ledger.dropped else [])

    def ledger(self) -> Ledger:
        """The counters, with the queued samples counted as not yet received (hand them over with it)."""
        return Ledger(self.origin, self.received - self._len, self.gap_filled, self.taken, self.dropped)

    def __len__(self) -> int:
        return self._len

    def put(self, samples: np.ndarray, start: int | None = None, arrival: float = 0.0) -> None:
        """Queue a piece of float32 16 kHz samples whose first sample has stream index ``start`` (default:
        right after the previous piece); a later start means the source lost audio: silence fills the gap."""
        start = self.next_start if start is None else start
        if start > self.next_start:
            gap = start - self.next_start
            self._append(np.zeros(gap, np.float32), arrival)
            self.gap_filled += gap
        self._append(samples, arrival)
        self.received += len(samples)
        self.next_start = start + len(samples)

    def _append(self, samples: np.ndarray, arrival: float) -> None:
        if len(samples):
            self._pieces.append((samples, arrival))
            self._len += len(samples)

    def take(self, n: int) -> np.ndarray:
        """The oldest ``n`` samples (a view when they lie in one piece)."""
        if n > self._len:
            raise ValueError(f"{n} samples asked for, {self._len} queued")
        if n == 0:
            return np.zeros(0, np.float32)
        head, arrival = self._pieces[0]
        if n <= len(head):
            out = head[:n]
            self._consume(n)
        else:
            out = np.empty(n, np.float32)
            filled = 0
            while filled < n:
                head, arrival = self._pieces[0]
                k = min(n - filled, len(head))
                out[filled:filled + k] = head[:k]
                self._consume(k)
                filled += k
        self.taken += n
        self.last_arrival = arrival
        return out

    def drop_oldest(self, n: int) -> int:
        """Discard up to ``n`` of the oldest samples; return how many were dropped."""
        n = min(n, self._len)
        left = n
        while left:
            k = min(left, len(self._pieces[0][0]))
            self._consume(k)
            left -= k
        if n:
            self.dropped += n
            self._drops.append((self.taken, self.dropped))
        return n

    def _consume(self, n: int) -> None:
        head, arrival = self._pieces[0]
        if n == len(head):
            self._pieces.popleft()
        else:
            self._pieces[0] = (head[n:], arrival)
        self._len -= n

    def stream_index(self, taken_position: int) -> int:
        """The stream sample index of the ``taken_position``-th sample taken (drops before it shift it).

        Positions must be asked for in non-decreasing order: drop records older than the position are
        discarded as it goes."""
        while len(self._drops) > 1 and self._drops[1][0] <= taken_position:
            self._drops.popleft()
        if self._drops and self._drops[0][0] <= taken_position:
            return self.origin + taken_position + self._drops[0][1]
        return self.origin + taken_position
