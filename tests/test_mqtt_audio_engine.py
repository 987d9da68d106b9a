"""MQTT audio in, through the engine: several real clients at once over a real mosquitto, and each stream's
embeddings equal streaming the same samples alone (issue 5). Also through ``streamwavlm stream --input
mqtt://...``, checked by a subscriber on the embeddings topics."""

from __future__ import annotations

import asyncio
import contextlib

import aiomqtt
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import password_broker_config
from test_engine import SETTINGS, collect, solo_frames

from streamwavlm.audio.mqtt_audio import MqttAudioInput, publish_file
from streamwavlm.checkpoint import load_model
from streamwavlm.cli import build_parser
from streamwavlm.commands.stream import AUDIO_PREFIX, stream
from streamwavlm.engine import Engine
from streamwavlm.mqtt import EmbeddingMessage, Status, subscribe
from streamwavlm.streaming import StreamPool


@pytest.fixture(scope="module")
def model(hf_models):
    return load_model(hf_models["base"][1])


def write_pcm16(path, wav: np.ndarray) -> np.ndarray:
    """Write ``wav`` as a 16-bit file and return what a reader gets back: the int16-quantised audio as
    float32 (x / 32768), which is exactly what the MQTT audio input decodes from these payloads."""
    sf.write(path, wav, 16000, subtype="PCM_16")
    return sf.read(path, dtype="float32")[0]


async def publish(port: int, prefix: str, stream_id: str, path, **kwargs) -> None:
    """One client, one stream: its own connection, like a separate device."""
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"sender-{stream_id}") as client:
        await publish_file(client, prefix, stream_id, path, **kwargs)


def test_three_mqtt_clients_through_engine_equal_solo_streaming(model, speech, tmp_path, mosquitto):
    """WAV chunks of two sizes and raw s16le, published at once; the engine batches the three streams."""
    clients = {"m0": {"frame_samples": 320}, "m1": {"frame_samples": 999}, "m2": {"wav": False}}
    audio = {name: write_pcm16(tmp_path / f"{name}.wav", speech.numpy()[i * 3000: 14000 + i * 2500])
             for i, name in enumerate(clients)}
    got, sink = collect()

    async def main():
        async with MqttAudioInput(mosquitto.url, prefix="t") as inp, \
                Engine(StreamPool(model, SETTINGS, capacity=4), [sink]) as engine:
            sources = {}

            async def accept():
                async for s in inp.streams():
                    sources[s.stream_id] = s
                    engine.add(s, s.stream_id)

            acceptor = asyncio.create_task(accept())
            await asyncio.gather(*(publish(mosquitto.port, "t", name, tmp_path / f"{name}.wav", **kw)
                                   for name, kw in clients.items()))
            while len(engine.finished) < len(clients):
                await asyncio.sleep(0.05)
            acceptor.cancel()
            return engine.status(), {n: s.stats for n, s in sources.items()}

    status, stats = asyncio.run(asyncio.wait_for(main(), 60))
    for name, wav in audio.items():
        frames = torch.cat([o.chunk.frames[0] for o in got[name]])
        assert (frames - solo_frames(model, wav)).abs().max() < 1e-5, name
        assert got[name][-1].chunk.final
        assert stats[name].dropped == 0 and stats[name].errors == 0, (name, stats[name])
    assert sorted(s["stream"] for s in status) == sorted(clients)
    assert all(s["state"] == "closed" and s["dropped"] == 0 and s["gap_filled"] == 0 for s in status), status


