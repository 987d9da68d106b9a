"""WavLM's relative position buckets, turned once into a per-head bias table over clamped distances.

The reference computes ``bucket(j - i)`` with a logarithm for every (query, key) pair of every forward.
The bucket saturates at |d| >= 778 frames for the released settings (and always below ``max_distance``),
so a table over d in [-max_distance, max_distance] is exact for any distance once d is clamped. It is
built here on the CPU in float32 with the reference formula, because a fast-math GPU logarithm could move
a boundary case (|d| = 713 sits 3.7e-5 below an integer).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def relative_bucket(distance: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """Bucket index of each key-minus-query distance (bidirectional, as in WavLM layer 0)."""
    half = num_buckets // 2
    buckets = (distance > 0).long() * half
    a = distance.abs()
    max_exact = half // 2
    large = max_exact + (
        torch.log(a.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    large = torch.clamp(large, max=half - 1)
    return buckets + torch.where(a < max_exact, a, large)


def bias_table(embedding: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """``(H, 2*max_distance + 1)`` fp32 bias for every distance d, at column ``d + max_distance``.

    ``embedding`` is the layer-0 ``relative_attention_bias`` weight, ``(num_buckets, H)``.
    """
    d = torch.arange(-max_distance, max_distance + 1)
    idx = relative_bucket(d, num_buckets, max_distance)
    return embedding.detach().float().cpu()[idx].t().contiguous()
