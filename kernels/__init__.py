"""Attention kernels for WavLM's gated relative position bias, importable as ``streamwavlm.kernels``.

One entry point, :func:`gated_rel_attention` ``(q, k, v, gate, table, layout)``, dispatches to the Triton
kernel on CUDA tensors and to the torch implementation on the CPU; ``STREAMWAVLM_ATTENTION``
(``auto``/``torch``/``triton``) or :func:`set_backend` forces one (``triton`` on CPU tensors needs
``TRITON_INTERPRET=1``). :class:`KeyLayout` says where queries and keys sit and which keys each may see.
"""

from .gate import gate_from_logits
from .gated_attention import (
    KeyLayout,
    attention_backend,
    gated_rel_attention,
    gated_rel_attention_torch,
    set_backend,
)

__all__ = [
    "KeyLayout",
    "attention_backend",
    "gate_from_logits",
    "gated_rel_attention",
    "gated_rel_attention_torch",
    "set_backend",
]
