"""The asyncio publisher: the engine hands it messages without ever waiting on the network.

``publish()`` encodes and appends to a bounded outbox and returns; one background task drains the outbox
over a fresh aiomqtt connection, reconnecting with exponential backoff and jitter when the broker goes
away. A message leaves the outbox only when its publish call succeeded (QoS 1: the broker's PUBACK), so a
short broker outage loses nothing: messages whose publish failed go back to the front of the outbox and
are sent again after the reconnect. The price is possible duplicates (a PUBACK lost with the connection),
which subscribers drop by sequence number. When the outbox is full, the oldest data message is dropped
and counted (principle 5: bounded queues, counted drops); status reports are never dropped.

Status: ``<prefix>/<stream>/status`` (retained) says whether a stream is online and carries its counters;
``<prefix>/_engine/status`` (retained) says whether the engine is, and is also the connection's last will,
so the broker marks the engine offline when the connection dies uncleanly. Both are re-published after
every reconnect because a restarted broker may have lost its retained messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import topics
from .connection import Backoff, Connection, Protocol, TLSOptions, abandon, is_refusal
from .message import ENGINE_ID, STATUS, EmbeddingMessage, Status
from .wire import (
    CONTENT_TYPE,
    DEFAULT_MAX_SIZE,
    JSON_CONTENT_TYPE,
    VERSION,
    WireError,
    encode,
    encode_json,
    encode_status,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_QOS: Mapping[str, int] = {"embeddings": 1, "xvector": 1, STATUS: 1}


@dataclass
class PublisherCounters:
    """Totals over all streams (a snapshot; see also ``Publisher.stream_counters``)."""

    published: int = 0        # confirmed by the broker (QoS 1/2) or written to the socket (QoS 0)
    outbox_overflow: int = 0  # data messages dropped because the outbox was full, oldest first
    retried: int = 0          # publishes that failed and went back into the outbox for the next connection
    reconnects: int = 0       # successful connections after the first
    unsent: int = 0           # data and status messages still queued when close gave up (close_timeout)


@dataclass
class _Stream:
    state: str = "online"
    published: int = 0
    dropped: int = 0
    outbox_overflow: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    reported: tuple[int, ...] = ()  # counters at the last status sent, so idle streams are not re-announced


@dataclass
class _Item:
    """One outbox entry; ``payload is None`` marks a status report, rendered when it is sent."""

    stream_id: str
    topic: str
    payload: bytes | None
    qos: int
    properties: Properties | None = None


class Publisher:
    """``async with Publisher("mqtt://host:1883") as pub: pub.publish(msg)``.

    Arguments:
        broker: URL ``mqtt[s]://[user[:password]@]host[:port][?protocol=5|3.1.1]``.
        prefix: topic prefix (one or more levels).
        engine_id: name reported in status payloads (default ``host:pid``).
        status_id: the pseudo stream id of the engine's own status topic and last will (default
            ``_engine``; one of several engines sharing a prefix takes its own, e.g. ``_engine.<name>``).
        protocol: ``"5"`` or ``"3.1.1"``; default: the URL's ``protocol`` parameter, else ``"5"``.
        qos: QoS per kind (``"status"`` included); kinds not listed use QoS 1.
        outbox_size: data messages queued at most; beyond it the oldest is dropped and counted.
        max_inflight: publishes awaiting their acknowledgement at once (pipelining at QoS 1).
        payload_format: ``"binary"`` (default) or ``"json"`` (the human form; much larger).
        message_expiry: MQTT 5 message expiry (seconds) for data messages; the broker discards them
            undelivered after that. None: never.
        status_interval: re-publish the status of streams whose counters changed every this many seconds.
        connect_timeout: how long ``__aenter__`` tries to reach the broker before raising BrokerUnavailable;
            None starts at once and connects in the background (messages wait in the outbox).
        close_timeout: how long ``__aexit__`` tries to deliver what is queued before giving up (``unsent``).
        timeout: aiomqtt's per-operation timeout (a publish not acknowledged in this time is retried).
        reconnect_first, reconnect_max: backoff bounds in seconds.

    Methods must be called from the event loop's thread.
    """

    def __init__(
        self, broker: str = "mqtt://127.0.0.1:1883", *, prefix: str = "streamwavlm",
        engine_id: str | None = None, username: str | None = None, password: str | None = None,
        protocol: Protocol | None = None, tls: TLSOptions | None = None, qos: Mapping[str, int] | None = None,
        outbox_size: int = 1000, max_inflight: int = 32, payload_format: Literal["binary", "json"] = "binary",
        message_expiry: float | None = None, status_interval: float | None = 10.0,
        connect_timeout: float | None = 10.0, close_timeout: float = 5.0, timeout: float = 10.0,
        keepalive: int = 30, reconnect_first: float = 0.1, reconnect_max: float = 10.0,
        max_size: int = DEFAULT_MAX_SIZE, status_id: str = ENGINE_ID,
    ) -> None:
        self._conn = Connection.create(broker, username=username, password=password, protocol=protocol,
                                       tls=tls, timeout=timeout, keepalive=keepalive)
        self.prefix = topics.check_prefix(prefix)
        self.engine_id = engine_id or f"{socket.gethostname()}:{os.getpid()}"
        if not topics.check_level(status_id, "status_id").startswith("_"):
            raise ValueError(f"status_id {status_id!r} must start with '_' (stream ids never do)")
        self.status_id = status_id
        self.qos = {**DEFAULT_QOS, **(qos or {})}
        if any(q not in (0, 1, 2) for q in self.qos.values()):
            raise ValueError(f"QoS values must be 0, 1 or 2: {self.qos}")
        if outbox_size < 1 or max_inflight < 1:
            raise ValueError(f"outbox_size ({outbox_size}) and max_inflight ({max_inflight}) must be >= 1")
        if payload_format not in ("binary", "json"):
            raise ValueError(f"payload_format {payload_format!r} must be 'binary' or 'json'")
        self.outbox_size = outbox_size
        self.max_inflight = max_inflight
        self.payload_format = payload_format
        self.message_expiry = message_expiry
        self.status_interval = status_interval
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.max_size = max_size
        self.epoch = time.time_ns() // 1000  # this run's sequence epoch, stamped on messages with epoch 0
        self._backoff = Backoff(reconnect_first, reconnect_max)
        self._counters = PublisherCounters()
        self._streams: dict[str, _Stream] = {}
        self._engine = _Stream()
        self._outbox: deque[_Item] = deque()
        self._status_queued: set[str] = set()  # streams with a status report waiting in the outbox
        self._inflight: list[_Item] = []
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._connected = asyncio.Event()
        self._last_error: BaseException | None = None
        self._ever_connected = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------------ public
    @property
    def url(self) -> str:
        return self._conn.address.display

    @property
    def protocol(self) -> Protocol:
        return self._conn.protocol

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def counters(self) -> PublisherCounters:
        return dataclasses.replace(self._counters)

    @property
    def queued(self) -> int:
        """Messages not yet confirmed: in the outbox or in flight."""
        return len(self._outbox) + len(self._inflight)

    def stream_counters(self, stream_id: str) -> dict[str, int]:
        """The counters a stream's status reports: published, dropped, outbox_overflow, reconnects
        (KeyError for a stream never published to)."""
        s = self._streams[stream_id]
        return {"published": s.published, "dropped": s.dropped, "outbox_overflow": s.outbox_overflow,
                "reconnects": self._counters.reconnects}

    def publish(self, msg: EmbeddingMessage) -> None:
        """Queue ``msg`` and return at once. Raises WireError for a message the format refuses (NaN, bad
        shape...) and ValueError for a reserved stream id; nothing else is affected by either."""
        self._check_target(msg.stream_id, msg.kind)
        if msg.epoch == 0:
            msg = dataclasses.replace(msg, epoch=self.epoch)
        if self.payload_format == "json":
            payload = encode_json(msg).encode()
            if len(payload) > self.max_size:
                raise WireError(f"JSON message of {len(payload)} bytes exceeds max_size {self.max_size}")
        else:
            payload = encode(msg, max_size=self.max_size)
        if msg.stream_id not in self._streams:
            self.set_status(msg.stream_id)
        stream = self._streams[msg.stream_id]
        if stream.state != "online":
            stream.state = "online"
            self._enqueue_status(msg.stream_id)
        self._queue_data(msg.stream_id, msg.kind, payload, self._data_properties(msg) if self._conn.v5 else None)

    def publish_payload(self, stream_id: str, kind: str, payload: bytes) -> None:
        """Queue a payload encoded elsewhere (the diarizer's JSON turn events) on ``<prefix>/<stream_id>/<kind>``
        with the embeddings' outbox, overflow and reconnection; the stream's status is left alone."""
        self._check_target(topics.check_level(stream_id, "stream id"), topics.check_level(kind, "kind"))
        self._queue_data(stream_id, kind, payload, None)

    def _check_target(self, stream_id: str, kind: str) -> None:
        """A data message may go out now to ``<prefix>/<stream_id>/<kind>`` (not a reserved id, not status)."""
        self._check_running()
        if stream_id.startswith("_"):
            raise ValueError(f"stream id {stream_id!r}: ids starting with '_' are reserved")
        if kind == STATUS:
            raise ValueError("kind 'status' is the JSON status topic; use set_status()")

    def _queue_data(self, stream_id: str, kind: str, payload: bytes, properties: Properties | None) -> None:
        if len(self._outbox) - len(self._status_queued) >= self.outbox_size:
            self._drop_oldest()
        self._enqueue(_Item(stream_id, topics.topic(self.prefix, stream_id, kind), payload, self.qos.get(kind, 1),
                            properties))

    def set_status(self, stream_id: str, *, state: Literal["online", "offline"] = "online",
                   dropped: int | None = None, info: Mapping[str, Any] | None = None) -> None:
        """Update a stream's retained status and queue a report. ``dropped`` is the engine's own count of
        frames or chunks its real-time policy dropped; ``info`` is free-form and merged."""
        self._check_running()
        topics.check_level(stream_id, "stream id")
        if state not in ("online", "offline"):
            raise ValueError(f"state {state!r} must be 'online' or 'offline'")
        stream = self._streams.setdefault(stream_id, _Stream())
        stream.state = state
        if dropped is not None:
            stream.dropped = dropped
        stream.info.update(info or {})
        self._enqueue_status(stream_id)

    def close_stream(self, stream_id: str) -> None:
        """Mark a stream offline (after its queued messages)."""
        self.set_status(stream_id, state="offline")

    def forget(self, stream_id: str) -> None:
        """Stop reporting a stream that another engine serves now: its queued status report is withdrawn
        and close does not mark it offline. Its data messages already queued are still sent."""
        if self._streams.pop(stream_id, None) is not None and stream_id in self._status_queued:
            self._status_queued.discard(stream_id)
            self._outbox = deque(i for i in self._outbox if i.payload is not None or i.stream_id != stream_id)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is confirmed; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def __aenter__(self) -> Publisher:
        if self._task is not None:
            raise RuntimeError("a Publisher is started once; create a new one")
        self._task = asyncio.create_task(self._run(), name=f"publisher {self.engine_id}")
        if self.status_interval is not None:
            self._ticker = asyncio.create_task(self._tick(self.status_interval))
        if self.connect_timeout is not None:
            t0 = time.monotonic()
            connected = asyncio.create_task(self._connected.wait())
            await asyncio.wait({self._task, connected}, timeout=self.connect_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            connected.cancel()
            if self._task.done() and not self._task.cancelled() and self._task.exception() is not None:
                await self._stop_tasks()
                raise RuntimeError("the publisher's connection task failed") from self._task.exception()
            if not self._connected.is_set():
                await self._stop_tasks()
                raise self._conn.unavailable(self._last_error, time.monotonic() - t0)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Deliver what is queued, mark every stream and the engine offline, disconnect cleanly (so the
        broker does not send the last will). Gives up after ``close_timeout`` and counts ``unsent``."""
        if self._task is None or self._closing:
            return
        for stream_id, stream in self._streams.items():
            stream.state = "offline"
            self._enqueue_status(stream_id)
        self._engine.state = "offline"
        self._enqueue_status(ENGINE_ID)
        self._closing = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.close_timeout)
        except asyncio.TimeoutError:
            log.warning("publisher %s: broker %s unreachable at close; %d messages not delivered",
                        self.engine_id, self.url, self.queued)
        finally:
            await self._stop_tasks()
            self._counters.unsent = self.queued

    # ---------------------------------------------------------------------------------------- internals
    def _check_running(self) -> None:
        if self._task is None or self._closing:
            raise RuntimeError("the Publisher is not running: use it inside `async with Publisher(...)`")
        if self._task.done():
            error = None if self._task.cancelled() else self._task.exception()
            raise RuntimeError(f"the publisher's connection task has stopped ({error!r})") from error

    def _enqueue(self, item: _Item) -> None:
        self._outbox.append(item)
        self._drained.clear()
        self._wake.set()

    def _enqueue_status(self, stream_id: str) -> None:
        # one pending report per stream is enough: it is rendered from the current state when sent
        if stream_id not in self._status_queued:
            self._status_queued.add(stream_id)
            self._enqueue(_Item(stream_id, self._status_topic(stream_id), None, self.qos.get(STATUS, 1)))

    def _drop_oldest(self) -> None:
        for i, item in enumerate(self._outbox):
            if item.payload is not None:
                del self._outbox[i]
                self._counters.outbox_overflow += 1
                if item.stream_id in self._streams:
                    self._streams[item.stream_id].outbox_overflow += 1
                return

    def _status_topic(self, stream_id: str) -> str:
        return topics.topic(self.prefix, self.status_id if stream_id == ENGINE_ID else stream_id, STATUS)

    def _status(self, stream_id: str) -> Status:
        if stream_id == ENGINE_ID:
            c = self._counters
            counters = {"published": c.published, "outbox_overflow": c.outbox_overflow,
                        "reconnects": c.reconnects,
                        "dropped": sum(s.dropped for s in self._streams.values())}
            return Status(self.status_id, self._engine.state, time.time(), self.engine_id, counters,
                          {"epoch": self.epoch, "streams": len(self._streams), "wire_version": VERSION})
        s = self._streams[stream_id]
        return Status(stream_id, s.state, time.time(), self.engine_id, self.stream_counters(stream_id),
                      dict(s.info))

    def _render(self, item: _Item) -> tuple[bytes, Properties | None]:
        if item.payload is not None:
            return item.payload, item.properties
        self._status_queued.discard(item.stream_id)
        status = self._status(item.stream_id)
        if item.stream_id != ENGINE_ID:
            self._streams[item.stream_id].reported = tuple(status.counters.values())
        props = self._json_properties([("stream_id", status.stream_id), ("state", status.state)])
        return encode_status(status), props

    def _data_properties(self, msg: EmbeddingMessage) -> Properties:
        """MQTT 5 extras: content type, payload format, the key header fields as user properties, expiry."""
        props = Properties(PacketTypes.PUBLISH)
        binary = self.payload_format == "binary"
        props.ContentType = CONTENT_TYPE if binary else JSON_CONTENT_TYPE
        props.PayloadFormatIndicator = 0 if binary else 1
        props.UserProperty = [("stream_id", msg.stream_id), ("kind", msg.kind), ("seq", str(msg.seq)),
                              ("epoch", str(msg.epoch)), ("first_frame", str(msg.first_frame)),
                              ("model_id", msg.model_id), ("wire_version", str(VERSION))]
        if self.message_expiry is not None:
            props.MessageExpiryInterval = max(1, round(self.message_expiry))
        return props

    def _json_properties(self, user: list[tuple[str, str]], packet: int = PacketTypes.PUBLISH
                         ) -> Properties | None:
        if not self._conn.v5:
            return None
        props = Properties(packet)
        props.ContentType = JSON_CONTENT_TYPE
        props.PayloadFormatIndicator = 1
        props.UserProperty = user
        return props

    def _will(self) -> aiomqtt.Will:
        status = Status(self.status_id, "offline", time.time(), self.engine_id, {},
                        {"reason": "connection lost (last will)", "epoch": self.epoch})
        return aiomqtt.Will(self._status_topic(ENGINE_ID), encode_status(status), self.qos.get(STATUS, 1),
                            retain=True,
                            properties=self._json_properties([("stream_id", self.status_id), ("state", "offline")],
                                                             PacketTypes.WILLMESSAGE))

    async def _run(self) -> None:
        """Connect, serve until closed, reconnect on any MQTT error. A refusal (negative CONNACK) before the
        first connection, with a connect_timeout, ends the task so ``__aenter__`` reports it at once."""
        while True:
            # a new client id per connection: the publisher needs no session, and a connect abandoned on a
            # hung broker (which may still complete when the broker wakes up) must not take over this one
            client = self._conn.client(f"streamwavlm-pub-{uuid.uuid4().hex[:12]}", will=self._will())
            live = False
            try:
                async with client:
                    live = True
                    if self._ever_connected:
                        self._counters.reconnects += 1
                        log.info("publisher %s: reconnected to %s", self.engine_id, self.url)
                    self._ever_connected = True
                    self._last_error = None
                    self._backoff.reset()
                    self._connected.set()
                    await self._serve(client)
                    return
            except aiomqtt.MqttError as e:
                self._connected.clear()
                if is_refusal(e) and not self._ever_connected and self.connect_timeout is not None:
                    self._last_error = e
                    return
                # log an outage once, not at every failed retry
                level = logging.DEBUG if self._last_error is not None else logging.WARNING
                log.log(level, "publisher %s: %s: %s; %d queued, retrying", self.engine_id, self.url, e,
                        self.queued)
                self._last_error = e
            finally:
                if not live:  # a connect that failed or was cancelled (connect_timeout, close_timeout)
                    abandon(client)
            await asyncio.sleep(self._backoff.next_delay())

    async def _serve(self, client: aiomqtt.Client) -> None:
        client.pending_calls_threshold = self.max_inflight + 16
        watcher = asyncio.create_task(self._watch(client))
        _collect_outcome(watcher)  # its error is re-raised by _race, or moot once we leave
        try:
            # the broker may have restarted and lost retained messages: announce everything again
            if not self._closing:
                self._engine.state = "online"
            announce = [_Item(sid, self._status_topic(sid), None, self.qos.get(STATUS, 1))
                        for sid in (ENGINE_ID, *self._streams) if sid not in self._status_queued]
            self._status_queued.update(item.stream_id for item in announce)
            await self._send(client, watcher, announce)
            while True:
                if not self._outbox:
                    self._drained.set()
                    if self._closing:
                        return
                    self._wake.clear()
                    await self._race(self._wake.wait(), watcher)
                    continue
                batch = [self._outbox.popleft() for _ in range(min(self.max_inflight, len(self._outbox)))]
                await self._send(client, watcher, batch)
        finally:
            watcher.cancel()

    async def _send(self, client: aiomqtt.Client, watcher: asyncio.Task[None], items: list[_Item]) -> None:
        """Publish ``items`` concurrently; the ones that fail go back to the front of the outbox in order."""
        self._inflight = items
        rendered = [self._render(item) for item in items]
        calls = [client.publish(item.topic, payload, item.qos, retain=item.payload is None, properties=props)
                 for item, (payload, props) in zip(items, rendered, strict=True)]
        # until the calls return, every item counts as failed: a cancellation (close_timeout) requeues them
        results: list[BaseException | None] = [aiomqtt.MqttError("not sent")] * len(items)
        try:
            results = await self._race(asyncio.gather(*calls, return_exceptions=True), watcher)
        except aiomqtt.MqttError as e:
            results = [e] * len(items)
        finally:
            failed = [item for item, r in zip(items, results, strict=True) if r is not None]
            for item in reversed(failed):
                if item.payload is None:
                    self._status_queued.add(item.stream_id)
                self._outbox.appendleft(item)
            self._counters.retried += len(failed)
            self._inflight = []
        for item, r in zip(items, results, strict=True):
            if r is None and item.payload is not None:
                self._counters.published += 1
                if item.stream_id in self._streams:  # not forgotten meanwhile
                    self._streams[item.stream_id].published += 1
        errors = [r for r in results if r is not None]
        if errors:
            raise errors[0] if isinstance(errors[0], aiomqtt.MqttError) else aiomqtt.MqttError(str(errors[0]))

    @staticmethod
    async def _watch(client: aiomqtt.Client) -> None:
        """Ends with MqttError when the connection drops (aiomqtt's message iterator reports it)."""
        async for _ in client.messages:
            pass

    @staticmethod
    async def _race(aw: Awaitable[T], watcher: asyncio.Task[None]) -> T:
        """Await ``aw`` unless the connection drops first; then cancel it and raise the watcher's error."""
        task = asyncio.ensure_future(aw)
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            finished = task.done()
            if not finished:
                # not awaited: that could swallow a cancellation of our own task
                _collect_outcome(task)
                task.cancel()
        if finished:
            return task.result()
        watcher.result()
        raise aiomqtt.MqttError("connection closed")

    async def _tick(self, interval: float) -> None:
        """Every ``interval`` s, report the streams whose counters changed (and the engine with them)."""
        while True:
            await asyncio.sleep(interval)
            changed = [sid for sid in self._streams if tuple(self.stream_counters(sid).values())
                       != self._streams[sid].reported]
            for sid in changed:
                self._enqueue_status(sid)
            if changed:
                self._enqueue_status(ENGINE_ID)

    async def _stop_tasks(self) -> None:
        for task in (self._ticker, self._task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._connected.clear()


def _collect_outcome(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as seen, so that asyncio does not log a result nobody needs to read."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


__all__ = ["DEFAULT_QOS", "Publisher", "PublisherCounters"]
