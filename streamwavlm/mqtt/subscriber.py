"""The subscriber helper: decoded messages in sequence order, duplicates dropped, gaps reported in place.

``subscribe()`` is an async generator of ``EmbeddingMessage | Gap | Status``:

- Per (stream, kind) it delivers messages in ``seq`` order. A message that arrives ahead of a missing one
  waits in a small reorder buffer; when more than ``reorder_window`` messages wait, or the oldest waited
  ``reorder_timeout`` seconds, the missing range is given up and a ``Gap`` is yielded where it would
  have been. A message of a range already delivered or given up is dropped (a transport duplicate after a
  publisher retry, or a late arrival); so is a message of an older ``epoch``. A newer epoch (the stream's
  seq restarted) flushes what waits and starts over. The first message seen for a (stream, kind) sets the
  starting point: a subscriber that joins mid-stream gets no gap for what came before it.
- Status topics (``"status"`` in ``kinds``) yield ``Status`` reports as they come, unordered.
- A payload that breaks the wire format raises ``WireError`` (naming the topic) and ends the iteration,
  unless ``on_error`` is given: then it is called with (topic, error), counted, and the iteration goes on.
  The default is loud because a wrong format usually means a wrong deployment; long-running consumers
  should pass ``on_error`` so that one bad publisher cannot stop them (principle 7).
- Connections: the first must succeed within ``connect_timeout`` (else BrokerUnavailable; a refusal is
  raised at once). After that a lost connection is retried forever with backoff; with ``session`` (a fixed
  client id) the broker keeps a persistent session, so QoS 1 messages published meanwhile are delivered
  after the reconnect (if the broker itself survived or persisted them).

Close the generator when done (``async with contextlib.aclosing(subscribe(...)) as items``) so that
the connection is released at once rather than when the generator is collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import aiomqtt

from . import topics
from .connection import Backoff, Connection, Protocol, TLSOptions, abandon, is_refusal
from .message import STATUS, EmbeddingMessage, Gap, Status
from .wire import DEFAULT_MAX_SIZE, WireError, decode_any, decode_status

log = logging.getLogger(__name__)

Item = EmbeddingMessage | Gap | Status
ErrorHandler = Callable[[str, WireError], None]


@dataclass
class SubscriberStats:
    """Counters a caller can pass in to watch the subscriber (updated in place)."""

    received: int = 0    # payloads received
    delivered: int = 0   # EmbeddingMessages yielded
    duplicates: int = 0  # dropped: seq already delivered or given up as a gap (duplicates, late arrivals)
    stale: int = 0       # dropped: epoch older than the stream's current one
    gaps: int = 0        # Gap items yielded
    lost: int = 0        # sequence numbers covered by those gaps
    errors: int = 0      # malformed payloads passed to on_error
    reconnects: int = 0  # connections after the first


@dataclass
class _Order:
    epoch: int
    next_seq: int
    held: dict[int, EmbeddingMessage] = field(default_factory=dict)
    since: float = 0.0  # when the current missing seq started to hold messages back


class Reorderer:
    """The ordering, dedup and gap logic of ``subscribe``, independent of MQTT (``now`` is monotonic s)."""

    def __init__(self, window: int, timeout: float, stats: SubscriberStats) -> None:
        if window < 0 or timeout < 0:
            raise ValueError(f"reorder_window ({window}) and reorder_timeout ({timeout}) must be >= 0")
        self.window = window
        self.timeout = timeout
        self.stats = stats
        self._states: dict[tuple[str, str], _Order] = {}

    def push(self, msg: EmbeddingMessage, now: float) -> list[Item]:
        key = (msg.stream_id, msg.kind)
        st = self._states.get(key)
        out: list[Item] = []
        if st is None or msg.epoch > st.epoch:
            if st is not None:
                while st.held:
                    out += self._skip(st, key, now)
            st = self._states[key] = _Order(msg.epoch, msg.seq)
        elif msg.epoch < st.epoch:
            self.stats.stale += 1
            return out
        if msg.seq < st.next_seq or msg.seq in st.held:
            self.stats.duplicates += 1
            return out
        if not st.held:
            st.since = now
        st.held[msg.seq] = msg
        out += self._release(st, now)
        while len(st.held) > self.window:
            out += self._skip(st, key, now)
        return out

    def expire(self, now: float) -> list[Item]:
        """Give up the missing ranges that have held messages back for ``timeout`` seconds."""
        out: list[Item] = []
        for key, st in self._states.items():
            if st.held and now - st.since >= self.timeout:
                out += self._skip(st, key, now)
        return out

    def deadline(self) -> float | None:
        """The earliest time ``expire`` has something to do, or None."""
        waiting = [st.since + self.timeout for st in self._states.values() if st.held]
        return min(waiting) if waiting else None

    def _release(self, st: _Order, now: float) -> list[Item]:
        out: list[Item] = []
        while st.next_seq in st.held:
            out.append(st.held.pop(st.next_seq))
            st.next_seq += 1
        if out and st.held:
            st.since = now  # a new hole: its wait starts now
        self.stats.delivered += len(out)
        return out

    def _skip(self, st: _Order, key: tuple[str, str], now: float) -> list[Item]:
        lowest = min(st.held)
        gap = Gap(key[0], key[1], st.epoch, st.next_seq, lowest - st.next_seq)
        self.stats.gaps += 1
        self.stats.lost += gap.count
        st.next_seq = lowest
        st.since = now
        return [gap, *self._release(st, now)]


async def subscribe(
    broker: str = "mqtt://127.0.0.1:1883", prefix: str = "streamwavlm", stream: str = "+",
    kinds: Sequence[str] = ("embeddings",), *, username: str | None = None, password: str | None = None,
    protocol: Protocol | None = None, tls: TLSOptions | None = None, qos: int = 1,
    reorder_window: int = 8, reorder_timeout: float = 0.25, on_error: ErrorHandler | None = None,
    session: str | None = None, session_expiry: int = 3600, max_size: int = DEFAULT_MAX_SIZE,
    queue_size: int = 10000, connect_timeout: float | None = 10.0, timeout: float = 10.0,
    keepalive: int = 30, reconnect_first: float = 0.1, reconnect_max: float = 10.0,
    stats: SubscriberStats | None = None, on_subscribed: Callable[[], None] | None = None,
) -> AsyncIterator[Item]:
    """Yield ``EmbeddingMessage``s in seq order per (stream, kind), ``Gap``s where messages were lost, and
    ``Status`` reports when ``"status"`` is among ``kinds``. See the module docstring for the policies.

    ``stream`` is a stream id or ``+`` for all; ``session`` is a client id for a persistent session
    (kept by the broker ``session_expiry`` seconds, and needing ``qos`` >= 1: a broker queues nothing at
    QoS 0 for an absent client, so the option would silently do nothing); ``queue_size`` bounds the
    messages received but not yet consumed (beyond it they are discarded and show up as gaps);
    ``connect_timeout=None`` retries the first connection forever. ``on_subscribed`` is called after every
    (re)subscription, e.g. to log it or to start publishing only once someone listens.
    """
    if session is not None and qos < 1:
        raise ValueError(f"a persistent session needs qos 1 or 2 (got {qos}): at QoS 0 the broker queues "
                         "nothing while the subscriber is away")
    conn = Connection.create(broker, username=username, password=password, protocol=protocol, tls=tls,
                             timeout=timeout, keepalive=keepalive)
    filters = [(f, qos) for f in topics.filters(prefix, stream, kinds)]
    stats = stats if stats is not None else SubscriberStats()
    order = Reorderer(reorder_window, reorder_timeout, stats)
    backoff = Backoff(reconnect_first, reconnect_max)
    identifier = session or f"streamwavlm-sub-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    connected_once = False
    first_error: BaseException | None = None  # why the first connection fails (not the final timeout)
    outage = False  # a lost connection is logged once, not at every failed retry
    while True:
        client = conn.client(identifier, session_expiry=session_expiry if session else None,
                             queue_size=queue_size)
        live = False
        try:
            async with contextlib.AsyncExitStack() as stack:
                left = None if connected_once or connect_timeout is None else max(
                    0.0, connect_timeout - (time.monotonic() - started))
                await asyncio.wait_for(stack.enter_async_context(client), left)
                live = True
                if connected_once:
                    stats.reconnects += 1
                    log.info("subscriber: reconnected to %s", conn.address.display)
                connected_once = True
                outage = False
                backoff.reset()
                async with contextlib.aclosing(_serve(client, filters, prefix, order, max_size, on_error,
                                                      stats, on_subscribed)) as items:
                    async for item in items:
                        yield item
        except (aiomqtt.MqttError, asyncio.TimeoutError) as e:
            if not connected_once:
                if first_error is None or not isinstance(e, asyncio.TimeoutError):
                    first_error = e
                waited = time.monotonic() - started
                if is_refusal(e) or (connect_timeout is not None and waited >= connect_timeout):
                    raise conn.unavailable(first_error, waited) from None
            elif not outage:
                outage = True
                log.warning("subscriber: lost %s (%s); reconnecting", conn.address.display, e)
        finally:
            if not live:  # a connect that failed, timed out or was cancelled
                abandon(client)
        await asyncio.sleep(backoff.next_delay())


async def _serve(client: aiomqtt.Client, filters: list[tuple[str, int]], prefix: str, order: Reorderer,
                 max_size: int, on_error: ErrorHandler | None, stats: SubscriberStats,
                 on_subscribed: Callable[[], None] | None) -> AsyncIterator[Item]:
    """One connection's worth of items; ends with MqttError when the connection drops."""
    await client.subscribe(filters)
    if on_subscribed is not None:
        on_subscribed()
    messages = client.messages
    # one __anext__ task stays pending across reorder timeouts: cancelling it could drop a message that
    # aiomqtt had already taken off its queue
    pending: asyncio.Task[aiomqtt.Message] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(messages.__anext__())
            deadline = order.deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait({pending}, timeout=timeout)
            if not done:
                for item in order.expire(time.monotonic()):
                    yield item
                continue
            task, pending = pending, None
            for item in _handle(task.result(), prefix, order, max_size, on_error, stats):
                yield item
    finally:
        if pending is not None:
            pending.cancel()


def _handle(m: aiomqtt.Message, prefix: str, order: Reorderer, max_size: int, on_error: ErrorHandler | None,
            stats: SubscriberStats) -> list[Item]:
    name = m.topic.value
    parsed = topics.split(prefix, name)
    payload = m.payload
    if parsed is None or not isinstance(payload, (bytes, bytearray)) or not payload:
        return []  # outside the layout, or an empty retained-message deletion
    stats.received += 1
    stream_id, kind = parsed
    try:
        if kind == STATUS:
            return [decode_status(bytes(payload))]
        msg = decode_any(payload, max_size=max_size)
        if (msg.stream_id, msg.kind) != (stream_id, kind):
            raise WireError(f"the payload is a {msg.kind!r} message of stream {msg.stream_id!r}, which "
                            "belongs on another topic")
    except WireError as e:
        error = WireError(f"{name}: {e}")
        if on_error is None:
            raise error from None
        stats.errors += 1
        on_error(name, error)
        return []
    return order.push(msg, time.monotonic())
