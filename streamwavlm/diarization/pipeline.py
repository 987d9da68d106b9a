"""Diarization of live streams: per-stream state, shared enrolled speakers, and the taps into the engine.

The engine hands sinks encoder frames, not audio, so the audio reaches the diarizer through
``TappedSource``: a wrapper around any ``AudioSource`` that passes every chunk on to the engine unchanged
and gives a copy to the stream's speech detector (and, with the resemblyzer backend, its embedder). With
the WavLM backend the windows come from the engine's x-vectors (``Session.sink``), and the diarizer's
clock is the end of the newest x-vector, so frames are not finalised before their windows have arrived.

Speech detection and resemblyzer are work (tens of milliseconds per second of audio) that must not hold
up the event loop that feeds the engine, so every change to a stream's diarization runs, in order, on one
``DiarizationWorker`` thread; its torch calls run single-threaded there (two small models gain nothing
from the engine's thread pool and would spin against it), and the turn events come back to the loop.

The event loop never waits on that thread. At most ``capacity`` chunks of audio (or batches of windows) wait
for it; when that many are waiting, a file source waits (asynchronously) for room, as the engine makes it
wait for its own backlog, while a live source's audio is skipped: the diarizer counts it as silence without
running its models, its clock moves on, and ``Session.skipped`` says how many seconds each stream lost.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..audio.source import AudioChunk, AudioSource, SourceStats
from ..audio.validate import SAMPLE_RATE
from ..engine import EngineOutput
from .background import Background
from .clustering import ClusterSettings, OnlineClustering, Speaker
from .diarizer import Diarizer
from .embedders import ResemblyzerEmbedder, windows_from_output
from .rttm import Segment
from .turns import TurnEvent
from .vad import FRAME, FRAME_SECONDS, VadKind, make_vad, speech_span
from .window import Window

log = logging.getLogger(__name__)

# seconds of audio taken at a time (the engine's default step, 16 frames of 20 ms): a label's final event
# comes up to one block after its latency
BLOCK = 0.32

EventHandler = Callable[[str, list[TurnEvent]], None]
Job = tuple[str, Callable[[], list[TurnEvent]]]


class DiarizationWorker:
    """A thread that runs diarization jobs in order and hands their events to ``emit`` on the event loop.

    Jobs that carry data (audio, windows) take one of ``capacity`` places until they have run: ``offer``
    refuses one when none is free and ``put`` waits for one without blocking the loop. Control jobs (the end
    of a stream) need no place, so they are never refused or delayed.
    """

    def __init__(self, emit: EventHandler, capacity: int = 256) -> None:
        self._emit = emit
        self._queue: queue.SimpleQueue[tuple[Job, bool] | None] = queue.SimpleQueue()
        self._places = threading.Semaphore(capacity)
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Event()  # set (on the loop) when a place is freed while a ``put`` waits
        self._waiting = 0
        self._error: BaseException | None = None
        self.cpu_seconds = 0.0  # thread CPU time spent in jobs
        self._threads_set = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diarization", daemon=True)
        import torch

        threads = torch.get_num_threads()
        self._thread.start()
        # torch's thread count is per thread, but setting it also changes the count that threads created
        # later start with: put that back for the engine's threads once the worker has its own
        self._threads_set.wait()
        torch.set_num_threads(threads)

    def offer(self, stream_id: str, job: Callable[[], list[TurnEvent]]) -> bool:
        """Queue a data job if a place is free; False (nothing queued) when ``capacity`` jobs are waiting."""
        if not self._places.acquire(blocking=False):
            return False
        self._queue.put(((stream_id, job), True))
        return True

    async def put(self, stream_id: str, job: Callable[[], list[TurnEvent]]) -> None:
        """Queue a data job, waiting (on the loop, not blocking it) for a free place."""
        self._waiting += 1  # before trying: a place freed after a failed try then always wakes us
        try:
            while True:
                self._room.clear()
                if self.offer(stream_id, job):
                    return
                await self._room.wait()
        finally:
            self._waiting -= 1

    def control(self, stream_id: str, job: Callable[[], list[TurnEvent]]) -> None:
        """Queue a job that takes no place (it follows every job queued before it)."""
        self._queue.put(((stream_id, job), False))

    def _run(self) -> None:
        import torch

        torch.get_num_threads()  # torch sets a thread's count on first use: before ours, not after
        torch.set_num_threads(1)  # this thread only (OpenMP's setting is per thread)
        self._threads_set.set()
        started = time.thread_time()
        while (item := self._queue.get()) is not None:
            (stream_id, job), holds_place = item
            try:
                if self._error is None:
                    events = job()
                    if events:
                        self._loop.call_soon_threadsafe(self._emit, stream_id, events)
            except BaseException as e:  # kept for ``stop`` to raise on the loop
                log.error("diarization of %s failed: %s", stream_id, e)
                self._error = e
            finally:
                if holds_place:
                    self._places.release()
                    if self._waiting:
                        self._loop.call_soon_threadsafe(self._room.set)
            self.cpu_seconds = time.thread_time() - started

    async def stop(self) -> None:
        """Run what is queued, end the thread, deliver the last events; raise a job's error."""
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        await asyncio.sleep(0)  # the events it scheduled run before we return
        if self._error is not None:
            raise self._error


