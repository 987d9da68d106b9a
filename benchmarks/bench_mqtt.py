"""Embeddings on MQTT: how many streams one process can publish, and a live stream's latency to a subscriber.

(a) Throughput. N simulated streams each produce one Base-size chunk (1 layer x 16 frames x 768, float32 or
float16) every 0.32 s, i.e. 50 frames/s, with their phases spread evenly; one ``Publisher`` in this process
(default outbox 1000, 32 in flight) sends them to a mosquitto child process, and a subscriber in a third
process (so that its CPU is not the publisher's) counts what the broker delivers and how late (its receipt
time minus the message's timestamp, which is its production time here). N doubles until the publisher
cannot keep up: its outbox overflowed, or its backlog (queued messages x production interval, the age of
the oldest) went past ``--max-lag`` seconds, or the producing loop itself fell behind its schedule; one
more row halfway between the last N that kept up and the first that did not narrows the answer.

Every socket has TCP_NODELAY, as shipped (our clients set it, our mosquitto config has ``set_tcp_nodelay
true``; the raw subscriber here sets it too). With Nagle's algorithm on (paho's and mosquitto's default) a
25-50 KB payload waits for the ACK of the one before it, and one publisher kept up with 4x fewer streams.

(b) Latency. The bundled sample, paced in real time in 20 ms blocks (like a network sender), through
``Engine`` -> ``MqttSink`` -> ``Publisher`` -> mosquitto -> ``subscribe()`` in the same process, with the
random Base+-shaped model ``streamwavlm stream`` uses without a checkpoint, 2 threads, one live stream. The
subscriber records ``time.time() - msg.timestamp``: from the arrival of a chunk's last audio sample to the
decoded message (compute, scheduling, publish, broker, decode). The algorithmic latency ((C + P) x 20 ms +
25 ms, the audio a chunk has to wait for) comes on top and is listed beside it.

Run: ``.venv/bin/python benchmarks/bench_mqtt.py [--quick] [--out benchmarks/results/mqtt.md]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import platform
import socket
import struct
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count
from multiprocessing.connection import Connection
from pathlib import Path

import aiomqtt
import numpy as np
import soundfile as sf
import torch
from common import cpu_report

from streamwavlm.audio.files import FileSource
from streamwavlm.checkpoint import model_from_setting
from streamwavlm.commands.common import bundled_sample
from streamwavlm.engine import Engine, EngineOutput
from streamwavlm.model.wavlm import WavLM
from streamwavlm.mqtt import EmbeddingMessage, Mosquitto, Publisher, subscribe
from streamwavlm.mqtt.broker import find_mosquitto
from streamwavlm.mqtt.sink import MqttSink
from streamwavlm.mqtt.wire import encode
from streamwavlm.streaming import StreamPool, StreamSettings, stream_audio

FRAME_RATE = 50.0
CHUNK, DIM = 16, 768  # a Base chunk at C = 16
TIMESTAMP_OFFSET = 48  # of the float64 timestamp in the binary payload (docs/mqtt.md, section 3.1)


def _ms(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if len(values) else float("nan")


@contextlib.contextmanager
def tcp_nodelay(enabled: bool) -> Iterator[None]:
    """While active, every TCP connection paho opens (it uses ``socket.create_connection`` and never sets
    TCP_NODELAY itself, as of paho-mqtt 2.2) gets TCP_NODELAY."""
    if not enabled:
        yield
        return
    original = socket.create_connection

    def create_connection(*args: object, **kwargs: object) -> socket.socket:
        sock = original(*args, **kwargs)  # type: ignore[arg-type]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    socket.create_connection = create_connection  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.create_connection = original


# ------------------------------------------------------------------------------------------ the subscriber
class CountingSubscriber:
    """A raw MQTT subscriber in its own process: per topic prefix, the messages it received, their bytes and
    their delay (receipt time minus the payload's timestamp, read from the header without decoding)."""

    def __init__(self, port: int, nodelay: bool) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_subscriber_main, args=(port, nodelay, child), daemon=True)
        self._proc.start()
        if not self._conn.poll(60) or self._conn.recv() != "ready":
            self._proc.kill()
            raise RuntimeError("the subscriber process did not start")

    def report(self, prefix: str) -> tuple[int, int, np.ndarray]:
        """(messages, bytes, delays in s) received under ``prefix`` so far; forgets them."""
        self._conn.send(prefix)
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


