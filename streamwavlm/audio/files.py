"""Sound files (WAV, FLAC, OGG and whatever else libsndfile reads) as streams of 16 kHz mono chunks.

A file is read block by block, mixed down and resampled with the same streaming resampler as live input,
so a file streamed in blocks gives exactly the samples of :func:`load_audio` on the whole file. With
``realtime=True`` chunks are released no faster than the audio plays, which makes a file a stand-in for a
live source; without it files are processed as fast as the consumer takes them, and a progress bar
(or callback) shows how far a long file has got.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from streamwavlm.audio.resample import Resampler, output_length, resample
from streamwavlm.audio.source import AudioChunk, Blocker, SourceStats
from streamwavlm.audio.validate import SAMPLE_RATE, AudioError, check_samples, mixdown

ProgressCallback = Callable[[int, int], object]
"""Called with (input frames read so far, total input frames of the file)."""


def _open(path: str | Path) -> sf.SoundFile:
    if not Path(path).exists():  # libsndfile would only say "System error"
        raise AudioError(f"{path}: no such file; check the path")
    try:
        return sf.SoundFile(str(path))
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"{path}: cannot read audio ({e}); is it a WAV/FLAC/OGG file?") from e


def load_audio(path: str | Path, *, min_samples: int = 0) -> np.ndarray:
    """A whole file as float32 mono 16 kHz: channels averaged, resampled at once.

    The one loader of whole files (``run``, ``fidelity``, ``embed``, and the offline reference of
    :class:`FileSource`), so every command accepts what ``stream`` accepts: any format libsndfile reads, any
    rate, any channel count. ``min_samples``: refuse shorter audio (at 16 kHz) with an :class:`AudioError`,
    e.g. the model's receptive field, below which it makes no frame at all.
    """
    with _open(path) as f:
        data = f.read(dtype="float32", always_2d=True)
        rate = f.samplerate
    check_samples(data, str(path))
    samples = resample(mixdown(data), rate)
    if len(samples) < min_samples:
        raise AudioError(f"{path}: {len(samples)} samples at {SAMPLE_RATE} Hz ({len(samples) / SAMPLE_RATE * 1000:.0f}"
                         f" ms) is too short: the model needs at least {min_samples} ({min_samples / 16:.0f} ms)")
    return samples


def audio_length(path: str | Path) -> int:
    """The number of 16 kHz samples :func:`load_audio` gives for ``path``, from its header alone."""
    with _open(path) as f:
        return output_length(f.frames, f.samplerate)


def audio_extensions() -> frozenset[str]:
    """File name extensions of the formats libsndfile reads here (``.wav``, ``.flac``, ``.ogg``, ...)."""
    return frozenset(f".{name.lower()}" for name in sf.available_formats()) | {".oga", ".opus", ".aif"}


def audio_files(paths: list[str | Path]) -> list[tuple[Path, Path]]:
    """Expand files and directories (recursively, sorted) into ``(file, name)`` pairs; ``name`` is the path
    under the directory given (or the file name), for naming outputs. A missing path is an :class:`AudioError`."""
    found: list[tuple[Path, Path]] = []
    extensions = audio_extensions()
    for given in map(Path, paths):
        if given.is_dir():
            found += [(p, p.relative_to(given)) for p in sorted(given.rglob("*"))
                      if p.is_file() and p.suffix.lower() in extensions]
        elif given.is_file():
            found.append((given, Path(given.name)))
        else:
            raise AudioError(f"{given}: no such file or directory")
    return found


class FileSource:
    """A sound file as an :class:`~streamwavlm.audio.source.AudioSource` of ``block``-sample chunks.

    ``realtime``: release each chunk when its last sample would have been heard (a 10 s file takes 10 s).
    ``progress``: ``True`` for a rich progress bar on the terminal, or a callback ``(done, total)`` in
    input frames. The last chunk may be shorter than ``block``. A chunk's ``arrival`` is when it was
    released (after pacing).
    """

    def __init__(self, path: str | Path, *, stream_id: str | None = None, block: int = 1600,
                 realtime: bool = False, progress: bool | ProgressCallback = False) -> None:
        if block <= 0:
            raise ValueError(f"block must be a positive number of 16 kHz samples, got {block}")
        self.path = Path(path)
        self.stream_id = stream_id if stream_id is not None else self.path.stem
        self.block, self.realtime = block, realtime
        self._progress_arg = progress
        self._file: sf.SoundFile | None = None
        self._resampler: Resampler | None = None
        self._blocker = Blocker(block)
        self._ready: deque[tuple[np.ndarray, int]] = deque()  # (16 kHz samples, start), cut but not yielded
        self._stats = SourceStats()
        self._t0: float | None = None
        self._bar: Any = None
        self._report: ProgressCallback | None = None
        self._ended = False
        self._reading = False

    @property
    def stats(self) -> SourceStats:
        return self._stats

    @property
    def duration(self) -> float:
        """Length of the file in seconds (opens it if needed)."""
        f = self._ensure_open()
        return f.frames / f.samplerate

    def _ensure_open(self) -> sf.SoundFile:
        if self._file is None:
            self._file = _open(self.path)
            self._resampler = Resampler(self._file.samplerate)
            self._stats.input_rate = self._file.samplerate
        return self._file

    def _start_progress(self, total: int) -> None:
        if callable(self._progress_arg):
            self._report = self._progress_arg
        elif self._progress_arg:
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._bar.start()
            task = self._bar.add_task(self.path.name, total=total)
            self._report = lambda done, _total: self._bar.update(task, completed=done)

    def __aiter__(self) -> FileSource:
        return self

    async def __anext__(self) -> AudioChunk:
        while not self._ready:
            if self._ended:
                raise StopAsyncIteration
            await self._fill()
        samples, start = self._ready[0]
        if self.realtime:
            assert self._t0 is not None
            delay = self._t0 + (start + len(samples)) / SAMPLE_RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        self._ready.popleft()
        self._stats.samples_out += len(samples)
        return AudioChunk(self.stream_id, samples, start, time.monotonic())

    async def _fill(self) -> None:
        """Read about one block of the file (in a worker thread: decoding may take a while)."""
        f = self._ensure_open()
        resampler = self._resampler
        assert resampler is not None
        if self._t0 is None:
            self._t0 = time.monotonic()
            self._start_progress(f.frames)
        at = self._stats.samples_in
        self._reading = True
        try:
            frames = await asyncio.to_thread(f.read, math.ceil(self.block * f.samplerate / SAMPLE_RATE),
                                             dtype="float32", always_2d=True)
        finally:
            self._reading = False
        if self._ended:  # closed while the worker thread was reading
            await self.close()
            return
        try:
            check_samples(frames, str(self.path), offset=at)
        except AudioError as e:
            self._stats.error(str(e))
            await self.close()
            raise
        self._stats.samples_in += len(frames)
        if self._report is not None:
            self._report(self._stats.samples_in, f.frames)
        start = resampler.output_index
        self._ready.extend(self._blocker.push(resampler.process(mixdown(frames)), start))
        if len(frames) == 0:
            start = resampler.output_index
            self._ready.extend(self._blocker.push(resampler.flush(), start) + self._blocker.flush())
            await self.close()

    async def close(self) -> None:
        """Stop reading: close the file and the progress bar; chunks already cut are still delivered."""
        self._ended = True
        if self._file is not None and not self._reading:  # else _fill closes it when the read returns
            self._file.close()
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
