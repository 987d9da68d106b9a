"""Refuse audio the model cannot use, with a message that says what to do instead.

The model expects 16 kHz mono float samples in [-1, 1]. Integer PCM is scaled, everything else that is
wrong (another rate, several channels where one is required, NaN/Inf, an unsupported dtype) is an
:class:`AudioError` rather than a silently wrong embedding.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SAMPLE_RATE = 16000

_INT_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0, np.dtype(np.uint8): 128.0}


class AudioError(ValueError):
    """Audio that cannot be processed as given; the message says how to fix it."""


MAX_AMPLITUDE = 1000.0
"""Float samples beyond this magnitude are not audio (60 dB above full scale): integer PCM sent as float, or
a broken capture. They are refused where they enter, before they can drive the model to NaN/Inf."""


def check_samples(samples: np.ndarray, source: str, what: str = "samples", offset: int = 0) -> None:
    """Refuse NaN/Inf and samples beyond :data:`MAX_AMPLITUDE` in ``(N,)`` or ``(N, C)`` samples, saying
    where they are (frame index plus ``offset``) and what to do."""
    finite = np.isfinite(samples)
    if not finite.all():
        flat = finite.reshape(len(samples), -1).all(axis=1) if samples.ndim else finite.reshape(1)
        first = offset + int(np.flatnonzero(~flat)[0])
        raise AudioError(f"{source}: {int((~finite).sum())} NaN/Inf {what} (first at frame {first}); the "
                         "capture, file or decoder is broken. Nothing of it was processed; fix the source or "
                         "replace the bad samples.")
    peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak > MAX_AMPLITUDE:
        hint = " (it looks like 16-bit PCM sent as float: divide by 32768)" if peak <= 32768 else ""
        raise AudioError(f"{source}: {what} reach {peak:.3g}; float audio must lie in [-1, 1] (at most "
                         f"{MAX_AMPLITUDE:g} is accepted){hint}")


def to_float_mono(samples: np.ndarray | Tensor, sample_rate: int, *, source: str = "audio") -> Tensor:
    """A float32 tensor ``(N,)`` from mono samples, after checking rate, shape, dtype and values.

    ``samples`` may be ``(N,)`` or ``(N, 1)``; int16/int32/uint8 PCM is scaled to [-1, 1].
    """
    if sample_rate != SAMPLE_RATE:
        raise AudioError(f"{source}: sample rate {sample_rate} Hz; WavLM needs {SAMPLE_RATE} Hz. Resample it "
                         f"(e.g. `sox in.wav -r {SAMPLE_RATE} out.wav`) or use a source with resampling.")
    arr = samples.detach().cpu().numpy() if isinstance(samples, Tensor) else np.asarray(samples)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise AudioError(f"{source}: shape {arr.shape}; expected mono samples (N,). Mix the channels down "
                         "first (e.g. `sox in.wav -c 1 out.wav`) or select one channel.")
    if arr.dtype in _INT_SCALE:
        offset = 128.0 if arr.dtype == np.uint8 else 0.0
        arr = (arr.astype(np.float32) - offset) / _INT_SCALE[arr.dtype]
    elif arr.dtype in (np.float32, np.float64, np.float16):
        arr = arr.astype(np.float32, copy=False)
    else:
        raise AudioError(f"{source}: sample dtype {arr.dtype} is not supported; use float32 or int16 PCM")
    check_samples(arr, source)
    return torch.from_numpy(np.ascontiguousarray(arr))


PCM_FORMATS = {"s16le": np.dtype("<i2"), "f32le": np.dtype("<f4")}


def mixdown(frames: np.ndarray) -> np.ndarray:
    """Float32 mono ``(N,)`` from interleaved frames ``(N, C)`` (or ``(N,)``), by averaging the channels.

    The channels are added one after another in a fixed order, so a signal mixed in blocks is bit-identical
    to the same signal mixed at once (numpy's ``mean`` may reorder the sum depending on the array shape).
    """
    if frames.ndim == 1:
        return frames.astype(np.float32, copy=False)
    out = frames[:, 0].astype(np.float32, copy=True)
    for c in range(1, frames.shape[1]):
        out += frames[:, c]
    if frames.shape[1] > 1:
        out *= np.float32(1.0 / frames.shape[1])
    return out


def decode_pcm(data: bytes, fmt: str, channels: int, *, source: str = "audio") -> np.ndarray:
    """Float32 frames ``(N, channels)`` from raw interleaved little-endian PCM bytes.

    ``s16le`` is scaled by 1/32768 (as PortAudio and libsndfile do, so the three paths agree bit for bit);
    ``f32le`` must be finite. A byte count that is not a whole number of frames is refused rather than
    truncated: a lost byte would shift every later sample into the wrong channel or the wrong byte order.
    """
    dtype = PCM_FORMATS.get(fmt)
    if dtype is None:
        raise AudioError(f"{source}: sample format {fmt!r} is not supported; "
                         f"use one of {sorted(PCM_FORMATS)}")
    frame_bytes = dtype.itemsize * channels
    if len(data) % frame_bytes:
        raise AudioError(f"{source}: {len(data)} bytes is not a whole number of {frame_bytes}-byte frames "
                         f"({channels} channel(s) of {fmt}); send complete frames only")
    raw = np.frombuffer(data, dtype=dtype).reshape(-1, channels)
    if fmt == "s16le":
        return raw.astype(np.float32) * np.float32(1.0 / 32768.0)
    check_samples(raw, source, "f32le samples")
    return raw.astype(np.float32)
