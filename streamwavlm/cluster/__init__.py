"""Many engine workers behind one MQTT broker: stream ownership by rendezvous hashing over the live members
of a group, membership on retained topics ended by last wills, and stream state handed over through the
broker on drain and on join. docs/scaling.md describes the design and its guarantees."""

from .handover import Handover, HandoverError, decode_handover, encode_handover
from .rendezvous import owner, weight

__all__ = ["Handover", "HandoverError", "decode_handover", "encode_handover", "owner", "weight"]
