"""What a stream remembers between steps, as typed dataclasses.

:class:`StreamTensors` holds the tensors of many streams, one row per pool slot (or one row for a saved
stream): the *front* (CNN tail, positional-conv history, normalisation moments, TDNN input cache: small,
read and rewritten each step) and the *rings* (per-layer K/V ring buffers and their absolute positions:
large, written in place a chunk at a time and read where they are). :class:`StreamProgress` holds the
per-stream counters and the x-vector window. Module objects hold weights only; a state can be created,
saved, reset and moved between pools (``StreamPool.save``/``restore``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..model.moments import Moments
from .settings import StreamSettings

EMPTY_POS = -(1 << 40)
"""Position of an empty K/V ring entry: far enough back that the left-context rule never lets a query see it."""

T = TypeVar("T")


def map_tensors(obj: T, fn: Callable[[Tensor], Tensor]) -> T:
    """A copy of a state object (dataclasses, lists, ``None``) with ``fn`` applied to every tensor in it."""
    if isinstance(obj, Tensor):
        return fn(obj)  # type: ignore[return-value]
    if isinstance(obj, list):
        return [map_tensors(x, fn) for x in obj]  # type: ignore[return-value]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(getattr(obj, f.name), fn)  # type: ignore[arg-type]
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def tensors_of(obj: Any) -> list[Tensor]:
    """Every tensor of a state object, in a fixed order (for row-wise copies between two of the same shape)."""
    found: list[Tensor] = []
    map_tensors(obj, lambda t: found.append(t) or t)
    return found


class Rows:
    """Row-wise operations shared by the state dataclasses (every tensor's first dimension is the stream)."""

    def take(self: T, rows: Tensor) -> T:
        """A copy of the given rows."""
        return map_tensors(self, lambda t: t.index_select(0, rows))

    def put(self, rows: Tensor, other: Rows) -> None:
        """Write ``other``'s rows (as many as ``rows``) into the given rows, in place."""
        for mine, theirs in zip(tensors_of(self), tensors_of(other), strict=True):
            if mine.shape[1:] != theirs.shape[1:]:
                raise ValueError(f"state of another shape: {tuple(theirs.shape)} for {tuple(mine.shape)}")
            mine.index_copy_(0, rows, theirs.to(mine.dtype))


@dataclass
class FrontState(Rows):
    """Per-stream tensors a step reads and rewrites as a whole (a few hundred KB per stream)."""

    cnn_tail: Tensor  # (N, receptive_field - hop) last input samples: the CNN re-reads them (exact)
    pos_history: Tensor  # (N, left + P, D) projected frames behind (and P ahead of) the next chunk
    wav_moments: Moments | None  # waveform normalisation statistics (Large)
    gn_moments: Moments | None  # GroupNorm statistics over conv-0 frames (Base, Base+)
    tdnn_inputs: Tensor | None  # (N, receptive_field - 1, P) last projected frames the TDNN reads behind

    def clear(self, rows: Tensor) -> None:
        for t in tensors_of(self):
            t.index_fill_(0, rows, 0)


@dataclass
class RingWrite:
    """One layer's K/V ring seen by one step: a :class:`~streamwavlm.model.attention.KVCache` that writes the
    new frames of the batch's streams at their ring entries and attends over the rings in place."""

    keys: Tensor  # (N, H, R, hd): every stream of the pool
    values: Tensor
    rows: Tensor  # (B,) the pool rows of the batch
    at: Tensor  # (B, T) ring entry of each new frame
    span: tuple[slice, slice] | None = None  # rows and entries as two runs, when they are (see KVRings.advance)

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.span is not None:  # a plain strided copy, an order of magnitude cheaper than index_put
            rows, at = self.span
            self.keys[rows, :, at].copy_(k)
            self.values[rows, :, at].copy_(v)
        else:
            self.keys[self.rows[:, None], :, self.at] = k.transpose(1, 2).to(self.keys.dtype)
            self.values[self.rows[:, None], :, self.at] = v.transpose(1, 2).to(self.values.dtype)
        return self.keys, self.values


@dataclass
class KVRings(Rows):
    """Per-layer K/V ring buffers of ``left + chunk`` frames and the absolute frame of each entry."""

    positions: Tensor  # (N, R) int64, EMPTY_POS where empty
    keys: list[Tensor]  # per layer (N, H, R, hd)
    values: list[Tensor]

    @property
    def size(self) -> int:
        return self.positions.shape[1]

    def clear(self, rows: Tensor) -> None:
        for t in [*self.keys, *self.values]:
            t.index_fill_(0, rows, 0)
        self.positions.index_fill_(0, rows, EMPTY_POS)

    def advance(self, rows: Tensor, q_pos: Tensor, runs: bool = True) -> tuple[Tensor, list[RingWrite]]:
        """Claim the ring entries of frames ``q_pos (B, T)`` of the given rows; return the rows' key
        positions ``(B, R)`` and a cache writer per layer. ``runs``: write as strided copies where the rows
        and entries are runs (found on the host: not for a CUDA graph)."""
        at = q_pos % self.size
        self.positions[rows[:, None], at] = q_pos
        span = _runs(rows, at) if runs else None
        writes = [RingWrite(k, v, rows, at, span) for k, v in zip(self.keys, self.values, strict=True)]
        return self.positions.index_select(0, rows), writes


def _runs(rows: Tensor, at: Tensor) -> tuple[slice, slice] | None:
    """``rows`` and the ring entries ``at (B, T)`` as two slices when the rows are consecutive and every row
    writes the same entries without wrapping around (one stream, or streams opened together), else ``None``."""
    b, t = at.shape
    if b == 0 or t == 0:
        return None
    r0, a0 = int(rows[0]), int(at[0, 0])
    steps = torch.arange(max(b, t), device=at.device)
    if not torch.equal(rows, steps[:b] + r0) or not bool((at == steps[:t] + a0).all()):
        return None
    return slice(r0, r0 + b), slice(a0, a0 + t)


@dataclass
class StreamTensors(Rows):
    front: FrontState
    rings: KVRings

    def clear(self, rows: Tensor) -> None:
        self.front.clear(rows)
        self.rings.clear(rows)


@dataclass
class XVectorState:
    """A stream's sliding-window x-vector state beyond the batched TDNN input cache."""

    tdnn_frames: int = 0  # TDNN frames computed so far
    next_end: int = 0  # TDNN frame count at which the next x-vector is due (0: not yet set)
    window: Tensor | None = None  # the most recent TDNN frames (at most window + chunk)


@dataclass
class StreamProgress:
    """Per-stream counters."""

    stream_id: str
    started: bool = False  # first step (with its lookahead and the CNN's extra window) done
    samples: int = 0  # samples consumed: the clock of the frozen statistics policy
    frames_out: int = 0  # encoder frames emitted (= the next chunk's first frame)
    xvector: XVectorState = field(default_factory=XVectorState)


@dataclass
class StreamState:
    """One stream's complete state, detached from any pool (save/restore, reset, migration)."""

    settings: StreamSettings
    progress: StreamProgress
    tensors: StreamTensors  # one row
