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
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise AudioError(f"{source}: {bad} NaN/Inf samples; the capture or decoder is broken. Nothing was "
                         "processed; fix the source or replace the bad samples.")
    return torch.from_numpy(np.ascontiguousarray(arr))


def read_wav(path: str, *, mixdown: bool = True) -> Tensor:
    """Read a sound file at 16 kHz as float32 mono (channels averaged when ``mixdown``)."""
    import soundfile as sf

    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"{path}: cannot read audio ({e}); is it a WAV/FLAC/OGG file?") from e
    if data.shape[1] > 1 and mixdown:
        data = data.mean(axis=1, keepdims=True)
    return to_float_mono(data, rate, source=path)