class StreamDiarization:
    """One stream: speech detector, optional audio embedder, clustering and diarizer."""

    def __init__(self, stream_id: str, clustering: OnlineClustering, *, latency: float, vad: VadKind | None,
                 embedder: ResemblyzerEmbedder | None, block: float = BLOCK,
                 background: Background | None = None) -> None:
        self.stream_id = stream_id
        self.vad = make_vad(vad) if vad else None
        self.embedder = embedder
        self.diarizer = Diarizer(clustering, latency=latency, frame=FRAME_SECONDS,
                                 min_speech=clustering.settings.min_speech, background=background)
        self.block = int(block * SAMPLE_RATE)
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._samples = 0

    def _select(self, start: int, end: int) -> int | None:
        """The embedder's window choice: skip silence, leave out the previous turn (``speech_span``)."""
        if self.vad is None:
            return start
        flags, first = self.diarizer.speech_frames()
        offset = first * FRAME
        chosen = speech_span(flags, start - offset, end - offset, self.diarizer.min_speech)
        return None if chosen is None else chosen + offset

    def audio(self, samples: np.ndarray) -> list[TurnEvent]:
        """The stream's next audio (16 kHz float32, contiguous; gaps already filled with silence), taken in
        blocks of ``block`` samples (the models' cost is mostly per call, not per sample), so the result
        does not depend on how the source cut the audio."""
        self._pending.append(samples)
        self._pending_samples += len(samples)
        if self._pending_samples < self.block:
            return []
        pending = np.concatenate(self._pending)
        whole = len(pending) // self.block * self.block
        self._pending, self._pending_samples = [pending[whole:]], len(pending) - whole
        return [e for start in range(0, whole, self.block) for e in self._run(pending[start:start + self.block])]

    def skip(self, samples: int) -> list[TurnEvent]:
        """``samples`` more of the stream that were not analysed (the diarizer fell behind a live source):
        silence to the diarizer, without running its models. The audio still pending (less than a block,
        before the skipped span) is skipped with it: a block of half skipped audio is not worth a model call."""
        n = self._pending_samples + samples
        self._pending, self._pending_samples = [], 0
        self._samples += n
        if self.vad is not None:
            self.diarizer.add_speech(self.vad.skip(n))
        if self.embedder is not None:  # the embedder's clock moves on; no window over the gap is embedded
            self.embedder.skip(n)
        return self.diarizer.advance(self._samples / SAMPLE_RATE)

    def _run(self, samples: np.ndarray) -> list[TurnEvent]:
        self._samples += len(samples)
        if self.vad is not None:
            self.diarizer.add_speech(self.vad.push(samples))
        if self.embedder is None:
            return []
        events = []
        for w in self.embedder.push(samples, self._select):  # each window labels frames as soon as it ends
            self.diarizer.add_window(w)
            events += self.diarizer.advance(w.end)
        return events + self.diarizer.advance(self._samples / SAMPLE_RATE)

    def windows(self, windows: Sequence[Window]) -> list[TurnEvent]:
        """Embeddings from elsewhere (the engine's x-vectors); the newest one's end is the clock."""
        for w in windows:
            self.diarizer.add_window(w)
        return self.diarizer.advance(windows[-1].end) if windows else []

    def finish(self) -> list[TurnEvent]:
        rest = np.concatenate(self._pending) if self._pending else np.zeros(0, np.float32)
        self._pending, self._pending_samples = [], 0
        return self._run(rest) + self.diarizer.finish()


