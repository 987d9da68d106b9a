"""Feature projection, positional convolution and the Transformer layers (post-LN and pre-LN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import WavLMConfig
from .attention import AttentionContext, KVCache, SelfAttention
from .linear import Linear, cpu_inference


class FeatureProjection(nn.Module):
    """LayerNorm over the CNN channels, then a linear map to the model width."""

    def __init__(self, cfg: WavLMConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.conv_dim, eps=cfg.layer_norm_eps)
        self.linear = Linear(cfg.conv_dim, cfg.embed_dim)

    def forward(self, features: Tensor) -> Tensor:
        """``(B, T, C)`` CNN output to ``(B, T, D)``."""
        return self.linear(self.norm(features))


class PositionalConv(nn.Module):
    """Grouped convolution over time whose output is added to its input (weight norm folded at load).

    With an even kernel K the reference pads K/2 on both sides and drops the last output, so output t
    reads inputs t-K/2 .. t+K/2-1: 64 frames back and 63 ahead for the released models.

    ``dtype`` (set by the model's precision, :func:`~streamwavlm.precision.apply`) is what the convolution
    multiplies in: under bf16 and int8 the products run in bf16 with fp32 accumulation (1.7x faster than
    fp32 here); the bias, GELU and the residual sum stay fp32.
    """

    def __init__(self, cfg: WavLMConfig) -> None:
        super().__init__()
        d, k = cfg.embed_dim, cfg.conv_pos
        self.kernel = k
        self.groups = cfg.conv_pos_groups
        self.conv = nn.Conv1d(d, d, k, padding=k // 2, groups=self.groups)
        self.dtype = torch.float32
        self.low_weight: Tensor | None = None  # the weight in ``dtype`` when that is not fp32

    def derive(self, dtype: torch.dtype) -> None:
        """Multiply in ``dtype`` from now on (a copy of the weight in it is made here, once)."""
        self.dtype = dtype
        self.low_weight = None if dtype == torch.float32 else self.conv.weight.detach().to(dtype)

    @property
    def left(self) -> int:
        return self.kernel // 2

    @property
    def right(self) -> int:
        return self.kernel - 1 - self.kernel // 2

    def forward(self, x: Tensor) -> Tensor:
        """``x + GELU(conv(x))`` for ``x (B, T, D)`` with zeros beyond both ends."""
        if self.low_weight is not None and cpu_inference(x):
            y = F.conv1d(x.transpose(1, 2).to(self.dtype), self.low_weight, None, padding=self.kernel // 2,
                         groups=self.groups).float() + self.conv.bias[:, None]
        else:
            y = self.conv(x.transpose(1, 2))
        if self.kernel % 2 == 0:
            y = y[:, :, :-1]
        return x + F.gelu(y).transpose(1, 2)

    def truncated_weight(self, lookahead: int) -> Tensor:
        """Per-group GEMM weight ``(G, (left + lookahead + 1) * Cg, Cg)`` of the taps up to ``+lookahead``.

        The streaming encoder treats frames beyond its lookahead as zero, which is the same as dropping
        those taps; as a batched GEMM over groups the short window of a chunk costs far less than the
        generic grouped convolution.
        """
        taps = self.left + lookahead + 1
        w = self.conv.weight.detach()[:, :, :taps].to(self.dtype)  # (D, Cg, taps): out, in channel of group, tap
        cg = w.shape[1]
        return w.reshape(self.groups, cg, cg, taps).permute(0, 3, 2, 1).reshape(self.groups, taps * cg, cg)

    def window(self, x: Tensor, weight: Tensor) -> Tensor:
        """``GELU(conv)`` for the frames of ``x (B, W, D)`` whose taps all lie inside ``x``, with the weight of
        :meth:`truncated_weight`: ``(B, W - taps + 1, D)``, output i centred on input ``i + left``."""
        b, w, d = x.shape
        g, k_cg, cg = weight.shape
        taps = k_cg // cg
        n = w - taps + 1
        x = x.contiguous()
        rows = x.as_strided((b, n, taps, g, cg), (w * d, d, d, cg, 1))
        # one copy of the overlapping windows, cast to the weight's dtype on the way
        rows = torch.empty(g, b, n, taps, cg, dtype=weight.dtype, device=x.device).copy_(rows.permute(3, 0, 1, 2, 4))
        y = torch.bmm(rows.view(g, b * n, taps * cg), weight)
        y = y.view(g, b, n, cg).permute(1, 2, 0, 3).reshape(b, n, d)
        return F.gelu(y.float() + self.conv.bias).to(x.dtype)


class FeedForward(nn.Module):
    def __init__(self, cfg: WavLMConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = Linear(cfg.ffn_dim, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """One Transformer layer; ``pre_norm`` selects Large's pre-LN order over Base's post-LN order.

    The offline model and the streaming pool both call it; the pool passes the layer's K/V ``cache``.
    """

    def __init__(self, cfg: WavLMConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.layer_norm_first
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, ctx: AttentionContext, cache: KVCache | None = None) -> Tensor:
        """Layer output ``(B, T, D)``."""
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), ctx, cache)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.attn(x, ctx, cache))
        return self.ffn_norm(x + self.ffn(x))
