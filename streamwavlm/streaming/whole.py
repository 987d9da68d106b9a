"""Stream an array that is already in memory through a pool: the incremental path for files and tests.

The pool owns no audio, so something must cut audio into steps; the engine does it for live sources with
its :class:`~streamwavlm.audio.queue.SampleQueue`, and this does it for an array known in advance (the
``run`` and ``fidelity`` commands, tests, notebooks), validating it once on the way in.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ..audio.queue import SampleQueue
from ..audio.validate import SAMPLE_RATE, to_float_mono
from .pool import ChunkOutput, StreamPool


def stream_audio(pool: StreamPool, samples: np.ndarray | Tensor, stream_id: str = "stream",
                 pieces: int | None = None) -> list[ChunkOutput]:
    """Every output of a new stream fed ``samples`` (16 kHz mono) step by step, then closed.

    ``pieces``: hand the audio over in pieces of that many samples, as a live source would (the output does
    not depend on it: steps are cut from the queue, not from the pieces)."""
    x = to_float_mono(samples, SAMPLE_RATE, source=f"stream {stream_id}").numpy()
    slot = pool.open(stream_id)
    queue = SampleQueue()
    outputs: list[ChunkOutput] = []
    size = pieces or max(len(x), 1)
    for a in range(0, len(x), size):
        queue.put(x[a:a + size])
        while len(queue) >= pool.need(slot):
            outputs += pool.step({slot: queue.take(pool.need(slot))})
    return outputs + pool.close(slot, queue.take(len(queue)))
