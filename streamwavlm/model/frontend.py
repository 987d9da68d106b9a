"""The CNN front end: 16 kHz samples to frame features (50 per second for the released models).

Each valid, strided convolution runs as one GEMM over a strided view of its channels-last input (row t of
the view is the ``kernel * channels`` values that output frame t reads), which is faster on the CPU than
the generic convolution and keeps every activation ``(B, T, C)`` so that norms and GELU work on rows.

Block 0 of the group-norm variant (Base, Base+) normalises each channel over the whole utterance, which is
the one part of WavLM that cannot stream exactly. The front end therefore takes the GroupNorm statistics as
an optional argument: offline they come from the input itself; the streaming encoder supplies running or
frozen statistics; a long utterance can be processed in blocks with statistics from a first cheap pass
(:meth:`FrontEnd.conv0_moments`), which keeps peak memory flat.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import WavLMConfig
from .linear import Packed, linear, pack

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
        self.gemm_weights: list[Tensor] = []
        self.gemm_packed: list[Packed | None] = []
        self.derive()

    @torch.no_grad()
    def derive(self) -> None:
        """Rebuild each conv's ``(C_out, kernel * C_in)`` GEMM weight (call after loading weights)."""
        self.gemm_weights = [
            conv.weight.permute(0, 2, 1).reshape(conv.weight.shape[0], -1).contiguous() for conv in self.convs
        ]
        self.gemm_packed = [pack(w, conv.bias) for w, conv in zip(self.gemm_weights, self.convs, strict=True)]

    @property
    def group_norm(self) -> bool:
        return self.cfg.extractor_mode == "default"

    def conv(self, i: int, x: Tensor) -> Tensor:
        """Conv ``i`` of a channels-last input ``(B, T, C_in)`` (``(B, N)`` samples for conv 0)."""
        _, kernel, stride = self.cfg.conv_layers[i]
        x = x.contiguous()
        b, t = x.shape[0], x.shape[1]
        c = x.shape[2] if x.dim() == 3 else 1
        t_out = (t - kernel) // stride + 1
        if t_out <= 0:
            return x.new_zeros(b, 0, self.cfg.conv_layers[i][0])
        rows = x.as_strided((b, t_out, kernel * c), (t * c, stride * c, 1))
        return linear(rows, self.gemm_weights[i], self.convs[i].bias, self.gemm_packed[i])

    def conv0_moments(self, wav: Tensor) -> tuple[Tensor, Tensor, int]:
        """Per-channel sum and sum of squares (fp64) of conv 0's output ``(B, C)``, and its length.

        These are the sufficient statistics of the GroupNorm; they add over disjoint spans of conv-0
        frames, which is what makes blocked and running statistics possible.
        """
        y = self.conv(0, wav).double()
        return y.sum(1), (y * y).sum(1), y.shape[1]

    def forward(self, wav: Tensor, stats: Stats | Callable[[Tensor], Stats] | None = None) -> Tensor:
        """``(B, N)`` samples to ``(B, T, C)`` features.

        ``stats``: GroupNorm ``(mean, var)`` of shape ``(B, C)`` to use instead of the input's own
        statistics (group-norm variant only), or a function that makes them from conv 0's output
        ``(B, T0, C)`` (the streaming encoder updates its running statistics there).
        """
        x = wav
        for i in range(len(self.convs)):
            x = self.conv(i, x)
            if self.group_norm:
                if i == 0:
                    x = self._group_norm(x, stats(x) if callable(stats) else stats)
            else:
                x = F.layer_norm(x, (x.shape[-1],), self.norms[i].weight, self.norms[i].bias, self.eps)
            x = F.gelu(x)
        return x

    def _group_norm(self, x: Tensor, stats: Stats | None) -> Tensor:
        """Per-channel normalisation over time with the given or the input's own (biased) statistics."""
        norm = self.norms[0]
        if stats is None:
            var, mean = torch.var_mean(x, dim=1, correction=0)
        else:
            mean, var = (s.to(x.dtype) for s in stats)
        scale = norm.weight * torch.rsqrt(var + self.eps)
        shift = norm.bias - mean * scale
        return torch.addcmul(shift[:, None, :], x, scale[:, None, :])
