"""The CNN front end: 16 kHz samples to frame features (50 per second for the released models).

The convolutions run channels-first through oneDNN (measured faster here than GEMMs over strided
channels-last views, which need a copy of every overlapping window); only the output is channels-last.
Under a bf16 precision (:meth:`FrontEnd.derive`) convolutions 1.. run in bf16 with fp32 accumulation and
their activations stay bf16 between them (a bf16 conv rounds its input to bf16 anyway). Under int8 (on CPUs
without native bf16: :func:`~streamwavlm.precision.cnn_precision`) they run channels-last as int8 linears over
each output frame's window, so that every frame gets its own activation scale. Conv 0, which reads the raw
waveform and feeds the GroupNorm statistics, and every normalisation stay fp32.

Block 0 of the group-norm variant (Base, Base+) normalises each channel over the whole utterance, which is
the one part of WavLM that cannot stream exactly. The front end therefore takes the GroupNorm statistics as
an optional argument: offline they come from the input itself; the streaming encoder supplies running or
frozen statistics; a long utterance can be processed in blocks with statistics from a first cheap pass
(:meth:`FrontEnd.conv0`), which keeps peak memory flat.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import WavLMConfig
from .linear import PackedInt8, Precision, cpu_inference

Stats = tuple[Tensor, Tensor]  # per-channel (mean, biased variance), each (B, C)


class FrontEnd(nn.Module):
    """Seven valid, strided convolutions with GELU; GroupNorm after conv 0 or LayerNorm after each."""

    def __init__(self, cfg: WavLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.eps = 1e-5
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        in_ch = 1
        for i, (out_ch, kernel, stride) in enumerate(cfg.conv_layers):
            self.convs.append(nn.Conv1d(in_ch, out_ch, kernel, stride=stride, bias=cfg.conv_bias))
            if cfg.extractor_mode == "layer_norm":
                self.norms.append(nn.LayerNorm(out_ch, eps=self.eps))
            elif i == 0:
                self.norms.append(nn.GroupNorm(out_ch, out_ch, eps=self.eps))
            in_ch = out_ch
        self.low: list[tuple[Tensor, Tensor | None]] = []  # bf16 oneDNN (weight, bias) of convs 1.. if derived
        self.quantized: list[PackedInt8] = []  # int8 linears over each frame's window, convs 1.., if derived

    def derive(self, precision: Precision) -> None:
        """Derive the convolutions' weights for ``precision``: for bf16, copies of convs 1.. in oneDNN's blocked
        layout (reordered once here rather than on every call; a 1-D conv is a 2-D one of height 1); for int8,
        each conv as a linear from its window (kernel x channels, frame-major) to its output channels."""
        usable = torch.backends.mkldnn.is_available() and self._on_cpu_fp32()
        self.low = [
            (torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach().bfloat16()[:, :, None],
                                                          [0, 0], [1, conv.stride[0]], [1, 1], 1),
             None if conv.bias is None else conv.bias.detach().bfloat16())
            for conv in self.convs[1:]
        ] if precision == "bfloat16" and usable else []
        self.quantized = [
            PackedInt8(conv.weight.detach().permute(0, 2, 1).reshape(conv.out_channels, -1), conv.bias)
            for conv in self.convs[1:]
        ] if precision == "int8" and usable else []

    def _on_cpu_fp32(self) -> bool:
        weight = self.convs[0].weight
        return weight.device.type == "cpu" and weight.dtype == torch.float32

    def _conv(self, i: int, x: Tensor, low: bool, gelu: bool) -> Tensor:
        """Convolution ``i``; with ``low``, convs 1.. in bf16, followed by a GELU fused into it if ``gelu``."""
        conv = self.convs[i]
        if i == 0 or not low:
            return F.gelu(conv(x)) if gelu else conv(x)
        weight, bias = self.low[i - 1]
        return torch.ops.mkldnn._convolution_pointwise(
            x.bfloat16()[:, :, None], weight, bias, [0, 0], [1, conv.stride[0]], [1, 1], 1,
            "gelu" if gelu else "none", [], "none" if gelu else "")[:, :, 0]

    @property
    def group_norm(self) -> bool:
        return self.cfg.extractor_mode == "default"

    def conv0(self, wav: Tensor) -> Tensor:
        """Conv 0's output ``(B, T0, C)`` of samples ``(B, N)``: what the GroupNorm's statistics are taken over.

        Its moments (:class:`~.moments.Moments`) add over disjoint spans of conv-0 frames, which is what makes
        blocked and running statistics possible.
        """
        return self.convs[0](wav[:, None, :]).transpose(1, 2)

    def forward(self, wav: Tensor, stats: Stats | Callable[[Tensor], Stats] | None = None) -> Tensor:
        """``(B, N)`` samples to ``(B, T, C)`` features.

        ``stats``: GroupNorm ``(mean, var)`` of shape ``(B, C)`` to use instead of the input's own
        statistics (group-norm variant only), or a function that makes them from conv 0's output
        ``(B, T0, C)`` (the streaming encoder updates its running statistics there).
        """
        if self.cfg.num_frames(wav.shape[-1]) == 0:  # too short for one frame: no frames, not an error
            return wav.new_zeros(wav.shape[0], 0, self.cfg.conv_dim)
        x = wav[:, None, :]
        low = bool(self.low) and cpu_inference(wav)
        int8 = bool(self.quantized) and cpu_inference(wav)
        for i in range(1 if int8 else len(self.convs)):
            plain = self.group_norm and i > 0  # conv then GELU, no norm between: one fused op
            x = self._conv(i, x, low, gelu=plain)
            if plain:
                continue
            if self.group_norm:
                x = self._group_norm(x, stats(x.transpose(1, 2)) if callable(stats) else stats)
            else:
                norm = self.norms[i]
                x = F.layer_norm(x.to(wav.dtype).transpose(1, 2), (x.shape[1],), norm.weight, norm.bias,
                                 self.eps).transpose(1, 2)
            x = F.gelu(x)
        return self._int8_convs(x).to(wav.dtype) if int8 else x.to(wav.dtype).transpose(1, 2)

    def _int8_convs(self, x: Tensor) -> Tensor:
        """Convs 1.. in int8 on conv 0's activations ``(B, C, T0)``, returning ``(B, T, C)``. Channels-last, each
        output frame's window is a row (a strided view, not a copy) of an int8 linear, quantised with its own
        scale: one scale per utterance, as an int8 convolution takes, zeroed the quietest frames of speech
        (docs/precision.md)."""
        x = x.transpose(1, 2).contiguous()
        for i, packed in enumerate(self.quantized, start=1):
            (kernel,), (stride,) = self.convs[i].kernel_size, self.convs[i].stride
            b, t, c = x.shape
            frames = (t - kernel) // stride + 1
            x = packed(x.as_strided((b, frames, kernel * c), (x.stride(0), stride * c, 1)))
            if not self.group_norm:
                norm = self.norms[i]
                x = F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, self.eps)
            x = F.gelu(x)
        return x

    def _group_norm(self, x: Tensor, stats: Stats | None) -> Tensor:
        """Per-channel normalisation of ``x (B, C, T)`` over time with given or its own (biased) statistics."""
        norm = self.norms[0]
        if stats is None:
            return F.group_norm(x, x.shape[1], norm.weight, norm.bias, self.eps)
        mean, var = (s.to(x.dtype) for s in stats)
        scale = norm.weight * torch.rsqrt(var + self.eps)
        shift = norm.bias - mean * scale
        return torch.addcmul(shift[:, :, None], x, scale[:, :, None])
