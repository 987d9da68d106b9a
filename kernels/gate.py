"""WavLM's relative-position gate (``gru_rel_pos``, wavlm.md §9.3) from its two logits per head and query.

For the attention input ``x`` at query i, head h (the raw 64-wide slice, not the projected q)::

    u = W_g x_h + b_g                      # grep_linear: (8, head_dim), shared by the heads of a layer
    s_a = u_0 + u_1 + u_2 + u_3,  s_b = u_4 + ... + u_7
    gate = sigmoid(s_a) * (sigmoid(s_b) * c_h - 1) + 2

Summing the rows first turns the 8-output linear into two outputs per head, so the logits ``(s_a, s_b)``
come out of the QKV projection as ``2H`` extra columns (``SelfAttention.fuse`` in ``model/attention.py``).
This is the one place the formula is written: every backend receives the evaluated gate. (An in-kernel
variant that read the logits was dropped: its saving, one small elementwise launch per layer, was never
measured on a GPU, and it doubled the kernel's interface.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def gate_from_logits(logits: Tensor, const: Tensor) -> Tensor:
    """The fp32 gate ``(..., H, T)`` from the logits ``(..., H, T, 2)`` = ``(s_a, s_b)`` and ``c`` ``(H,)``."""
    gate_a, gate_b = torch.sigmoid(logits.float()).unbind(-1)
    return gate_a * (gate_b * const.float()[:, None] - 1.0) + 2.0