@dataclass
class Session:
    """Diarization of every stream of a run. ``backend``: ``resemblyzer`` (audio taps) or ``wavlm`` (engine
    x-vectors through ``sink``; ``xvector_window`` frames each, ``hop_samples`` per frame). Feed it through
    ``tap``, ``sink``, ``windows`` and ``close`` on the event loop; ``drain`` waits for the worker thread.
    ``finished`` keeps the final turns of the last ``keep_finished`` streams that ended."""

    backend: str = "resemblyzer"
    latency: float = 2.0
    vad: VadKind | None = "auto"
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    enrolled: Sequence[Speaker] = ()
    background: Background | None = None  # projects windows and enrolled centroids (``background.py``)
    window: float = 1.6
    hop: float = 0.5
    xvector_window: int = 150
    hop_samples: int = 320
    handlers: list[EventHandler] = field(default_factory=list)
    keep_finished: int = 1000
    capacity: int = 256  # chunks of audio (or batches of windows) that may wait for the worker
    # the session's state, read by callers but never given to the constructor
    streams: dict[str, StreamDiarization] = field(default_factory=dict, init=False)
    finished: OrderedDict[str, list[Segment]] = field(default_factory=OrderedDict, init=False)
    worker: DiarizationWorker | None = field(default=None, init=False)
    skipped: dict[str, float] = field(default_factory=dict, init=False)  # seconds of live audio not analysed
    _active: set[str] = field(default_factory=set, init=False)  # streams fed and not closed, as the loop sees them
    _behind: dict[str, int] = field(default_factory=dict, init=False)  # samples skipped, not yet told the stream

    def __post_init__(self) -> None:
        if self.backend not in ("resemblyzer", "wavlm"):
            raise ValueError(f"backend {self.backend!r} must be resemblyzer or wavlm")
        # streams start on the worker thread: a missing model is said here, and silero-vad is imported
        # here, on the caller's thread (see vad._silero_weights)
        if self.vad in ("auto", "silero"):
            make_vad(self.vad)
        if self.backend == "resemblyzer":
            ResemblyzerEmbedder(self.window, self.hop)

    def stream(self, stream_id: str) -> StreamDiarization:
        if stream_id not in self.streams:
            embedder = ResemblyzerEmbedder(self.window, self.hop) if self.backend == "resemblyzer" else None
            # profiles keep raw centroids (the mean direction of their windows); projected, they stand where
            # their windows' projections would (to the mean's first order)
            bg = self.background
            enrolled = [Speaker(s.name, bg.apply(s.centroid), s.count, True) for s in self.enrolled] if bg \
                else self.enrolled
            self.streams[stream_id] = StreamDiarization(
                stream_id, OnlineClustering(self.cluster, enrolled), latency=self.latency, vad=self.vad,
                embedder=embedder, background=self.background)
        return self.streams[stream_id]

    def emit(self, stream_id: str, events: list[TurnEvent]) -> None:
        if events:
            for handler in self.handlers:
                handler(stream_id, events)

    def _worker(self, stream_id: str) -> DiarizationWorker:
        self._active.add(stream_id)
        if self.worker is None:
            self.worker = DiarizationWorker(self.emit, self.capacity)
        return self.worker

    def tap(self, source: AudioSource, stream_id: str, *, live: bool = True) -> TappedSource:
        """``source`` for the engine, with the diarizer listening in. ``live``: when the diarizer is behind,
        skip audio (counted in ``skipped``) rather than make the source wait, as for the engine's ``add``."""
        return TappedSource(source, lambda samples: self._audio(stream_id, samples, live))

    async def _audio(self, stream_id: str, samples: np.ndarray, live: bool) -> None:
        behind = self._behind.pop(stream_id, 0)

        def job() -> list[TurnEvent]:
            stream = self.stream(stream_id)
            return (stream.skip(behind) if behind else []) + stream.audio(samples)

        worker = self._worker(stream_id)
        if not live:
            await worker.put(stream_id, job)
        elif not worker.offer(stream_id, job):
            self._behind[stream_id] = behind + len(samples)
            self.skipped[stream_id] = self.skipped.get(stream_id, 0.0) + len(samples) / SAMPLE_RATE
            if not behind:
                log.warning("diarization of %s is behind its live audio: skipping audio until it catches up",
                            stream_id)

    def windows(self, stream_id: str, windows: Sequence[Window]) -> None:
        """Embeddings from elsewhere (the ``xvector`` topic: live) for one stream; dropped (and counted in
        ``skipped``) when the diarizer is behind."""
        if not self._worker(stream_id).offer(stream_id, lambda: self.stream(stream_id).windows(windows)):
            seconds = windows[-1].end - windows[0].start if windows else 0.0
            self.skipped[stream_id] = self.skipped.get(stream_id, 0.0) + seconds

    async def sink(self, out: EngineOutput) -> None:
        """Engine sink: x-vectors become windows (WavLM backend); the final chunk ends the stream."""
        if self.backend == "wavlm" and out.chunk.xvectors:  # waits for room: the engine's own policy decides
            windows = windows_from_output(out, self.xvector_window, self.hop_samples)
            await self._worker(out.stream_id).put(out.stream_id, lambda: self.stream(out.stream_id).windows(windows))
        if out.chunk.final:
            self.close(out.stream_id)

    def close(self, stream_id: str) -> None:
        """End a stream: its remaining frames become final."""
        if stream_id in self._active:
            behind = self._behind.pop(stream_id, 0)
            self._worker(stream_id).control(stream_id, lambda: self._finish(stream_id, behind))
            self._active.discard(stream_id)

    def close_all(self) -> None:
        for stream_id in list(self._active):
            self.close(stream_id)

    def _finish(self, stream_id: str, behind: int) -> list[TurnEvent]:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return []
        events = (stream.skip(behind) if behind else []) + stream.finish()
        self.finished[stream_id] = stream.diarizer.segments()
        while len(self.finished) > self.keep_finished:
            self.finished.popitem(last=False)
        return events

    async def drain(self) -> None:
        """Wait until everything submitted has run and its events have been handled."""
        if self.worker is not None:
            worker, self.worker = self.worker, None
            await worker.stop()


class TappedSource:
    """An ``AudioSource`` that also hands each chunk's samples to ``listener`` (gaps as silence), awaiting it
    before the chunk goes on (so a listener may hold a file source back)."""

    def __init__(self, source: AudioSource, listener: Callable[[np.ndarray], Awaitable[None]]) -> None:
        self.source = source
        self.listener = listener
        self._next = 0

    @property
    def stats(self) -> SourceStats:
        return self.source.stats

    async def __aiter__(self) -> AsyncIterator[AudioChunk]:
        async for chunk in self.source:
            if chunk.start > self._next:
                await self.listener(np.zeros(chunk.start - self._next, np.float32))
            await self.listener(chunk.samples.copy())  # the source may reuse its buffer before the listener reads it
            self._next = chunk.end
            yield chunk

    async def close(self) -> None:
        await self.source.close()
