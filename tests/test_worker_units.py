"""The parts of ``streamwavlm worker`` that need no broker: rendezvous hashing, the hand-over format (a
stream saved from one pool and continued in another equals the uninterrupted stream), an engine releasing a
stream between steps and another continuing it, and MQTT audio offsets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
import time
from collections import Counter

import numpy as np
import pytest
import torch
from test_engine import SETTINGS, ListSource, collect, solo_frames, split

from streamwavlm.checkpoint import load_model
from streamwavlm.cluster import Handover, HandoverError, decode_handover, encode_handover, owner
from streamwavlm.cluster.handover import model_fingerprint
from streamwavlm.engine import Engine
from streamwavlm.streaming import StreamPool, StreamSettings


@pytest.fixture(scope="module")
def model(hf_models):
    return load_model(hf_models["base"][1])


def test_rendezvous_spreads_streams_and_moves_only_those_of_the_member_that_changes():
    streams = [f"call-{i}" for i in range(3000)]
    three = {s: owner(s, ["w0", "w1", "w2"]) for s in streams}
    counts = Counter(three.values())
    assert set(counts) == {"w0", "w1", "w2"} and min(counts.values()) > 900, counts
    four = {s: owner(s, ["w0", "w1", "w2", "w3"]) for s in streams}
    moved = [s for s in streams if four[s] != three[s]]
    assert all(four[s] == "w3" for s in moved) and 600 < len(moved) < 900  # only to the newcomer, ~1/4
    two = {s: owner(s, ["w0", "w2"]) for s in streams}
    assert all(two[s] == three[s] for s in streams if three[s] != "w1")  # only w1's streams move
    assert owner("x", []) is None and owner("x", ["b", "a"]) == owner("x", ["a", "b"])


def handover_of(pool: StreamPool, slot: int, model) -> Handover:
    return Handover("s", "w0", "w1", model_fingerprint(model), pool.settings, pool.save(slot),
                    ledger_of(pool, slot), np.arange(5, dtype=np.float32), 16000, False, 123, {"embeddings": 7})


def ledger_of(pool: StreamPool, slot: int):
    from streamwavlm.audio.queue import Ledger

    return Ledger(taken=pool.save(slot).progress.samples, received=pool.save(slot).progress.samples)


@pytest.mark.parametrize("settings", [SETTINGS, StreamSettings(chunk=3, left=7, lookahead=1, layers=(1, 3))])
def test_a_handed_over_stream_continues_exactly(model, speech, settings):
    """Steps in one pool, the state through the wire format into another pool, the rest there: the frames
    equal one pool's uninterrupted run (bit for bit: the same arithmetic on the same values)."""
    wav = speech.numpy()[:24000]
    whole = StreamPool(model, settings)
    a, b = StreamPool(model, settings, capacity=2), StreamPool(model, settings, capacity=3)
    ref_slot, slot = whole.open("s"), a.open("s")
    a.open("other")
    pos, ref, got = 0, [], []
    for _ in range(7):
        n = a.need(slot)
        got += a.step({slot: wav[pos:pos + n]})
        ref += whole.step({ref_slot: wav[pos:pos + n]})
        pos += n
    payload = encode_handover(handover_of(a, slot, model))
    h = decode_handover(payload, settings, model_fingerprint(model))
    assert (h.stream_id, h.sender, h.recipient, h.epoch, h.seqs, h.rate, h.wav) == (
        "s", "w0", "w1", 123, {"embeddings": 7}, 16000, False)
    assert np.array_equal(h.backlog, np.arange(5)) and h.ledger.taken == pos and h.resume_at == pos + 5
    b.open("x")
    slot_b = b.open("s")
    b.restore(slot_b, h.state)
    while pos + b.need(slot_b) <= len(wav):
        n = b.need(slot_b)
        got += b.step({slot_b: wav[pos:pos + n]})
        ref += whole.step({ref_slot: wav[pos:pos + n]})
        pos += n
    got += b.close(slot_b, wav[pos:])
    ref += whole.close(ref_slot, wav[pos:])
    frames = torch.cat([o.frames for o in got if o.stream_id == "s"], 1)
    expected = torch.cat([o.frames for o in ref], 1)
    assert frames.shape == expected.shape and torch.equal(frames, expected)


