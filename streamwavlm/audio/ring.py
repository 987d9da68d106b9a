"""A preallocated single-producer/single-consumer ring buffer between an audio callback and its reader.

The producer is a real-time audio callback: it must not allocate buffers, take a lock that the reader
may hold, block, or log. :meth:`RingBuffer.write` therefore only copies into preallocated memory and
updates two integers. When the reader falls behind, the producer overwrites the oldest frames (the newest
audio matters more for a live stream) and the reader counts exactly what it lost.

Lock-free protocol (attribute reads and writes of Python ints are atomic under the GIL, but numpy
releases the GIL while it copies, so the two sides do run concurrently):

* The producer announces ``_reserved = w + n`` before copying frames ``[w, w + n)`` and publishes
  ``_committed = w + n`` after. Frame ``i`` lives in slot ``i % capacity``.
* The reader copies committed frames ``[r, committed)``, skipping those already below
  ``reserved - capacity`` (overwritten or being overwritten). After copying it re-reads ``_reserved``:
  frames of its copy that fell below the new ``reserved - capacity`` may be torn, so they are discarded
  and counted as dropped too. Every frame is thus either delivered intact or counted, never both.

Waiting: the reader registers the frame count it waits for; the producer signals only when that count is
reached (one wakeup per read, not one per callback) through a callable: ``loop.call_soon_threadsafe``
on an ``asyncio.Event`` for an asyncio reader, or ``threading.Event.set`` for a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

import numpy as np


class RingBuffer:
    """Float32 frames ``(capacity, channels)``; one writer thread, one reader."""

    def __init__(self, capacity: int, channels: int = 1) -> None:
        if capacity <= 0 or channels <= 0:
            raise ValueError(f"capacity and channels must be positive, got {capacity} and {channels}")
        self.capacity, self.channels = capacity, channels
        self._buf = np.zeros((capacity, channels), np.float32)
        self._reserved = 0  # producer: frames [.., _reserved) are being or have been written
        self._committed = 0  # producer: frames [.., _committed) are complete
        self._read = 0  # reader: next frame to deliver
        self._arrival = 0.0  # producer: time.monotonic() of the last commit
        self._wake_at: int | None = None  # reader: frame count it waits for
        self._notify: Callable[[], object] | None = None
        self.closed = False
        self.dropped = 0
        """Frames overwritten before the reader got them (exact)."""
        self.overruns = 0
        """Reads that found frames missing (each overrun is one gap in the delivered indices)."""

    @property
    def available(self) -> int:
        """Frames the reader could get now (at most ``capacity``)."""
        return min(self._committed - self._read, self.capacity)

    def write(self, frames: np.ndarray) -> None:
        """Producer: copy ``frames`` (``(n, channels)``, or ``(n,)`` when mono) in; never blocks.

        A block longer than the buffer keeps only its newest ``capacity`` frames (the rest is dropped).
        """
        n = len(frames)
        if n == 0:
            return
        w = self._committed
        end = w + n
        self._reserved = end
        if n > self.capacity:
            frames, w = frames[n - self.capacity:], end - self.capacity
            n = self.capacity
        src = frames.reshape(n, self.channels) if frames.ndim == 1 else frames
        i = w % self.capacity
        first = min(n, self.capacity - i)
        self._buf[i:i + first] = src[:first]
        if first < n:
            self._buf[:n - first] = src[first:]
        self._committed = end
        self._arrival = time.monotonic()
        wake_at = self._wake_at
        if wake_at is not None and end >= wake_at:
            self._wake_at = None
            notify = self._notify
            if notify is not None:
                notify()

    def read(self, max_frames: int | None = None) -> tuple[np.ndarray, int, float]:
        """Reader: ``(frames, start, arrival)`` for up to ``max_frames`` of the oldest unread frames.

        ``start`` is the stream index of ``frames[0]``; if it is beyond the previous read's end, the frames
        in between were overwritten and are counted in ``dropped``. ``arrival`` is the monotonic time of
        the producer's last write.
        """
        committed, arrival = self._committed, self._arrival
        lo = max(self._read, self._reserved - self.capacity)
        hi = committed if max_frames is None else min(committed, lo + max_frames)
        n = max(hi - lo, 0)
        out = np.empty((n, self.channels), np.float32)
        if n:
            i = lo % self.capacity
            first = min(n, self.capacity - i)
            out[:first] = self._buf[i:i + first]
            if first < n:
                out[first:] = self._buf[:n - first]
            valid_from = self._reserved - self.capacity  # anything below may have been overwritten meanwhile
            if valid_from > lo:
                cut = min(valid_from - lo, n)
                out, lo = out[cut:], lo + cut
        if lo > self._read:
            self.dropped += lo - self._read
            self.overruns += 1
        self._read = max(hi, lo)
        return out, lo, arrival

    def _ready(self, target: int) -> bool:
        return self.closed or self._committed >= target

    async def wait(self, min_frames: int) -> None:
        """Reader (asyncio): return once ``min_frames`` unread frames (at most ``capacity``) are there, or
        the buffer is closed. Sleeps without polling; the producer's wakeup goes through the event loop."""
        target = self._read + min(max(min_frames, 1), self.capacity)
        if self._ready(target):
            return
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(event.set)

        self._notify = wake
        self._wake_at = target
        try:
            if not self._ready(target):  # re-check after registering, so a write in between is not missed
                await event.wait()
        finally:
            self._wake_at = None
            self._notify = None

    def wait_blocking(self, min_frames: int, timeout: float | None = None) -> bool:
        """Reader (thread): like :meth:`wait`, blocking on a ``threading.Event``; False on timeout."""
        target = self._read + min(max(min_frames, 1), self.capacity)
        if self._ready(target):
            return True
        event = threading.Event()
        self._notify = event.set
        self._wake_at = target
        try:
            return self._ready(target) or event.wait(timeout)
        finally:
            self._wake_at = None
            self._notify = None

    def close(self) -> None:
        """No more writes: wake the reader so it can drain what is left and stop."""
        self.closed = True
        notify = self._notify
        if notify is not None:
            notify()
