"""Security of the network inputs (issue 10): who may send audio and how much.

WebSocket: token (header or hello), streams per client, connection rate, connections without a hello,
idle streams; each refusal is the documented error and close code, logged in one line, and the streams of
other clients go on. Real servers and real ``websockets`` clients on loopback; a second client address is
127.0.0.2 (all of 127/8 is loopback on Linux).

MQTT: credentials and TLS through the one ``Connection`` layer for audio in and embeddings out, payload
size checked before decoding, text sent as raw audio refused, and the topic ACLs of docs/security.md
loaded into a real mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streamwavlm.audio.guard import AccessLimits, Admission, Denied, bearer_token
from streamwavlm.audio.validate import AudioError
from streamwavlm.audio.websocket import WebSocketAudioServer, WebSocketStream, send_audio

OTHER_HOST = "127.0.0.2"
RNG = np.random.default_rng(10)
SPEECHLIKE = (0.2 * RNG.standard_normal(16000) * 32767).astype(np.int16)


def run(coro: Any, timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def hello(stream_id: str, **extra: Any) -> str:
    return json.dumps({"stream_id": stream_id, "sample_rate": 16000, "format": "s16le", "channels": 1, **extra})


def second_address_works() -> bool:
    with socket.socket() as s:
        try:
            s.bind((OTHER_HOST, 0))
        except OSError:
            return False
    return True


needs_second_address = pytest.mark.skipif(not second_address_works(), reason=f"{OTHER_HOST} is not loopback here")


@contextlib.asynccontextmanager
async def consuming(server: WebSocketAudioServer):
    """Run ``server`` and drain every stream it offers; yields the streams seen, by id."""
    seen: dict[str, WebSocketStream] = {}
    samples: dict[str, int] = {}

    async def drain(stream: WebSocketStream) -> None:
        async for chunk in stream:
            samples[stream.stream_id] = samples.get(stream.stream_id, 0) + len(chunk.samples)

    async def accept() -> None:
        async for stream in server.streams():
            seen[stream.stream_id] = stream
            tasks.append(asyncio.create_task(drain(stream)))

    tasks: list[asyncio.Task[None]] = []
    async with server:
        acceptor = asyncio.create_task(accept())
        yield seen, samples
    acceptor.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def refusal(url: str, *messages: str | bytes, headers: dict[str, str] | None = None,
                  host: str = "127.0.0.1") -> tuple[dict[str, Any] | None, int | None]:
    """Connect from ``host``, send ``messages``, and return the server's error message and close code."""
    async with connect(url, additional_headers=headers, local_addr=(host, 0)) as ws:
        error = None
        with contextlib.suppress(ConnectionClosed):  # a refusal at connection time may beat our hello
            for m in messages:
                await ws.send(m)
        with contextlib.suppress(ConnectionClosed):
            while error is None:
                reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
                error = reply if reply["type"] == "error" else None
        with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError):
            await asyncio.wait_for(ws.recv(), 2)
        return error, ws.close_code


@contextlib.asynccontextmanager
async def open_stream(url: str, stream_id: str, *, host: str = "127.0.0.1", **hello_extra: Any):
    """A client that has sent its hello and got ``ready``; yields the connection."""
    async with connect(url, local_addr=(host, 0)) as ws:
        await ws.send(hello(stream_id, **hello_extra))
        assert json.loads(await ws.recv())["type"] == "ready"
        yield ws


# ---------------------------------------------------------------- the rules alone (clock injected)

def test_admission_counts_rate_and_release_with_a_fake_clock() -> None:
    now = [0.0]
    adm = Admission(AccessLimits(max_streams_per_client=2, connection_rate=1.0, connection_burst=3,
                                 max_unready=10), clock=lambda: now[0])
    a, b = adm.admit("a"), adm.admit("a")
    with pytest.raises(Denied) as e:
        adm.admit("a")
    assert e.value.code == "too_many_streams" and adm.open_streams("a") == 2
    b.leave()
    b.leave()  # idempotent: every exit path may call it
    with pytest.raises(Denied) as e:  # the burst of 3 is spent (the refused attempt took a token too)
        adm.admit("a")
    assert e.value.code == "rate_limited" and "wait 1.0 s" in e.value.message
    now[0] = 1.0
    c = adm.admit("a")
    assert adm.open_streams("a") == 2 and adm.unready == 2
    a.ready()
    c.ready()
    assert adm.unready == 0
    a.leave()
    c.leave()
    assert adm.open_streams("a") == 0 and adm.unready == 0
    assert adm.admit("b") is not None  # another address has its own bucket