def test_handover_payloads_are_checked(model):
    pool = StreamPool(model, SETTINGS)
    slot = pool.open("s")
    pool.step({slot: np.zeros(pool.need(slot), np.float32)})
    payload = encode_handover(handover_of(pool, slot, model))
    fp = model_fingerprint(model)
    head_len = struct.unpack_from("<I", payload, 8)[0]
    header = json.loads(payload[12:12 + head_len])
    assert header["format"] == "streamwavlm-handover" and header["version"] == 1
    assert header["state"]["@"] == "StreamProgress" and header["state"]["@tensors"]["@"] == "StreamTensors"
    cases = {
        "not a streamwavlm hand-over": b"SWLM" + payload[4:],
        "version 2": payload[:4] + b"\x02" + payload[5:],
        "damaged": payload[:-10],
        "exceeds the limit": payload + b"\0" * 64,
    }
    for expected, bad in cases.items():
        with pytest.raises(HandoverError, match=expected):
            decode_handover(bad, SETTINGS, fp, max_size=len(payload) + 32)
    with pytest.raises(HandoverError, match="other streaming settings"):
        decode_handover(payload, dataclasses.replace(SETTINGS, left=17), fp)
    with pytest.raises(HandoverError, match="same checkpoint"):
        decode_handover(payload, SETTINGS, "0" * 16)
    # a class name outside the stream-state modules is refused, never looked up elsewhere
    evil = payload[12:12 + head_len].replace(b'"@":"StreamProgress"', b'"@":"Path"')
    evil_payload = payload[:8] + struct.pack("<I", len(evil)) + evil + payload[12 + head_len:]
    with pytest.raises(HandoverError, match="not a stream-state class"):
        decode_handover(evil_payload, SETTINGS, fp)


def test_an_engine_releases_a_stream_between_steps_and_another_continues_it(model, speech):
    """Engine.release mid-stream (backlog included), Engine.add(resume=...) in a second engine: the stream's
    frames and stream times equal one engine's uninterrupted run."""
    wav = speech.numpy()[:20000]
    chunks = split(wav, 700)
    got, sink = collect()

    async def main():
        first = Engine(StreamPool(model, SETTINGS, capacity=2), [sink])
        async with first:
            first.add(ListSource("s", chunks[:12], pace=20), "s")
            while first.streams["s"].status.samples_processed < 4000:
                await asyncio.sleep(0.005)
            released = await first.release("s")
        assert released.status.state == "released" and not first.streams
        start = released.resume.ledger.next_start + len(released.resume.backlog)
        rest = [(x, i) for x, i in chunks if i >= start]
        partial = [(wav[start:i + len(x)], start) for x, i in chunks if i < start < i + len(x)]
        async with Engine(StreamPool(model, SETTINGS, capacity=2), [sink]) as second:
            second.add(ListSource("s", partial + rest), "s", resume=released.resume)
            await second.drain()
        return released

    released = asyncio.run(asyncio.wait_for(main(), 60))
    assert released.resume.ledger.taken > 0
    frames = torch.cat([o.chunk.frames[0] for o in got["s"]])
    assert torch.equal(frames, solo_frames(model, wav))
    assert [o.stream_frame for o in got["s"]] == [o.chunk.first_frame for o in got["s"]]


