"""The CNN front end: 16 kHz samples to frame features (50 per second for the released models).

The convolutions run channels-first through oneDNN (measured faster here than GEMMs over strided
channels-last views, which need a copy of every overlapping window); only the output is channels-last.

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
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.group_norm:
                if i == 0:
                    x = self._group_norm(x, stats(x.transpose(1, 2)) if callable(stats) else stats)
            else:
                norm = self.norms[i]
                x = F.layer_norm(x.transpose(1, 2), (x.shape[1],), norm.weight, norm.bias, self.eps).transpose(1, 2)
            x = F.gelu(x)
        return x.transpose(1, 2)

    def _group_norm(self, x: Tensor, stats: Stats | None) -> Tensor:
        """Per-channel normalisation of ``x (B, C, T)`` over time with given or its own (biased) statistics."""
        norm = self.norms[0]
        if stats is None:
            return F.group_norm(x, x.shape[1], norm.weight, norm.bias, self.eps)
        mean, var = (s.to(x.dtype) for s in stats)
        scale = norm.weight * torch.rsqrt(var + self.eps)
        shift = norm.bias - mean * scale
        return torch.addcmul(shift[:, :, None], x, scale[:, :, None])
