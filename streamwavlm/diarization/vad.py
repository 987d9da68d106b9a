"""Speech activity, causally, in 32 ms frames (512 samples at 16 kHz: silero-vad's fixed chunk).

``SileroVad`` runs silero-vad's recurrent model chunk by chunk (its state carries across chunks, so the
result is the same however the audio is split). ``EnergyVad`` is the fallback when silero-vad is not
installed: frame energy against a tracked noise floor. Both turn a per-frame score into decisions with
hysteresis (a higher threshold to start speech than to continue it) and a hangover of a few frames
(64-96 ms: longer ones mark silence between turns as speech), so that the shortest pauses inside a
sentence do not split a stretch of speech.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

FRAME = 512  # samples per decision at 16 kHz
FRAME_SECONDS = FRAME / 16000


class _Hysteresis:
    def __init__(self, onset: float, offset: float, hangover: int) -> None:
        self.onset, self.offset, self.hangover = onset, offset, hangover
        self._speaking = False
        self._quiet = 0

    def __call__(self, score: float) -> bool:
        if score >= self.onset or (self._speaking and score >= self.offset):
            self._speaking, self._quiet = True, 0
        elif self._speaking:
            self._quiet += 1
            self._speaking = self._quiet <= self.hangover
        return self._speaking


class _FrameVad:
    """Buffers audio into frames and decides each; subclasses give ``_score`` (higher: more speech)."""

    def __init__(self, onset: float, offset: float, hangover: int) -> None:
        self._decide = _Hysteresis(onset, offset, hangover)
        self._buffer = np.zeros(0, np.float32)

    def _score(self, frame: np.ndarray) -> float:
        raise NotImplementedError

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Decisions for the frames completed by ``samples`` (float32, 16 kHz mono)."""
        self._buffer = np.concatenate([self._buffer, np.asarray(samples, np.float32)])
        n = len(self._buffer) // FRAME
        frames, self._buffer = self._buffer[: n * FRAME].reshape(n, FRAME), self._buffer[n * FRAME:]
        return np.array([self._decide(self._score(f)) for f in frames], bool)


class SileroVad(_FrameVad):
    """silero-vad's model (bundled in its wheel, runs offline); one instance per stream (it has state)."""

    def __init__(self, onset: float = 0.5, offset: float = 0.35, hangover: int = 2) -> None:
        super().__init__(onset, offset, hangover)
        import torch
        from silero_vad import load_silero_vad

        self._torch = torch
        self._model = load_silero_vad()

    def _score(self, frame: np.ndarray) -> float:
        with self._torch.inference_mode():
            return float(self._model(self._torch.from_numpy(frame), 16000))


class EnergyVad(_FrameVad):
    """Frame energy in dB over a noise floor that follows quiet stretches quickly and loud ones slowly."""

    def __init__(self, margin_db: float = 12.0, floor_db: float = -60.0, hangover: int = 3) -> None:
        super().__init__(margin_db, margin_db - 4.0, hangover)
        self._noise = floor_db
        self._floor = floor_db

    def _score(self, frame: np.ndarray) -> float:
        level = 10 * np.log10(float(np.mean(frame.astype(np.float64) ** 2)) + 1e-12)
        rate = 0.3 if level < self._noise else 0.002  # falls fast, rises slowly under speech
        self._noise = max(self._floor, self._noise + rate * (level - self._noise))
        return level - self._noise


VadKind = Literal["auto", "silero", "energy"]


def make_vad(kind: VadKind = "auto") -> SileroVad | EnergyVad:
    """``auto``: silero-vad when it is installed, else the energy detector (logged)."""
    if kind == "energy":
        return EnergyVad()
    try:
        return SileroVad()
    except ImportError as e:
        if kind == "silero":
            raise ValueError(f"silero-vad is not installed ({e}); pip install silero-vad, or use --vad energy") from e
        log.warning("silero-vad is not installed (%s); using the energy speech detector", e)
        return EnergyVad()


def speech_span(flags: np.ndarray, start: int, end: int, min_speech: float, min_tail: float = 0.5) -> int | None:
    """Where a window over samples ``[start, end)`` should begin, given the VAD ``flags`` of the stream's
    frames from frame 0: None when less than ``min_speech`` of it is speech; after its last pause when the
    speech since that pause lasts at least ``min_tail`` seconds (the window would otherwise mix the end of
    the previous turn into the new one); else ``start``."""
    a, b = start // FRAME, end // FRAME
    span = flags[a:b]
    if not len(span) or span.mean() < min_speech:
        return None
    pauses = np.flatnonzero(~span)
    if len(pauses) and (len(span) - 1 - pauses[-1]) * FRAME_SECONDS >= min_tail and span[: pauses[-1]].any():
        return (a + int(pauses[-1]) + 1) * FRAME
    return start
