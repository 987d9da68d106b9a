"""The MQTT layer against real brokers (mosquitto child processes, amqtt in-process); no mocks.

Every test runs its coroutine under ``arun`` (an overall timeout) and waits on events, not sleeps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import math
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from streamwavlm.commands import listen
from streamwavlm.mqtt import (
    BrokerUnavailable,
    EmbeddedBroker,
    EmbeddingMessage,
    Gap,
    Mosquitto,
    Publisher,
    Status,
    SubscriberStats,
    TLSOptions,
    WireError,
    decode,
    decode_json,
    decode_status,
    encode,
    encode_json,
    encode_status,
    parse_broker_url,
    subscribe,
)
from streamwavlm.mqtt.broker import find_mosquitto, free_port
from streamwavlm.mqtt.subscriber import Reorderer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "mqtt.md"

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
try:
    import amqtt  # noqa: F401
    HAVE_AMQTT = True
except ImportError:
    HAVE_AMQTT = False
needs_amqtt = pytest.mark.skipif(not HAVE_AMQTT, reason="amqtt not installed")

FAST = {"reconnect_first": 0.05, "reconnect_max": 0.2}  # backoff for tests: outages last ~0.1-0.5 s


def arun(coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
    """Run a test coroutine with a hard bound, so that no test can hang."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make(seq: int, *, stream: str = "mic0", dtype: type = np.float32, shape: tuple[int, ...] = (2, 4, 8),
         kind: str = "embeddings", epoch: int = 0) -> EmbeddingMessage:
    rng = np.random.default_rng(seq)
    layers = (4, -1)[: shape[0]] if kind == "embeddings" else ()
    if kind == "embeddings" and shape[0] > 2:
        layers = tuple(range(shape[0]))
    return EmbeddingMessage(stream, kind, seq, seq * (shape[1] if len(shape) == 3 else 1), 50.0, time.time(),
                            "wavlm-test", layers, rng.standard_normal(shape).astype(dtype), epoch)