def _subscriber_main(port: int, nodelay: bool, conn: Connection) -> None:
    with tcp_nodelay(nodelay):
        asyncio.run(_subscriber(port, conn))


async def _subscriber(port: int, conn: Connection) -> None:
    records: dict[str, list[tuple[float, int]]] = defaultdict(list)
    requests: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    async with aiomqtt.Client("127.0.0.1", port, max_queued_incoming_messages=100_000) as client:
        await client.subscribe("bench/+/+/embeddings", qos=1)  # a QoS 0 publish is delivered at QoS 0

        async def receive() -> None:
            async for m in client.messages:
                payload = m.payload
                assert isinstance(payload, bytes)
                sent = struct.unpack_from("<d", payload, TIMESTAMP_OFFSET)[0]
                records[m.topic.value.rsplit("/", 2)[0]].append((time.time() - sent, len(payload)))

        receiver = asyncio.create_task(receive())
        loop.add_reader(conn.fileno(), lambda: requests.put_nowait(conn.recv()))
        conn.send("ready")
        while (prefix := await requests.get()) is not None:
            got = records.pop(prefix, [])
            conn.send((len(got), sum(n for _, n in got), np.array([d for d, _ in got])))
        receiver.cancel()


# ------------------------------------------------------------------------------------------ (a) throughput
@dataclass
class Throughput:
    sockets: str  # "as shipped" or "TCP_NODELAY"
    dtype: str
    qos: int
    streams: int
    offered: float  # messages/s the streams produce
    published: float  # messages/s the broker confirmed (QoS 1) or that were written to the socket (QoS 0)
    megabytes: float  # MB/s of payload published
    overflow: int  # messages the outbox dropped
    backlog_s: float  # the largest publisher backlog, in seconds of production
    behind_s: float  # how far the producing loop itself fell behind its schedule at the end
    received: float  # fraction of the produced messages the subscriber got
    delay_p50: float  # ms from production to the subscriber's receipt
    delay_p99: float
    max_lag: float

    @property
    def keeps_up(self) -> bool:
        return self.overflow == 0 and self.backlog_s <= self.max_lag and self.behind_s <= self.max_lag

    def row(self) -> str:
        return (f"| {self.sockets} | {self.dtype} | {self.qos} | {self.streams} | {self.offered:.0f} | "
                f"{self.published:.0f} | {self.megabytes:.1f} | {self.overflow} | {self.backlog_s:.2f} | "
                f"{100 * self.received:.1f}% | {self.delay_p50:.0f} / {self.delay_p99:.0f} | "
                f"{'yes' if self.keeps_up else '**no**'} |")


@dataclass
class Setup:
    """One broker, its subscriber, and the settings every row of a sweep shares."""

    url: str
    sub: CountingSubscriber
    nodelay: bool
    seconds: float
    max_lag: float
    runs: Iterator[int]  # a fresh topic prefix per row, so that nothing late from a row counts for the next


