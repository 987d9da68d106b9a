"""Running first and second moments: the sufficient statistics of a normalisation over a long span.

WavLM normalises over whole utterances in two places (Base's GroupNorm over conv-0 frames, Large's
waveform normalisation over samples). Sums and sums of squares add over disjoint pieces, so the offline
model can compute them block by block and the streaming pool can keep them running per stream; both use
this one accumulator. fp64, because a sum of squares over an hour of audio loses the variance in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Moments:
    """Per-row sums over time: ``total`` and ``squares`` ``(N, C)`` (or ``(N,)`` for scalars), ``count (N,)``."""

    total: Tensor
    squares: Tensor
    count: Tensor

    @classmethod
    def zeros(cls, rows: int, channels: int | None, device: torch.device | str = "cpu") -> Moments:
        shape = (rows,) if channels is None else (rows, channels)
        f64 = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(shape, **f64), torch.zeros(shape, **f64), torch.zeros(rows, **f64))

    def add(self, x: Tensor, update: Tensor | None = None) -> None:
        """Add the values of ``x`` ``(N, T, C)`` (or ``(N, T)``) over time; rows where ``update`` (N,) is
        False are left as they are (a frozen statistic)."""
        if x.shape[1] == 0:
            return
        # one piece's sums in x's own dtype, over time as the innermost dimension (x is usually a transposed
        # view of a channels-first tensor), as contiguous dot products: two orders of magnitude faster than
        # over an fp64 copy, and as exact as the rounding of one piece; the pieces add up in fp64
        y = x.movedim(1, -1)
        total, squares = y.sum(-1).double(), torch.linalg.vecdot(y, y).double()
        n = float(x.shape[1])
        count = torch.full_like(self.count, n)
        if update is not None:
            keep = update.view(-1, *([1] * (total.dim() - 1)))
            total, squares = torch.where(keep, total, 0.0), torch.where(keep, squares, 0.0)
            count = torch.where(update, count, 0.0)
        self.total += total
        self.squares += squares
        self.count += count

    def mean_var(self) -> tuple[Tensor, Tensor]:
        """Mean and biased variance (fp64), as the reference normalisations compute them."""
        n = self.count.view(-1, *([1] * (self.total.dim() - 1)))
        mean = self.total / n
        return mean, (self.squares / n - mean * mean).clamp_min(0.0)
