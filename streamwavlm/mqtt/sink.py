"""The engine's MQTT sink: each encoder chunk becomes an ``embeddings`` message, each x-vector an ``xvector``
message, and stream statuses follow the engine's counters."""

from __future__ import annotations

import numpy as np

from ..engine import EngineOutput, StreamStatus
from .message import EMBEDDINGS, XVECTOR, EmbeddingMessage
from .publisher import Publisher


class MqttSink:
    """Publishes engine outputs; ``dtype`` float16 halves the payloads."""

    def __init__(self, publisher: Publisher, model_id: str, frame_rate: float, dtype: str = "float32") -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype {dtype!r} must be float32 or float16")
        self.publisher = publisher
        self.model_id = model_id
        self.frame_rate = frame_rate
        self.dtype = np.dtype(dtype)
        self._seq: dict[tuple[str, str], int] = {}
        self._epochs: dict[str, int] = {}  # streams continued from another engine: their own epoch

    def _next(self, stream_id: str, kind: str) -> int:
        seq = self._seq.get((stream_id, kind), 0)
        self._seq[(stream_id, kind)] = seq + 1
        return seq

    def resume(self, stream_id: str, epoch: int, seqs: dict[str, int]) -> None:
        """Number the stream's messages from ``seqs`` (the next seq per kind) in ``epoch`` instead of from 0
        in the publisher's epoch: a stream that another engine served before, or that several engines
        serve in turn, keeps one sequence for its subscribers."""
        self._epochs[stream_id] = epoch
        for kind in (EMBEDDINGS, XVECTOR):
            self._seq[(stream_id, kind)] = seqs.get(kind, 0)

    def position(self, stream_id: str) -> tuple[int, dict[str, int]]:
        """The stream's epoch (0: the publisher's) and next seq per kind (for :meth:`resume` elsewhere)."""
        return self._epochs.get(stream_id, 0), {kind: self._seq.get((stream_id, kind), 0)
                                                 for kind in (EMBEDDINGS, XVECTOR)}

    def forget(self, stream_id: str) -> None:
        """Drop the stream's numbering (it ended, or goes on elsewhere)."""
        self._epochs.pop(stream_id, None)
        for kind in (EMBEDDINGS, XVECTOR):
            self._seq.pop((stream_id, kind), None)

    async def __call__(self, out: EngineOutput) -> None:
        chunk = out.chunk
        arrival = out.wall_time - out.latency  # when the chunk's last input sample arrived
        # frame indices are stream time: where the engine dropped audio they jump, so subscribers see the loss
        if chunk.num_frames:
            self.publisher.publish(EmbeddingMessage(
                chunk.stream_id, EMBEDDINGS, self._next(chunk.stream_id, EMBEDDINGS), out.stream_frame,
                self.frame_rate, arrival, self.model_id, chunk.layers, chunk.frames.numpy().astype(self.dtype),
                self._epochs.get(chunk.stream_id, 0)))
        for end, vector in chunk.xvectors:
            self.publisher.publish(EmbeddingMessage(
                chunk.stream_id, XVECTOR, self._next(chunk.stream_id, XVECTOR), end + out.frame_offset,
                self.frame_rate, arrival, self.model_id, (), vector.numpy().astype(self.dtype),
                self._epochs.get(chunk.stream_id, 0)))

    def status(self, st: StreamStatus) -> None:
        """Publish a stream's engine counters (retained), offline once the stream has ended."""
        summary = st.summary()
        state = "online" if st.state == "open" else "offline"
        self.publisher.set_status(st.stream_id, state=state, dropped=st.dropped,
                                  info={k: v for k, v in summary.items() if k not in ("stream", "dropped")})
