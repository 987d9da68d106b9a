"""``streamwavlm stream``: the main job. Audio in (file, microphone, WebSocket or MQTT audio) -> streaming
encoder -> embeddings out on MQTT, with an embedded broker when none is given."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from rich.console import Console

from ..audio.files import FileSource, audio_length
from ..audio.level import Metered, meter
from ..audio.source import refuse
from ..audio.validate import AudioError
from ..engine import Engine
from ..file_sink import FileSink
from ..mqtt import EmbeddedBroker, EmbeddingMessage, Gap, Publisher, subscribe
from ..mqtt.sink import MqttSink
from ..streaming import PoolFull, StreamPool
from .common import (
    ONE_FRAME,
    add_checkpoint_option,
    add_device_option,
    add_dtype_option,
    add_stream_options,
    bundled_sample,
    check_reachable,
    positive,
    streaming_model,
)
from .signals import on_forced_exit, stop_event

AUDIO_PREFIX = "streamwavlm-audio"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stream", help="the main job: audio in -> streaming encoder -> embeddings on MQTT")
    add_checkpoint_option(p)
    add_device_option(p)
    add_stream_options(p)
    p.add_argument("--input", default=None, metavar="SOURCE",
                   help="FILE, mic[:DEVICE], ws://HOST:PORT (serve audio over WebSocket) or mqtt://HOST:PORT "
                        f"(audio on '{AUDIO_PREFIX}/audio/<stream>'); default: the bundled sample")
    p.add_argument("--broker", help="mqtt://[user:pass@]host:port to publish to, or 'none' to publish nothing "
                   "(with --save; default: start an embedded broker)")
    p.add_argument("--save", metavar="PATH", help="also write what is published (embeddings, x-vectors, frame "
                   "times) to PATH (.npz), written when the run ends")
    p.add_argument("--prefix", default="streamwavlm", help="topic prefix (default: %(default)s)")
    p.add_argument("--protocol", choices=("5", "3.1.1"), help="MQTT protocol version (default: 5)")
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=1, help="QoS of embeddings (default: 1)")
    add_dtype_option(p)
    p.add_argument("--payload-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the published vectors (default: %(default)s)")
    p.add_argument("--xvector", type=window_hop, metavar="WINDOW,HOP", help="publish x-vectors over WINDOW "
                   "frames every HOP frames (needs a speaker-head checkpoint)")
    p.add_argument("--realtime", action="store_true", help="pace file input in real time")
    p.add_argument("--capacity", type=positive(int), default=16, help="most concurrent streams (default: %(default)s)")
    p.add_argument("--max-backlog", type=positive(float), default=2.0, help="seconds of queued audio per stream before "
                   "the overload policy applies (default: %(default)s)")
    p.add_argument("--overload", choices=("drop_oldest", "shed"), default="drop_oldest")
    p.add_argument("--idle-timeout", type=positive(float), default=30.0, metavar="S", help="end a stream that sent no "
                   "audio for S seconds and free its slot (network inputs; default: %(default)s)")
    p.add_argument("--status-interval", type=positive(float), default=5.0, metavar="S",
                   help="publish every stream's live status every S seconds (default: %(default)s)")
    p.add_argument("--listen", action="store_true", help="also subscribe and print what arrives, with the input "
                   "level")
    p.add_argument("--seconds", type=positive(float), help="stop after this many seconds (live inputs)")
    p.add_argument("--ws-token", default=os.environ.get("STREAMWAVLM_WS_TOKEN"), metavar="TOKEN",
                   help="WebSocket input: clients must send 'Authorization: Bearer TOKEN' or \"token\" in their "
                        "hello (default: $STREAMWAVLM_WS_TOKEN; unset: no authentication, see docs/security.md)")
    p.set_defaults(func=lambda args: asyncio.run(stream(args)))


def window_hop(text: str) -> tuple[int, int]:
    """``--xvector WINDOW,HOP``: two positive frame counts."""
    try:
        window, hop = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WINDOW,HOP: give two frame counts, e.g. 150,50 "
                                         "(a 3 s window every second)") from None
    if window <= 0 or hop <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: WINDOW and HOP must be positive frame counts")
    return window, hop


Sources = AsyncIterator[tuple[object, str, bool]]


def _is_network(spec: str) -> bool:
    return spec.startswith(("ws://", "mqtt://"))


def _is_mic(spec: str) -> bool:
    return spec == "mic" or spec.startswith("mic:")


def _mic_device(spec: str) -> int | str | None:
    """The device of ``mic`` / ``mic:DEVICE`` (an index or a name), or None for the default."""
    device = spec[4:] or None
    return int(device) if device and device.isdigit() else device


def check_input(spec: str) -> None:
    """Refuse an input that cannot work, in one line, before the model is loaded (seconds) or anything
    starts: a missing or unreadable file, a microphone that is not there, a WebSocket port out of range, an
    audio broker that refuses connections. (A port in use is found when :func:`open_input` binds it.)"""
    if spec.startswith("ws://"):
        try:
            urlparse(spec).port  # noqa: B018 (the property parses the port and raises on a bad one)
        except ValueError:
            raise AudioError(f"--input {spec}: the port must be a number from 0 to 65535, e.g. "
                             "ws://0.0.0.0:8765") from None
    elif spec.startswith("mqtt://"):
        check_reachable(spec)
    elif _is_mic(spec):
        from ..audio.microphone import find_device

        try:
            find_device(_mic_device(spec))
        except OSError as e:  # PortAudio itself is missing (sounddevice could not load it)
            raise AudioError(f"no microphone: {e}; install PortAudio (apt-get install libportaudio2)") from None
    else:
        samples = audio_length(spec)
        if samples < ONE_FRAME:
            raise AudioError(f"{spec}: {samples} samples at 16 kHz is too short for one frame; WavLM needs at "
                             f"least {ONE_FRAME} ({ONE_FRAME / 16:.0f} ms): give a longer recording")


@contextlib.asynccontextmanager
async def open_input(spec: str, args: argparse.Namespace) -> AsyncIterator[Sources]:
    """Open the input now (bind the WebSocket port, connect to the audio broker), so that a port in use or
    an unreachable broker is said at start, not when the run ends; the yielded iterator gives (source,
    stream id, live), one per client for network inputs."""
    if spec.startswith("ws://"):
        from ..audio.guard import AccessLimits
        from ..audio.websocket import WebSocketAudioServer

        u = urlparse(spec)
        async with WebSocketAudioServer(u.hostname or "127.0.0.1", u.port or 8765,
                                        limits=AccessLimits(token=args.ws_token)) as server:
            print(f"accepting audio streams on {server.url}", flush=True)
            # a sender that can wait gets back-pressure, not drops
            yield ((s, s.stream_id, s.hello.live) async for s in server.streams())
    elif spec.startswith("mqtt://"):
        from ..audio.mqtt_audio import MqttAudioInput

        async with MqttAudioInput(spec, prefix=AUDIO_PREFIX) as mq:
            print(f"accepting audio on {spec} topic {AUDIO_PREFIX}/audio/<stream>", flush=True)
            yield ((s, s.stream_id, True) async for s in mq.streams())
    elif _is_mic(spec):
        from ..audio.microphone import MicrophoneSource

        yield _one((MicrophoneSource(_mic_device(spec), block=800), "mic", True))
    else:
        yield _one((FileSource(spec, block=1600, realtime=args.realtime), Path(spec).stem, args.realtime))


async def _one(item: tuple[object, str, bool]) -> Sources:
    yield item


async def _sources(spec: str, args: argparse.Namespace) -> Sources:
    """Yield (source, stream id, live) for the input spec; network inputs yield one per client."""
    async with open_input(spec, args) as sources:
        async for item in sources:
            yield item


async def _listen(broker: str, prefix: str, console: Console, latencies: list[float],
                  levels: dict[str, float]) -> None:
    async for item in subscribe(broker, prefix, kinds=("embeddings", "xvector"), connect_timeout=10):
        if isinstance(item, Gap):
            console.print(f"[red]gap[/] {item.stream_id}/{item.kind}: {item.count} message(s) missing")
        elif isinstance(item, EmbeddingMessage):
            latency = time.time() - item.timestamp
            latencies.append(latency)
            level = levels.get(item.stream_id)  # one line that fits 80 columns, level meter included
            shown = f", input {level:3.0f} dBFS {meter(level)}" if level is not None else ""
            console.print(f"{item.stream_id}/{item.kind} seq {item.seq}: frames {item.first_frame}.."
                          f"{item.first_frame + item.frames - 1} {'x'.join(map(str, item.data.shape))} "
                          f"{latency * 1000:.0f} ms{shown}", highlight=False)


async def stream(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    """Run the main job until the input ends, ``--seconds`` pass, Ctrl-C, or ``stop`` is set."""
    console = Console()
    torch.set_grad_enabled(False)
    spec = args.input or str(bundled_sample())
    publish = args.broker != "none"
    if args.listen and not publish:
        raise ValueError("--listen subscribes to the broker; with --broker none there is none (use --save)")
    check_input(spec)  # before the model loads (seconds): a user's mistake is said at once
    if publish and args.broker is not None:
        check_reachable(args.broker)
    model, settings, model_id = streaming_model(args, console)
    stop = stop or stop_event()  # Ctrl-C and SIGTERM end the run cleanly (flush, offline statuses)
    loop = asyncio.get_running_loop()
    if args.seconds:
        loop.call_later(args.seconds, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        broker = args.broker
        if broker is None:
            embedded = EmbeddedBroker()
            broker = await stack.enter_async_context(embedded)
            stack.callback(on_forced_exit(embedded.kill))  # a forced exit must not leave it running
            console.print(f"[bold]broker[/]: embedded, {broker}")
        sources = await stack.enter_async_context(open_input(spec, args))
        latencies: list[float] = []
        levels: dict[str, float] = {}
        listener = None
        if args.listen:
            listener = asyncio.create_task(_listen(broker, args.prefix, console, latencies, levels))
            await asyncio.sleep(0.3)  # let the subscription settle before the first message
        frame_rate = 16000 / model.cfg.hop
        saver = FileSink(args.save, model_id, frame_rate, args.payload_dtype) if args.save else None
        publisher, mqtt_sink = None, None
        if publish:
            publisher = await stack.enter_async_context(Publisher(
                broker, prefix=args.prefix, protocol=args.protocol,
                qos={"embeddings": args.qos, "xvector": args.qos}))
            mqtt_sink = MqttSink(publisher, model_id, frame_rate, args.payload_dtype)
        sinks = [s for s in (mqtt_sink, saver) if s is not None]
        pool = StreamPool(model, settings, capacity=args.capacity)
        engine = await stack.enter_async_context(
            Engine(pool, sinks, max_backlog=args.max_backlog, policy=args.overload,
                   on_status=mqtt_sink.status if mqtt_sink else None, idle_timeout=args.idle_timeout,
                   status_interval=args.status_interval))
        target = (f"{broker} under '{args.prefix}/<stream>/embeddings'" if publish else "no broker")
        target += f", saved to {saver.path}" if saver else ""
        console.print(f"[bold]streaming[/]: {spec} -> {target}; "
                      f"chunk {settings.chunk}, left {settings.left}, lookahead {settings.lookahead}: algorithmic "
                      f"latency {settings.latency_ms(model.cfg):.0f} ms")

        async def accept() -> None:
            async for source, stream_id, live in sources:
                if args.listen:
                    source = Metered(source, levels.__setitem__)  # type: ignore[arg-type]
                try:
                    engine.add(source, stream_id, live=live)  # type: ignore[arg-type]
                except PoolFull as e:  # the newcomer is told; the streams already running are untouched
                    await refuse(source, "server_busy", str(e))  # type: ignore[arg-type]

        acceptor = asyncio.create_task(accept())
        network = _is_network(spec)
        # a network input runs until stopped, unless its server or broker fails (the acceptor ends)
        while not stop.is_set() and not (network and acceptor.done()) and (
                network or not acceptor.done() or engine.streams):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        if acceptor.done() and acceptor.exception():
            raise acceptor.exception()  # type: ignore[misc]
        acceptor.cancel()
        for s in list(engine.streams.values()):
            await s.source.close()
        await engine.drain(discard_backlog=stop.is_set())  # stopped (Ctrl-C, --seconds): end quickly
        if publisher is not None:
            await publisher.flush(10)
        if listener is not None:
            await asyncio.sleep(0.5)
            listener.cancel()
        for summary in engine.status():
            console.print(f"[bold]{summary['stream']}[/]: {summary['frames_out']} frames, chunk latency p50 "
                          f"{summary['latency_ms_p50']} ms p99 {summary['latency_ms_p99']} ms, RTF {summary['rtf']}, "
                          f"dropped {summary['dropped']} samples")
        if publisher is not None:
            c = publisher.counters
            console.print(f"published {c.published} messages ({c.outbox_overflow} lost to a full outbox, "
                          f"{c.reconnects} reconnects)")
        if saver is not None:
            console.print(f"saved to {saver.write()}")
        if latencies:
            ms = np.array(latencies) * 1000
            console.print(f"subscriber received {len(ms)} messages: latency from a chunk's last sample to "
                          f"receipt p50 {np.percentile(ms, 50):.0f} ms, p99 {np.percentile(ms, 99):.0f} ms")
    failed = [s for s in engine.status() if s["error"]]
    if failed and not network:  # the one input failed (a network input's clients fail on their own)
        raise AudioError(f"{failed[0]['stream']}: {failed[0]['error']}")
    return 0