async def throughput(setup: Setup, n: int, dtype: str, qos: int) -> Throughput:
    """N streams for ``seconds``; stops early once the outbox overflows (the answer is known by then)."""
    run = next(setup.runs)
    prefix = f"bench/r{run}"
    data = np.random.default_rng(run).standard_normal((1, CHUNK, DIM)).astype(dtype)
    interval = CHUNK / FRAME_RATE / n  # between two messages of all the streams together
    with tcp_nodelay(setup.nodelay):
        async with Publisher(setup.url, prefix=prefix, qos={"embeddings": qos}, status_interval=None) as pub:
            start = time.monotonic()
            sent = 0
            backlog = 0
            while (now := time.monotonic()) < start + setup.seconds and not pub.counters.outbox_overflow:
                due = int((now - start) / interval) + 1
                while sent < due:
                    i, k = sent % n, sent // n
                    pub.publish(EmbeddingMessage(f"s{i}", "embeddings", k, k * CHUNK, FRAME_RATE, time.time(),
                                                 "bench", (12,), data))
                    sent += 1
                backlog = max(backlog, pub.queued)
                await asyncio.sleep(0.002)
            elapsed = time.monotonic() - start
            behind = (int(elapsed / interval) + 1 - sent) * interval
            c = pub.counters
            await pub.flush(10)
    await asyncio.sleep(0.5)  # what the broker still holds reaches the subscriber
    received, _, delays = setup.sub.report(prefix)
    size = len(encode(EmbeddingMessage("s0", "embeddings", 0, 0, FRAME_RATE, 0.0, "bench", (12,), data)))
    return Throughput("TCP_NODELAY" if setup.nodelay else "as shipped", dtype, qos, n, n * FRAME_RATE / CHUNK,
                      c.published / elapsed, c.published * size / elapsed / 1e6, c.outbox_overflow,
                      backlog * interval, max(0.0, behind), received / max(sent, 1), _ms(delays, 50),
                      _ms(delays, 99), setup.max_lag)


async def sweep(setup: Setup, dtype: str, qos: int, counts: list[int]) -> tuple[list[Throughput], int]:
    """Rows for N in ``counts`` until one does not keep up, plus one halfway back; the most N that kept up."""
    rows: list[Throughput] = []
    ok, bad = 0, 0
    for n in counts:
        rows.append(await throughput(setup, n, dtype, qos))
        print(rows[-1].row(), flush=True)
        if not rows[-1].keeps_up:
            bad = n
            break
        ok = n
    if ok and bad:
        rows.append(await throughput(setup, (ok + bad) // 2, dtype, qos))
        print(rows[-1].row(), flush=True)
        ok = rows[-1].streams if rows[-1].keeps_up else ok
    return sorted(rows, key=lambda r: r.streams), ok


async def throughput_table(args: argparse.Namespace) -> list[str]:
    lines = ["| sockets | payload | QoS | streams | offered msg/s | published msg/s | MB/s | outbox overflow | "
             "max backlog s | subscriber received | delay p50 / p99 ms | keeps up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best: list[str] = []
    runs = count(1)
    for nodelay in (True,):
        with Mosquitto() as broker:
            setup = Setup(broker.url, CountingSubscriber(broker.port, nodelay), nodelay, args.seconds,
                          args.max_lag, runs)
            try:
                for dtype in ("float32", "float16"):
                    for qos in (0, 1):
                        rows, ok = await sweep(setup, dtype, qos, args.counts)
                        lines += [r.row() for r in rows]
                        best.append(f"{rows[0].sockets}, {dtype}, QoS {qos}: {ok} streams "
                                    f"({ok * FRAME_RATE / CHUNK:.0f} msg/s)")
            finally:
                setup.sub.close()
    return [*lines, "", "Most streams that kept up: " + "; ".join(best) + "."]


# ------------------------------------------------------------------------------------------ (b) latency
def warm_up(model: WavLM, settings: StreamSettings) -> None:
    """A few steps at this chunk size first, so that one-time kernel set-up is not counted as latency."""
    stream_audio(StreamPool(model, settings, capacity=1), torch.randn(16000) * 0.1, "warm")


async def latency(url: str, model: WavLM, chunk: int, wav: Path) -> str:
    settings = StreamSettings(chunk=chunk, left=250)
    settings.validate(model.cfg)
    warm_up(model, settings)
    prefix = f"latency/c{chunk}"
    received: list[float] = []
    engine_latency: list[float] = []
    subscribed = asyncio.Event()

    async def listen() -> None:
        async with contextlib.aclosing(subscribe(url, prefix, on_subscribed=subscribed.set)) as items:
            async for item in items:
                if isinstance(item, EmbeddingMessage):
                    received.append(time.time() - item.timestamp)

    async def engine_sink(out: EngineOutput) -> None:
        if out.chunk.num_frames:
            engine_latency.append(out.latency)

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), 10)
    async with Publisher(url, prefix=prefix) as pub:
        sink = MqttSink(pub, "random-base-plus", FRAME_RATE)
        async with Engine(StreamPool(model, settings, capacity=1), [sink, engine_sink]) as engine:
            engine.add(FileSource(wav, block=320, realtime=True), "live")
            await engine.drain()
            steps = list(engine.step_times)
        await pub.flush(10)
    await asyncio.sleep(0.5)  # the last messages reach the subscriber
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    algorithmic = settings.latency_ms(model.cfg)
    p99 = _ms(received, 99)
    line = (f"| {chunk} | {algorithmic:.0f} | {len(received)} | {_ms(steps, 50):.0f} | {_ms(engine_latency, 50):.0f} / "
            f"{_ms(engine_latency, 99):.0f} | {_ms(received, 50):.0f} / {p99:.0f} | {algorithmic + p99:.0f} |")
    print(line, flush=True)
    return line


async def latency_table(port: int, chunks: list[int], seconds: float, threads: int) -> list[str]:
    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    model, _ = model_from_setting(None)
    wav, rate = sf.read(bundled_sample(), dtype="int16")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "live.wav"
        sf.write(path, wav[: int(seconds * rate)], rate)
        lines = ["| C | algorithmic ms | messages | step p50 ms | engine p50 / p99 ms | to subscriber p50 / p99 ms | "
                 "algorithmic + p99 ms |", "|---|---|---|---|---|---|---|"]
        for chunk in chunks:
            lines.append(await latency(f"mqtt://127.0.0.1:{port}", model, chunk, path))
    return lines


# ------------------------------------------------------------------------------------------ main
def machine() -> str:
    binary = find_mosquitto() or "mosquitto"
    version = subprocess.run([binary, "-h"], capture_output=True, text=True).stdout.splitlines()[:1]
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
            f"{torch.__version__}, {version[0] if version else 'mosquitto'} on loopback, MQTT 5")


