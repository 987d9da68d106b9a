"""The group's topics and the retained records on them (docs/scaling.md, "Topics").

``<root>/<group>/members/<worker>``: a worker's retained record, ``live`` or ``draining``; its last will
(an empty retained message) clears it when the connection dies, so the broker itself announces a dead
worker. ``<root>/<group>/streams/<stream>``: the stream's retained record, the worker that serves it (or
that it was handed to) and its sequence epoch; cleared when the stream ends. ``<root>/<group>/handover/
<worker>``: hand-over messages for that worker (QoS 1, not retained).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

from ..mqtt.topics import check_level, check_prefix

MEMBER_FORMAT = "streamwavlm-member"
STREAM_FORMAT = "streamwavlm-stream"
VERSION = 1
MemberState = Literal["live", "draining"]


class GroupTopics:
    """Topic names of one group under ``root`` (default ``streamwavlm-cluster``)."""

    def __init__(self, root: str, group: str) -> None:
        self.base = f"{check_prefix(root)}/{check_level(group, 'group name')}"

    def member(self, worker: str) -> str:
        return f"{self.base}/members/{check_level(worker, 'worker name')}"

    def stream(self, stream_id: str) -> str:
        return f"{self.base}/streams/{stream_id}"

    def handover(self, worker: str) -> str:
        return f"{self.base}/handover/{worker}"

    def subscriptions(self, worker: str) -> list[str]:
        return [f"{self.base}/members/+", f"{self.base}/streams/+", self.handover(worker)]

    def parse(self, topic: str) -> tuple[str, str] | None:
        """``(kind, name)`` of a topic of this group: kind is members, streams or handover."""
        head = self.base + "/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        return (parts[0], parts[1]) if len(parts) == 2 else None


@dataclass(frozen=True)
class Member:
    worker: str
    state: MemberState
    since: float
    keepalive: int

    def encode(self) -> bytes:
        return json.dumps({"format": MEMBER_FORMAT, "version": VERSION, "worker": self.worker, "state": self.state,
                           "since": self.since, "keepalive": self.keepalive}).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Member:
        d = _record(payload, MEMBER_FORMAT)
        if d["state"] not in ("live", "draining"):
            raise ValueError(f"member state {d['state']!r} is neither live nor draining")
        return cls(str(d["worker"]), d["state"], float(d["since"]), int(d["keepalive"]))


@dataclass(frozen=True)
class StreamRecord:
    stream_id: str
    owner: str  # the worker serving the stream, or the one it is being handed to
    epoch: int  # the stream's sequence epoch (microseconds since 1970 when it started)

    def encode(self) -> bytes:
        return json.dumps({"format": STREAM_FORMAT, "version": VERSION, "stream_id": self.stream_id,
                           "owner": self.owner, "epoch": self.epoch, "timestamp": time.time()}).encode()

    @classmethod
    def decode(cls, payload: bytes) -> StreamRecord:
        d = _record(payload, STREAM_FORMAT)
        return cls(str(d["stream_id"]), str(d["owner"]), int(d["epoch"]))


def _record(payload: bytes, fmt: str) -> dict:
    d = json.loads(payload)
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise ValueError(f"not a {fmt} record")
    if d.get("version") != VERSION:
        raise ValueError(f"{fmt} record version {d.get('version')}; this worker reads version {VERSION}")
    return d
