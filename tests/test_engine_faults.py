"""One stream's fault never touches another (issue 10): non-finite model output, capacity, idle senders,
senders faster than real time, live statuses. Engine-level tests with the real model, then the ``stream``
command with real WebSocket and MQTT clients and a real mosquitto on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import aiomqtt
import numpy as np
import pytest
import torch
from test_engine import SETTINGS, ListSource, collect, solo_frames, split

from streamwavlm.audio.validate import AudioError
from streamwavlm.audio.websocket import send_audio
from streamwavlm.checkpoint import load_model
from streamwavlm.cli import build_parser
from streamwavlm.commands.stream import AUDIO_PREFIX, stream
from streamwavlm.engine import Engine, StreamStatus
from streamwavlm.mqtt import EmbeddingMessage, Status, subscribe
from streamwavlm.streaming import PoolFull, StreamPool


@pytest.fixture(scope="module")
def model(hf_models):
    return load_model(hf_models["base"][1])


class StallingSource(ListSource):
    """Sends its chunks, then goes silent without ending (an abandoned network stream)."""

    async def _gen(self):
        async for chunk in super()._gen():
            yield chunk
        while not self.closed:
            await asyncio.sleep(0.05)


def frames_of(outputs) -> torch.Tensor:
    return torch.cat([o.chunk.frames[0] for o in outputs])


def test_non_finite_output_ends_that_stream_only(model, speech):
    """Audio that drives the model to Inf/NaN (here samples of 3e38, given straight to the engine, past the
    edge checks) fails its own stream with a message naming the cause; the streams batched with it go on
    without a gap, nothing non-finite reaches a sink, and a stream added afterwards is served."""
    wav = speech.numpy()
    good = {"a": wav[:24000], "b": wav[5000:27000]}
    bad = np.concatenate([wav[:6000], np.full(6000, 3e38, np.float32), wav[:6000]])
    later = wav[2000:14000]
    got, sink = collect()
    statuses: list[tuple[str, str, str | None]] = []

    async def main() -> None:
        async with Engine(StreamPool(model, SETTINGS, capacity=3), [sink],
                          on_status=lambda st: statuses.append((st.stream_id, st.state, st.error))) as engine:
            for name, audio in good.items():
                engine.add(ListSource(name, split(audio, 800), pace=20), name)
            engine.add(ListSource("bad", split(bad, 800), pace=20), "bad")
            while "bad" not in engine.finished:
                await asyncio.sleep(0.02)
            engine.add(ListSource("later", split(later, 800)), "later")  # the bad stream's slot is free again
            await engine.drain()

    asyncio.run(asyncio.wait_for(main(), 60))
    final = {name: (state, error) for name, state, error in statuses if state != "open"}
    assert final["bad"][0] == "failed" and "non-finite" in final["bad"][1] and "[-1, 1]" in final["bad"][1]
    assert all(torch.isfinite(o.chunk.frames).all() for outs in got.values() for o in outs)
    for name, audio in {**good, "later": later}.items():
        assert final[name] == ("closed", None)
        assert (frames_of(got[name]) - solo_frames(model, audio)).abs().max() < 1e-5, name


def test_a_full_pool_refuses_the_newcomer_and_nothing_else(model, speech):
    wav = speech.numpy()[:16000]
    got, sink = collect()

    async def main() -> None:
        async with Engine(StreamPool(model, SETTINGS, capacity=1), [sink]) as engine:
            engine.add(ListSource("first", split(wav, 800), pace=10), "first")
            with pytest.raises(PoolFull, match="capacity of 1 streams"):
                engine.add(ListSource("second", split(wav, 800)), "second")
            await engine.drain()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert list(got) == ["first"]
    assert (frames_of(got["first"]) - solo_frames(model, wav)).abs().max() < 1e-5


def test_idle_stream_is_ended_and_its_slot_freed(model, speech):
    wav = speech.numpy()[:12000]
    got, sink = collect()
    ended: list[StreamStatus] = []

    async def main() -> float:
        async with Engine(StreamPool(model, SETTINGS, capacity=1), [sink], idle_timeout=0.4,
                          on_status=lambda st: ended.append(st) if st.state != "open" else None) as engine:
            t0 = time.monotonic()
            engine.add(StallingSource("quiet", split(wav, 800)), "quiet")
            while not ended:
                await asyncio.sleep(0.02)
            took = time.monotonic() - t0
            engine.add(ListSource("next", split(wav, 800)), "next")  # capacity 1: the slot is free again
            await engine.drain()
            return took

    took = asyncio.run(asyncio.wait_for(main(), 60))
    assert 0.4 <= took < 3
    assert ended[0].stream_id == "quiet" and ended[0].state == "closed" and "idle" in ended[0].error
    assert got["quiet"][-1].chunk.final  # what it sent was processed and flushed
    assert (frames_of(got["quiet"]) - solo_frames(model, wav)).abs().max() < 1e-5
    assert (frames_of(got["next"]) - solo_frames(model, wav)).abs().max() < 1e-5


def test_drops_show_in_stream_time_and_waiting_senders_lose_nothing(model, speech):
    """A live sender faster than the engine loses its oldest audio in whole frames, and every output says
    where it sits in the stream (``stream_frame`` jumps by the frames dropped); a sender that can wait is
    slowed down instead (back-pressure) and loses nothing."""
    wav = np.tile(speech.numpy(), 3)[:64000]
    got, sink = collect()

    async def main() -> dict[str, dict]:
        async with Engine(StreamPool(model, SETTINGS, capacity=2), [sink], max_backlog=0.2) as engine:
            engine.add(ListSource("live", split(wav, 3200)), "live", live=True)
            engine.add(ListSource("patient", split(wav, 3200)), "patient", live=False)
            await engine.drain()
            return {s["stream"]: s for s in engine.status()}

    status = asyncio.run(asyncio.wait_for(main(), 120))
    hop = model.cfg.hop
    assert status["patient"]["dropped"] == 0 and status["patient"]["processed"] == len(wav)
    assert (frames_of(got["patient"]) - solo_frames(model, wav)).abs().max() < 1e-5
    live = got["live"]
    dropped = status["live"]["dropped"]
    assert dropped > 0 and dropped % hop == 0 and status["live"]["processed"] + dropped == len(wav)
    offsets = [o.stream_frame - o.chunk.first_frame for o in live]
    assert offsets == sorted(offsets) and offsets[-1] > 0  # later frames sit later in the stream
    assert offsets[-1] * hop <= dropped


def test_live_status_reports_counters_while_streaming(model, speech):
    wav = speech.numpy()[:24000]
    seen: list[tuple[str, int]] = []

    async def main() -> None:
        async with Engine(StreamPool(model, SETTINGS), [], status_interval=0.1,
                          on_status=lambda st: seen.append((st.state, st.samples_in))) as engine:
            engine.add(ListSource("s", split(wav, 800), pace=2), "s")
            await engine.drain()

    asyncio.run(asyncio.wait_for(main(), 60))
    live = [n for state, n in seen if state == "open"]
    assert len(live) >= 5 and live[-1] > live[1] > 0  # periodic reports with growing counters
    assert seen[-1] == ("closed", len(wav))  # one final status


def test_engine_refuses_a_backlog_shorter_than_one_step(model):
    with pytest.raises(ValueError, match="shorter than one encoder step"):
        Engine(StreamPool(model, SETTINGS), max_backlog=0)
    with pytest.raises(ValueError, match="idle_timeout must be a positive"):
        Engine(StreamPool(model, SETTINGS), idle_timeout=0)


# ------------------------------------------------------------------ the stream command, real clients
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(directory, broker: str, source: str, *extra: str) -> list[str]:
    return ["stream", "--checkpoint", str(directory), "--dtype", "float32", "--input", source,
            "--broker", broker, "--prefix", "out", "--chunk", str(SETTINGS.chunk), "--left", str(SETTINGS.left),
            "--lookahead", str(SETTINGS.lookahead), *extra]


async def wait_for_output(capsys, text: str) -> None:
    printed = ""
    while text not in printed:
        printed += capsys.readouterr().out
        await asyncio.sleep(0.05)


def test_websocket_faults_are_contained(hf_models, model, speech, mosquitto, capsys):
    """Over real WebSocket clients with capacity 2: 1e30 float samples are refused at the edge
    (``invalid_frame``), a client beyond capacity gets ``server_busy``, the other client's embeddings arrive
    complete and in order, and a client that comes later is served."""
    _, directory = hf_models["base"]
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    normal = (speech.numpy()[:32000] * 32767).astype(np.int16)
    huge = np.full(3200, 1e30, np.float32)
    messages: dict[str, list[EmbeddingMessage]] = {}
    stop = asyncio.Event()

    async def listen(subscribed: asyncio.Event) -> None:
        async with contextlib.aclosing(subscribe(mosquitto.url, "out", kinds=("embeddings",),
                                                 on_subscribed=subscribed.set)) as items:
            async for item in items:
                if isinstance(item, EmbeddingMessage):
                    messages.setdefault(item.stream_id, []).append(item)

    async def clients() -> dict[str, object]:
        await wait_for_output(capsys, "accepting audio streams")
        results: dict[str, object] = {}

        async def run(name: str, frames: np.ndarray, rate: int = 16000, **kw) -> None:
            try:
                results[name] = await send_audio(url, frames, rate, name, **kw)
            except AudioError as e:
                results[name] = str(e)

        steady = asyncio.create_task(run("steady", normal, realtime=True))
        await asyncio.sleep(0.3)
        await run("huge", huge)  # refused at the edge; its slot is freed as its stream ends
        await asyncio.sleep(0.5)
        blocker = asyncio.create_task(run("second", normal, realtime=True))
        await asyncio.sleep(0.3)
        await run("third", normal[:8000])  # capacity 2 is taken by steady and second
        await asyncio.gather(steady, blocker)
        await run("later", normal[:16000])
        expected = model.cfg.num_frames(16000)
        while sum(m.frames for m in messages.get("later", [])) < expected:  # processed, then stop
            await asyncio.sleep(0.05)
        stop.set()
        return results

    async def main() -> dict[str, object]:
        subscribed = asyncio.Event()
        listener = asyncio.create_task(listen(subscribed))
        await asyncio.wait_for(subscribed.wait(), 10)
        sending = asyncio.create_task(clients())
        rc = await stream(build_parser().parse_args(command(directory, mosquitto.url, url, "--capacity", "2")),
                          stop)
        assert rc == 0
        results = await sending
        await asyncio.sleep(0.5)
        listener.cancel()
        return results

    results = asyncio.run(asyncio.wait_for(main(), 120))
    assert "invalid_frame" in str(results["huge"]) and "[-1, 1]" in str(results["huge"])
    assert "server_busy" in str(results["third"]) and "capacity of 2" in str(results["third"])
    for name in ("steady", "second", "later"):
        assert isinstance(results[name], dict) and results[name]["type"] == "done", results[name]
        got = messages[name]
        assert [m.seq for m in got] == list(range(len(got))), name
        assert [m.first_frame for m in got] == list(np.cumsum([0] + [m.frames for m in got[:-1]])), name
    n = len(normal)
    assert sum(m.frames for m in messages["steady"]) == model.cfg.num_frames(n)
    assert "third" not in messages


def test_mqtt_audio_capacity_and_idle_senders(hf_models, model, speech, mosquitto, capsys):
    """Capacity 1, idle timeout 1 s: a sender that never ends holds the slot until the timeout (its status
    then says why), a newcomer meanwhile is told ``server_busy`` on its error topic, and a sender after the
    timeout is served."""
    _, directory = hf_models["base"]
    pcm = (speech.numpy()[:8000] * 32767).astype("<i2")
    errors: list[dict] = []
    statuses: dict[str, list[Status]] = {}
    embeddings: dict[str, int] = {}
    stop = asyncio.Event()

    async def watch(ready: asyncio.Event) -> None:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.subscribe(f"{AUDIO_PREFIX}/audio/+/error")
            ready.set()
            async for m in client.messages:
                errors.append({"topic": m.topic.value, **json.loads(m.payload)})

    async def listen(subscribed: asyncio.Event) -> None:
        async with contextlib.aclosing(subscribe(mosquitto.url, "out", kinds=("embeddings", "status"),
                                                 on_subscribed=subscribed.set)) as items:
            async for item in items:
                if isinstance(item, Status):
                    statuses.setdefault(item.stream_id, []).append(item)
                elif isinstance(item, EmbeddingMessage):
                    embeddings[item.stream_id] = embeddings.get(item.stream_id, 0) + item.frames

    async def senders() -> None:
        await wait_for_output(capsys, "accepting audio on")
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as pub:
            await pub.publish(f"{AUDIO_PREFIX}/audio/abandoned", pcm.tobytes(), qos=1)  # and never an end
            await asyncio.sleep(0.3)
            await pub.publish(f"{AUDIO_PREFIX}/audio/newcomer", pcm.tobytes(), qos=1)
            await pub.publish(f"{AUDIO_PREFIX}/audio/newcomer", b"", qos=1)
            while not any(s.state == "offline" for s in statuses.get("abandoned", [])):
                await asyncio.sleep(0.05)
            await pub.publish(f"{AUDIO_PREFIX}/audio/after", pcm.tobytes(), qos=1)
            await pub.publish(f"{AUDIO_PREFIX}/audio/after", b"", qos=1)
            while not any(s.state == "offline" for s in statuses.get("after", [])):
                await asyncio.sleep(0.05)
        stop.set()

    async def main() -> int:
        ready, subscribed = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(watch(ready)), asyncio.create_task(listen(subscribed))]
        await asyncio.wait_for(asyncio.gather(ready.wait(), subscribed.wait()), 10)
        sending = asyncio.create_task(senders())
        argv = command(directory, mosquitto.url, f"mqtt://127.0.0.1:{mosquitto.port}", "--capacity", "1",
                       "--idle-timeout", "1", "--status-interval", "0.3")
        rc = await stream(build_parser().parse_args(argv), stop)
        await asyncio.wait_for(sending, 5)
        await asyncio.sleep(0.3)
        for task in tasks:
            task.cancel()
        return rc

    assert asyncio.run(asyncio.wait_for(main(), 120)) == 0
    busy = [e for e in errors if e["topic"].endswith("/newcomer/error")]
    assert busy and busy[0]["code"] == "server_busy"
    final = statuses["abandoned"][-1]
    assert final.state == "offline" and "idle" in final.info["error"]
    live = [s for s in statuses["abandoned"] if s.state == "online"]
    assert len(live) >= 2 and live[-1].info["samples_in"] == len(pcm)  # live counters while it was open
    assert embeddings["after"] == model.cfg.num_frames(len(pcm)) and statuses["after"][-1].info["error"] is None
    assert "newcomer" not in embeddings


def test_a_sink_failing_for_one_stream_ends_that_stream_only(model, speech):
    wav = speech.numpy()[:16000]
    got, sink = collect()
    ended: dict[str, tuple[str, str | None]] = {}

    async def picky(out) -> None:
        if out.stream_id == "unlucky" and out.chunk.first_frame >= 8:
            raise OSError("disk full")

    async def main() -> None:
        async with Engine(StreamPool(model, SETTINGS, capacity=2), [picky, sink],
                          on_status=lambda st: ended.update({st.stream_id: (st.state, st.error)})) as engine:
            engine.add(ListSource("unlucky", split(wav, 800), pace=10), "unlucky")
            engine.add(ListSource("fine", split(wav, 800), pace=10), "fine")
            await engine.drain()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert ended["unlucky"][0] == "failed" and "disk full" in ended["unlucky"][1]
    assert ended["fine"] == ("closed", None)
    assert (frames_of(got["fine"]) - solo_frames(model, wav)).abs().max() < 1e-5


def test_a_quick_stop_discards_the_backlog_and_counts_it(model, speech):
    """``drain(discard_backlog=True)`` (Ctrl-C): queued audio is dropped in whole frames and counted, not
    processed; every stream still ends with a final output and a closed status."""
    wav = np.tile(speech.numpy(), 4)
    got, sink = collect()

    async def main() -> list[dict]:
        async with Engine(StreamPool(model, SETTINGS, capacity=2), [sink], max_backlog=1.0) as engine:
            for name in ("a", "b"):
                engine.add(ListSource(name, split(wav, 1600)), name, live=False)
            await asyncio.sleep(0.2)
            for stream in list(engine.streams.values()):
                await stream.source.close()
            await engine.drain(discard_backlog=True)
            return engine.status()

    status = asyncio.run(asyncio.wait_for(main(), 60))
    for s in status:
        assert s["state"] == "closed" and s["dropped"] > 0 and s["dropped"] % model.cfg.hop == 0, s
        assert s["processed"] + s["dropped"] + s["backlog_s"] * 16000 == s["samples_in"], s
        assert got[s["stream"]][-1].chunk.final