def test_admission_unready_cap_is_global_and_buckets_are_pruned() -> None:
    now = [0.0]
    adm = Admission(AccessLimits(max_unready=2), clock=lambda: now[0])
    t1, _ = adm.admit("x"), adm.admit("y")
    with pytest.raises(Denied, match="2 connections are still to send their hello"):
        adm.admit("z")
    t1.ready()
    adm.admit("z").leave()
    for i in range(Admission.PRUNE_ABOVE + 10):  # a scan from many addresses, each long refilled
        now[0] += 10
        adm.admit(f"scan-{i}").leave()
    assert len(adm._buckets) <= Admission.PRUNE_ABOVE


def test_access_limits_are_validated_and_the_token_never_printed() -> None:
    assert "hunter2" not in repr(AccessLimits(token="hunter2"))
    for bad in ({"token": ""}, {"max_unready": 0}, {"connection_rate": 0}, {"connection_rate": float("nan")},
                {"idle_timeout": 0}, {"max_streams_per_client": 0}):
        with pytest.raises(ValueError):
            AccessLimits(**bad)
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer") is None and bearer_token(None) is None


# ---------------------------------------------------------------- WebSocket, real server and clients

def test_token_by_header_or_hello_and_refusals_leave_other_streams_alone(caplog: pytest.LogCaptureFixture) -> None:
    server = WebSocketAudioServer(limits=AccessLimits(token="s3cret"))

    async def main() -> None:
        async with consuming(server) as (seen, samples):
            url = server.url
            # a stream in progress while bad clients are refused
            good = asyncio.create_task(send_audio(url, SPEECHLIKE[:, None], 16000, "good", token="s3cret",
                                                  realtime=True))
            await asyncio.sleep(0.1)
            no_token = await refusal(url, hello("anon"))
            wrong = await refusal(url, hello("wrong"), headers={"Authorization": "Bearer guess"})
            wrong_in_hello = await refusal(url, hello("wrong2", token="guess"))
            bad_type = await refusal(url, hello("typed", token=123))
            with pytest.raises(AudioError, match="unauthorized: the token is not valid"):
                await send_audio(url, SPEECHLIKE[:160, None], 16000, "helper", token="guess")
            by_hello = asyncio.create_task(_send_with_hello_token(url, "s3cret"))
            done = await good
            assert (await by_hello)["type"] == "done"
            await asyncio.sleep(0.1)
            assert done["samples_in"] == len(SPEECHLIKE) and samples["good"] == len(SPEECHLIKE)
            assert seen["good"].stats.errors == 0
            assert set(seen) == {"good", "by-hello"}  # no refused client ever became a stream
            assert server._admission.unready == 0 and server._admission.open_streams("127.0.0.1") == 0
        for (error, close), text in ((no_token, "a token is required"), (wrong, "the token is not valid"),
                                     (wrong_in_hello, "the token is not valid")):
            assert error is not None and error["code"] == "unauthorized" and close == 1008, error
            assert text in error["message"]
        assert bad_type[0] is not None and bad_type[0]["code"] == "invalid_hello"
        assert "s3cret" not in caplog.text and "guess" not in caplog.text

    run(main())


async def _send_with_hello_token(url: str, token: str) -> dict[str, Any]:
    """A browser-like client: no headers, the token in the hello."""
    async with connect(url) as ws:
        await ws.send(hello("by-hello", token=token))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(SPEECHLIKE[:1600].tobytes())
        await ws.send(json.dumps({"type": "end"}))
        return json.loads(await ws.recv())


