"""Speaker embeddings behind one interface: every backend yields :class:`Window`s on the stream's timeline.

- ``ResemblyzerEmbedder``: resemblyzer's pretrained speaker encoder (its weights ship in its wheel), on the
  last ``window`` seconds of audio every ``hop`` seconds, in bfloat16 where the CPU has it. For a user
  without a speaker-verification
  checkpoint, and for this project's tests, it is the embedding that means something.
- WavLM x-vectors: the engine's streaming x-vectors (``StreamSettings(xvector=...)``) of a
  ``WavLMForXVector`` checkpoint such as microsoft/wavlm-base-plus-sv, taken in-process from
  ``EngineOutput``s (``windows_from_output``) or from the ``xvector`` topic (``window_from_message``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from ..audio.validate import SAMPLE_RATE
from ..engine import EngineOutput
from ..mqtt.message import EmbeddingMessage
from .window import Window

RESEMBLYZER = "resemblyzer"


@functools.cache
def _mel_basis() -> Any:
    import librosa
    import torch

    return torch.from_numpy(librosa.filters.mel(sr=16000, n_fft=400, n_mels=40)).float()


def _mel(audio: Any) -> Any:
    """resemblyzer's features (librosa's power mel spectrogram: 25 ms Hann, 10 ms hop, 40 bands) in one
    batched torch STFT instead of a librosa call per window."""
    import torch

    spec = torch.stft(torch.nn.functional.pad(audio, (200, 200)), 400, 160, window=torch.hann_window(400),
                      center=False, return_complex=True).abs().pow(2)
    return (_mel_basis() @ spec).transpose(1, 2)


@functools.cache
def _voice_encoder(dtype: str = "float32") -> Any:  # resemblyzer is untyped
    """resemblyzer's encoder in ``dtype`` (one copy per dtype, shared by every stream: it has no state)."""
    try:
        with warnings.catch_warnings():  # its webrtcvad imports pkg_resources: two lines of warning per command
            warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
            from resemblyzer import VoiceEncoder
    except ImportError as e:
        raise ValueError(f"the resemblyzer backend needs resemblyzer ({e}); pip install resemblyzer") from e
    import torch

    return VoiceEncoder("cpu", verbose=False).to(getattr(torch, dtype))


def encoder_dtype() -> str:
    """bfloat16 where the CPU multiplies it natively: the LSTM (3 layers of 256 over 160 frames per window)
    is bound by reading its weights, which bf16 halves (twice as fast, cosine 0.999 to the fp32
    embedding); float32 elsewhere."""
    from ..precision import missing

    return "bfloat16" if missing("bfloat16") is None else "float32"


class ResemblyzerEmbedder:
    """Embeds the last ``window`` seconds every ``hop`` seconds of one stream (resemblyzer: 256-d)."""

    backend = RESEMBLYZER

    def __init__(self, window: float = 1.6, hop: float = 0.5, dtype: str | None = None) -> None:
        if window < 0.5 or hop <= 0:
            raise ValueError(f"resemblyzer window ({window} s) must be >= 0.5 s and hop ({hop} s) > 0")
        self.window, self.hop = int(window * SAMPLE_RATE), int(hop * SAMPLE_RATE)
        self.dtype = dtype or encoder_dtype()
        self._encoder = _voice_encoder(self.dtype)
        self._audio = np.zeros(0, np.float32)
        self._first = 0  # stream index of ``_audio[0]``
        self._next_end = self.window

    def embed(self, segments: list[np.ndarray]) -> np.ndarray:
        """(n, 256) unit embeddings of equal-length audio segments, one batched forward."""
        import torch

        audio = torch.from_numpy(np.stack(segments).astype(np.float32))
        rms = audio.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-8)  # resemblyzer's -30 dBFS, gain only up
        audio = audio * (10 ** (-30 / 20) / rms).clamp_min(1.0)
        with torch.inference_mode():
            return self._encoder(_mel(audio).to(getattr(torch, self.dtype))).float().numpy()

    def push(self, samples: np.ndarray, select: Callable[[int, int], int | None] = lambda a, b: a) -> list[Window]:
        """Append audio (16 kHz float32); return the windows completed. ``select(start, end)`` (stream
        samples) may move a window's start later (to leave out the end of the previous turn) or decline it
        with None (mostly silence: not worth the encoder's time)."""
        self._audio = np.concatenate([self._audio, np.asarray(samples, np.float32)])
        spans = []
        while self._first + len(self._audio) >= self._next_end:
            start = select(self._next_end - self.window, self._next_end)
            if start is not None:
                spans.append((start, self._next_end))
            self._next_end += self.hop
        windows = []
        for length in sorted({b - a for a, b in spans}):  # one batched forward per window length
            group = [(a, b) for a, b in spans if b - a == length]
            vectors = self.embed([self._audio[a - self._first:b - self._first] for a, b in group])
            windows += [Window(a / SAMPLE_RATE, b / SAMPLE_RATE, v) for (a, b), v in zip(group, vectors, strict=True)]
        keep = self._next_end - self.window - self._first
        if keep > 0:
            self._audio, self._first = self._audio[keep:], self._first + keep
        return sorted(windows, key=lambda w: w.end)

    def skip(self, samples: int) -> None:
        """``samples`` more of the stream that are not analysed (a diarizer behind a live source): the clock
        moves on and no window that ends in them is embedded. What is kept is what the next window needs, with
        silence in place of the gap, so memory stays one window however long the gap."""
        end = self._first + len(self._audio) + samples
        if end >= self._next_end:
            self._next_end += ((end - self._next_end) // self.hop + 1) * self.hop
        start = max(self._first, self._next_end - self.window)
        kept = self._audio[start - self._first:]
        self._audio = np.concatenate([kept, np.zeros(end - start - len(kept), np.float32)])
        self._first = start


def windows_from_output(out: EngineOutput, window_frames: int, hop_samples: int) -> list[Window]:
    """The x-vectors of an engine output as windows; the engine's ``stream_start`` keeps them on the stream's
    timeline when it dropped audio."""
    chunk = out.chunk
    windows = []
    for end_frame, vector in chunk.xvectors:
        end = (out.stream_start + (end_frame - chunk.first_frame) * hop_samples) / SAMPLE_RATE
        windows.append(Window(max(0.0, end - window_frames * hop_samples / SAMPLE_RATE), end,
                              vector.float().numpy()))
    return windows


def window_from_message(msg: EmbeddingMessage, window_frames: int) -> Window:
    """An ``xvector`` message as a window: its ``first_frame`` is the x-vector's end frame (docs/mqtt.md)."""
    end = msg.first_frame / msg.frame_rate
    return Window(max(0.0, end - window_frames / msg.frame_rate), end, msg.data.astype(np.float32))
