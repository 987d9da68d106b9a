"""The interface every audio source offers the engine, and the small parts the sources share.

A source is an async iterator of :class:`AudioChunk`: float32 mono 16 kHz samples stamped with their
index in the stream, so that anything lost on the way (a ring-buffer overrun, a dropped network chunk)
shows up as a jump in ``start`` instead of silently shifting the timeline. Its :class:`SourceStats`
counts what came in and, exactly, what was lost; the engine publishes them in the stream's status.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from streamwavlm.audio.validate import SAMPLE_RATE

OverflowPolicy = Literal["block", "drop_oldest"]

SUPPORTED_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000)
"""Input rates that network sources accept (all resample to 16 kHz with small polyphase tables)."""
STREAM_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
"""Valid stream ids: they become MQTT topic levels and file names downstream (no '/', '+', '#', spaces)."""


@dataclass(frozen=True)
class AudioChunk:
    """A run of consecutive samples of one stream."""

    stream_id: str
    samples: np.ndarray
    """float32 mono at 16 kHz, 1-D."""
    start: int
    """Index of ``samples[0]`` in the stream at 16 kHz; a start beyond the previous chunk's end is a gap."""
    arrival: float
    """``time.monotonic()`` when the last input sample of this chunk arrived (for latency accounting)."""

    @property
    def end(self) -> int:
        """Index one past the last sample: the ``start`` of the next chunk if nothing is lost."""
        return self.start + len(self.samples)


@dataclass
class SourceStats:
    """Counters of one stream. Samples delivered plus ``dropped`` always equal the last chunk's ``end``."""

    input_rate: int = SAMPLE_RATE
    """Sample rate of the source before resampling (the unit of ``samples_in``)."""
    samples_in: int = 0
    """Input frames received from the device, file or network, at ``input_rate``."""
    samples_out: int = 0
    """16 kHz samples yielded in chunks."""
    dropped: int = 0
    """16 kHz samples lost (buffer overruns, chunks dropped from a full queue): the sum of the gaps in
    ``AudioChunk.start``."""
    overflows: int = 0
    """Overflow events: input overflows reported by the audio device plus overruns of our own buffers."""
    errors: int = 0
    """Bad input or failures seen by this stream; ``last_error`` says the most recent one."""
    last_error: str | None = None

    def error(self, message: str) -> None:
        """Count a failure and remember what it was."""
        self.errors += 1
        self.last_error = message


@runtime_checkable
class AudioSource(Protocol):
    """What the engine consumes: ``async for chunk in source``, ``source.stats``, ``await source.close()``.

    Iteration ends when the stream ends (end of file, client closed, ``close()`` called); samples still
    buffered at that point are delivered first.
    """

    @property
    def stats(self) -> SourceStats: ...

    def __aiter__(self) -> AsyncIterator[AudioChunk]: ...

    async def close(self) -> None: ...


class Blocker:
    """Cuts 16 kHz pieces ``(samples, start)`` into chunks of exactly ``size`` samples.

    A gap (a piece that does not start where the previous one ended) closes the pending chunk early, so
    that every chunk is contiguous. ``size=None`` passes non-empty pieces through unchanged.
    """

    def __init__(self, size: int | None) -> None:
        if size is not None and size <= 0:
            raise ValueError(f"block size must be positive, got {size}")
        self.size = size
        self._pending: list[np.ndarray] = []
        self._count = 0
        self._start = 0

    def push(self, samples: np.ndarray, start: int) -> list[tuple[np.ndarray, int]]:
        """Add a piece; return the complete blocks as ``(samples, start)``."""
        out = [] if start == self._start + self._count else self.flush()
        if not self._pending:
            self._start = start
        if self.size is None:
            return [*out, (samples, start)] if len(samples) else out
        self._pending.append(samples)
        self._count += len(samples)
        if self._count < self.size:
            return out
        joined = np.concatenate(self._pending)
        n_full = self._count // self.size * self.size
        out.extend((joined[i:i + self.size], self._start + i) for i in range(0, n_full, self.size))
        rest = joined[n_full:]
        self._pending, self._count, self._start = [rest], len(rest), self._start + n_full
        return out

    def flush(self) -> list[tuple[np.ndarray, int]]:
        """The pending partial block, if any (at a gap or at the end of the stream)."""
        if not self._count:
            return []
        block = (np.concatenate(self._pending), self._start)
        self._start += self._count
        self._pending, self._count = [], 0
        return [block]


