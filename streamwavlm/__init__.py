"""Streaming, real-time WavLM audio embeddings.

The three-line start: ``import streamwavlm``, then ``e = streamwavlm.embed("speech.wav")`` and
``e.hidden_states``. ``load_model`` loads a checkpoint by path or name. Both are imported on first use, so
that ``import streamwavlm`` stays light for tools that need only a submodule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpoint import load_model
    from .embedding import Embedding, embed

__all__ = ["Embedding", "embed", "load_model"]


def __getattr__(name: str) -> Any:
    if name in ("embed", "Embedding"):
        from . import embedding

        return getattr(embedding, name)
    if name == "load_model":
        from .checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'streamwavlm' has no attribute {name!r}")
