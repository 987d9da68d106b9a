"""The input level of a source, measured on its way to the engine (for ``stream --listen`` and the demos).

A wrapper rather than a feature of every source: the level is a view for a person watching, computed on
chunks the source already made, so no source needs to know about it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import numpy as np

from streamwavlm.audio.source import AudioChunk, AudioSource, SourceStats, refuse

FLOOR_DB = -120.0
METER = " ▁▂▃▄▅▆▇█"


def level_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale (a full-scale sine is -3 dBFS); silence is ``FLOOR_DB``."""
    if len(samples) == 0:
        return FLOOR_DB
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return max(20 * np.log10(rms), FLOOR_DB) if rms > 0 else FLOOR_DB


def meter(db: float, width: int = 8, floor: float = -60.0) -> str:
    """A bar of ``width`` cells for a level between ``floor`` and 0 dBFS."""
    fill = min(max((db - floor) / -floor, 0.0), 1.0) * width
    whole = int(fill)
    part = METER[round((fill - whole) * (len(METER) - 1))] if whole < width else ""
    return (METER[-1] * whole + part).ljust(width)


class Metered:
    """An :class:`AudioSource` that reports each chunk's level to ``on_level(stream_id, dBFS)`` and passes
    the chunk on unchanged."""

    def __init__(self, source: AudioSource, on_level: Callable[[str, float], object]) -> None:
        self.source, self.on_level = source, on_level

    @property
    def stats(self) -> SourceStats:
        return self.source.stats

    async def _chunks(self) -> AsyncIterator[AudioChunk]:
        async for chunk in self.source:
            self.on_level(chunk.stream_id, level_dbfs(chunk.samples))
            yield chunk

    def __aiter__(self) -> AsyncIterator[AudioChunk]:
        return self._chunks()

    async def close(self) -> None:
        await self.source.close()

    async def refuse(self, code: str, message: str) -> None:
        await refuse(self.source, code, message)
