"""One worker of a group: takes the audio of the streams it owns from MQTT and publishes their embeddings.

Every worker subscribes to all audio topics of the group and serves the streams that rendezvous hashing over
the live members gives it; it keeps the last ``handover_window`` seconds of every other stream's messages
(raw, undecoded) so that it can continue one from any point of that window. Ownership moves when the live
members change:

* a member joins or drains: the current owner of each moving stream releases it between two steps, sends
  its state (:mod:`.handover`) to the new owner and marks the stream's record with the new owner; the new
  owner continues from exactly that state and sample, with the same sequence numbers and epoch;
* a member dies (its last will clears its member record): the new owner of each of its streams starts a
  fresh state with the audio that arrives from then on, in the stream's epoch and with sequence numbers past
  any the dead worker can have used, so subscribers see the gap; the stream's status says so.

A worker never publishes a stream before its previous owner has released it (hand-over) or is known dead
(will), so no two workers publish one stream at once (docs/scaling.md has the argument and the bounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt

from ..audio.mqtt_audio import MqttAudioInput, MqttAudioStream, decode_payload
from ..audio.queue import Ledger
from ..audio.source import refuse
from ..audio.validate import SAMPLE_RATE, AudioError
from ..engine import Engine, Resume, StreamStatus
from ..mqtt.connection import BrokerUnavailable, Connection
from ..mqtt.message import EMBEDDINGS, XVECTOR
from ..mqtt.publisher import Publisher
from ..mqtt.sink import MqttSink
from ..streaming import PoolFull, StreamPool
from ..streaming.state import map_tensors
from .handover import Handover, HandoverError, decode_handover, encode_handover
from .membership import GroupTopics, Member, StreamRecord
from .rendezvous import owner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    broker: str
    group: str
    name: str
    model_id: str  # published with the embeddings
    fingerprint: str  # of the weights: a hand-over is refused between workers with different ones
    audio_prefix: str = "streamwavlm-audio"
    prefix: str = "streamwavlm"
    cluster_prefix: str = "streamwavlm-cluster"
    keepalive: int = 5  # of the membership connection: a dead host is noticed within 1.5x this
    max_backlog: float = 2.0
    idle_timeout: float = 30.0
    status_interval: float = 5.0
    payload_dtype: str = "float32"
    qos: int = 1
    handover_window: float = 5.0  # seconds of other streams' audio kept to continue them
    handover_timeout: float = 10.0  # a hand-over announced in a stream's record but not received by then
    drain_timeout: float = 20.0  # the longest a drain waits for the broker to take the hand-overs


@dataclass
class _Kept:
    """Recent messages of a stream this worker does not serve: (arrival, payload, offset)."""

    messages: deque[tuple[float, bytes, int | None]]
    since: float  # when this worker first expected to serve it (a hand-over on its way), else 0


class Worker:
    """``await Worker(pool, options).run(stop)`` serves until ``stop`` is set, then drains."""

    def __init__(self, pool: StreamPool, options: WorkerOptions, *, say: Callable[[str], None] = print) -> None:
        self.pool = pool
        self.o = options
        self.me = options.name
        self.topics = GroupTopics(options.cluster_prefix, options.group)
        self.topics.member(self.me)  # refuses a name that cannot be a topic level
        self.say = say
        self.members: dict[str, Member] = {}
        self.records: dict[str, StreamRecord] = {}
        self.kept: dict[str, _Kept] = {}
        self.joined = asyncio.Event()
        self.draining = False
        self._moving = asyncio.Lock()  # one rebalance or drain at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn = Connection.create(options.broker, username=None, password=None, protocol="5", tls=None,
                                       timeout=10.0, keepalive=options.keepalive)

    # ------------------------------------------------------------------ who serves what
    def live(self) -> list[str]:
        return sorted(n for n, m in self.members.items() if m.state == "live")

    def owner_of(self, stream_id: str) -> str | None:
        return owner(stream_id, self.live())

    def _claim(self, stream_id: str, offset: int | None) -> bool:
        """A message of a stream not served here: serve it from its start if it is a new stream of ours."""
        return (self.joined.is_set() and not self.draining and self.owner_of(stream_id) == self.me
                and stream_id not in self.records and not offset)

    def _other(self, stream_id: str, payload: bytes, offset: int | None) -> None:
        """A message of a stream served elsewhere: keep it, and take the stream over when nobody else will."""
        now = time.monotonic()
        kept = self.kept.setdefault(stream_id, _Kept(deque(), 0.0))
        kept.messages.append((now, payload, offset))
        if not kept.since or now - kept.since > self.o.handover_timeout:  # all of it while a hand-over is due
            while kept.messages and kept.messages[0][0] < now - self.o.handover_window:
                kept.messages.popleft()
        if not payload:  # the end of the stream: nothing more to take over
            if not kept.since:
                del self.kept[stream_id]
            self._forget_orphan(stream_id)
            return
        self._consider(stream_id, payload, offset)

    def _consider(self, stream_id: str, payload: bytes, offset: int | None) -> None:
        if not self.joined.is_set() or self.draining or self.owner_of(stream_id) != self.me:
            return
        rec = self.records.get(stream_id)
        kept = self.kept[stream_id]
        if rec is not None and rec.owner != self.me and rec.owner in self.members:
            kept.since = kept.since or time.monotonic()  # its owner hands it to us (drain or join): keep all
            return
        if rec is not None and rec.owner == self.me:
            kept.since = kept.since or time.monotonic()
            if time.monotonic() - kept.since < self.o.handover_timeout:
                return  # the hand-over addressed to us is on its way
        self._take_over(stream_id, rec, payload, offset)

    def _take_over(self, stream_id: str, rec: StreamRecord | None, payload: bytes, offset: int | None) -> None:
        """Serve a stream whose owner died (or that nobody served) with a fresh state, from this message."""
        try:
            decoded = decode_payload(payload)
        except AudioError:
            return  # the next good message will do
        hop, s = self.pool.cfg.hop, self.pool.settings
        start = math.ceil((offset or 0) * SAMPLE_RATE / decoded.rate / hop) * hop  # on a frame boundary
        frame = start // hop
        epoch = rec.epoch if rec is not None else _new_epoch()
        # past every seq the previous owner can have used: its messages covered frames before ``frame``
        seqs = {} if rec is None else {EMBEDDINGS: -(-frame // s.chunk),
                                       XVECTOR: -(-frame // s.xvector.hop) if s.xvector else 0}
        source = self.audio.attach(stream_id, decoded.rate, decoded.wav, start)
        how = "a stream nobody served" if rec is None else f"failover from {rec.owner}"
        info = {"owner": self.me, "failover": None if rec is None else {
            "from": rec.owner, "resumed_at_frame": frame,
            "reason": f"worker {rec.owner} left the group without handing the stream over"}}
        if self._serve(source, Resume(None, Ledger(origin=start)), epoch, seqs, info):
            self.kept.pop(stream_id, None)
            self.say(f"worker {self.me}: took stream {stream_id} ({how}) at frame {frame}")

    def _serve(self, source: MqttAudioStream, resume: Resume | None, epoch: int, seqs: dict[str, int],
               info: dict[str, object]) -> bool:
        """Run a stream here from now on and say so in its record and status."""
        sid = source.stream_id
        try:
            self.engine.add(source, sid, resume=resume)
        except PoolFull as e:  # the sender is told, and the stream ignored here until it ends
            self._spawn(refuse(source, "server_busy", f"worker {self.me}: {e}"))
            return False
        self.sink.resume(sid, epoch, seqs)
        self.publisher.set_status(sid, info=info)
        self._record(StreamRecord(sid, self.me, epoch))
        return True

    def _record(self, rec: StreamRecord | None, stream_id: str = "") -> None:
        sid = rec.stream_id if rec is not None else stream_id
        if rec is None:
            self.records.pop(sid, None)
        else:
            self.records[sid] = rec
        self._spawn(self.control.publish(self.topics.stream(sid), rec.encode() if rec else b"", qos=1,
                                         retain=True))

    def _forget_orphan(self, stream_id: str) -> None:
        """A stream ended whose record names a worker that is gone: its record goes with it."""
        rec = self.records.get(stream_id)
        if rec is not None and rec.owner not in self.members and self.owner_of(stream_id) == self.me:
            self._record(None, stream_id)

    # ------------------------------------------------------------------ new streams and statuses
    async def _accept(self) -> None:
        async for source in self.audio.streams():
            if self._serve(source, None, _new_epoch(), {}, {"owner": self.me}):
                self.say(f"worker {self.me}: took stream {source.stream_id} (new)")

    def _status(self, st: StreamStatus) -> None:
        self.sink.status(st)
        if st.state != "open":  # ended here: the stream's record and numbering go
            self.sink.forget(st.stream_id)
            if self.records.get(st.stream_id, None) and self.records[st.stream_id].owner == self.me:
                self._record(None, st.stream_id)

    # ------------------------------------------------------------------ control messages
    async def _listen(self) -> None:
        try:
            async for message in self.control.messages:
                parsed = self.topics.parse(message.topic.value)
                payload = message.payload if isinstance(message.payload, bytes) else b""
                if parsed is None:
                    continue
                kind, name = parsed
                try:
                    if kind == "members":
                        self._on_member(name, payload)
                    elif kind == "streams":
                        if payload:
                            rec = self.records[name] = StreamRecord.decode(payload)
                            if rec.owner == self.me and name in self.kept:  # released to us: the state comes
                                self.kept[name].since = time.monotonic()  # next; --handover-timeout from now
                        else:
                            self.records.pop(name, None)
                    elif kind == "handover" and name == self.me:
                        await self._adopt(payload)
                except (ValueError, KeyError, TypeError) as e:
                    log.warning("worker %s: ignored %s: %s", self.me, message.topic.value, e)
        except aiomqtt.MqttError as e:
            raise BrokerUnavailable(f"worker {self.me} lost the broker ({e}); its streams move to the other "
                                    "workers of the group: restart it (a supervisor should)") from None

    def _on_member(self, name: str, payload: bytes) -> None:
        before = self.live()
        if payload:
            self.members[name] = Member.decode(payload)
        elif name == self.me and not self.draining:
            raise BrokerUnavailable(f"worker {self.me}: the group lost this worker's membership (another worker "
                                    "with the same name, or the broker fired its will); stopping")
        else:
            self.members.pop(name, None)
        if name == self.me and not self.joined.is_set():
            self.joined.set()
            self.say(f"worker {self.me}: joined group {self.o.group} ({len(self.live())} live: "
                     f"{', '.join(self.live())})")
        if self.live() != before and self.joined.is_set() and not self.draining:
            self._spawn(self._rebalance())

    async def _rebalance(self) -> None:
        """Hand the streams the live members now give to another worker over to it."""
        async with self._moving:
            if self.draining:
                return
            for sid in list(self.engine.streams):
                target = self.owner_of(sid)
                if target not in (None, self.me):
                    await self._release(sid, target)

    async def _release(self, stream_id: str, target: str) -> None:
        source = self.audio.detach(stream_id)
        if source is None or stream_id not in self.engine.streams:  # it ended (or ends) here
            return
        released = await self.engine.release(stream_id)
        epoch, seqs = self.sink.position(stream_id)
        self.sink.forget(stream_id)
        r = released.resume
        handover = Handover(stream_id, self.me, target, self.o.fingerprint, self.pool.settings, r.state, r.ledger,
                            r.backlog, source.stats.input_rate, source.wav, epoch, seqs)
        payload = encode_handover(handover)
        await self.publisher.flush(self.o.drain_timeout)  # our last messages of it before the next owner's
        self.publisher.forget(stream_id)
        self._record(StreamRecord(stream_id, target, epoch))
        await self.control.publish(self.topics.handover(target), payload, qos=1)
        self.say(f"worker {self.me}: handed stream {stream_id} to {target} at sample {handover.resume_at} "
                 f"({len(payload)} bytes)")

    async def _adopt(self, payload: bytes) -> None:
        """Continue a stream handed to this worker, from exactly where its previous owner left it."""
        try:
            h = decode_handover(payload, self.pool.settings, self.o.fingerprint)
        except HandoverError as e:
            log.error("worker %s: refused a hand-over: %s", self.me, e)
            return
        sid = h.stream_id
        target = owner(sid, [m for m in self.live() if m != self.me])
        if self.draining and target is not None:  # handed to us as we leave: pass it on
            self._record(StreamRecord(sid, target, h.epoch))
            await self.control.publish(self.topics.handover(target), encode_handover(
                dataclasses.replace(h, sender=self.me, recipient=target)), qos=1)
            self.say(f"worker {self.me}: passed stream {sid} on to {target}")
            return
        if sid in self.engine.streams or h.state is None:
            log.warning("worker %s: hand-over of stream %s ignored (%s)", self.me, sid,
                        "already served here" if h.state is None else "it had failed")
            return
        device = next(self.pool.model.parameters()).device
        state = map_tensors(h.state, lambda t: t.to(device))  # the wire's tensors are on the CPU
        kept = self.kept.pop(sid, None)
        source = self.audio.attach(sid, h.rate, h.wav, h.resume_at)
        for _, message, offset in kept.messages if kept else ():
            await self.audio.feed(sid, message, offset)
        if self._serve(source, Resume(state, h.ledger, h.backlog), h.epoch, h.seqs,
                       {"owner": self.me, "handover_from": h.sender, "failover": None}):
            self.say(f"worker {self.me}: took stream {sid} (handover from {h.sender}) at sample {h.resume_at}")

    # ------------------------------------------------------------------ running
    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce(self, state: str) -> None:
        member = Member(self.me, state, time.time(), self.o.keepalive)  # type: ignore[arg-type]
        await self.control.publish(self.topics.member(self.me), member.encode(), qos=1, retain=True)

    async def run(self, stop: asyncio.Event) -> None:
        o = self.o
        will = aiomqtt.Will(self.topics.member(self.me), None, qos=1, retain=True)
        self.control = self._conn.client(f"streamwavlm-worker-{uuid.uuid4().hex[:12]}", will=will)
        try:
            await self.control.__aenter__()
        except aiomqtt.MqttError as e:
            raise self._conn.unavailable(e, 0.0) from e
        try:
            async with contextlib.AsyncExitStack() as stack:
                await self.control.subscribe([(t, 1) for t in self.topics.subscriptions(self.me)])
                self.audio = await stack.enter_async_context(MqttAudioInput(
                    o.broker, prefix=o.audio_prefix, protocol="5", keepalive=o.keepalive, claim=self._claim,
                    on_other=self._other))
                self.publisher = await stack.enter_async_context(Publisher(
                    o.broker, prefix=o.prefix, engine_id=self.me, status_id=f"_engine.{self.me}", protocol="5",
                    qos={EMBEDDINGS: o.qos, XVECTOR: o.qos}, close_timeout=2.0))  # a drain flushed already
                self.sink = MqttSink(self.publisher, o.model_id, SAMPLE_RATE / self.pool.cfg.hop, o.payload_dtype)
                self.engine = await stack.enter_async_context(Engine(
                    self.pool, [self.sink], max_backlog=o.max_backlog, on_status=self._status,
                    idle_timeout=o.idle_timeout, status_interval=o.status_interval))
                listener = asyncio.create_task(self._listen())
                acceptor = asyncio.create_task(self._accept())
                await self._announce("live")  # after the audio subscription: we keep what we may continue
                waiting = [asyncio.create_task(stop.wait()), listener, acceptor]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in (listener, acceptor):
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                await self._drain()
                listener.cancel()
                acceptor.cancel()
        finally:
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(aiomqtt.MqttError):
                await self.control.__aexit__(None, None, None)

    async def _drain(self) -> None:
        """Hand every stream to its next owner (or, the last worker, end them), then leave the group."""
        self.draining = True
        async with self._moving:
            await self._announce("draining")
            others = [m for m in self.live() if m != self.me]
            moved = 0
            for sid in list(self.engine.streams):
                target = owner(sid, others)
                if target is not None:
                    await self._release(sid, target)
                    moved += 1
            for stream in list(self.engine.streams.values()):
                await stream.source.close()
            await self.engine.drain()
            await self.publisher.flush(self.o.drain_timeout)
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=self.o.drain_timeout)
            await self.control.publish(self.topics.member(self.me), b"", qos=1, retain=True)
            self.say(f"worker {self.me}: drained ({moved} stream(s) handed over)")


def _new_epoch() -> int:
    return time.time_ns() // 1000
