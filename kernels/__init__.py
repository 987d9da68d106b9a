"""Attention kernels for WavLM's gated relative position bias, importable as ``streamwavlm.kernels``.

One entry point, :func:`gated_rel_attention`, dispatches to the Triton kernel on CUDA tensors and to the
torch implementation on the CPU; ``STREAMWAVLM_ATTENTION`` (``auto``/``torch``/``triton``) or
:func:`set_backend` forces one (``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``).
"""

from .gate import gate_from_logits, gated_rel_attention_from_logits
from .gated_attention import (
    attention_backend,
    gated_rel_attention,
    gated_rel_attention_torch,
    set_backend,
)

__all__ = [
    "attention_backend",
    "gate_from_logits",
    "gated_rel_attention",
    "gated_rel_attention_from_logits",
    "gated_rel_attention_torch",
    "set_backend",
]