def test_mqtt_audio_offsets_skip_repeats_fill_losses_and_place_an_attached_stream(mosquitto):
    """A repeated message is skipped, a lost one leaves a gap of its length (the engine fills it with
    silence); a stream attached mid-way starts at the asked sample, earlier audio trimmed."""
    import aiomqtt

    from streamwavlm.audio.mqtt_audio import MqttAudioInput, _offset

    wav = (np.arange(1600) % 200 - 100).astype(np.int16)
    sends = [(0, 320), (320, 640), (320, 640), (960, 1280), (1280, 1600)]  # a repeat; 640..960 lost
    kept: list[tuple[bytes, int | None]] = []

    async def main():
        async with MqttAudioInput(mosquitto.url, prefix="o") as inp, \
                MqttAudioInput(mosquitto.url, prefix="o", claim=lambda s, o: False,
                               on_other=lambda s, p, o: kept.append((p, o))) as other:
            async with aiomqtt.Client("127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
                for a, b in sends:
                    await c.publish("o/audio/s", wav[a:b].tobytes(), qos=1, properties=_offset(a))
                await c.publish("o/audio/s", b"", qos=1)
                stream = await anext(inp.streams())
                chunks = [chunk async for chunk in stream]
            while len(kept) < len(sends) + 1:
                await asyncio.sleep(0.01)
            attached = other.attach("s", 16000, False, start=400)
            for payload, offset in kept:
                await other.feed("s", payload, offset)
            return chunks, [chunk async for chunk in attached]

    chunks, attached = asyncio.run(asyncio.wait_for(main(), 30))
    assert [(c.start, len(c.samples)) for c in chunks] == [(0, 320), (320, 320), (960, 320), (1280, 320)]
    assert np.array_equal(np.concatenate([c.samples for c in chunks]) * 32768,
                          np.concatenate([wav[:640], wav[960:]]))
    assert [(c.start, len(c.samples)) for c in attached] == [(400, 240), (960, 320), (1280, 320)]
    assert np.array_equal(attached[0].samples * 32768, wav[400:640])


def test_a_bf16_pool_state_travels_in_its_own_dtype(hf_models, speech):
    """Under --dtype bfloat16 the K/V rings are bf16: the hand-over carries them as they are (the format
    follows the state field by field), and the continued stream equals the uninterrupted one."""
    from streamwavlm.checkpoint import model_from_setting

    try:
        bf16, _ = model_from_setting(str(hf_models["base"][1]), dtype="bfloat16")
    except ValueError as e:  # a CPU that would emulate bf16 refuses it
        pytest.skip(str(e))
    wav = speech.numpy()[:12000]
    a, b = StreamPool(bf16, SETTINGS), StreamPool(bf16, SETTINGS, capacity=2)
    slot = a.open("s")
    pos = 0
    for _ in range(3):
        n = a.need(slot)
        a.step({slot: wav[pos:pos + n]})
        pos += n
    h = decode_handover(encode_handover(handover_of(a, slot, bf16)), SETTINGS, model_fingerprint(bf16))
    assert {t.dtype for t in h.state.tensors.rings.keys} == {t.dtype for t in a.save(slot).tensors.rings.keys} == {
        torch.bfloat16}
    b.open("x")
    slot_b = b.open("s")
    b.restore(slot_b, h.state)
    n = a.need(slot)
    assert torch.equal(a.step({slot: wav[pos:pos + n]})[0].frames, b.step({slot_b: wav[pos:pos + n]})[0].frames)


def test_worker_command_mistakes_are_one_line(capsys, mosquitto, hf_models):
    from streamwavlm.cli import main

    assert main(["worker", "--broker", "mqtt://127.0.0.1:1", "--group", "g"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot connect to MQTT broker" in err, err
    assert main(["worker", "--broker", mosquitto.url, "--group", "g", "--name", "a/b", "--checkpoint",
                 str(hf_models["base"][1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "worker name 'a/b'" in err, err
    with pytest.raises(SystemExit):
        main(["worker", "--group", "g"])
    assert "--broker" in capsys.readouterr().err


def test_a_full_worker_refuses_a_new_stream_and_a_lone_worker_drains_by_ending_its_streams(model, mosquitto):
    """In-process Worker at capacity 1: the second new stream is told server_busy on its error topic (and
    ignored until its sender ends it); on stop, with no other member to hand to, the stream is flushed."""
    import aiomqtt

    from streamwavlm.audio.mqtt_audio import _offset
    from streamwavlm.cluster.worker import Worker, WorkerOptions

    lines: list[str] = []
    block = (np.sin(np.arange(320) / 5) * 8000).astype(np.int16).tobytes()

    async def main():
        worker = Worker(StreamPool(model, SETTINGS, capacity=1), WorkerOptions(
            mosquitto.url, "g", "solo", "m", "fp", audio_prefix="a", prefix="p"), say=lines.append)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await asyncio.wait_for(worker.joined.wait(), 20)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
            await c.subscribe("a/audio/+/error")
            for i in range(10):
                for sid in ("first", "second"):
                    await c.publish(f"a/audio/{sid}", block, qos=1, properties=_offset(320 * i))
            message = await asyncio.wait_for(anext(aiter(c.messages)), 10)
            assert message.topic.value == "a/audio/second/error"
            assert json.loads(message.payload)["code"] == "server_busy"
            while worker.engine.streams["first"].status.frames_out == 0:
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(running, 20)
        return worker

    worker = asyncio.run(asyncio.wait_for(main(), 60))
    assert lines[1:] == ["worker solo: took stream first (new)", "worker solo: drained (0 stream(s) handed over)"]
    assert worker.engine.finished["first"].state == "closed" and "second" not in worker.engine.finished


def test_a_worker_that_loses_the_broker_stops_with_one_reason(model, mosquitto):
    """Its streams move to the others (the broker's will); it must not go on serving them: run() raises
    BrokerUnavailable (the CLI's one line and exit 2) within seconds."""
    from streamwavlm.cluster.worker import Worker, WorkerOptions
    from streamwavlm.mqtt import BrokerUnavailable

    async def main():
        worker = Worker(StreamPool(model, SETTINGS), WorkerOptions(mosquitto.url, "g", "w", "m", "fp", keepalive=1),
                        say=lambda line: None)
        running = asyncio.create_task(worker.run(asyncio.Event()))
        await asyncio.wait_for(worker.joined.wait(), 20)
        mosquitto.kill()
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable, match="lost the broker"):
            await asyncio.wait_for(running, 20)
        return time.monotonic() - t0

    took = asyncio.run(main())
    print(f"stopped {took:.2f} s after the broker died")
    assert took < 10
