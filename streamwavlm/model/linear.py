"""Linear layers with a derived, pre-packed copy of the weight in the model's compute precision.

Streaming steps multiply a few dozen rows by every weight matrix of the model. With plain ``F.linear``
that runs at about half the speed of the same product through oneDNN with the weight reordered once into
its blocked layout (docs/benchmarks.md, docs/precision.md). The parameters stay fp32 and are what autograd,
other devices and the state dict see; the packed copy is derived from them after loading (``derive``) and
used for CPU inference only. Its precision (:data:`PRECISIONS`) is whatever :func:`packing` says when it is
derived, so code that packs a weight (``SelfAttention.fuse``) needs to know nothing about precision:

- ``float32``: oneDNN fp32 with the weight in its blocked layout;
- ``bfloat16``: oneDNN bf16 with fp32 accumulation; input rounded to bf16, output widened back to fp32;
- ``int8``: per-output-channel symmetric int8 weights and dynamic per-row activation quantisation (each
  row, i.e. each frame of each stream, gets its own scale, so one loud stream in a batch costs the quiet
  ones nothing), through oneDNN's u8 x s8 kernel with int32 accumulation.

``STREAMWAVLM_LINEAR=dense`` disables packing (``F.linear`` on the parameters everywhere).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cpu import int8_saturates
from .threads import all_threads

Precision = Literal["float32", "bfloat16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("float32", "bfloat16", "int8")

_packing: ContextVar[Precision] = ContextVar("streamwavlm_packing", default="float32")


@contextlib.contextmanager
def packing(precision: Precision) -> Iterator[None]:
    """Weights packed inside this block (:func:`pack`) are packed for ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    token = _packing.set(precision)
    try:
        yield
    finally:
        _packing.reset(token)


def _rows(x: Tensor) -> Tensor:
    return x if x.is_contiguous() else x.contiguous()


class Packed:
    """A linear layer's weight and bias prepared for one precision; calling it computes ``x @ W.T + b``."""

    precision: Precision

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError


class PackedFloat(Packed):
    """fp32 or bf16 weights in oneDNN's blocked layout (reordered once here, not on every call)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, precision: Precision) -> None:
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(self.dtype), None)
        self.bias = None if bias is None else bias.detach().to(self.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        x = _rows(x).to(self.dtype)
        with all_threads():
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return y.float()


_HALF_UP = torch.tensor(128.5)
_TINY = torch.finfo(torch.float32).tiny


class PackedInt8(Packed):
    """Per-channel int8 weights; each input row is quantised symmetrically with its own scale.

    oneDNN's fast int8 kernels (VNNI) multiply unsigned by signed bytes, so a row quantised to
    ``[-127, 127]`` is shifted by 128 and passed with zero point 128; with an input scale of 1 and the
    weight scales applied inside, the kernel returns ``q_x @ (W_q * s_w).T`` in fp32, and the row scale and
    the bias are applied after (oneDNN takes one input scale per tensor, not one per row). Without VNNI
    the kernel's 16-bit pair sums would saturate, so weights then take 7 bits (:func:`~..cpu.int8_saturates`).
    """

    precision: Precision = "int8"

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        w = weight.detach().float()
        levels = 63 if int8_saturates() else 127
        self.scale = (w.abs().amax(1) / levels).clamp_min(_TINY)
        q = torch.round(w / self.scale[:, None]).clamp_(-levels, levels).to(torch.int8)
        self.weight = torch.ops.onednn.qlinear_prepack(q, None)
        self.zero_points = torch.zeros(w.shape[0], dtype=torch.long)
        self.bias = None if bias is None else bias.detach().float()

    def __call__(self, x: Tensor) -> Tensor:
        # widened first: the passes below run 5-25 % slower on a bf16 input (measured); any layout, as the
        # quantisation writes its rows contiguous (the CNN's int8 convolutions pass overlapping windows)
        x = x.float()
        row_scale = x.abs().amax(-1, keepdim=True).clamp_min_(_TINY) / 127
        # round(x / s) + 128 in two passes: x / s + 128.5 lies in [1.5, 255.5] and the cast truncates
        q = torch.addcmul(_HALF_UP, x, row_scale.reciprocal()).to(torch.uint8)
        with all_threads():
            y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 128, self.weight, self.scale, self.zero_points, None,
                                                   1.0, 0, torch.float32, "none", [None], "")
        return y.mul_(row_scale) if self.bias is None else torch.addcmul(self.bias, y, row_scale)


def _enabled() -> bool:
    return os.environ.get("STREAMWAVLM_LINEAR", "packed") != "dense" and torch.backends.mkldnn.is_available()


def pack(weight: Tensor, bias: Tensor | None) -> Packed | None:
    """``weight`` (out, in) and ``bias`` packed for the current :func:`packing` precision, or ``None``
    where packing does not apply (not an fp32 CPU weight, or packing disabled)."""
    if not _enabled() or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    precision = _packing.get()
    with torch.no_grad():
        return PackedInt8(weight, bias) if precision == "int8" else PackedFloat(weight, bias, precision)


# activations a packed linear takes: fp32, and bf16 (the attention output under the bf16 and int8 precisions)
_INPUTS = (torch.float32, torch.bfloat16)


def cpu_inference(x: Tensor) -> bool:
    """Whether the CPU precision paths (packed weights, bf16 copies) apply to ``x``: they are made for
    inference on the CPU; autograd and other devices take the modules' own fp32 weights."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, packed: Packed | None) -> Tensor:
    """``x @ weight.T + bias`` in fp32, through the packed weights when they apply to this call."""
    if packed is None or x.dtype not in _INPUTS or not cpu_inference(x):
        return F.linear(x.to(weight.dtype), weight, bias)
    return packed(x)


class Linear(nn.Linear):
    """``nn.Linear`` with the same parameters and state-dict keys, plus a packed copy for inference."""

    packed: Packed | None = None

    def derive(self) -> None:
        """Re-pack the weights (after loading or changing them, or to change precision)."""
        self.packed = pack(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)
