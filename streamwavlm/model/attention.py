"""Self-attention with WavLM's gated relative position bias, with or without a K/V cache.

q, k, v and the gate's two logits per head come out of one GEMM: the gate's ``Linear(head_dim, 8)`` is
summed over its two groups of four rows (``s_a = sum(W[0:4]) . x_h + sum(b[0:4])``), which makes it a
block-diagonal ``D -> 2H`` projection that is appended to the QKV weight. The fused weight is derived from
the checkpoint parameters whenever they are loaded (:meth:`SelfAttention.fuse`); the parameters
themselves keep the checkpoint's layout.

The same module serves the offline model and the streaming pool: offline it attends over the keys of its own
call; given a :class:`KVCache` it first writes this call's keys and values into the cache and attends over
what the cache holds, at the positions the context's :class:`~streamwavlm.kernels.KeyLayout` names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from ..config import WavLMConfig
from ..kernels import KeyLayout, gate_from_logits, gated_rel_attention
from .linear import Linear, Packed, cpu_inference, linear, pack


@dataclass
class AttentionContext:
    """What the layers of one forward share: the bias table, the key layout, and what the attention derives
    from the layout once (``memo``) instead of once per layer."""

    table: Tensor  # (H, 2M+1) fp32 bias per clamped distance
    layout: KeyLayout
    memo: dict = field(default_factory=dict)


class KVCache(Protocol):
    """A layer's key/value store across calls (the streaming pool's ring buffers)."""

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this call's keys and values ``(B, H, T, hd)``; return the keys and values to attend over,
        laid out as the context's ``layout.k_pos`` (and ``layout.rows``) say."""
        ...


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
        # what q, k, v (and a pool's K/V rings) are kept in on the CPU: bf16 under its bf16 and int8
        # precisions (:func:`~streamwavlm.precision.apply`), which halves the rings and doubles the attention's
        # speed; other devices keep the model's own dtype
        self.kv_dtype = torch.float32
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
        """q, k, v ``(B, H, T, hd)`` and the fp32 gate ``(B, H, T)`` of the attention input ``x (B, T, D)``."""
        b, t, d = x.shape
        h, hd = self.num_heads, self.head_dim
        y = linear(x, self.qkvg_weight, self.qkvg_bias, self.qkvg_packed)
        qkv = y[..., :3 * d]
        if self.kv_dtype != qkv.dtype and cpu_inference(qkv):
            qkv = qkv.to(self.kv_dtype)
        q, k, v = (qkv[..., i * d:(i + 1) * d].view(b, t, h, hd).transpose(1, 2) for i in range(3))
        logits = y[..., 3 * d:].view(b, t, h, 2).transpose(1, 2)
        return q, k, v, gate_from_logits(logits, self.gate_const)

    def forward(self, x: Tensor, ctx: AttentionContext, cache: KVCache | None = None) -> Tensor:
        """Attention output ``(B, T, D)`` of ``x (B, T, D)``, over ``cache`` (after storing this call's keys
        and values in it) or over this call's own keys."""
        q, k, v, gate = self.project(x)
        if cache is not None:
            k, v = cache.write(k, v)
        out = gated_rel_attention(q, k, v, gate, ctx.table, ctx.layout, ctx.memo)
        b, h, t, hd = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h * hd))