@needs_second_address
def test_streams_per_client_limit_other_clients_unaffected() -> None:
    server = WebSocketAudioServer(limits=AccessLimits(max_streams_per_client=2))

    async def main() -> None:
        async with consuming(server) as (seen, _):
            url = server.url
            async with open_stream(url, "a1") as a1, open_stream(url, "a2"):
                error, close = await refusal(url, hello("a3"))
                assert error is not None and error["code"] == "too_many_streams" and close == 1013
                assert "127.0.0.1 already has 2 open streams" in error["message"]
                async with open_stream(url, "b1", host=OTHER_HOST) as b1:  # another client is not limited
                    await b1.send(SPEECHLIKE[:320].tobytes())
                    await a1.send(SPEECHLIKE[:320].tobytes())
                    await b1.send(json.dumps({"type": "end"}))
                    assert json.loads(await b1.recv())["type"] == "done"
                await a1.send(json.dumps({"type": "end"}))
                assert json.loads(await a1.recv())["type"] == "done"
                await asyncio.sleep(0.1)
                async with open_stream(url, "a4"):  # a slot of its own freed: accepted again
                    pass
            assert set(seen) == {"a1", "a2", "b1", "a4"}

    run(main())


@needs_second_address
def test_connection_rate_limit_per_client() -> None:
    server = WebSocketAudioServer(limits=AccessLimits(connection_rate=0.5, connection_burst=3))

    async def main() -> None:
        async with consuming(server):
            url = server.url
            for i in range(3):
                async with open_stream(url, f"r{i}"):
                    pass
            error, close = await refusal(url, hello("r3"))
            assert error is not None and error["code"] == "rate_limited" and close == 1013
            assert "wait 2.0 s before reconnecting" in error["message"]
            async with open_stream(url, "other", host=OTHER_HOST):
                pass

    run(main())


@needs_second_address
def test_slowloris_connections_without_hello_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    """Sockets that connect and say nothing hold at most ``max_unready`` places, each for ``hello_timeout``;
    a stream that is already running never notices."""
    server = WebSocketAudioServer(hello_timeout=1.0, limits=AccessLimits(max_unready=3))

    async def main() -> None:
        async with consuming(server) as (seen, samples):
            url = server.url
            async with open_stream(url, "running") as running:
                silent = [await connect(url, local_addr=(OTHER_HOST, 0)) for _ in range(3)]
                error, close = await refusal(url, hello("newcomer"))
                assert error is not None and error["code"] == "server_busy" and close == 1013
                assert "3 connections are still to send their hello" in error["message"]
                for _ in range(20):
                    await running.send(SPEECHLIKE[:320].tobytes())
                # the silent ones are closed by hello_timeout; then newcomers are served again
                timeouts = [await _error_of(ws) for ws in silent]
                assert {e["code"] for e in timeouts} == {"hello_timeout"}
                async with open_stream(url, "newcomer"):
                    pass
                await running.send(json.dumps({"type": "end"}))
                assert json.loads(await running.recv())["samples_in"] == 20 * 320
            await asyncio.sleep(0.1)
            assert samples["running"] == 20 * 320 and seen["running"].stats.errors == 0

    run(main())
    lines = [r for r in caplog.records if "no hello within" in r.getMessage()]
    assert len(lines) == 3 and all(r.exc_info is None for r in lines)


async def _error_of(ws: Any) -> dict[str, Any]:
    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    with contextlib.suppress(ConnectionClosed):
        await ws.recv()
    return reply