class Collector:
    """Runs ``subscribe()`` in a task, keeps every item, and lets the test wait for a condition."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.url = url
        self.kwargs = kwargs
        self.items: list[Any] = []
        self.stats = SubscriberStats()
        self.error: BaseException | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @property
    def messages(self) -> list[EmbeddingMessage]:
        return [x for x in self.items if isinstance(x, EmbeddingMessage)]

    async def _run(self) -> None:
        try:
            items = subscribe(self.url, stats=self.stats, on_subscribed=self._ready.set, **self.kwargs)
            async with contextlib.aclosing(items):
                async for item in items:
                    self.items.append(item)
                    async with self._changed:
                        self._changed.notify_all()
        except Exception as e:
            self.error = e
            self._ready.set()
            async with self._changed:
                self._changed.notify_all()

    async def wait(self, predicate: Callable[[Collector], bool], timeout: float = 5.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.error is not None or predicate(self)),
                                   timeout)

    async def __aenter__(self) -> Collector:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 5)
        if self.error is not None:
            raise self.error
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def assert_same(a: EmbeddingMessage, b: EmbeddingMessage) -> None:
    for name in ("stream_id", "kind", "seq", "first_frame", "frame_rate", "timestamp", "model_id", "epoch"):
        assert getattr(a, name) == getattr(b, name), name
    assert tuple(a.layers) == tuple(b.layers)
    assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
    assert np.array_equal(a.data, b.data)


# ------------------------------------------------------------------------------------------ wire format
SHAPES = [("embeddings", (3, 16, 768)), ("embeddings", (1, 1, 4)), ("embeddings", (13, 50, 32)),
          ("xvector", (512,)), ("speakers", (2, 3))]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(("kind", "shape"), SHAPES)
def test_roundtrip_binary_and_json(dtype: type, kind: str, shape: tuple[int, ...]) -> None:
    msg = make(7, dtype=dtype, shape=shape, kind=kind, epoch=123)
    out = decode(encode(msg))
    assert_same(out, msg)
    assert out.data.flags.writeable
    assert_same(decode_json(encode_json(msg)), msg)


def doc_decode(payload: bytes) -> dict[str, Any]:
    """A decoder written from docs/mqtt.md §3 alone (struct, no import of the encoder)."""
    magic, version, dtype, ndim, n_layers, header_len, data_len, seq, epoch, first_frame, frame_rate, \
        timestamp = struct.unpack_from("<4sBBBBIIQQqdd", payload, 0)
    assert magic == b"SWLM" and version == 1
    off = 56
    shape = struct.unpack_from(f"<{ndim}I", payload, off)
    off += 4 * ndim
    layers = struct.unpack_from(f"<{n_layers}h", payload, off)
    off += 2 * n_layers
    strings = []
    for _ in range(3):
        (length,) = struct.unpack_from("<H", payload, off)
        strings.append(payload[off + 2: off + 2 + length].decode("utf-8"))
        off += 2 + length
    assert off <= header_len and len(payload) == header_len + data_len
    np_dtype = {1: "<f4", 2: "<f2"}[dtype]
    assert data_len == math.prod(shape) * np.dtype(np_dtype).itemsize
    data = np.frombuffer(payload[header_len:], dtype=np_dtype).reshape(shape)
    return dict(stream_id=strings[0], kind=strings[1], model_id=strings[2], seq=seq, epoch=epoch,
                first_frame=first_frame, frame_rate=frame_rate, timestamp=timestamp, layers=layers, data=data)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(("kind", "shape"), SHAPES[:2] + SHAPES[3:4])
def test_decoder_written_from_the_doc(dtype: type, kind: str, shape: tuple[int, ...]) -> None:
    msg = make(3, dtype=dtype, shape=shape, kind=kind, stream="küche-1", epoch=9)
    if kind == "xvector":
        msg.layers = (-1,)  # the layers a pooled vector came from
    d = doc_decode(encode(msg))
    for name in ("stream_id", "kind", "model_id", "seq", "epoch", "first_frame", "frame_rate", "timestamp"):
        assert d[name] == getattr(msg, name), name
    assert d["layers"] == msg.layers
    assert d["data"].dtype == msg.data.dtype and np.array_equal(d["data"], msg.data)


def test_doc_worked_example_is_what_encode_writes() -> None:
    text = DOC.read_text()
    block = text.split("### 3.6 Worked example", 1)[1].split("```", 2)[1]
    expected = b"".join(bytes.fromhex(m.group(1)) for line in block.strip().splitlines()
                        if (m := re.match(r"^[0-9a-f]{2}  (.*?)(?:\s{3,}.*)?$", line)))
    msg = EmbeddingMessage("mic0", "embeddings", 3, 48, 50.0, 1700000000.5, "m", (4, -1),
                           np.array([[[0.5, -1.0]], [[2.0, 0.25]]], np.float16), epoch=1)
    assert encode(msg) == expected
    assert doc_decode(expected)["seq"] == 3
    # and the JSON example of §4 is what encode_json writes
    json_block = text.split("## 4. The JSON form", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    assert json.loads(json_block) == json.loads(encode_json(msg))


def test_encode_refuses_what_a_decoder_would_refuse() -> None:
    cases: list[tuple[EmbeddingMessage, str]] = []
    nan = make(0)
    nan.data[0, 0, 0] = np.nan
    cases.append((nan, "1 non-finite values"))
    big = make(0, dtype=np.float16)
    big.data[1, 1, 1] = np.inf
    cases.append((big, "non-finite"))
    f64 = make(0)
    f64.data = f64.data.astype(np.float64)
    cases.append((f64, "astype"))

    def msg(stream: str, kind: str, seq: int, layers: tuple[int, ...], shape: tuple[int, ...]
            ) -> EmbeddingMessage:
        return EmbeddingMessage(stream, kind, seq, 0, 50.0, 0.0, "m", layers, np.zeros(shape, "f4"))

    cases.append((msg("a/b", "embeddings", 0, (1,), (1, 1, 2)), "single MQTT topic level"))
    cases.append((msg("s", "embeddings", 0, (1, 2), (1, 1, 2)), "2 layer ids"))
    cases.append((msg("s", "embeddings", 0, (1,), (2,)), "needs data of shape"))
    cases.append((msg("s", "embeddings", 0, (), (1, 1, 2)), "layers is empty"))
    cases.append((msg("s", "xvector", 0, (), (2, 2)), r"shape \(dim,\)"))
    cases.append((msg("s", "xvector", -1, (), (2,)), "seq -1"))
    for msg, pattern in cases:
        with pytest.raises(WireError, match=pattern):
            encode(msg)
    with pytest.raises(WireError, match="exceeds the limit of 1000 bytes"):
        encode(make(0, shape=(2, 40, 8)), max_size=1000)


def test_decode_errors_say_what_is_wrong() -> None:
    good = encode(make(1, shape=(2, 3, 4)))
    header_len = struct.unpack_from("<I", good, 8)[0]

    def patched(offset: int, fmt: str, value: Any) -> bytes:
        b = bytearray(good)
        struct.pack_into(fmt, b, offset, value)
        return bytes(b)

    nan_payload = bytearray(good)
    struct.pack_into("<f", nan_payload, header_len, float("nan"))
    cases = [
        (b"", "truncated header"),
        (b"hello world, this is not it", "not a streamwavlm payload: expected magic b'SWLM'"),
        (b'{"format": "streamwavlm"}', "the JSON form, use decode_json"),
        (patched(4, "<B", 9), "unsupported wire version 9; this decoder supports version\\(s\\) 1"),
        (good[:40], "truncated header: 40 bytes, the fixed header needs 56"),
        (good[:70], "truncated header"),
        (good[:header_len - 1], "truncated header"),
        (good[:-1], "truncated body"),
        (good + b"\0", "trailing bytes"),
        (patched(12, "<I", 12), "shape/size mismatch"),
        (patched(5, "<B", 7), "unknown dtype code 7"),
        (patched(6, "<B", 0), "ndim 0"),
        (bytes(nan_payload), "received data contains 1 non-finite"),
    ]
    for payload, pattern in cases:
        with pytest.raises(WireError, match=pattern):
            decode(payload)
    with pytest.raises(WireError, match=f"payload of {len(good)} bytes exceeds the limit of 100 bytes"):
        decode(good, max_size=100)
    with pytest.raises(WireError, match="not valid JSON"):
        decode_json(b"{oops")
    with pytest.raises(WireError, match="unsupported version 2"):
        decode_json(json.dumps({"format": "streamwavlm", "version": 2}))


def test_status_payload_roundtrip_and_checks() -> None:
    status = Status("mic0", "online", 1.5, "host:1", {"published": 3, "dropped": 1, "outbox_overflow": 0,
                                                      "reconnects": 2}, {"model": "m"})
    assert decode_status(encode_status(status)) == status
    with pytest.raises(WireError, match="state"):
        encode_status(Status("mic0", "sleeping", 0.0, "e"))
    with pytest.raises(WireError, match="lacks field 'state'"):
        decode_status(json.dumps({"format": "streamwavlm-status", "version": 1, "stream_id": "x"}))
    with pytest.raises(WireError, match="not a streamwavlm-status JSON payload"):
        decode_status(encode_json(make(0)))


def test_broker_urls() -> None:
    a = parse_broker_url("mqtts://us%40er:p%3Ass@broker.example:9999?protocol=3.1.1")
    assert (a.host, a.port, a.tls, a.username, a.password, a.protocol) == (
        "broker.example", 9999, True, "us@er", "p:ss", "3.1.1")
    assert parse_broker_url("localhost").port == 1883
    assert parse_broker_url("mqtts://h").port == 8883
    assert parse_broker_url("mqtt://[::1]:1884").host == "::1"
    for bad, pattern in [("http://h", "scheme 'http'"), ("mqtt://h:99999", "invalid port"),
                         ("mqtt://h/x", "unexpected path"), ("mqtt://h?protocol=4", "'5' or '3.1.1'"),
                         ("mqtt://:1883", "no host")]:
        with pytest.raises(ValueError, match=pattern):
            parse_broker_url(bad)
    with pytest.raises(ValueError, match="mqtts://"):
        Publisher("mqtt://h", tls=TLSOptions())


# ------------------------------------------------------------------------------------------ ordering
def test_reorderer_orders_dedups_and_reports_gaps() -> None:
    stats = SubscriberStats()
    r = Reorderer(window=3, timeout=1.0, stats=stats)

    def seqs(items: list[Any]) -> list[Any]:
        return [x.seq if isinstance(x, EmbeddingMessage) else x for x in items]

    def push(seq: int, now: float = 0.0, epoch: int = 1) -> list[Any]:
        return seqs(r.push(make(seq, epoch=epoch), now))

    assert push(10) == [10]            # the first message seen is the starting point: no gap before it
    assert push(12) == []              # 11 missing: 12 waits
    assert push(11) == [11, 12]        # reordered
    assert push(12) == [] and stats.duplicates == 1
    assert push(14) == [] and push(15) == [] and push(16) == []
    assert r.deadline() == pytest.approx(1.0)
    out = push(17)                     # four waiting > window 3: 13 is given up
    assert out == [Gap("mic0", "embeddings", 1, 13, 1), 14, 15, 16, 17]
    assert push(13) == [] and stats.duplicates == 2  # late, after its gap was reported
    assert push(20, now=5.0) == [] and r.expire(5.5) == []
    assert seqs(r.expire(6.0)) == [Gap("mic0", "embeddings", 1, 18, 2), 20]
    assert push(3, epoch=0) == [] and stats.stale == 1
    assert push(0, now=7.0, epoch=2) == [0]  # newer epoch: seq restarts
    assert (stats.gaps, stats.lost, stats.delivered) == (2, 3, 9)
    r0 = Reorderer(window=0, timeout=1.0, stats=SubscriberStats())
    r0.push(make(0), 0.0)
    assert seqs(r0.push(make(2), 0.0)) == [Gap("mic0", "embeddings", 0, 1, 1), 2]


# ------------------------------------------------------------------------------------------ end to end
async def _publish_and_receive(url: str, protocol: str | None, n: int = 60) -> None:
    sent = [make(i, dtype=np.float16 if i % 2 else np.float32) for i in range(n)]
    sent.append(make(0, kind="xvector", shape=(16,)))
    async with Collector(url, kinds=("embeddings", "xvector"), protocol=protocol) as col:
        async with Publisher(url, protocol=protocol, engine_id="e2e", status_interval=None) as pub:
            for msg in sent:
                pub.publish(msg)
            assert await pub.flush(10)
            assert pub.counters.published == n + 1
        await col.wait(lambda c: len(c.messages) == n + 1)
    got = [m for m in col.messages if m.kind == "embeddings"]
    assert [m.seq for m in got] == list(range(n))
    for a, b in zip(got, sent[:n], strict=True):
        assert_same(a, dataclasses.replace(b, epoch=a.epoch))
    assert a.epoch == pub.epoch
    assert [m.data.shape for m in col.messages if m.kind == "xvector"] == [(16,)]
    assert col.stats.gaps == 0 and col.stats.duplicates == 0


@needs_mosquitto
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_end_to_end_mosquitto(mosquitto: Mosquitto, protocol: str) -> None:
    arun(_publish_and_receive(mosquitto.url, protocol))


@pytest.mark.parametrize("backend", [pytest.param("mosquitto", marks=needs_mosquitto),
                                     pytest.param("amqtt", marks=needs_amqtt)])
def test_end_to_end_embedded_broker(backend: str) -> None:
    async def body() -> None:
        broker = EmbeddedBroker(backend=backend)  # type: ignore[arg-type]
        async with broker as url:
            assert url.endswith("?protocol=3.1.1") == (backend == "amqtt")
            await _publish_and_receive(url, None, n=30)
    arun(body())


@needs_mosquitto
@pytest.mark.skipif(shutil.which("mosquitto_sub") is None or shutil.which("stdbuf") is None,
                    reason="mosquitto_sub or stdbuf not installed")
def test_mosquitto_sub_receives_payloads_and_v5_properties(mosquitto: Mosquitto) -> None:
    n = 5

    async def body() -> list[str]:
        # line-buffered (stdbuf): a piped mosquitto_sub would otherwise hold its SUBACK line until it exits
        proc = await asyncio.create_subprocess_exec(
            "stdbuf", "-oL", "mosquitto_sub", "-h", mosquitto.host, "-p", str(mosquitto.port), "-V", "mqttv5",
            "-q", "1", "-d", "-t", "streamwavlm/+/embeddings", "-C", str(n), "-W", "10",
            "-F", "MSG %t|%C|%E|%x",
            stdout=asyncio.subprocess.PIPE, limit=1 << 20)
        assert proc.stdout is not None
        while b"SUBACK" not in (line := await proc.stdout.readline()):
            assert line, "mosquitto_sub exited before subscribing"
        async with Publisher(mosquitto.url, message_expiry=30, status_interval=None) as pub:
            for i in range(n):
                pub.publish(make(i))
        lines = [line.decode().strip() async for line in proc.stdout]
        assert await proc.wait() == 0
        return [line[4:] for line in lines if line.startswith("MSG ")]

    lines = arun(body())
    assert len(lines) == n
    for i, line in enumerate(lines):
        topic, content_type, expiry, hexdata = line.split("|")
        assert topic == "streamwavlm/mic0/embeddings" and content_type == "application/x-streamwavlm"
        assert 0 < int(expiry) <= 30
        msg = decode(bytes.fromhex(hexdata))
        assert msg.seq == i and np.array_equal(msg.data, make(i).data)


@needs_mosquitto
def test_v5_user_properties_repeat_the_header(mosquitto: Mosquitto) -> None:
    async def body() -> None:
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe("streamwavlm/mic0/embeddings", qos=1)
            async with Publisher(mosquitto.url, status_interval=None) as pub:
                pub.publish(make(4))
            m = await anext(aiter(c.messages))
            props = dict(m.properties.UserProperty)  # type: ignore[union-attr]
            assert props["seq"] == "4" and props["stream_id"] == "mic0" and props["wire_version"] == "1"
            assert props["first_frame"] == "16" and props["epoch"] == str(pub.epoch)
            assert m.properties.PayloadFormatIndicator == 0  # type: ignore[union-attr]
    arun(body())


@needs_mosquitto
def test_broker_restart_mid_stream_delivers_every_seq_once(tmp_path: Path) -> None:
    """QoS 1, persistent subscriber session, broker with persistence: stop mosquitto while publishing,
    keep publishing into the outbox, restart on the same port; every seq arrives exactly once."""
    broker = Mosquitto(workdir=tmp_path / "b", persistence=True)
    broker.start()
    n, stop_at = 120, 40

    async def body() -> tuple[Collector, Publisher]:
        async with Collector(broker.url, session="restart-test", reorder_timeout=2.0, **FAST) as col:
            async with Publisher(broker.url, status_interval=None, timeout=2.0, **FAST) as pub:
                for i in range(n):
                    pub.publish(make(i))
                    if i == stop_at:
                        await col.wait(lambda c: len(c.messages) >= stop_at // 2)
                        await asyncio.to_thread(broker.stop)
                    if i == stop_at + 40:
                        assert pub.queued >= 30  # the outbox holds what the broker could not take
                        await asyncio.to_thread(broker.start)
                    await asyncio.sleep(0.002)  # a real-time producer, not a burst
                assert await pub.flush(10)
            await col.wait(lambda c: len(c.messages) >= n, timeout=10)
        return col, pub

    try:
        col, pub = arun(body(), timeout=30)
    finally:
        broker.close()
    assert [m.seq for m in col.messages] == list(range(n))
    assert not [x for x in col.items if isinstance(x, Gap)]
    assert pub.counters.reconnects == 1 and col.stats.reconnects == 1
    assert pub.counters.published == n and pub.counters.outbox_overflow == 0


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition that has no event to wait on (publisher counters), every 10 ms, bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@needs_mosquitto
def test_hung_broker_publishes_are_retried_and_duplicates_dropped(mosquitto: Mosquitto) -> None:
    """SIGSTOP the broker: the publishes time out, go back to the outbox and are re-sent once the broker
    answers again. The broker also delivers the originals it had buffered, so the subscriber receives
    transport duplicates, and must drop them by seq."""
    async def body() -> tuple[Collector, Publisher]:
        async with Collector(mosquitto.url, reorder_timeout=2.0) as col:
            async with Publisher(mosquitto.url, status_interval=None, timeout=0.3, **FAST) as pub:
                for i in range(10):
                    pub.publish(make(i))
                await col.wait(lambda c: len(c.messages) == 10)
                mosquitto.pause()
                try:
                    for i in range(10, 30):
                        pub.publish(make(i))
                    await until(lambda: pub.counters.retried >= 20)
                finally:
                    mosquitto.resume()
                assert await pub.flush(10)
            await col.wait(lambda c: len(c.messages) == 30)
        return col, pub

    col, pub = arun(body())
    assert [m.seq for m in col.messages] == list(range(30))
    assert not [x for x in col.items if isinstance(x, Gap)]
    # how many originals the woken broker still delivers varies (so far always some): each was dropped
    assert col.stats.received == 30 + col.stats.duplicates
    assert pub.counters.published == 30 and pub.counters.reconnects >= 1


@needs_mosquitto
def test_outbox_overflow_is_counted_exactly_and_reported_in_status(tmp_path: Path) -> None:
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"

    broker = Mosquitto(port, workdir=tmp_path / "b")

    async def body() -> None:
        # the broker is down: connect_timeout=None starts anyway and buffers
        async with Publisher(url, connect_timeout=None, outbox_size=10, status_interval=None, **FAST) as pub:
            for i in range(25):
                pub.publish(make(i))
            assert not pub.connected
            assert pub.counters.outbox_overflow == 15
            assert pub.stream_counters("mic0")["outbox_overflow"] == 15
            assert pub.queued == 11  # 10 data messages and mic0's pending status report
            await asyncio.to_thread(broker.start)
            assert await pub.flush(5)
            assert pub.counters.published == 10
            pub.set_status("mic0", dropped=3, info={"chunk_ms": 320})
            assert await pub.flush(5)
            async with Collector(url, kinds=("status",)) as col:
                await col.wait(lambda c: any(s.stream_id == "mic0" for s in c.items))
        status = next(s for s in col.items if s.stream_id == "mic0")
        assert status.state == "online" and status.info == {"chunk_ms": 320}
        assert status.counters == {"published": 10, "dropped": 3, "outbox_overflow": 15, "reconnects": 0}
        assert pub.counters.unsent == 0

    try:
        arun(body())
    finally:
        broker.close()


@needs_mosquitto
def test_status_retained_and_clean_close_marks_offline(mosquitto: Mosquitto) -> None:
    async def body() -> None:
        async with Publisher(mosquitto.url, engine_id="clean", status_interval=None) as pub:
            pub.publish(make(0))
            pub.publish(make(0, stream="mic1"))
            assert await pub.flush(5)
            async with Collector(mosquitto.url, kinds=("status",)) as col:
                await col.wait(lambda c: len(c.items) == 3)
            assert {(s.stream_id, s.state) for s in col.items} == {
                ("_engine", "online"), ("mic0", "online"), ("mic1", "online")}
            pub.close_stream("mic1")
            assert await pub.flush(5)
            async with Collector(mosquitto.url, stream="mic1", kinds=("status",)) as col:
                await col.wait(lambda c: len(c.items) == 1)
            assert col.items[0].state == "offline"
        async with Collector(mosquitto.url, kinds=("status",)) as col:
            await col.wait(lambda c: len(c.items) == 3)
        assert {(s.stream_id, s.state) for s in col.items} == {
            ("_engine", "offline"), ("mic0", "offline"), ("mic1", "offline")}
        engine = next(s for s in col.items if s.stream_id == "_engine")
        assert "reason" not in engine.info and engine.counters["published"] == 2
    arun(body())


@needs_mosquitto
def test_publisher_refuses_bad_messages_and_goes_on(mosquitto: Mosquitto) -> None:
    async def body() -> Collector:
        async with Collector(mosquitto.url) as col, Publisher(mosquitto.url, status_interval=None) as pub:
            bad = make(0)
            bad.data[0, 0, 0] = np.inf
            with pytest.raises(WireError, match="non-finite"):
                pub.publish(bad)
            with pytest.raises(ValueError, match="reserved"):
                pub.publish(make(0, stream="_engine"))
            with pytest.raises(ValueError, match="set_status"):
                pub.publish(make(0, kind="status", shape=(4,)))
            pub.publish(make(0))
            await col.wait(lambda c: len(c.messages) == 1)
            assert await pub.flush(5) and pub.counters.published == 1
        with pytest.raises(RuntimeError, match="not running"):
            pub.publish(make(1))
        return col
    assert [m.seq for m in arun(body()).messages] == [0]


@needs_mosquitto
def test_statuses_are_republished_after_a_broker_restart_loses_them(mosquitto: Mosquitto) -> None:
    """persistence false: a restarted broker has no retained messages; the publisher announces again."""
    async def body() -> list[Status]:
        async with Publisher(mosquitto.url, engine_id="again", status_interval=None, **FAST) as pub:
            pub.publish(make(0))
            assert await pub.flush(5)
            await asyncio.to_thread(mosquitto.restart)
            await until(lambda: pub.counters.reconnects == 1 and pub.connected)
            assert await pub.flush(5)
            async with Collector(mosquitto.url, kinds=("status",)) as col:
                await col.wait(lambda c: len(c.items) == 2)
            return col.items
    statuses = {s.stream_id: s for s in arun(body())}
    assert statuses["_engine"].state == "online" and statuses["mic0"].state == "online"
    assert statuses["mic0"].counters["reconnects"] == 1 and statuses["mic0"].counters["published"] == 1


VICTIM = """
import asyncio, sys, time
import numpy as np
from streamwavlm.mqtt import EmbeddingMessage, Publisher
async def main():
    async with Publisher(sys.argv[1], engine_id="victim", status_interval=None) as pub:
        pub.publish(EmbeddingMessage("mic0", "embeddings", 0, 0, 50.0, time.time(), "m", (0,),
                                     np.zeros((1, 1, 4), np.float32)))
        await pub.flush(5)
        print("ready", flush=True)
        await asyncio.sleep(60)
