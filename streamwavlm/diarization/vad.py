"""Speech activity, causally, in 32 ms frames (512 samples at 16 kHz: silero-vad's fixed chunk).

``SileroVad`` runs silero-vad's recurrent model (its state carries across chunks, so the result is the
same, to float rounding, however the audio is split) on all the frames of a chunk at once: the network's
front end (STFT and four convolutions) sees each frame with the 64 samples before it and nothing else, so
a chunk's frames go through it as one batch, and only its LSTM cell steps frame by frame. silero's own
wrapper is called once per 32 ms frame through TorchScript, which costs two to five times the CPU
(per-call overhead; the tests hold the scores equal to its own). ``EnergyVad`` is the fallback when silero-vad is not
installed: frame energy against a tracked noise floor. Both turn a per-frame score into decisions with
hysteresis (a higher threshold to start speech than to continue it) and a hangover of a few frames
(64-96 ms: longer ones mark silence between turns as speech), so that the shortest pauses inside a
sentence do not split a stretch of speech.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

FRAME = 512  # samples per decision at 16 kHz
FRAME_SECONDS = FRAME / 16000


class _Hysteresis:
    def __init__(self, onset: float, offset: float, hangover: int) -> None:
        self.onset, self.offset, self.hangover = onset, offset, hangover
        self._speaking = False
        self._quiet = 0

    def reset(self) -> None:
        self._speaking, self._quiet = False, 0

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

    def _scores(self, frames: np.ndarray) -> np.ndarray:
        """Scores of consecutive ``(n, FRAME)`` frames."""
        raise NotImplementedError

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Decisions for the frames completed by ``samples`` (float32, 16 kHz mono)."""
        self._buffer = np.concatenate([self._buffer, np.asarray(samples, np.float32)])
        n = len(self._buffer) // FRAME
        frames, self._buffer = self._buffer[: n * FRAME].reshape(n, FRAME), self._buffer[n * FRAME:]
        if not n:
            return np.zeros(0, bool)
        return np.array([self._decide(float(score)) for score in self._scores(frames)], bool)

    def skip(self, samples: int) -> np.ndarray:
        """Non-speech decisions for the frames completed by ``samples`` that are not analysed (a diarizer
        behind a live stream skips them); the detector then starts again as after silence."""
        total = len(self._buffer) + samples
        n = total // FRAME
        self._buffer = np.zeros(total - n * FRAME, np.float32)
        self._decide.reset()
        self._restart()
        return np.zeros(n, bool)

    def _restart(self) -> None:
        """Forget the audio before a skipped span (model state that follows the signal)."""


CONTEXT = 64  # samples of the previous frame silero's 16 kHz network sees before each frame


class SileroVad(_FrameVad):
    """silero-vad's model (bundled in its wheel, runs offline); one instance per stream (it has state)."""

    def __init__(self, onset: float = 0.5, offset: float = 0.35, hangover: int = 2) -> None:
        super().__init__(onset, offset, hangover)
        import torch

        self._torch = torch
        self._weights, self._basis = _silero_weights()
        self._restart()

    def _restart(self) -> None:
        torch = self._torch
        self._context = torch.zeros(CONTEXT)
        self._state = (torch.zeros(1, 128), torch.zeros(1, 128))

    def _scores(self, frames: np.ndarray) -> np.ndarray:
        torch, w = self._torch, self._weights
        f = torch.nn.functional
        with torch.inference_mode():
            x = torch.from_numpy(frames)
            context = torch.cat([self._context[None], x[:-1, -CONTEXT:]])
            self._context = x[-1, -CONTEXT:].clone()
            spec = f.conv1d(f.pad(torch.cat([context, x], 1)[:, None], (0, CONTEXT), mode="reflect"), self._basis,
                            stride=128)
            h = (spec[:, :129] ** 2 + spec[:, 129:] ** 2).sqrt()
            for i, stride in enumerate((1, 2, 2, 1)):
                h = f.relu(f.conv1d(h, w[f"encoder.{i}.reparam_conv.weight"], w[f"encoder.{i}.reparam_conv.bias"],
                                    stride=stride, padding=1))
            (hc, cc), hidden = self._state, []
            for step in h[:, :, 0]:
                hc, cc = torch.lstm_cell(step[None], (hc, cc), w["decoder.rnn.weight_ih"], w["decoder.rnn.weight_hh"],
                                         w["decoder.rnn.bias_ih"], w["decoder.rnn.bias_hh"])
                hidden.append(hc)
            self._state = (hc, cc)
            out = f.conv1d(f.relu(torch.cat(hidden))[:, :, None], w["decoder.decoder.2.weight"],
                           w["decoder.decoder.2.bias"])
            return torch.sigmoid(out).reshape(-1).numpy()


@functools.cache
def _silero_weights() -> tuple[dict[str, Any], Any]:
    """The 16 kHz network's parameters and STFT basis, from the TorchScript model in silero-vad's wheel.
    Importing silero-vad sets torch's thread count to 1 (for this thread and every thread started later,
    the engine's included): the count is put back."""
    import torch

    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad

    torch.set_num_threads(threads)
    net = load_silero_vad()._model
    return {name: p.detach() for name, p in net.named_parameters()}, net.stft.forward_basis_buffer


class EnergyVad(_FrameVad):
    """Frame energy in dB over a noise floor that follows quiet stretches quickly and loud ones slowly."""

    def __init__(self, margin_db: float = 12.0, floor_db: float = -60.0, hangover: int = 3) -> None:
        super().__init__(margin_db, margin_db - 4.0, hangover)
        self._noise = floor_db
        self._floor = floor_db

    def _scores(self, frames: np.ndarray) -> np.ndarray:
        levels = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
        out = np.empty(len(levels))
        for i, level in enumerate(levels):
            rate = 0.3 if level < self._noise else 0.002  # falls fast, rises slowly under speech
            self._noise = max(self._floor, self._noise + rate * (level - self._noise))
            out[i] = level - self._noise
        return out


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


def frames_of(start: float, end: float, frame: float = FRAME_SECONDS) -> tuple[int, int]:
    """The frames ``[a, b)`` that the stretch ``[start, end)`` seconds overlaps: the one place where a
    window's speech is measured (a frame partly inside counts)."""
    return int(start / frame + 1e-9), max(int(np.ceil(end / frame - 1e-9)), 1)


def speech_fraction(flags: np.ndarray, start: float, end: float) -> float:
    """The share of speech in ``[start, end)`` seconds, from the VAD ``flags`` of the stream's frames from
    frame 0 (0 where none are known)."""
    a, b = frames_of(start, end)
    span = flags[a:b]
    return float(span.mean()) if len(span) else 0.0


def speech_span(flags: np.ndarray, start: int, end: int, min_speech: float, min_tail: float = 0.5) -> int | None:
    """Where a window over samples ``[start, end)`` should begin, given the VAD ``flags`` of the stream's
    frames from frame 0: None when less than ``min_speech`` of it is speech; after its last pause when the
    speech since that pause lasts at least ``min_tail`` seconds (the window would otherwise mix the end of
    the previous turn into the new one); else ``start``."""
    if speech_fraction(flags, start / 16000, end / 16000) < min_speech:
        return None
    a, b = frames_of(start / 16000, end / 16000)
    span = flags[a:b]
    pauses = np.flatnonzero(~span)
    if len(pauses) and (len(span) - 1 - pauses[-1]) * FRAME_SECONDS >= min_tail and span[: pauses[-1]].any():
        return (a + int(pauses[-1]) + 1) * FRAME
    return start
