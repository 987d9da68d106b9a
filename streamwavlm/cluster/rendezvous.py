"""Rendezvous (highest-random-weight) hashing: the owner of a stream is the member with the largest
``weight(member, stream)``. Every worker computes the same owner from the same member list without talking
to the others, and when a member joins or leaves only the streams it wins or held move (each with
probability 1/N), never streams between two members that stay."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def weight(member: str, stream_id: str) -> int:
    """A 64-bit pseudo-random weight of the pair, the same on every machine and Python (no hash seed)."""
    digest = hashlib.blake2b(f"{member}\0{stream_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(stream_id: str, members: Iterable[str]) -> str | None:
    """The member that owns ``stream_id`` (None without members); ties (2^-64) go to the larger name."""
    return max(members, key=lambda m: (weight(m, stream_id), m), default=None)