def test_idle_stream_is_closed_in_one_line_and_its_audio_kept(caplog: pytest.LogCaptureFixture) -> None:
    server = WebSocketAudioServer(limits=AccessLimits(idle_timeout=0.5))

    async def main() -> None:
        async with consuming(server) as (seen, samples):
            url = server.url
            good = asyncio.create_task(send_audio(url, SPEECHLIKE[:, None], 16000, "good", realtime=True,
                                                  frame_samples=1600))
            async with open_stream(url, "stalled") as ws:
                await ws.send(SPEECHLIKE[:3200].tobytes())
                error = await _error_of(ws)
                assert ws.close_code == 1008
            assert error["code"] == "idle_timeout" and "nothing received for 0.5 s" in error["message"]
            assert (await good)["samples_in"] == len(SPEECHLIKE)  # paced at 100 ms: never idle
            await asyncio.sleep(0.1)
            stalled = seen["stalled"]
            assert samples["stalled"] == 3200 and stalled.stats.errors == 1
            assert "nothing received" in (stalled.stats.last_error or "")
            assert seen["good"].stats.errors == 0

    with caplog.at_level(logging.INFO):
        run(main())
    lines = [r for r in caplog.records if "nothing received" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "Traceback" not in caplog.text


def test_raw_sockets_that_are_not_websocket_get_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    """A port scanner, a plain HTTP request and a client hanging up mid-handshake: one warning line each,
    no traceback (websockets logs a stack trace at ERROR for these by default)."""
    server = WebSocketAudioServer(hello_timeout=0.5)

    async def main() -> None:
        async with consuming(server):
            for data in (b"hello there\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n", b"\x16\x03\x01\x02\x00"):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # connects, says nothing
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after hello_timeout
            writer.close()
            async with open_stream(server.url, "fine"):
                pass

    with caplog.at_level(logging.INFO):
        run(main())
    failed = [r for r in caplog.records if "handshake failed" in r.getMessage()]
    assert len(failed) == 3 and all(r.exc_info is None and r.levelno == logging.WARNING for r in failed)
    assert "Traceback" not in caplog.text


def test_stream_command_takes_the_token_from_option_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamwavlm.cli import build_parser

    base = ["stream", "--input", "ws://127.0.0.1:8765"]
    assert build_parser().parse_args(base).ws_token is None
    assert build_parser().parse_args([*base, "--ws-token", "abc"]).ws_token == "abc"
    monkeypatch.setenv("STREAMWAVLM_WS_TOKEN", "from-env")
    assert build_parser().parse_args(base).ws_token == "from-env"


def test_stream_command_with_a_token_serves_only_clients_that_send_it(hf_models, mosquitto, capsys) -> None:
    """``streamwavlm stream --input ws://... --ws-token T``: a client without the token is refused, one with it
    gets its embeddings published, the command itself goes on."""
    from test_engine_faults import command, wait_for_output

    from streamwavlm.cli import build_parser
    from streamwavlm.commands.stream import stream
    from streamwavlm.mqtt import EmbeddingMessage, subscribe
    from streamwavlm.mqtt.broker import free_port

    _, directory = hf_models["base"]
    url = f"ws://127.0.0.1:{free_port()}"
    stop = asyncio.Event()
    frames: dict[str, int] = {}

    async def listen(subscribed: asyncio.Event) -> None:
        async with contextlib.aclosing(subscribe(mosquitto.url, "out", on_subscribed=subscribed.set)) as items:
            async for item in items:
                if isinstance(item, EmbeddingMessage):
                    frames[item.stream_id] = frames.get(item.stream_id, 0) + item.frames

    async def clients() -> tuple[str, dict[str, Any]]:
        await wait_for_output(capsys, "accepting audio streams")
        with pytest.raises(AudioError) as refused:
            await send_audio(url, SPEECHLIKE[:1600, None], 16000, "anon")
        done = await send_audio(url, SPEECHLIKE[:, None], 16000, "member", token="t0ken")
        await asyncio.sleep(0.5)
        stop.set()
        return str(refused.value), done

    async def main() -> tuple[str, dict[str, Any]]:
        subscribed = asyncio.Event()
        listener = asyncio.create_task(listen(subscribed))
        await asyncio.wait_for(subscribed.wait(), 10)
        sending = asyncio.create_task(clients())
        argv = command(directory, mosquitto.url, url, "--ws-token", "t0ken")
        assert await stream(build_parser().parse_args(argv), stop) == 0
        listener.cancel()
        return await sending

    refused, done = run(main(), timeout=90)
    assert "unauthorized: a token is required" in refused
    assert done["samples_in"] == len(SPEECHLIKE) and frames["member"] > 40 and "anon" not in frames


# ---------------------------------------------------------------- MQTT

def _mosquitto_tools() -> str | None:
    import shutil

    from streamwavlm.mqtt.broker import find_mosquitto

    for tool in ("mosquitto_passwd", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    return None if find_mosquitto() is not None else "mosquitto not installed (apt mosquitto)"


def acl_example() -> str:
    """The ACL block of docs/security.md, exactly as documented."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    after = doc.split("<!-- acl-example", 1)[1]
    return after.split("```\n", 2)[1]


@pytest.fixture
def secured_broker(tmp_path):
    """A mosquitto with a generated certificate, a password file (engine, reader, kitchen) and the ACL of
    docs/security.md; yields (port, TLSOptions, password of every user)."""
    import subprocess

    from streamwavlm.mqtt import Mosquitto
    from streamwavlm.mqtt.connection import TLSOptions

    if (why := _mosquitto_tools()) is not None:
        pytest.skip(why)
    cert, key, passwd, acl = (tmp_path / n for n in ("cert.pem", "key.pem", "passwd", "acl"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    passwords = {"engine": "e-pass", "reader": "r-pass", "kitchen": "k-pass"}
    for i, (user, password) in enumerate(passwords.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, password],
                       check=True)
    acl.write_text(acl_example())
    config = [f"certfile {cert}", f"keyfile {key}", "allow_anonymous false", f"password_file {passwd}",
              f"acl_file {acl}"]
    with Mosquitto(workdir=tmp_path / "broker", extra_config=config) as broker:
        yield broker.port, TLSOptions(ca_file=str(cert)), passwords


def test_audio_in_and_embeddings_out_through_tls_passwords_and_acls(secured_broker, hf_models) -> None:
    """Audio in and embeddings out through one TLS broker, as three users with the documented ACL: the engine,
    a read-only reader, and a device that may only send its own stream."""
    import aiomqtt
    import torch
    from test_engine import SETTINGS, solo_frames

    from streamwavlm.audio.mqtt_audio import MqttAudioInput, publish_audio
    from streamwavlm.checkpoint import load_model
    from streamwavlm.engine import Engine
    from streamwavlm.mqtt import EmbeddingMessage, Publisher, subscribe
    from streamwavlm.mqtt.sink import MqttSink
    from streamwavlm.streaming import StreamPool

    port, tls, pw = secured_broker
    model = load_model(hf_models["base"][1])
    audio = SPEECHLIKE[:8000]
    want = solo_frames(model, audio.astype(np.float32) / 32768)

    def url(user: str) -> str:
        return f"mqtts://{user}:{pw[user]}@127.0.0.1:{port}"

    def client(user: str) -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", port, username=user, password=pw[user], tls_context=tls.context(),
                              identifier=f"test-{user}")

    async def main() -> None:
        got: list[EmbeddingMessage] = []
        subscribed = asyncio.Event()

        async def read() -> None:
            async with contextlib.aclosing(subscribe(url("reader"), "streamwavlm", tls=tls,
                                                     on_subscribed=subscribed.set)) as items:
                async for item in items:
                    if isinstance(item, EmbeddingMessage):
                        got.append(item)

        async with MqttAudioInput(url("engine"), prefix="streamwavlm-audio", tls=tls) as inp, \
                Publisher(url("engine"), tls=tls, status_interval=None) as pub, \
                Engine(StreamPool(model, SETTINGS, capacity=2), [MqttSink(pub, "tiny", 50.0)]) as engine:
            streams: list[str] = []

            async def accept() -> None:
                async for s in inp.streams():
                    streams.append(s.stream_id)
                    engine.add(s, s.stream_id)

            acceptor = asyncio.create_task(accept())
            reader = asyncio.create_task(read())
            await asyncio.wait_for(subscribed.wait(), 10)
            async with client("kitchen") as kitchen, client("reader") as rogue:
                await kitchen.subscribe("streamwavlm-audio/audio/kitchen/error")
                await kitchen.subscribe("streamwavlm/#")  # not allowed: must never deliver embeddings
                await rogue.subscribe("streamwavlm/#")  # allowed: sees the engine's output, not its own forgery
                # the device's own stream, and one under another device's name (denied by the ACL)
                await publish_audio(kitchen, "streamwavlm-audio", "hall", audio, 16000)
                await publish_audio(kitchen, "streamwavlm-audio", "kitchen", audio, 16000)
                # a reader forging an embedding message (denied: reaches no one)
                await rogue.publish("streamwavlm/forged/embeddings", b"\x00" * 64, qos=1)
                # JSON to the audio topic: refused, and the device may read the reply
                await kitchen.publish("streamwavlm-audio/audio/kitchen", b'{"samples": [0.1, 0.2]}', qos=1)
                reply = await asyncio.wait_for(anext(aiomqtt_messages(kitchen)), 10)
                assert reply.topic.value == "streamwavlm-audio/audio/kitchen/error"
                error = json.loads(reply.payload)
                assert error["code"] == "invalid_payload" and "the payload is text" in error["message"]
                while sum(m.frames for m in got) < len(want):
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)  # anything forbidden would have arrived by now
                extra = [m async for m in _drain(kitchen)]
                seen_by_reader = {m.topic.value async for m in _drain(rogue)}
            acceptor.cancel()
            reader.cancel()
        assert streams == ["kitchen"]  # "hall" never reached the engine
        frames = torch.cat([torch.from_numpy(m.data[0]) for m in got])
        assert frames.shape == want.shape and (frames - want).abs().max() < 1e-5
        assert "streamwavlm/kitchen/embeddings" in seen_by_reader  # the reader reads the engine's output,
        assert "streamwavlm/forged/embeddings" not in seen_by_reader  # and its own publication reached no one
        assert extra == []  # the device received no embedding (nor anything else)

    run(main(), timeout=60)


def aiomqtt_messages(client: Any) -> Any:
    return client.messages.__aiter__()


async def _drain(client: Any) -> Any:
    """Messages already waiting for ``client`` (without waiting for more)."""
    while True:
        try:
            yield await asyncio.wait_for(anext(aiomqtt_messages(client)), 0.2)
        except asyncio.TimeoutError:
            return


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to the current one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def test_oversized_mqtt_payloads_are_refused_before_decoding(mosquitto, tmp_path) -> None:
    """A payload over the limit is refused by its size on the stream's error topic; a 50 MB one is not even
    delivered (MQTT 5 maximum packet size) and the resident memory stays flat; JSON sent as raw audio is
    refused as text. A concurrent stream goes on, and the refused stream's sender can start over."""
    import aiomqtt

    from streamwavlm.audio.mqtt_audio import MqttAudioInput, publish_audio

    if not _reset_peak_rss():
        pytest.skip("cannot reset the peak resident size here (/proc/self/clear_refs)")
    big = tmp_path / "big.raw"
    np.zeros(25_000_000, "<i2").tofile(big)  # 50 MB of valid raw audio: only its size is wrong

    async def main() -> None:
        async with MqttAudioInput(mosquitto.url, prefix="t", max_payload_bytes=64 * 1024) as inp, \
                aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.subscribe("t/audio/+/error")
            totals: dict[str, int] = {}

            async def consume() -> None:
                async for stream in inp.streams():
                    async for chunk in stream:
                        totals[stream.stream_id] = totals.get(stream.stream_id, 0) + len(chunk.samples)

            consumer = asyncio.create_task(consume())
            good = asyncio.create_task(publish_audio(client, "t", "good", SPEECHLIKE, 16000, realtime=True,
                                                     frame_samples=1600))
            await client.publish("t/audio/big", b"\x00" * 200_000, qos=1)  # over the limit, delivered
            reply = await asyncio.wait_for(anext(aiomqtt_messages(client)), 10)
            error = json.loads(reply.payload)
            assert reply.topic.value == "t/audio/big/error" and error["code"] == "payload_too_big"
            assert "200000 bytes exceeds the limit of 65536 bytes" in error["message"]
            await client.publish("t/audio/notes", b'{"samples": [0.1, 0.2, 0.3]}', qos=1)  # text, not audio
            reply = await asyncio.wait_for(anext(aiomqtt_messages(client)), 10)
            error = json.loads(reply.payload)
            assert reply.topic.value == "t/audio/notes/error" and "the payload is text" in error["message"]
            await asyncio.sleep(0.3)
            _reset_peak_rss()
            before = _peak_rss_mb()
            sender = await asyncio.create_subprocess_exec(  # another process: its memory is not ours
                "mosquitto_pub", "-h", "127.0.0.1", "-p", str(mosquitto.port), "-t", "t/audio/big", "-q", "1",
                "-f", str(big))
            assert await sender.wait() == 0
            await asyncio.sleep(1.0)
            growth = _peak_rss_mb() - before
            assert growth < 25, f"resident memory grew by {growth:.0f} MB while a 50 MB payload was sent"
            await publish_audio(client, "t", "big", SPEECHLIKE[:3200], 16000)  # the sender starts over
            await good
            await asyncio.sleep(0.3)
            consumer.cancel()
            assert totals == {"good": len(SPEECHLIKE), "big": 3200}

    run(main(), timeout=60)
