"""Diarization of live streams: per-stream state, shared enrolled speakers, and the taps into the engine.

The engine hands sinks encoder frames, not audio, so the audio reaches the diarizer through
``TappedSource``: a wrapper around any ``AudioSource`` that passes every chunk on to the engine unchanged
and gives a copy to the stream's speech detector (and, with the resemblyzer backend, its embedder). With
the WavLM backend the windows come from the engine's x-vectors (``Session.sink``), and the diarizer's
clock is the end of the newest x-vector, so frames are not finalised before their windows have arrived.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..audio.source import AudioChunk, AudioSource, SourceStats
from ..audio.validate import SAMPLE_RATE
from ..engine import EngineOutput
from .clustering import ClusterSettings, OnlineClustering, Speaker
from .diarizer import Diarizer
from .embedders import ResemblyzerEmbedder, windows_from_output
from .turns import TurnEvent
from .vad import FRAME, FRAME_SECONDS, VadKind, make_vad, speech_span
from .window import Window

EventHandler = Callable[[str, list[TurnEvent]], None]


class StreamDiarization:
    """One stream: speech detector, optional audio embedder, clustering and diarizer."""

    def __init__(self, stream_id: str, clustering: OnlineClustering, *, latency: float, vad: VadKind | None,
                 embedder: ResemblyzerEmbedder | None) -> None:
        self.stream_id = stream_id
        self.vad = make_vad(vad) if vad else None
        self.embedder = embedder
        self.diarizer = Diarizer(clustering, latency=latency, frame=FRAME_SECONDS,
                                 min_speech=clustering.settings.min_speech)
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
        """The stream's next audio (16 kHz float32, contiguous; gaps already filled with silence)."""
        self._samples += len(samples)
        if self.vad is not None:
            self.diarizer.add_speech(self.vad.push(samples))
        if self.embedder is None:
            return []
        for w in self.embedder.push(samples, self._select):
            self.diarizer.add_window(w)
        return self.diarizer.advance(self._samples / SAMPLE_RATE)

    def windows(self, windows: Sequence[Window]) -> list[TurnEvent]:
        """Embeddings from elsewhere (the engine's x-vectors); the newest one's end is the clock."""
        for w in windows:
            self.diarizer.add_window(w)
        return self.diarizer.advance(windows[-1].end) if windows else []

    def finish(self) -> list[TurnEvent]:
        return self.diarizer.finish()


@dataclass
class Session:
    """Diarization of every stream of a run. ``backend``: ``resemblyzer`` (audio taps) or ``wavlm`` (engine
    x-vectors through ``sink``; ``xvector_window`` frames each, ``hop_samples`` per frame)."""

    backend: str = "resemblyzer"
    latency: float = 2.0
    vad: VadKind | None = "auto"
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    enrolled: Sequence[Speaker] = ()
    window: float = 1.6
    hop: float = 0.5
    xvector_window: int = 150
    hop_samples: int = 320
    handlers: list[EventHandler] = field(default_factory=list)
    streams: dict[str, StreamDiarization] = field(default_factory=dict)
    finished: dict[str, StreamDiarization] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in ("resemblyzer", "wavlm"):
            raise ValueError(f"backend {self.backend!r} must be resemblyzer or wavlm")

    def stream(self, stream_id: str) -> StreamDiarization:
        if stream_id not in self.streams:
            embedder = ResemblyzerEmbedder(self.window, self.hop) if self.backend == "resemblyzer" else None
            self.streams[stream_id] = StreamDiarization(
                stream_id, OnlineClustering(self.cluster, self.enrolled), latency=self.latency, vad=self.vad,
                embedder=embedder)
        return self.streams[stream_id]

    def emit(self, stream_id: str, events: list[TurnEvent]) -> None:
        if events:
            for handler in self.handlers:
                handler(stream_id, events)

    def tap(self, source: AudioSource, stream_id: str) -> TappedSource:
        """``source`` for the engine, with the diarizer listening in."""
        self.stream(stream_id)
        return TappedSource(source, lambda samples: self.emit(stream_id, self.stream(stream_id).audio(samples)))

    async def sink(self, out: EngineOutput) -> None:
        """Engine sink: x-vectors become windows (WavLM backend); the final chunk ends the stream."""
        if self.backend == "wavlm" and out.chunk.xvectors:
            windows = windows_from_output(out, self.xvector_window, self.hop_samples)
            self.emit(out.stream_id, self.stream(out.stream_id).windows(windows))
        if out.chunk.final:
            self.close(out.stream_id)

    def close(self, stream_id: str) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self.emit(stream_id, stream.finish())
            self.finished[stream_id] = stream


class TappedSource:
    """An ``AudioSource`` that also hands each chunk's samples to ``listener`` (gaps as silence)."""

    def __init__(self, source: AudioSource, listener: Callable[[np.ndarray], None]) -> None:
        self.source = source
        self.listener = listener
        self._next = 0

    @property
    def stats(self) -> SourceStats:
        return self.source.stats

    async def __aiter__(self) -> AsyncIterator[AudioChunk]:
        async for chunk in self.source:
            if chunk.start > self._next:
                self.listener(np.zeros(chunk.start - self._next, np.float32))
            self.listener(chunk.samples)
            self._next = chunk.end
            yield chunk

    async def close(self) -> None:
        await self.source.close()
