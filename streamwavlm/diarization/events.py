"""The ``<prefix>/<stream_id>/speakers`` topic: speaker-turn events as JSON (docs/mqtt.md, section speakers).

Turn events are few (a handful per turn) and read by people and dashboards, so they travel as JSON rather
than the binary embedding format. Each payload carries a per-stream ``seq`` and an ``epoch`` (this run's
start in microseconds) so a subscriber can detect loss and restarts as it does for embeddings.
``SpeakerPublisher`` owns one connection; ``publish`` only queues (bounded; the oldest is dropped and
counted when the broker is away too long), one task sends at QoS 1 and reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from typing import Any

import aiomqtt

from ..mqtt import topics
from ..mqtt.connection import Backoff, Connection
from .turns import TurnEvent

log = logging.getLogger(__name__)

FORMAT = "streamwavlm-speakers"
VERSION = 1
KIND = "speakers"


def encode_event(stream_id: str, seq: int, epoch: int, event: TurnEvent) -> bytes:
    return json.dumps({
        "format": FORMAT, "version": VERSION, "stream_id": stream_id, "seq": seq, "epoch": epoch,
        "event": event.event, "turn": event.turn, "label": event.label, "start": event.start, "end": event.end,
        "confidence": event.confidence, "final": event.event in ("final", "cancel"), "timestamp": time.time(),
    }).encode()


def decode_event(payload: bytes | str) -> dict[str, Any]:
    """Parse and check a speakers payload (ValueError naming what is wrong)."""
    try:
        doc = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"speakers payload is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ValueError(f"speakers payload must have format {FORMAT!r} and version {VERSION}")
    if doc.get("event") not in ("start", "update", "final", "cancel"):
        raise ValueError(f"speakers event {doc.get('event')!r} is not start, update, final or cancel")
    return doc


class SpeakerPublisher:
    """``async with SpeakerPublisher(url, prefix) as pub: pub.publish(stream_id, events)``."""

    def __init__(self, broker: str, prefix: str = "streamwavlm", *, protocol: str | None = None,
                 queue_size: int = 10000, timeout: float = 10.0) -> None:
        self._conn = Connection.create(broker, username=None, password=None, protocol=protocol,  # type: ignore[arg-type]
                                       tls=None, timeout=timeout, keepalive=30)
        self.prefix = topics.check_prefix(prefix)
        self.epoch = time.time_ns() // 1000
        self.sent = 0
        self.dropped = 0
        self._queue: deque[tuple[str, bytes]] = deque()
        self._size = queue_size
        self._seq: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def publish(self, stream_id: str, events: list[TurnEvent]) -> None:
        topic = topics.topic(self.prefix, topics.check_level(stream_id, "stream id"), KIND)
        for e in events:
            seq = self._seq.get(stream_id, 0)
            self._seq[stream_id] = seq + 1
            if len(self._queue) >= self._size:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append((topic, encode_event(stream_id, seq, self.epoch, e)))
        self._idle.clear()
        self._wake.set()

    async def flush(self, timeout: float = 10.0) -> bool:
        if not self._queue:
            return True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return not self._queue

    async def __aenter__(self) -> SpeakerPublisher:
        self._task = asyncio.create_task(self._run(), name="speaker-publisher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async with self._conn.client(f"streamwavlm-speakers-{uuid.uuid4().hex[:8]}") as client:
                    backoff.reset()
                    while True:
                        while self._queue:
                            topic, payload = self._queue[0]
                            await client.publish(topic, payload, qos=1)
                            self._queue.popleft()
                            self.sent += 1
                        self._idle.set()
                        self._wake.clear()
                        await self._wake.wait()
            except aiomqtt.MqttError as e:
                log.warning("speakers publisher: %s; reconnecting", e)
                await asyncio.sleep(backoff.next_delay())
