"""A subscriber with a persistent session loses nothing when the broker is killed and restarted.

A real mosquitto with ``persistence true``, its database in the test's folder and saved every second: the
subscriber connects, messages flow, the broker is SIGKILLed (a crash: only what was saved survives, which
includes the subscriber's session) and started again on the same port from its database; the publisher
reconnects and publishes while the subscriber is still away; the broker queues those for the persistent
session and delivers them when the subscriber is back. Without the session the same messages are lost,
which the control case shows (so the test can fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamwavlm.mqtt import EmbeddingMessage, Gap, Mosquitto, Publisher, SubscriberStats, subscribe
from streamwavlm.mqtt.broker import find_mosquitto

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
AUTOSAVE = 1  # seconds between saves of the broker's database
PUBLISHER = {"reconnect_first": 0.05, "reconnect_max": 0.2}  # back at once after the restart
SLOW_SUBSCRIBER = {"reconnect_first": 1.0, "reconnect_max": 1.0}  # away for 0.5-1 s after the restart


def persistent_broker(folder: Path) -> Mosquitto:
    broker = Mosquitto(workdir=folder, persistence=True, extra_config=[f"autosave_interval {AUTOSAVE}"])
    broker.start()
    return broker


def message(seq: int) -> EmbeddingMessage:
    return EmbeddingMessage("mic0", "embeddings", seq, seq * 4, 50.0, time.time(), "wavlm-test", (-1,),
                            np.full((1, 4, 8), seq, np.float32))


async def publish(pub: Publisher, seqs: range) -> None:
    for seq in seqs:
        pub.publish(message(seq))
    assert await pub.flush(10)


def crash_and_restart(broker: Mosquitto) -> None:
    broker.kill()
    assert (broker.workdir / "mosquitto.db").exists()  # the session survives in the saved database
    broker.start()


async def saved_after(broker: Mosquitto, t: float) -> None:
    """Wait until the broker has saved its database after wall time ``t`` (so a crash keeps the session;
    mosquitto saves every ``autosave_interval`` seconds, a little later on a busy machine)."""
    db = broker.workdir / "mosquitto.db"
    await eventually(lambda: db.exists() and db.stat().st_mtime > t)


async def eventually(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("session", ["sub-persistent", None], ids=["persistent", "clean-control"])
def test_subscriber_gets_every_seq_across_a_broker_crash(tmp_path: Path, session: str | None) -> None:
    broker = persistent_broker(tmp_path / "broker")
    items: list[EmbeddingMessage | Gap] = []
    stats = SubscriberStats()

    async def body() -> int:
        subscribed = asyncio.Event()

        async def consume() -> None:
            async with contextlib.aclosing(subscribe(broker.url, session=session, session_expiry=600, qos=1,
                                                     stats=stats, on_subscribed=subscribed.set,
                                                     reorder_timeout=2.0, **SLOW_SUBSCRIBER)) as stream:
                async for item in stream:
                    items.append(item)  # type: ignore[arg-type]

        task = asyncio.create_task(consume())
        await asyncio.wait_for(subscribed.wait(), 5)
        await saved_after(broker, time.time())  # the session is in the database
        async with Publisher(broker.url, status_interval=None, timeout=2.0, **PUBLISHER) as pub:
            await publish(pub, range(0, 20))
            await eventually(lambda: len(items) >= 20)
            await asyncio.to_thread(crash_and_restart, broker)
            await eventually(lambda: pub.connected and pub.counters.reconnects == 1)
            await publish(pub, range(20, 40))  # the subscriber is still away (its backoff)
            away = stats.reconnects == 0
            await eventually(lambda: stats.reconnects == 1)
            await asyncio.sleep(0.3)  # a clean session subscribes anew before the last messages
            await publish(pub, range(40, 60))
            await eventually(lambda: any(getattr(x, "seq", -1) == 59 for x in items))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert away, "the subscriber came back before the publisher published: nothing was tested"
        return 0

    try:
        asyncio.run(asyncio.wait_for(body(), 40))
    finally:
        broker.close()
    seqs = [x.seq for x in items if isinstance(x, EmbeddingMessage)]
    gaps = [x for x in items if isinstance(x, Gap)]
    if session is not None:
        assert seqs == list(range(60)) and not gaps, (seqs, gaps)
    else:  # the control: what was published while the subscriber was away is gone
        assert seqs == [*range(20), *range(40, 60)] and [(g.first_seq, g.count) for g in gaps] == [(20, 20)]


def test_listen_with_a_session_prints_every_seq_across_a_broker_crash(tmp_path: Path) -> None:
    """The same through the command line: ``streamwavlm listen --session ID --json``."""
    broker = persistent_broker(tmp_path / "broker")
    proc = subprocess.Popen([sys.executable, "-m", "streamwavlm.cli", "listen", "--broker", broker.url,
                             "--session", "listen-test", "--json", "--count", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[dict] = []

    async def read_until(n: int) -> None:
        assert proc.stdout is not None
        while len(lines) < n:
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, f"listen ended early: {proc.stderr.read()}"  # type: ignore[union-attr]
            lines.append(json.loads(line))

    async def body() -> None:
        deadline = time.monotonic() + 60
        while "as listen-test" not in broker.log_file.read_text(errors="replace"):  # connected (imports: s)
            assert time.monotonic() < deadline and proc.poll() is None
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # its SUBSCRIBE follows the connect within milliseconds
        await saved_after(broker, time.time())
        async with Publisher(broker.url, status_interval=None, timeout=2.0, **PUBLISHER) as pub:
            await publish(pub, range(0, 20))
            await asyncio.wait_for(read_until(20), 10)
            await asyncio.to_thread(crash_and_restart, broker)
            await eventually(lambda: pub.connected and pub.counters.reconnects == 1)
            await publish(pub, range(20, 40))  # while listen reconnects
            await publish(pub, range(40, 60))
            await asyncio.wait_for(read_until(60), 20)

    try:
        asyncio.run(asyncio.wait_for(body(), 90))
        code = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.close()
    assert code == 0
    assert [x.get("format") for x in lines] == ["streamwavlm"] * 60  # no streamwavlm-gap line
    assert [x["seq"] for x in lines] == list(range(60))
