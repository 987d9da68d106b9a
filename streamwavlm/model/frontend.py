"""The CNN front end: 16 kHz samples to frame features (50 per second for the released models).

Block 0 of the group-norm variant (Base, Base+) normalises each channel over the whole utterance, which is
the one part of WavLM that cannot stream exactly. The front end therefore takes the GroupNorm statistics as
an optional argument: offline they come from the input itself; the streaming encoder supplies running or
frozen statistics; a long utterance can be processed in blocks with statistics from a first cheap pass
(:meth:`conv0_moments`), which keeps peak memory flat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import WavLMConfig


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

    @property
    def group_norm(self) -> bool:
        return self.cfg.extractor_mode == "default"

    def conv0_moments(self, wav: Tensor) -> tuple[Tensor, Tensor, int]:
        """Per-channel sum and sum of squares (fp64) of conv 0's output, and its length.

        These are the sufficient statistics of the GroupNorm; they add over disjoint spans of conv-0
        frames, which is what makes blocked and running statistics possible.
        """
        y = self.convs[0](wav[:, None, :]).double()
        return y.sum(-1), (y * y).sum(-1), y.shape[-1]

    def forward(self, wav: Tensor, stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``(B, N)`` samples to ``(B, C, T)`` features.

        ``stats``: GroupNorm ``(mean, var)`` of shape ``(B, C)`` to use instead of the input's own
        statistics (group-norm variant only).
        """
        x = wav[:, None, :]
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.group_norm:
                if i == 0:
                    x = self._group_norm(x, stats)
            else:
                x = F.layer_norm(x.transpose(1, 2), (x.shape[1],), self.norms[i].weight, self.norms[i].bias,
                                 self.eps).transpose(1, 2)
            x = F.gelu(x)
        return x

    def _group_norm(self, x: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        norm = self.norms[0]
        if stats is None:
            return F.group_norm(x, x.shape[1], norm.weight, norm.bias, self.eps)
        mean, var = stats
        scale = norm.weight[None, :] * torch.rsqrt(var.to(x.dtype) + self.eps)
        shift = norm.bias[None, :] - mean.to(x.dtype) * scale
        return torch.addcmul(shift[:, :, None], x, scale[:, :, None])
