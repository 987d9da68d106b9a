"""Self-attention with WavLM's gated relative position bias.

q, k, v and the gate's two logits per head come out of one GEMM: the gate's ``Linear(head_dim, 8)`` is
summed over its two groups of four rows (``s_a = sum(W[0:4]) . x_h + sum(b[0:4])``), which makes it a
block-diagonal ``D -> 2H`` projection that is appended to the QKV weight. The fused weight is derived from
the checkpoint parameters whenever they are loaded (:meth:`SelfAttention.fuse`); the parameters
themselves keep the checkpoint's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import WavLMConfig
from ..kernels import gated_rel_attention
from .linear import Linear, Packed, linear, pack


@dataclass
class AttentionContext:
    """Where the queries and keys of one forward sit, and which keys each query may see."""

    table: Tensor  # (H, 2M+1) fp32 bias per clamped distance
    q_pos: Tensor  # (B, Tq) absolute frame index of each query
    k_pos: Tensor  # (B, Tk) absolute frame index of each key (cache first, then the new frames)
    k_len: Tensor | None = None  # (B,) valid keys per row (padding / partly filled caches)
    chunk: int | None = None  # streaming block mask: chunk size in frames
    left: int | None = None  # ... and left context in frames (None: unlimited)
    memo: dict = field(default_factory=dict)  # what the attention derives from the positions, shared by layers


class SelfAttention(nn.Module):
    def __init__(self, cfg: WavLMConfig) -> None:
        super().__init__()
        d, h = cfg.embed_dim, cfg.num_heads
        self.num_heads = h
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = Linear(d, d)
        self.gate = nn.Linear(cfg.head_dim, 8)  # unilm grep_linear / HF gru_rel_pos_linear
        self.gate_const = nn.Parameter(torch.ones(h))  # unilm grep_a / HF gru_rel_pos_const, per head
        self.register_buffer("qkvg_weight", torch.empty(3 * d + 2 * h, d), persistent=False)
        self.register_buffer("qkvg_bias", torch.empty(3 * d + 2 * h), persistent=False)
        self.qkvg_packed: Packed | None = None
        self.fuse()

    @torch.no_grad()
    def fuse(self) -> None:
        """Rebuild the fused QKV+gate projection from the parameters (call after loading weights)."""
        h, hd = self.num_heads, self.head_dim
        wa, wb = self.gate.weight[:4].sum(0), self.gate.weight[4:].sum(0)  # (hd,)
        ba, bb = self.gate.bias[:4].sum(), self.gate.bias[4:].sum()
        gate_w = torch.zeros(2 * h, h * hd, dtype=wa.dtype, device=wa.device)
        for i in range(h):
            gate_w[2 * i, i * hd:(i + 1) * hd] = wa
            gate_w[2 * i + 1, i * hd:(i + 1) * hd] = wb
        gate_b = torch.stack([ba, bb]).repeat(h)
        self.qkvg_weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, gate_w])
        self.qkvg_bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias, gate_b])
        self.qkvg_packed = pack(self.qkvg_weight, self.qkvg_bias)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v ``(B, H, T, hd)`` and the gate ``(B, H, T)`` of the attention input ``x (B, T, D)``."""
        b, t, d = x.shape
        h, hd = self.num_heads, self.head_dim
        y = linear(x, self.qkvg_weight, self.qkvg_bias, self.qkvg_packed)
        q, k, v = (y[..., i * d:(i + 1) * d].view(b, t, h, hd).transpose(1, 2) for i in range(3))
        logits = y[..., 3 * d:].view(b, t, h, 2)
        a, g = torch.sigmoid(logits.float()).unbind(-1)
        gate = a * (g * self.gate_const.float() - 1.0) + 2.0
        return q, k, v, gate.transpose(1, 2)

    def forward(
        self, x: Tensor, ctx: AttentionContext, past: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Attention output ``(B, T, D)`` and this call's new keys and values ``(B, H, T, hd)``.

        ``past``: cached keys and values ``(B, H, Tc, hd)`` that precede the new frames in ``ctx.k_pos``.
        """
        q, k, v, gate = self.project(x)
        k_all, v_all = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        return self.attend(q, k_all, v_all, gate, ctx), k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, ctx: AttentionContext) -> Tensor:
        """Attention of projected queries over keys/values ``(B, H, Tk, hd)``, then the output projection."""
        out = gated_rel_attention(q, k, v, gate, ctx.table, ctx.q_pos, ctx.k_pos,
                                  k_len=ctx.k_len, chunk=ctx.chunk, left=ctx.left, memo=ctx.memo)
        b, h, t, hd = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h * hd))