class ChunkQueue:
    """A bounded queue of one stream's chunks with a declared overflow policy.

    ``block``: ``put`` waits for room (back-pressure to the sender; lossless). ``drop_oldest``: ``put``
    never waits; when full the oldest chunk is discarded and its samples counted in ``stats.dropped`` and
    ``stats.overflows`` (for inputs that must not stall others, e.g. many streams on one MQTT connection).
    ``finish`` ends the stream; it always succeeds, also when the queue is full.
    """

    def __init__(self, maxsize: int, policy: OverflowPolicy, stats: SourceStats) -> None:
        if maxsize <= 0:
            raise ValueError(f"queue size must be positive, got {maxsize}")
        if policy not in ("block", "drop_oldest"):
            raise ValueError(f"overflow policy must be 'block' or 'drop_oldest', got {policy!r}")
        self.maxsize, self.policy, self.stats = maxsize, policy, stats
        self._items: deque[AudioChunk] = deque()
        self._finished = False
        self._changed = asyncio.Event()

    async def put(self, chunk: AudioChunk) -> None:
        """Queue a chunk, waiting for room under the ``block`` policy; chunks after ``finish`` are ignored."""
        while self.policy == "block" and len(self._items) >= self.maxsize and not self._finished:
            self._changed.clear()
            await self._changed.wait()
        self.put_nowait(chunk)

    def put_nowait(self, chunk: AudioChunk) -> None:
        """Queue a chunk now; when full, drop the oldest (``drop_oldest``) or raise ``asyncio.QueueFull``."""
        if self._finished:
            return
        if len(self._items) >= self.maxsize:
            if self.policy == "block":
                raise asyncio.QueueFull
            lost = self._items.popleft()
            self.stats.dropped += len(lost.samples)
            self.stats.overflows += 1
        self._items.append(chunk)
        self._changed.set()

    def finish(self) -> None:
        """No more chunks will come; the consumer gets the queued ones, then the end."""
        self._finished = True
        self._changed.set()

    async def get(self) -> AudioChunk | None:
        """The next chunk, or ``None`` at the end of the stream."""
        while not self._items and not self._finished:
            self._changed.clear()
            await self._changed.wait()
        if not self._items:
            return None
        chunk = self._items.popleft()
        self._changed.set()
        return chunk


async def refuse(source: AudioSource, code: str, message: str) -> None:
    """End ``source``, telling its sender why where it has one (network sources: ``server_busy``,
    ``non_finite``, ...); other sources are simply closed."""
    method = getattr(source, "refuse", None)
    if method is not None:
        await method(code, message)
    else:
        await source.close()


RefuseCallback = Callable[[str, str], Awaitable[object]]
"""Tells a network sender why its stream is refused or ended: ``(code, message)``."""


class QueuedSource:
    """An :class:`AudioSource` fed by a network handler through a :class:`ChunkQueue`."""

    def __init__(self, stream_id: str, input_rate: int, *, queue_size: int, policy: OverflowPolicy,
                 on_close: Callable[[], object] | None = None, on_refuse: RefuseCallback | None = None) -> None:
        self.stream_id = stream_id
        self._stats = SourceStats(input_rate=input_rate)
        self.queue = ChunkQueue(queue_size, policy, self._stats)
        self._on_close = on_close
        self._on_refuse = on_refuse

    @property
    def stats(self) -> SourceStats:
        return self._stats

    def __aiter__(self) -> QueuedSource:
        return self

    async def __anext__(self) -> AudioChunk:
        chunk = await self.queue.get()
        if chunk is None:
            raise StopAsyncIteration
        self._stats.samples_out += len(chunk.samples)
        return chunk

    async def close(self) -> None:
        """Stop the stream from the consumer's side; queued chunks are still delivered."""
        self.queue.finish()
        if self._on_close is not None:
            result = self._on_close()
            if asyncio.iscoroutine(result):
                await result

    async def refuse(self, code: str, message: str) -> None:
        """End the stream with an error the sender is told about (``server_busy``, ``non_finite``, ...)."""
        self._stats.error(message)
        self.queue.finish()
        if self._on_refuse is not None:
            await self._on_refuse(code, message)
        elif self._on_close is not None:
            await self.close()
