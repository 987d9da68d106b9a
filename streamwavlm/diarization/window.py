"""The unit every speaker-embedding backend produces: one embedding of a stretch of a stream."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Window:
    """A speaker embedding of the audio in ``[start, end)`` seconds of a stream.

    ``vector`` is L2-normalised on construction (every comparison downstream is a cosine); ``speech`` is the
    fraction of the window that speech activity detection marked as speech and ``segment`` the index of the
    stretch of uninterrupted speech most of it lies in (-1: unknown), both filled in by the diarizer.
    """

    start: float
    end: float
    vector: np.ndarray
    speech: float = 1.0
    segment: int = -1

    def __post_init__(self) -> None:
        v = np.asarray(self.vector, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(v))
        if not np.isfinite(norm) or norm == 0.0:
            raise ValueError(f"speaker embedding of [{self.start:.2f}, {self.end:.2f}) s is zero or not finite")
        self.vector = v / norm

    @property
    def center(self) -> float:
        return 0.5 * (self.start + self.end)
