"""Linear layers with weights pre-packed for oneDNN on the CPU.

Streaming steps multiply a few dozen rows by every weight matrix of the model; with plain ``F.linear`` on
this kind of CPU that runs at about half the speed of the same product through oneDNN with the weights
reordered once into its blocked layout (measured in docs/benchmarks.md). The packed copy is derived from
the parameters after loading (``derive``) and used only for fp32 CPU inference; everything else (autograd,
other devices, other dtypes) takes ``F.linear`` on the parameters. ``STREAMWAVLM_LINEAR=dense`` disables it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Packed = tuple[Tensor, Tensor | None]


def _enabled() -> bool:
    return os.environ.get("STREAMWAVLM_LINEAR", "packed") != "dense" and torch.backends.mkldnn.is_available()


def pack(weight: Tensor, bias: Tensor | None) -> Packed | None:
    """oneDNN copies of ``weight`` (out, in) and ``bias``, or ``None`` where packing does not apply."""
    if not _enabled() or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    with torch.no_grad():
        return weight.detach().to_mkldnn(), None if bias is None else bias.detach().to_mkldnn()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, packed: Packed | None) -> Tensor:
    """``x @ weight.T + bias``, through the packed weights when they apply to this call."""
    if packed is None or x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), packed[0], packed[1]).to_dense()


class Linear(nn.Linear):
    """``nn.Linear`` with the same parameters and state-dict keys, plus a packed copy for inference."""

    packed: Packed | None = None

    def derive(self) -> None:
        """Re-pack the weights (after loading or changing them)."""
        self.packed = pack(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)
