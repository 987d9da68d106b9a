"""Offline, batched embedding of whole files or arrays: ``streamwavlm.embed(...)`` and ``streamwavlm embed``.

Offline on purpose: for files that already exist, the whole-utterance forward is the reference the
streaming encoder is measured against, and it needs no chunking settings. Files are sorted by length and
run in padded batches (``model(wav, lengths)``), so little compute goes to padding. One exception keeps the
outputs equal to a forward over each file alone: the GroupNorm front end of Base and Base+ normalises over
the whole input, padding included (as in transformers), so for those models only files of equal length share
a batch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .audio.files import audio_files, audio_length, load_audio
from .audio.resample import resample
from .audio.validate import SAMPLE_RATE, AudioError, to_float_mono
from .model.wavlm import WavLM

DEFAULT_MODEL = "wavlm-base-plus"
AudioInput = str | os.PathLike[str] | np.ndarray | Tensor


@dataclass(frozen=True)
class Embedding:
    """The embeddings of one file or array.

    ``hidden_states[k]`` is hidden state ``layers[k]`` (``(frames, dim)``, float32, on the CPU), with the
    convention of the streaming outputs: layer ``L`` is the model's ``last_hidden_state`` (final LayerNorm of
    pre-LN models included), the others ``hidden_states[i]``. Frame ``t`` starts at ``t / frame_rate``
    seconds and covers the model's 25 ms receptive field. ``xvector``: the 512-d speaker embedding, when asked.
    """

    source: str
    layers: tuple[int, ...]
    hidden_states: Tensor
    frame_rate: float
    xvector: Tensor | None = None

    @property
    def frames(self) -> int:
        return self.hidden_states.shape[1]

    def times(self) -> Tensor:
        """Start time in seconds of every frame."""
        return torch.arange(self.frames, dtype=torch.float64) / self.frame_rate


@dataclass(frozen=True)
class Item:
    """One input, loaded only when its batch runs (a long list of files is not held in memory at once)."""

    source: str
    length: int  # samples at 16 kHz
    load: Callable[[], np.ndarray]  # float32 mono 16 kHz


def file_item(path: Path, min_samples: int) -> Item:
    """A file as an :class:`Item`; its header is read now, so an unreadable or too short file fails before
    any compute."""
    length = audio_length(path)
    if length < min_samples:
        load_audio(path, min_samples=min_samples)  # raises the loader's own "too short" error
    return Item(str(path), length, lambda: load_audio(path))


def array_item(x: np.ndarray | Tensor, sample_rate: int, name: str, min_samples: int) -> Item:
    # checked and scaled (int16 PCM, NaN/Inf, shape) at its own rate, then resampled
    samples = to_float_mono(x, SAMPLE_RATE, source=name).numpy()
    if sample_rate != SAMPLE_RATE:
        samples = resample(samples, sample_rate)
    if len(samples) < min_samples:
        raise AudioError(f"{name}: {len(samples)} samples is too short: the model needs at least {min_samples} "
                         f"at {SAMPLE_RATE} Hz")
    return Item(name, len(samples), lambda: samples)


@functools.lru_cache(maxsize=2)
def _named_model(name: str, device: str) -> WavLM:
    """Models by name, loaded once per process: repeated ``embed`` calls do not reload them."""
    from .checkpoint import load_model

    return load_model(name, device=device)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``); ``None`` picks CUDA when available. CUDA without a GPU is an error
    that says so, not a traceback from deep inside torch."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is available to this torch ({torch.__version__}); "
                         "use --device cpu")
    return dev


def _items(audio: AudioInput | Sequence[AudioInput], sample_rate: int, min_samples: int) -> list[Item]:
    inputs = list(audio) if isinstance(audio, (list, tuple)) else [audio]
    items: list[Item] = []
    for i, x in enumerate(inputs):
        if isinstance(x, (str, os.PathLike)):
            items += [file_item(path, min_samples) for path, _ in audio_files([x])]
        else:
            items.append(array_item(x, sample_rate, f"array {i}", min_samples))
    return items


def batches(lengths: Sequence[int], batch_size: int, equal_lengths_only: bool) -> Iterator[list[int]]:
    """Indices grouped into batches of at most ``batch_size``, shortest first; with ``equal_lengths_only``
    a batch never mixes lengths (no padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) == batch_size or (equal_lengths_only and lengths[i] != lengths[batch[0]])):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def check_request(model: WavLM, layers: Sequence[int] | None, xvector: bool, batch_size: int) -> tuple[int, ...]:
    """Refuse what this model cannot give, before any audio is read; returns the layers to emit."""
    chosen = tuple(layers) if layers else (model.cfg.num_layers,)
    bad = [i for i in chosen if not 0 <= i <= model.cfg.num_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{model.cfg.num_layers}")
    if xvector and model.xvector is None:
        raise ValueError("x-vectors need a checkpoint with a speaker head, e.g. wavlm-base-plus-sv")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return chosen


def embed_items(model: WavLM, items: Sequence[Item], *, layers: Sequence[int] | None = None,
                xvector: bool = False, batch_size: int = 8,
                on_batch: Callable[[int], object] | None = None) -> list[Embedding]:
    """Embed loaded audio in padded batches; results in the order of ``items``. ``on_batch(samples)`` is
    called after each batch (progress)."""
    cfg = model.cfg
    chosen = check_request(model, layers, xvector, batch_size)
    device = next(model.parameters()).device
    results: list[Embedding | None] = [None] * len(items)
    lengths = [item.length for item in items]
    with torch.inference_mode():
        for batch in batches(lengths, batch_size, equal_lengths_only=model.frontend.group_norm):
            n = torch.tensor([lengths[i] for i in batch])
            wav = torch.zeros(len(batch), int(n.max()))
            for row, i in enumerate(batch):
                wav[row, : lengths[i]] = torch.from_numpy(items[i].load())
            out = model(wav.to(device), n.to(device) if len(batch) > 1 else None)
            states = out.layers("hf4")
            vectors = model.xvector_embedding(out).float().cpu() if xvector else None
            for row, i in enumerate(batch):
                t = int(out.frame_lengths[row])
                hidden = torch.stack([states[k][row, :t] for k in chosen]).float().cpu()
                results[i] = Embedding(items[i].source, chosen, hidden, SAMPLE_RATE / cfg.hop,
                                       vectors[row] if vectors is not None else None)
            if on_batch is not None:
                on_batch(int(n.sum()))
    return results  # type: ignore[return-value]


def embed(audio: AudioInput | Sequence[AudioInput], model: str | os.PathLike[str] | WavLM = DEFAULT_MODEL, *,
          layers: Sequence[int] | None = None, xvector: bool = False, device: str | torch.device | None = None,
          sample_rate: int = SAMPLE_RATE, batch_size: int = 8) -> Embedding | list[Embedding]:
    """Embeddings of audio files, directories of them, or arrays, with the offline model.

    ``audio``: a path (file of any format, rate and channel count libsndfile reads; or a directory, searched
    recursively), a mono array or tensor (float, or int16 PCM) at ``sample_rate``, or a list of these.
    ``model``: a loaded :class:`WavLM` (used on its own device unless ``device`` is given), or a checkpoint
    path or model name (``wavlm-base-plus``, ``microsoft/wavlm-base-plus``), downloaded once and kept
    loaded. ``device``: ``cpu``, ``cuda``; default CUDA when available. Returns one :class:`Embedding` for a
    single file or array, else a list.
    """
    if isinstance(model, WavLM):
        net = model if device is None else model.to(resolve_device(device))
    else:
        net = _named_model(str(model), str(resolve_device(device)))
    items = _items(audio, sample_rate, net.cfg.receptive_field)
    if not items:
        raise AudioError(f"{audio}: no audio files found")
    results = embed_items(net, items, layers=layers, xvector=xvector, batch_size=batch_size)
    single = not isinstance(audio, (list, tuple)) and not (isinstance(audio, (str, os.PathLike))
                                                           and Path(audio).is_dir())
    return results[0] if single else results
