"""WavLM's relative-position gate (``gru_rel_pos``, wavlm.md §9.3) from its two logits per head and query.

For the attention input ``x`` at query i, head h (the raw 64-wide slice, not the projected q)::

    u = W_g x_h + b_g                      # grep_linear: (8, head_dim), shared by the heads of a layer
    s_a = u_0 + u_1 + u_2 + u_3,  s_b = u_4 + ... + u_7
    gate = sigmoid(s_a) * (sigmoid(s_b) * c_h - 1) + 2

Summing the rows first turns the 8-output linear into two outputs per head, so the logits ``(s_a, s_b)``
come out of the QKV projection as ``2H`` extra columns (``SelfAttention.fuse`` in ``model/attention.py``).
The gate itself is then either evaluated by :func:`gate_from_logits` and passed to the attention, or
evaluated inside the Triton kernel (:func:`gated_rel_attention_from_logits`), which saves the separate
elementwise launches and the gate's round trip through memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gated_attention import attention_backend, gated_rel_attention_torch


def gate_from_logits(logits: Tensor, const: Tensor) -> Tensor:
    """The fp32 gate ``(B, H, T)`` from the logits ``(B, H, T, 2)`` = ``(s_a, s_b)`` and ``c`` ``(H,)``."""
    gate_a, gate_b = torch.sigmoid(logits.float()).unbind(-1)
    return gate_a * (gate_b * const.float()[:, None] - 1.0) + 2.0


def gated_rel_attention_from_logits(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate_logits: Tensor,
    gate_const: Tensor,
    table: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    k_len: Tensor | None = None,
    chunk: int | None = None,
    left: int | None = None,
) -> Tensor:
    """:func:`~.gated_attention.gated_rel_attention` with the gate given as logits ``(B, H, Tq, 2)`` and
    the per-head constant ``(H,)``: evaluated in-kernel on the Triton backend, by :func:`gate_from_logits`
    on torch. The backend is picked as for ``gated_rel_attention`` (env var or ``set_backend``).
    """
    if attention_backend(q.device) == "triton":
        from .triton_gated_attention import gated_rel_attention_triton_from_logits

        return gated_rel_attention_triton_from_logits(
            q, k, v, gate_logits, gate_const, table, q_pos, k_pos, k_len=k_len, chunk=chunk, left=left
        )
    gate = gate_from_logits(gate_logits, gate_const)
    return gated_rel_attention_torch(q, k, v, gate, table, q_pos, k_pos, k_len=k_len, chunk=chunk, left=left)