async def main_async(args: argparse.Namespace) -> list[str]:
    a = await throughput_table(args)
    with Mosquitto() as broker:
        b = await latency_table(broker.port, [16] if args.quick else [16, 25, 50], args.audio, args.threads)
    return [
        f"MQTT output benchmark (`benchmarks/bench_mqtt.py{' --quick' if args.quick else ''}`): {machine()}.", "",
        "## (a) Streams one process publishes",
        "",
        f"Each stream sends a 1 x {CHUNK} x {DIM} chunk every {CHUNK / FRAME_RATE:.2f} s (50 frames/s). One "
        "Publisher (outbox 1000, 32 in flight) in this process; a raw subscriber in another process; publisher, "
        f"broker and subscriber share the CPUs. {args.seconds:g} s per row, counted from the start (each stream's "
        "first status report included); N doubles until the publisher does not keep up (outbox overflow, or a "
        f"backlog over {args.max_lag:g} s of production), then one row halfway back. Delay: production to the "
        "subscriber's receipt. Every socket has TCP_NODELAY (as shipped).",
        "",
        *a,
        "",
        "## (b) Latency of one live stream",
        "",
        f"Random Base+-shaped model, fp32, {args.threads} threads, left context 250, lookahead 0; {args.audio:g} s of "
        "the bundled sample paced in real time in 20 ms blocks; Engine -> MqttSink -> Publisher (QoS 1) -> mosquitto "
        "-> subscribe() in the same process. Engine: the chunk's last sample arriving to its output; to subscriber: "
        "the same to the decoded message (the target is p99 <= 150 ms at C = 16). p99 of a few dozen messages is "
        "close to their maximum.",
        "",
        *b,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short rows, C = 16 only")
    ap.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for (b) (default: %(default)s)")
    ap.add_argument("--max-lag", type=float, default=0.5, help="(a): the most backlog, in seconds of "
                    "production, that still counts as keeping up (default: %(default)s)")
    args = ap.parse_args()
    args.seconds = 1.5 if args.quick else 3.0
    args.counts = [64 * 2 ** i for i in range(7)]  # 64 .. 4096 streams
    args.audio = 4.0 if args.quick else 11.0
    lines = [*cpu_report(), "", *asyncio.run(main_async(args))]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
