"""The streaming encoder: per-stream state, a slot pool stepping many streams at once, and policies."""

from .pool import ChunkOutput, StreamPool, StreamState
from .settings import NormPolicy, StreamSettings, XVectorSettings

__all__ = ["ChunkOutput", "NormPolicy", "StreamPool", "StreamSettings", "StreamState", "XVectorSettings"]
