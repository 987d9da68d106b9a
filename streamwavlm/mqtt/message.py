"""The data types that travel on MQTT: one embedding chunk, a sequence gap, a status report.

They are plain dataclasses so that the engine, the wire format and the subscriber agree on one shape and
nothing else needs to be imported to produce or consume them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Kinds with a fixed array layout; other kinds (e.g. "speakers" later) are carried without layout checks.
EMBEDDINGS = "embeddings"
XVECTOR = "xvector"
STATUS = "status"  # JSON status topic, not an array kind

ENGINE_ID = "_engine"  # the pseudo stream id of the engine-level status topic; "_" ids are reserved


@dataclass
class EmbeddingMessage:
    """One published chunk of a stream's output.

    ``data`` is float32 or float16; shape ``(layers, frames, dim)`` for ``embeddings``, ``(dim,)`` for
    ``xvector``. ``epoch`` identifies one run of the ``seq`` counter: when a stream's seq restarts at 0 (the
    engine restarted, the stream was re-created) the epoch must grow, so that subscribers reset their order
    state instead of taking the new messages for duplicates. 0 means "let the Publisher stamp its own run
    epoch" (its start time in microseconds), which covers engine restarts.
    """

    stream_id: str
    kind: str
    seq: int
    first_frame: int
    frame_rate: float
    timestamp: float
    model_id: str
    layers: tuple[int, ...]
    data: np.ndarray
    epoch: int = 0

    @property
    def frames(self) -> int:
        """Number of frames covered: the frame axis of ``embeddings`` (axis 1), 1 for pooled vectors."""
        return int(self.data.shape[1]) if self.kind == EMBEDDINGS and self.data.ndim == 3 else 1


@dataclass(frozen=True)
class Gap:
    """Sequence numbers ``first_seq .. first_seq + count - 1`` of (stream_id, kind, epoch) never arrived.

    Yielded by the subscriber in the place where the missing messages would have been, once the reorder
    window or timeout has given up on them; a message of that range arriving later is discarded.
    """

    stream_id: str
    kind: str
    epoch: int
    first_seq: int
    count: int

    @property
    def last_seq(self) -> int:
        return self.first_seq + self.count - 1


@dataclass
class Status:
    """A stream's (or, with ``stream_id == "_engine"``, the engine's) retained status report.

    ``counters`` holds at least ``published`` (messages confirmed by the broker), ``dropped`` (frames or
    chunks the engine's real-time policy dropped, as reported by the engine), ``outbox_overflow``
    (messages the publisher discarded because its outbox was full) and ``reconnects``.
    """

    stream_id: str
    state: str  # "online" | "offline"
    timestamp: float
    engine_id: str
    counters: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