asyncio.run(main())
"""


@needs_mosquitto
def test_last_will_marks_engine_offline_when_the_process_dies(mosquitto: Mosquitto) -> None:
    async def body() -> None:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", VICTIM, mosquitto.url, cwd=ROOT,
                                                    stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 15)).strip() == b"ready"
            async with Collector(mosquitto.url, stream="_engine", kinds=("status",)) as col:
                await col.wait(lambda c: len(c.items) == 1)
                assert col.items[0].state == "online" and col.items[0].engine_id == "victim"
                proc.kill()  # SIGKILL: no DISCONNECT, the broker must send the will
                await col.wait(lambda c: len(c.items) == 2)
            will = col.items[1]
            assert (will.state, will.engine_id) == ("offline", "victim")
            assert "last will" in will.info["reason"]
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    arun(body())


# ------------------------------------------------------------------------------------------ bad input
async def _raw_publish(url: str, payloads: list[bytes], topic: str = "streamwavlm/mic0/embeddings") -> None:
    a = parse_broker_url(url)
    async with aiomqtt.Client(a.host, a.port) as c:
        for p in payloads:
            await c.publish(topic, p, qos=1)


BAD = [
    (b"GARBAGE!" * 10, "not a streamwavlm payload"),
    (bytes([*b"SWLM", 9]) + bytes(60), "unsupported wire version 9; this decoder supports version\\(s\\) 1"),
    (encode(make(0, shape=(2, 40, 8))), "exceeds the limit of 2000 bytes"),
    (encode(make(0))[:-3], "truncated body"),
    (encode(make(0, stream="other")), "belongs on another topic"),
]


@needs_mosquitto
@pytest.mark.parametrize(("payload", "pattern"), BAD,
                         ids=["magic", "version", "oversize", "truncated", "topic"])
def test_subscriber_raises_on_bad_payload(mosquitto: Mosquitto, payload: bytes, pattern: str) -> None:
    async def body() -> None:
        async with Collector(mosquitto.url, max_size=2000) as col:
            await _raw_publish(mosquitto.url, [payload])
            await col.wait(lambda c: False)
        assert isinstance(col.error, WireError)
        assert re.search(pattern, str(col.error)) and "streamwavlm/mic0/embeddings" in str(col.error)
    arun(body())


@needs_mosquitto
def test_subscriber_on_error_reports_and_goes_on(mosquitto: Mosquitto) -> None:
    errors: list[tuple[str, WireError]] = []

    async def body() -> Collector:
        on_error = lambda t, e: errors.append((t, e))  # noqa: E731
        async with Collector(mosquitto.url, max_size=2000, on_error=on_error) as col:
            await _raw_publish(mosquitto.url, [p for p, _ in BAD] + [encode(make(0)), encode(make(1))])
            await col.wait(lambda c: len(c.messages) == 2)
        return col

    col = arun(body())
    assert [m.seq for m in col.messages] == [0, 1]
    assert len(errors) == len(BAD) == col.stats.errors
    for (_, error), (_, pattern) in zip(errors, BAD, strict=True):
        assert re.search(pattern, str(error))


@needs_mosquitto
def test_subscriber_drops_duplicates_and_reorders(mosquitto: Mosquitto) -> None:
    payloads = [encode(make(i, epoch=5)) for i in (0, 1, 3, 2, 2, 1, 4, 6, 7)]

    async def body() -> Collector:
        async with Collector(mosquitto.url, reorder_timeout=0.2) as col:
            await _raw_publish(mosquitto.url, payloads)
            await col.wait(lambda c: c.items and getattr(c.items[-1], "seq", None) == 7)
        return col

    col = arun(body())
    gap = Gap("mic0", "embeddings", 5, 5, 1)
    assert [getattr(x, "seq", x) for x in col.items] == [0, 1, 2, 3, 4, gap, 6, 7]
    assert col.stats.duplicates == 2


# ------------------------------------------------------------------------------------------ no broker
def test_broker_down_at_start_is_a_clear_error_not_a_hang() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"

    async def body() -> None:
        t0 = time.monotonic()
        pattern = f"cannot connect to MQTT broker {re.escape(url)}.*is a broker running"
        with pytest.raises(BrokerUnavailable, match=pattern):
            async with Publisher(url, connect_timeout=0.5, **FAST):
                pass
        with pytest.raises(BrokerUnavailable, match="cannot connect to MQTT broker"):
            async for _ in subscribe(url, connect_timeout=0.5, **FAST):
                pass
        # connect_timeout=None: start anyway; close gives up after close_timeout and counts what is left
        async with Publisher(url, connect_timeout=None, close_timeout=0.3, **FAST) as pub:
            for i in range(3):
                pub.publish(make(i))
        assert pub.counters.unsent == 5  # 3 data messages, mic0's and the engine's offline status
        assert time.monotonic() - t0 < 3
    arun(body(), timeout=10)


@needs_amqtt
def test_mqtt5_to_a_311_only_broker_is_a_clear_error() -> None:
    async def body() -> None:
        async with EmbeddedBroker(backend="amqtt") as url:
            plain = url.split("?")[0]
            t0 = time.monotonic()
            with pytest.raises(BrokerUnavailable, match=re.escape("protocol='3.1.1'")):  # a refusal: at once
                async for _ in subscribe(plain, protocol="5", connect_timeout=10):
                    pass
            assert time.monotonic() - t0 < 2
            # amqtt does not even answer a v5 CONNECT that carries a will: bounded by connect_timeout
            with pytest.raises(BrokerUnavailable, match=re.escape("protocol='3.1.1'")):
                async with Publisher(plain, protocol="5", connect_timeout=1):
                    pass
            assert time.monotonic() - t0 < 4
    arun(body())


@needs_mosquitto
def test_credentials_from_url_and_refusal(tmp_path: Path) -> None:
    from conftest import password_broker_config

    config = password_broker_config(tmp_path / "auth", {"engine": "s3:cret"})
    with Mosquitto(workdir=tmp_path / "b", extra_config=config) as b:
        async def body() -> None:
            good = f"mqtt://engine:s3%3Acret@127.0.0.1:{b.port}"
            async with Collector(good) as col, Publisher(good, status_interval=None) as pub:
                pub.publish(make(0))
                await col.wait(lambda c: len(c.messages) == 1)
            t0 = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="check the username and password"):
                async with Publisher(b.url, username="engine", password="wrong"):
                    pass
            assert time.monotonic() - t0 < 2
        arun(body())


@needs_mosquitto
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_mqtts_with_a_private_ca(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    with Mosquitto(workdir=tmp_path / "b", extra_config=[f"certfile {cert}", f"keyfile {key}"]) as b:
        url = f"mqtts://127.0.0.1:{b.port}"
        tls = TLSOptions(ca_file=str(cert))

        async def body() -> None:
            async with Collector(url, tls=tls) as col, Publisher(url, tls=tls, status_interval=None) as pub:
                pub.publish(make(0))
                await col.wait(lambda c: len(c.messages) == 1)
            # without the CA file the system CAs do not trust the broker's certificate
            with pytest.raises(BrokerUnavailable, match=re.escape("mqtts://127.0.0.1")):
                async with Publisher(url, connect_timeout=0.5, **FAST):
                    pass
        arun(body())


# ------------------------------------------------------------------------------------------ listen command
def _listen_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    listen.add_parser(parser.add_subparsers())
    return parser.parse_args(["listen", *argv])


@needs_mosquitto
@pytest.mark.parametrize("as_json", [False, True])
def test_listen_command_prints_one_line_per_message(mosquitto: Mosquitto, as_json: bool) -> None:
    out = io.StringIO()
    args = _listen_args("--broker", mosquitto.url, "--count", "3", "--timeout", "10",
                        *(["--json"] if as_json else []))

    async def body() -> int:
        async with Publisher(mosquitto.url, status_interval=None) as pub:
            task = asyncio.create_task(listen.run(args, out))
            seq = 0
            while not task.done():  # keep producing until the listener has seen three
                pub.publish(make(seq, dtype=np.float16))
                seq += 1
                await asyncio.wait({task}, timeout=0.01)
            return task.result()

    assert arun(body()) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    if as_json:
        first = json.loads(lines[0])
        assert (first["format"], first["shape"], first["dtype"]) == ("streamwavlm", [2, 4, 8], "float16")
        assert np.array_equal(np.array(first["data"], np.float16), make(first["seq"], dtype=np.float16).data)
    else:
        assert re.fullmatch(r"mic0 embeddings seq=\d+ frames=\d+\+4 shape=2x4x8 float16 latency=[\d.]+ms",
                            lines[0])
    seqs = [int(re.search(r'"?seq"?[=:] ?(\d+)', line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert seqs == list(range(seqs[0], seqs[0] + 3))


def test_listen_command_unreachable_broker_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = _listen_args("--broker", f"mqtt://127.0.0.1:{free_port()}", "--connect-timeout", "0.3")
    assert arun(listen.run(args)) == 2
    assert "cannot connect to MQTT broker" in capsys.readouterr().err
    assert arun(listen.run(_listen_args("--broker", "http://nowhere"))) == 2
    assert "scheme 'http'" in capsys.readouterr().err


def test_client_sockets_have_tcp_nodelay(mosquitto) -> None:
    """Nagle's algorithm would make each tens-of-KB payload wait for the previous one's ACK."""
    import socket as socket_module

    from streamwavlm.mqtt.connection import Connection

    async def main() -> int:
        conn = Connection.create(mosquitto.url, username=None, password=None, protocol=None, tls=None, timeout=5,
                                 keepalive=30)
        async with conn.client("nodelay-check") as client:
            return client._client.socket().getsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY)

    assert asyncio.run(main()) == 1
    assert "set_tcp_nodelay true" in mosquitto.config_file.read_text()
