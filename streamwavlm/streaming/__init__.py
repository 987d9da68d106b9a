"""The streaming encoder: per-stream state, a slot pool stepping many streams at once, and policies."""

from .pool import ChunkOutput, PoolFull, StreamPool
from .settings import NormPolicy, StreamSettings, XVectorSettings
from .state import StreamState
from .whole import stream_audio

__all__ = ["ChunkOutput", "NormPolicy", "PoolFull", "StreamPool", "StreamSettings", "StreamState", "XVectorSettings",
           "stream_audio"]
