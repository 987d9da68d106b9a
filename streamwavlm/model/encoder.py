"""Feature projection, positional convolution and the Transformer layers (post-LN and pre-LN)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import WavLMConfig
from .attention import AttentionContext, SelfAttention
from .linear import Linear


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
    """

    def __init__(self, cfg: WavLMConfig) -> None:
        super().__init__()
        d, k = cfg.embed_dim, cfg.conv_pos
        self.kernel = k
        self.groups = cfg.conv_pos_groups
        self.conv = nn.Conv1d(d, d, k, padding=k // 2, groups=self.groups)

    @property
    def left(self) -> int:
        return self.kernel // 2

    @property
    def right(self) -> int:
        return self.kernel - 1 - self.kernel // 2

    def forward(self, x: Tensor) -> Tensor:
        """``x + GELU(conv(x))`` for ``x (B, T, D)`` with zeros beyond both ends."""
        y = self.conv(x.transpose(1, 2))
        if self.kernel % 2 == 0:
            y = y[:, :, :-1]
        return x + F.gelu(y).transpose(1, 2)

    def window(self, x: Tensor) -> Tensor:
        """Conv output for the frames of ``x (B, T, D)`` that have their full context inside ``x``.

        Returns ``(B, T - K + 1, D)``: output frame i corresponds to input frame ``i + left``. The streaming
        encoder uses this with its history and lookahead buffers; without the residual.
        """
        y = F.conv1d(x.transpose(1, 2), self.conv.weight, self.conv.bias, groups=self.groups)
        return F.gelu(y).transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, cfg: WavLMConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = Linear(cfg.ffn_dim, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """One Transformer layer; ``pre_norm`` selects Large's pre-LN order over Base's post-LN order."""

    def __init__(self, cfg: WavLMConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.layer_norm_first
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(
        self, x: Tensor, ctx: AttentionContext, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Layer output ``(B, T, D)`` and the new keys and values of this call (for K/V caches)."""
        a, k, v = self.attn(self.attn_norm(x) if self.pre_norm else x, ctx, past)
        return self.finish(x, a), k, v

    def finish(self, x: Tensor, a: Tensor) -> Tensor:
        """Everything after the attention: residual, norms and the feed-forward block."""
        if self.pre_norm:
            x = x + a
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + a)
        return self.ffn_norm(x + self.ffn(x))
