"""CUDA graphs of the Transformer stage of a streaming step, one per batch size.

On a GPU a streaming step of a few streams launches ~400 small kernels whose summed run time is a few
percent of the step's wall time (measured on an H200: 1 ms of kernels in a 23 ms profiled step at one stream,
docs/benchmarks.md): the step is bound by the host. Replaying a captured graph launches the same kernels in
one call. The stage captured is the part of a step whose shapes depend only on the batch size: the K/V ring
writes and the Transformer layers over the rings (the front end's shapes vary with a stream's phase).

A graph reads its inputs from, and writes its outputs to, fixed buffers, and it refers to the pool's ring
tensors, which the pool mutates in place and never reallocates; a model whose weights change after the pool
was made needs a new pool (as it does anyway). The first call for a batch size runs the stage eagerly (that
is the real step), captures a graph, and replays it once on the same inputs: the stage only writes the rings
with what the eager call already wrote there, so the replay must reproduce the eager outputs, and a graph
that does not (or a capture that fails: an operation that cannot be captured, such as the torch attention
backend's data-dependent plan) is never used; the pool then stays eager.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Stage = Callable[[Tensor, Tensor, Tensor], list[Tensor]]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, Tensor, Tensor]  # x (B, C, D), first frame (B,), pool rows (B,)
    outputs: list[Tensor]


class StageGraphs:
    """Captured replays of ``stage(x, first, rows)`` for up to ``limit`` batch sizes (least recently used
    dropped first)."""

    def __init__(self, stage: Stage, limit: int = 16) -> None:
        self.stage = stage
        self.limit = limit
        self.failed: str | None = None  # why graphs were given up (then every call is eager)
        self._graphs: OrderedDict[int, _Captured] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle()

    def __call__(self, x: Tensor, first: Tensor, rows: Tensor) -> list[Tensor]:
        batch = x.shape[0]
        if self.failed is not None:
            return self.stage(x, first, rows)
        if batch not in self._graphs:
            return self._first_call(x, first, rows)
        self._graphs.move_to_end(batch)
        captured = self._graphs[batch]
        for buffer, value in zip(captured.inputs, (x, first, rows), strict=True):
            buffer.copy_(value)
        captured.graph.replay()
        return [h.clone() for h in captured.outputs]  # the next replay overwrites the buffers

    @property
    def captured(self) -> int:
        """How many batch sizes replay a graph."""
        return len(self._graphs)

    def _first_call(self, x: Tensor, first: Tensor, rows: Tensor) -> list[Tensor]:
        inputs = (x.clone(), first.clone(), rows.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the real step, which also warms up (autotunes) every kernel
            result = self.stage(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the engine's other threads (sinks copying results out) may call CUDA meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                outputs = self.stage(*inputs)
            graph.replay()
            mismatch = _mismatch(outputs, result)
        except RuntimeError as err:  # recorded, not run: the rings hold what the eager call wrote
            mismatch = f"capture failed: {err}"
        if mismatch is not None:
            # A failed capture can leave the allocator's graph pool in use: give up graphs for this pool
            # rather than capture again into it.
            self.failed = mismatch
            self._graphs.clear()
            warnings.warn(f"streaming steps stay eager (no CUDA graphs): {mismatch}", RuntimeWarning, stacklevel=3)
        else:
            self._graphs[x.shape[0]] = _Captured(graph, inputs, outputs)
            while len(self._graphs) > self.limit:
                self._graphs.popitem(last=False)
        return [h.clone() for h in result]


def _mismatch(replayed: list[Tensor], eager: list[Tensor]) -> str | None:
    """Why a replay differs from the eager outputs beyond the rounding of another kernel choice, or None."""
    for i, (a, b) in enumerate(zip(replayed, eager, strict=True)):
        tol = 1e-4 if a.dtype == torch.float32 else 2e-2
        scale = float(b.abs().max()) + 1.0
        if a.shape != b.shape or not bool(((a.float() - b.float()).abs() <= tol * scale).all()):
            return f"the replayed graph differs from the eager step at hidden state {i}"
    return None
