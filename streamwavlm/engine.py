"""The asyncio pipeline: audio sources -> bounded backlogs -> batched encoder steps -> sinks.

Each source is read by its own task, which only puts chunks into that stream's :class:`SampleQueue` (the
one place audio waits between a source and the encoder; gaps in the source's sample index are filled with
silence there so frame indices stay on the stream's timeline). One scheduler task takes exactly one step's
samples from every stream that has them and hands them to the :class:`StreamPool` (which keeps no audio)
for one batched step in a worker thread, so the event loop keeps serving sockets and sinks while the model
computes.

When compute falls behind, a stream's backlog grows; past ``max_backlog`` seconds the declared policy
applies: ``drop_oldest`` discards the oldest queued audio (counted in samples, and reflected in the outputs'
``stream_start`` so timestamps stay true), ``shed`` closes the stream with an error status. Latency stays
bounded either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from .audio.queue import Ledger, SampleQueue
from .audio.source import AudioSource, refuse
from .audio.validate import SAMPLE_RATE
from .streaming import ChunkOutput, StreamPool, StreamState

log = logging.getLogger(__name__)

# oneDNN (through torch's ideep) compiles and caches a primitive per input shape in each thread, 1024 by
# default, each holding its own scratch memory. A long-running engine meets ever new shapes (every stream's
# shorter last step): with 1024 or 256 entries resident memory grew ~20 MB per hour of audio for three hours
# (tests/test_soak.py); with 128 it is flat after the first hour (+0.2 MB/h). Fewer entries make steps
# recompile when many batch sizes alternate (64 cost int8 1.5x over 16 batch sizes, docs/precision.md).
# The worker threads that run the steps create their caches after this is read; a value the user set is kept.
os.environ.setdefault("LRU_CACHE_CAPACITY", "128")

OverloadPolicy = Literal["drop_oldest", "shed"]


@dataclass
class EngineOutput:
    """A chunk of encoder output with the timing a consumer needs."""

    chunk: ChunkOutput
    stream_start: int  # stream sample index of the chunk's first frame (dropped audio accounted for)
    latency: float  # seconds from the arrival of the chunk's last input sample to the output
    wall_time: float  # time.time() when the output was ready
    stream_frame: int  # stream frame index of the chunk's first frame: ``first_frame`` + frames dropped

    @property
    def frame_offset(self) -> int:
        """Frames the overload policy dropped before this chunk (add it to the chunk's frame indices)."""
        return self.stream_frame - self.chunk.first_frame

    @property
    def stream_id(self) -> str:
        return self.chunk.stream_id


Sink = Callable[[EngineOutput], Awaitable[None]]


@dataclass
class Resume:
    """Where a stream served elsewhere before continues here (:meth:`Engine.add`): the pool state (None: a
    fresh state, for a stream taken over without its history), the ledger of its queue, and the audio the
    previous engine had queued but not stepped (it starts at ``ledger.next_start``)."""

    state: StreamState | None
    ledger: Ledger
    backlog: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@dataclass
class Released:
    """A stream taken out of a running engine by :meth:`Engine.release`, everything another engine needs to
    continue it exactly (as a :class:`Resume`), and its last status."""

    resume: Resume
    status: StreamStatus


@dataclass
class StreamStatus:
    """What the engine knows about one stream; published as its status. The sample counts are those of the
    stream's :class:`SampleQueue`, the one ledger of its audio."""

    stream_id: str
    state: str = "open"  # open | closed | failed | shed
    frames_out: int = 0
    error: str | None = None
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1000), repr=False)
    compute: float = 0.0  # seconds of step time attributed to this stream
    queue: SampleQueue = field(default_factory=SampleQueue, repr=False)

    @property
    def samples_in(self) -> int:
        """16 kHz samples received from the source."""
        return self.queue.received

    @property
    def samples_processed(self) -> int:
        """Samples handed to the encoder."""
        return self.queue.taken

    @property
    def dropped(self) -> int:
        """Samples dropped by the engine's overload policy."""
        return self.queue.dropped

    @property
    def gap_filled(self) -> int:
        """Samples of silence inserted where the source lost audio."""
        return self.queue.gap_filled

    @property
    def backlog(self) -> int:
        """Samples waiting for the encoder."""
        return len(self.queue)

    def summary(self) -> dict[str, object]:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        audio = self.samples_processed / SAMPLE_RATE
        return {
            "stream": self.stream_id, "state": self.state, "samples_in": self.samples_in,
            "processed": self.samples_processed, "dropped": self.dropped, "gap_filled": self.gap_filled,
            "backlog_s": round(self.backlog / SAMPLE_RATE, 3), "frames_out": self.frames_out,
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
            "latency_ms_p95": round(float(np.percentile(lat, 95)), 1),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 1),
            "rtf": round(self.compute / audio, 4) if audio else None, "error": self.error,
        }


