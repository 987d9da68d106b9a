"""Online speaker diarization on the embedding stream: who speaks when, live, per stream.

``vad`` (speech activity), ``embedders`` (speaker embeddings: resemblyzer, or the engine's WavLM
x-vectors), ``clustering`` (online assignment to speakers; ``baseline`` is diart's for comparison),
``diarizer`` (latency, frame labels, turns), ``profiles`` (enrolled speakers on disk), ``rttm``, ``der``
(DER/JER), ``plot`` (timeline PNG), ``events`` (the MQTT ``speakers`` topic). docs/diarization.md.
"""

from .clustering import ClusterSettings, OnlineClustering, Speaker
from .der import Score, score
from .diarizer import Diarizer
from .rttm import RttmError, Segment, read_rttm, write_rttm
from .turns import Turn, TurnEvent
from .window import Window

__all__ = [
    "ClusterSettings", "Diarizer", "OnlineClustering", "RttmError", "Score", "Segment", "Speaker", "Turn",
    "TurnEvent", "Window", "read_rttm", "score", "write_rttm",
]
