"""The ``<prefix>/<stream_id>/speakers`` topic: speaker-turn events as JSON (docs/mqtt.md, section speakers).

Turn events are few (a handful per turn) and read by people and dashboards, so they travel as JSON rather
than the binary embedding format. Each payload carries a per-stream ``seq`` and an ``epoch`` (this run's
start in microseconds) so a subscriber can detect loss and restarts as it does for embeddings.
``SpeakerPublisher`` sends them through an :class:`~streamwavlm.mqtt.Publisher` (its bounded outbox that
drops the oldest when the broker is away too long, QoS 1, reconnection with backoff, and a retained status
with a last will on ``<prefix>/_speakers/status``).
"""

from __future__ import annotations

import json
import time
from typing import Any

from ..mqtt.publisher import Publisher
from .turns import TurnEvent

FORMAT = "streamwavlm-speakers"
VERSION = 1
KIND = "speakers"
STATUS_ID = "_speakers"  # the diarizer's own status topic, beside the engines' ``_engine``


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
    """``async with SpeakerPublisher(url, prefix) as pub: pub.publish(stream_id, events)``. Options of
    :class:`~streamwavlm.mqtt.Publisher` pass through (``connect_timeout``: how long the start waits for the
    broker before raising ``BrokerUnavailable``)."""

    def __init__(self, broker: str, prefix: str = "streamwavlm", *, queue_size: int = 10000,
                 **options: Any) -> None:
        self.publisher = Publisher(broker, prefix=prefix, outbox_size=queue_size, status_id=STATUS_ID,
                                   **options)
        self._seq: dict[str, int] = {}

    @property
    def epoch(self) -> int:
        return self.publisher.epoch

    def publish(self, stream_id: str, events: list[TurnEvent]) -> None:
        for e in events:
            seq = self._seq.get(stream_id, 0)
            self._seq[stream_id] = seq + 1
            self.publisher.publish_payload(stream_id, KIND, encode_event(stream_id, seq, self.epoch, e))

    async def __aenter__(self) -> SpeakerPublisher:
        await self.publisher.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.publisher.__aexit__(*exc)
