"""How far a precision path drifts from fp32, per layer, offline and streaming, for a given model and audio.

Random weights say little about a released checkpoint (weight and activation ranges decide what bf16 and
int8 lose), so the check that matters is the user's own: ``streamwavlm fidelity CHECKPOINT AUDIO --dtype
int8`` runs :func:`measure_precision`. Each comparison isolates the precision: the offline forward in the
precision against the offline fp32 forward, and a stream in the precision against the same stream (same
settings) in fp32. The metrics are :func:`streamwavlm.streaming.fidelity.compare`'s, so streaming-vs-offline
and precision-vs-fp32 numbers mean the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .model.linear import Precision
from .model.wavlm import WavLM
from .precision import Choice, apply, precision_of
from .streaming.fidelity import compare, stream_hidden
from .streaming.settings import StreamSettings


@dataclass(frozen=True)
class PrecisionRow:
    """One path (``offline`` or a streaming setting) in one precision against the same path in fp32."""

    path: str
    cosine: tuple[float, ...]  # per hidden state 0..L: mean over frames of cos(precision_t, fp32_t)
    rel_error: tuple[float, ...]  # per hidden state: ||precision - fp32||_F / ||fp32||_F

    @property
    def worst_cosine(self) -> float:
        return min(self.cosine)

    @property
    def worst_rel_error(self) -> float:
        return max(self.rel_error)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "cosine": list(self.cosine), "rel_error": list(self.rel_error),
                "worst_cosine": self.worst_cosine, "worst_rel_error": self.worst_rel_error}


def _row(path: str, got: Tensor, ref: Tensor) -> PrecisionRow:
    pairs = [compare(got[i], ref[i]) for i in range(ref.shape[0])]
    return PrecisionRow(path, tuple(c for c, _ in pairs), tuple(e for _, e in pairs))


@torch.no_grad()
def measure_precision(model: WavLM, wav: Tensor, precision: Precision,
                      settings: Sequence[StreamSettings] = ()) -> list[PrecisionRow]:
    """Per-layer agreement of ``precision`` with fp32: offline first, then one row per streaming setting.

    The model is switched between fp32 and ``precision`` and left in the precision it had before. Speed is
    the benchmarks' business (``benchmarks/bench_precision.py``): here each path runs once.
    """
    before: Choice = precision_of(model)
    paths: list[tuple[str, Any]] = [("offline", lambda: torch.stack(model(wav[None]).hidden_states)[:, 0])]
    paths += [(f"stream C{s.chunk} L{s.left} P{s.lookahead} {s.norm.value}",
               lambda s=s: stream_hidden(model, wav, s)) for s in settings]
    try:
        apply(model, "float32")
        refs = [run() for _, run in paths]
        apply(model, precision)
        return [_row(name, run(), ref) for (name, run), ref in zip(paths, refs, strict=True)]
    finally:
        apply(model, before.precision)