def test_stream_command_takes_two_mqtt_audio_streams(hf_models, model, speech, tmp_path, mosquitto, capsys):
    """``streamwavlm stream --input mqtt://HOST:PORT --broker URL --seconds S``: two senders at once; a
    subscriber gets each stream's embeddings, in order and equal to the solo stream, then its final status."""
    _, directory = hf_models["base"]
    audio = {name: write_pcm16(tmp_path / f"{name}.wav", speech.numpy()[i * 4000: 16000 + i * 4000])
             for i, name in enumerate(("kitchen", "hall"))}
    expected = {name: solo_frames(model, wav) for name, wav in audio.items()}
    argv = ["stream", "--checkpoint", str(directory), "--dtype", "float32", "--input", f"mqtt://127.0.0.1:{mosquitto.port}",
            "--broker", mosquitto.url, "--prefix", "out", "--chunk", str(SETTINGS.chunk), "--left",
            str(SETTINGS.left), "--lookahead", str(SETTINGS.lookahead), "--seconds", "4"]
    messages: dict[str, list[EmbeddingMessage]] = {name: [] for name in audio}
    statuses: dict[str, list[Status]] = {name: [] for name in audio}

    async def listen(subscribed: asyncio.Event) -> None:
        async with contextlib.aclosing(subscribe(mosquitto.url, "out", kinds=("embeddings", "status"),
                                                 on_subscribed=subscribed.set)) as items:
            async for item in items:
                if isinstance(item, EmbeddingMessage):
                    messages[item.stream_id].append(item)
                elif isinstance(item, Status) and item.stream_id in statuses:
                    statuses[item.stream_id].append(item)

    async def senders() -> None:
        printed = ""
        while "accepting audio on" not in printed:  # the command has subscribed to the audio topics
            printed += capsys.readouterr().out
            await asyncio.sleep(0.05)
        await asyncio.gather(*(publish(mosquitto.port, AUDIO_PREFIX, name, tmp_path / f"{name}.wav")
                               for name in audio))

    async def main() -> int:
        subscribed = asyncio.Event()
        listener = asyncio.create_task(listen(subscribed))
        await asyncio.wait_for(subscribed.wait(), 10)
        sending = asyncio.create_task(senders())
        rc = await stream(build_parser().parse_args(argv))
        await asyncio.wait_for(sending, 1)
        await asyncio.sleep(0.5)  # the last statuses are on their way
        listener.cancel()
        return rc

    assert asyncio.run(asyncio.wait_for(main(), 60)) == 0
    for name, want in expected.items():
        got = messages[name]
        assert [m.seq for m in got] == list(range(len(got))), name
        assert [m.first_frame for m in got] == list(np.cumsum([0] + [m.frames for m in got[:-1]])), name
        frames = torch.cat([torch.from_numpy(m.data[0]) for m in got])
        assert frames.shape == want.shape and (frames - want).abs().max() < 1e-5, name
        final = statuses[name][-1]
        assert final.state == "offline" and final.counters["dropped"] == 0, final
        assert final.info["state"] == "closed" and final.info["frames_out"] == len(want), final


def test_mqtt_audio_input_uses_the_shared_connection(tmp_path) -> None:
    """Credentials in the URL, MQTT 3.1.1 by query, and the shared connection's refusal message."""
    from streamwavlm.mqtt import Mosquitto
    from streamwavlm.mqtt.broker import find_mosquitto
    from streamwavlm.mqtt.connection import BrokerUnavailable

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed (apt mosquitto)")
    config = password_broker_config(tmp_path / "auth", {"mic": "pa:ss"})
    with Mosquitto(workdir=tmp_path / "b", extra_config=config) as broker:
        async def body() -> None:
            url = f"mqtt://mic:pa%3Ass@127.0.0.1:{broker.port}?protocol=3.1.1"
            async with MqttAudioInput(url, prefix="t") as inp, \
                    aiomqtt.Client("127.0.0.1", broker.port, username="mic", password="pa:ss") as pub:
                await pub.publish("t/audio/a", np.zeros(320, "<i2").tobytes(), qos=1)
                await pub.publish("t/audio/a", b"", qos=1)
                stream = await asyncio.wait_for(anext(inp.streams()), 10)
                chunks = [c async for c in stream]
                assert sum(len(c.samples) for c in chunks) == 320
            with pytest.raises(BrokerUnavailable, match="check the username and password"):
                async with MqttAudioInput(f"mqtt://mic:wrong@127.0.0.1:{broker.port}", prefix="t"):
                    pass

        asyncio.run(body())