@dataclass
class _Stream:
    status: StreamStatus
    source: AudioSource
    slot: int
    ended: bool = False
    live: bool = True  # False: the source waits for room (backpressure) instead of the overload policy
    room: asyncio.Event = field(default_factory=asyncio.Event)  # set when the backlog shrinks
    task: asyncio.Task[None] | None = None

    @property
    def queue(self) -> SampleQueue:
        return self.status.queue


class Engine:
    """Runs many audio sources through one :class:`StreamPool`; call :meth:`add` then :meth:`drain`.
    :meth:`release` takes a stream out between two steps with what another engine needs to continue it
    (``add(..., resume=...)``): how ``streamwavlm worker`` moves streams between processes.

    One stream's fault stays its own: a source that fails, audio that drives the model to non-finite values,
    a step or sink that raises for a stream, or a source silent for ``idle_timeout`` seconds ends that
    stream (with ``error`` saying why) while the others go on. ``status_interval``: tell ``on_status`` the
    live counters of every open stream this often (seconds; None: only when streams start and end).
    """

    def __init__(self, pool: StreamPool, sinks: list[Sink] | None = None, *, max_backlog: float = 2.0,
                 policy: OverloadPolicy = "drop_oldest",
                 on_status: Callable[[StreamStatus], None] | None = None, keep_finished: int = 1000,
                 idle_timeout: float | None = None, status_interval: float | None = None) -> None:
        if policy not in ("drop_oldest", "shed"):
            raise ValueError(f"unknown overload policy {policy!r}; use drop_oldest or shed")
        step = pool.first_step
        if not max_backlog * SAMPLE_RATE >= step:
            raise ValueError(f"max_backlog {max_backlog} s is shorter than one encoder step "
                             f"({step / SAMPLE_RATE:.3f} s for chunk {pool.settings.chunk}): nothing could ever "
                             "be processed; use at least that (the default is 2 s)")
        for name, value in (("idle_timeout", idle_timeout), ("status_interval", status_interval)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds (or None), got {value}")
        self.pool = pool
        self.sinks = list(sinks or [])
        self.max_backlog = int(max_backlog * SAMPLE_RATE)
        self.policy = policy
        self.idle_timeout = idle_timeout
        self.status_interval = status_interval
        self.streams: dict[str, _Stream] = {}
        self.finished: dict[str, StreamStatus] = {}  # the last ``keep_finished`` ended streams
        self.keep_finished = keep_finished
        self.on_status = on_status  # told when a stream starts and when it ends (e.g. to publish its status)
        self.step_times: deque[float] = deque(maxlen=1000)
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self._wake = asyncio.Event()
        self._busy = asyncio.Lock()  # held by the scheduler through a step or a flush, and by release()
        self._scheduler: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._discarding = False

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Engine:
        self._scheduler = asyncio.create_task(self._schedule(), name="streamwavlm-scheduler")
        if self.status_interval is not None and self.on_status is not None:
            self._ticker = asyncio.create_task(self._tick(self.status_interval), name="streamwavlm-status")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for stream in list(self.streams.values()):
            await stream.source.close()
        await self.drain()
        for task in (self._ticker, self._scheduler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _tick(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for stream in list(self.streams.values()):
                self._tell(stream.status)

    def _tell(self, status: StreamStatus) -> None:
        """Hand a status to ``on_status``; its failure is logged, never a stream's or the engine's end."""
        if self.on_status is None:
            return
        try:
            self.on_status(status)
        except Exception:
            log.exception("stream %s: status callback failed", status.stream_id)

    def add(self, source: AudioSource, stream_id: str, *, live: bool = True, resume: Resume | None = None
            ) -> StreamStatus:
        """Start reading ``source`` as stream ``stream_id`` (a pool slot is taken now).

        ``live=False`` (files read faster than real time): the source is paused while its backlog is full,
        so nothing is dropped; live sources (microphones, network streams) get the overload policy.
        ``resume``: continue a stream another engine released (its source starts at the stream index
        ``resume.ledger.next_start + len(resume.backlog)``).
        """
        if stream_id in self.streams:
            raise ValueError(f"stream {stream_id!r} is already running")
        slot = self.pool.open(stream_id)  # PoolFull when every slot is taken: nothing else has changed
        status = StreamStatus(stream_id)
        if resume is not None:
            try:
                if resume.state is not None:
                    self.pool.restore(slot, resume.state)
            except Exception:
                self.pool.discard(slot)
                raise
            status.queue = SampleQueue(resume.ledger)
            status.queue.put(resume.backlog, arrival=time.monotonic())
        stream = _Stream(status, source, slot, live=live)
        self.streams[stream_id] = stream
        stream.task = asyncio.create_task(self._read(stream), name=f"source-{stream_id}")
        self._tell(stream.status)
        return stream.status

    async def drain(self, discard_backlog: bool = False) -> None:
        """Wait until every source has ended and its audio has been processed and flushed.

        ``discard_backlog``: a stop that must be quick (Ctrl-C): audio still queued, or still arriving from
        the sources, is dropped (counted) instead of processed; each stream is then flushed as usual."""
        if discard_backlog:
            self._discarding = True
            for stream in self.streams.values():
                self._discard(stream)
        while self.streams:
            tasks = [s.task for s in self.streams.values() if s.task is not None]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._wake.set()
            await asyncio.sleep(0.01)
            if self._scheduler is not None and self._scheduler.done():
                self._scheduler.result()  # re-raise a scheduler failure instead of waiting forever

    async def release(self, stream_id: str) -> Released:
        """Take a running stream out without flushing it, between two steps: its reader stops, its slot is
        freed, and what another engine needs to continue it exactly is returned. Its source is left to the
        caller, and ``on_status`` is not told (the stream goes on elsewhere)."""
        async with self._busy:
            stream = self.streams.pop(stream_id)
            if stream.task is not None:
                stream.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stream.task
            st = stream.status
            state = self.pool.save(stream.slot) if st.state == "open" else None
            self._free(stream)
            ledger = stream.queue.ledger()
            backlog = stream.queue.take(len(stream.queue)).copy()
            st.state = "released"
            self.finished[stream_id] = st
            return Released(Resume(state, ledger, backlog), st)

    def status(self) -> list[dict[str, object]]:
        return [s.status.summary() for s in self.streams.values()] + [s.summary() for s in self.finished.values()]

    # ------------------------------------------------------------------ sources
    async def _read(self, stream: _Stream) -> None:
        st = stream.status
        chunks = aiter(stream.source)
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), self.idle_timeout)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    st.error = (f"idle: no audio for {self.idle_timeout:g} s, so the stream was ended and its "
                                "slot freed; send audio continuously or end the stream explicitly")
                    log.warning("stream %s: %s", st.stream_id, st.error)
                    await stream.source.close()
                    break
                stream.queue.put(chunk.samples, chunk.start, chunk.arrival)
                if self._discarding:
                    self._discard(stream)
                self._wake.set()
                while not stream.live and st.backlog > self.max_backlog and st.state == "open":
                    stream.room.clear()
                    await stream.room.wait()
                if st.backlog > self.max_backlog:
                    self._overload(stream)
                    if st.state == "shed":
                        return
        except Exception as e:  # a broken source ends its own stream only
            log.warning("stream %s: source failed: %s", st.stream_id, e)
            st.state, st.error = "failed", str(e)
        finally:
            stream.ended = True
            self._wake.set()

    def _discard(self, stream: _Stream) -> None:
        """Drop the stream's queued audio in whole frames (the remainder is flushed at its end)."""
        queued = len(stream.queue)
        stream.queue.drop_oldest(queued - queued % self.pool.cfg.hop)
        stream.room.set()

    def _overload(self, stream: _Stream) -> None:
        st = stream.status
        if self.policy == "shed":
            st.state = "shed"
            st.error = f"shed: backlog exceeded {self.max_backlog / SAMPLE_RATE:.1f} s (compute is behind)"
            log.warning("stream %s: %s", st.stream_id, st.error)
            return
        hop = self.pool.cfg.hop  # whole frames, so that stream frame indices stay exact after a drop
        stream.queue.drop_oldest(-(-(st.backlog - self.max_backlog) // hop) * hop)

    # ------------------------------------------------------------------ scheduling
    def _ready(self, stream: _Stream) -> bool:
        return stream.status.state == "open" and stream.status.backlog >= self.pool.need(stream.slot)

    async def _schedule(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                async with self._busy:
                    ready = [s for s in list(self.streams.values()) if self._ready(s)]
                    if ready:
                        await self._step(ready)
                    for stream in list(self.streams.values()):
                        # ended, and no whole step left (audio may have arrived during the step just run)
                        if stream.ended and not self._ready(stream):
                            await self._finish(stream)
                if not ready:
                    break

    async def _step(self, streams: list[_Stream]) -> None:
        audio = {s.slot: s.queue.take(self.pool.need(s.slot)) for s in streams}
        for s in streams:
            s.room.set()
        start = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(self.pool.step, audio)
        except Exception as e:  # a bug or resource failure in a step ends the streams of that step only
            log.exception("step of %d stream(s) failed", len(streams))
            for s in streams:
                await self._fail(s, "internal_error", f"internal error in the encoder step: {e!r}")
            return
        elapsed = time.perf_counter() - start
        self.step_times.append(elapsed)
        self.batch_sizes.append(len(streams))
        for s in streams:
            s.status.compute += elapsed / len(streams)
        await self._deliver(outputs)

    def _free(self, stream: _Stream) -> None:
        """Give the stream's slot back to the pool, unless closing it already did."""
        if self.pool.streams.get(stream.status.stream_id) == stream.slot:
            self.pool.discard(stream.slot)

    async def _fail(self, stream: _Stream, code: str, message: str) -> None:
        """End one stream with an error: its state, its sender told (network sources), its slot freed soon
        (by the scheduler, once its source has ended)."""
        st = stream.status
        if st.state != "open":
            return
        st.state, st.error = "failed", message
        log.warning("stream %s: %s", st.stream_id, message)
        self._free(stream)
        stream.room.set()  # a reader waiting for room (back-pressure) must see the end
        await refuse(stream.source, code, message)
        self._wake.set()

    async def _finish(self, stream: _Stream) -> None:
        """Flush a stream whose source ended (or drop a failed/shed one) and free its slot."""
        st = stream.status
        if st.state == "open":
            rest = stream.queue.take(st.backlog)  # the tail that never filled a step
            try:
                outputs = await asyncio.to_thread(self.pool.close, stream.slot, rest)
            except Exception as e:
                log.exception("stream %s: flush failed", st.stream_id)
                st.state, st.error = "failed", f"internal error in the final step: {e!r}"
            else:
                await self._deliver(outputs)
                if st.state == "open":
                    st.state = "closed"
        else:
            await stream.source.close()
        self._free(stream)
        del self.streams[st.stream_id]
        self.finished[st.stream_id] = st
        while len(self.finished) > self.keep_finished:
            del self.finished[next(iter(self.finished))]
        self._tell(st)

    async def _deliver(self, outputs: list[ChunkOutput]) -> None:
        now_mono, now_wall = time.monotonic(), time.time()
        hop = self.pool.cfg.hop
        for out in outputs:
            stream = self.streams[out.stream_id]
            st = stream.status
            if st.state != "open":
                continue
            if not _finite(out):
                await self._fail(stream, "non_finite", _non_finite_message(out))
                continue
            latency = max(0.0, now_mono - stream.queue.last_arrival)
            if out.num_frames:
                st.latencies.append(latency)
            st.frames_out += out.num_frames
            start = stream.queue.stream_index(out.first_frame * hop)
            result = EngineOutput(out, start, latency, now_wall, start // hop)
            for sink in self.sinks:
                try:
                    await sink(result)
                except Exception as e:  # a sink that cannot take this stream's output ends this stream only
                    log.exception("stream %s: sink %r failed", st.stream_id, sink)
                    await self._fail(stream, "internal_error", f"output could not be delivered: {e!r}")
                    break


def _finite(out: ChunkOutput) -> bool:
    return bool(torch.isfinite(out.frames).all()) and all(bool(torch.isfinite(v).all()) for _, v in out.xvectors)


def _non_finite_message(out: ChunkOutput) -> str:
    return (f"the model produced non-finite values (NaN/Inf) from this stream's audio at frame {out.first_frame}; "
            "the stream was ended. Its samples are probably far outside [-1, 1] (e.g. integer PCM sent as float, "
            "or a broken capture): scale float audio to [-1, 1]")
