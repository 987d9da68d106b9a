"""Audio streams over WebSocket: a server that turns each client connection into one audio source.

Protocol (docs/audio.md has the full text):

1. The client sends a JSON text *hello*:
   ``{"stream_id": "room-1", "sample_rate": 48000, "format": "s16le", "channels": 2}``.
2. The server answers ``{"type": "ready", ...}``, or ``{"type": "error", "code": ..., "message": ...}``
   and closes the connection with a close code that says which kind of problem it was.
3. The client sends binary frames of interleaved little-endian samples (whole frames only, at most
   ``max_frame_bytes`` each), and finally the text ``{"type": "end"}``; the server answers
   ``{"type": "done", ...}`` with its counts and closes normally. Closing without ``end`` also ends the
   stream; losing the connection ends it with an error counted.

Every connection has its own handler task and queue: a client that sends garbage, too much, or vanishes
loses its own stream and nothing else. With the default ``block`` policy a full queue stops reading that
client's socket (TCP back-pressure: lossless, the sender slows down); ``drop_oldest`` instead drops and
counts old chunks so that a live sender is never delayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake

from streamwavlm.audio.guard import AccessLimits, Admission, Denied, Ticket
from streamwavlm.audio.resample import Resampler
from streamwavlm.audio.source import (
    STREAM_ID,
    SUPPORTED_RATES,
    AudioChunk,
    OverflowPolicy,
    QueuedSource,
    RefuseCallback,
)
from streamwavlm.audio.validate import PCM_FORMATS, SAMPLE_RATE, AudioError, decode_pcm, mixdown
from streamwavlm.quoting import shown

log = logging.getLogger(__name__)

MAX_CHANNELS = 8

# Close codes (RFC 6455, section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED = 1003  # a rate, format or channel count this server does not take
CLOSE_INVALID_DATA = 1007  # audio bytes that are not valid samples
CLOSE_POLICY = 1008  # protocol misuse: no/invalid hello, unexpected message, duplicate stream id
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013


class Refusal(Exception):
    """A client error: sent to the client as JSON, then the connection is closed with ``close_code``."""

    def __init__(self, code: str, message: str, close_code: int) -> None:
        super().__init__(message)
        self.code, self.message, self.close_code = code, message, close_code


@dataclass(frozen=True)
class Hello:
    """The stream description a client sends first."""

    stream_id: str
    sample_rate: int
    format: str
    channels: int
    live: bool = False  # true: a real-time sender that cannot wait (overload policy); false: back-pressure
    token: str | None = field(default=None, repr=False, compare=False)  # checked against AccessLimits.token


HELLO_EXAMPLE = '{"stream_id": "mic-1", "sample_rate": 16000, "format": "s16le", "channels": 1}'


def parse_hello(message: str | bytes) -> Hello:
    """Check the first message of a connection; :class:`Refusal` says precisely what is wrong."""
    if isinstance(message, bytes):
        raise Refusal("missing_hello", f"the first message must be the JSON text hello {HELLO_EXAMPLE}; "
                      f"got a binary frame of {len(message)} bytes", CLOSE_POLICY)
    try:
        hello = _loads(message)
    except ValueError as e:
        raise Refusal("invalid_hello", f"the hello is not valid JSON ({e}); send e.g. {HELLO_EXAMPLE}",
                      CLOSE_POLICY) from e
    if not isinstance(hello, dict):
        raise Refusal("invalid_hello", f"the hello must be a JSON object like {HELLO_EXAMPLE}", CLOSE_POLICY)
    if hello.get("type", "hello") != "hello":
        raise Refusal("invalid_hello", f"the first message must be the hello, got type {shown(hello['type'])}",
                      CLOSE_POLICY)
    missing = [k for k in ("stream_id", "sample_rate", "format", "channels") if k not in hello]
    if missing:
        raise Refusal("invalid_hello", f"the hello lacks {', '.join(missing)}; send e.g. {HELLO_EXAMPLE}",
                      CLOSE_POLICY)
    stream_id, rate = hello["stream_id"], hello["sample_rate"]
    fmt, channels = hello["format"], hello["channels"]
    if not isinstance(stream_id, str) or not STREAM_ID.fullmatch(stream_id):
        raise Refusal("invalid_hello", f"stream_id {shown(stream_id)} must be 1-128 characters of letters, digits "
                      "and _ . : -", CLOSE_POLICY)
    if not _is_int(rate) or rate not in SUPPORTED_RATES:
        raise Refusal("unsupported_rate", f"sample_rate {shown(rate)} is not supported; use one of "
                      f"{', '.join(map(str, SUPPORTED_RATES))} Hz (the server resamples to 16000)",
                      CLOSE_UNSUPPORTED)
    if not isinstance(fmt, str) or fmt not in PCM_FORMATS:  # a list is unhashable (found by test_fuzz.py)
        raise Refusal("unsupported_format", f"format {shown(fmt)} is not supported; use \"s16le\" (16-bit signed "
                      "little-endian) or \"f32le\" (32-bit float little-endian)", CLOSE_UNSUPPORTED)
    if not _is_int(channels) or not 1 <= channels <= MAX_CHANNELS:
        raise Refusal("unsupported_channels", f"channels {shown(channels)} is not supported; send 1 to "
                      f"{MAX_CHANNELS} interleaved channels (they are mixed down to mono)", CLOSE_UNSUPPORTED)
    live = hello.get("live", False)
    if not isinstance(live, bool):
        raise Refusal("invalid_hello", f"live {shown(live)} must be true (a real-time sender: the server drops the "
                      "oldest audio when it falls behind) or false (the default: it slows the sender down)",
                      CLOSE_POLICY)
    token = hello.get("token")
    if token is not None and not isinstance(token, str):
        raise Refusal("invalid_hello", "token must be a string", CLOSE_POLICY)
    return Hello(stream_id, rate, fmt, channels, live, token)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class WebSocketStream(QueuedSource):
    """One client's audio: an :class:`~streamwavlm.audio.source.AudioSource` with the client's hello.

    ``close()`` ends the stream from the server side (the client sees a normal close).
    """

    def __init__(self, hello: Hello, *, queue_size: int, policy: OverflowPolicy,
                 on_close: Callable[[], Awaitable[None]], on_refuse: RefuseCallback) -> None:
        super().__init__(hello.stream_id, hello.sample_rate, queue_size=queue_size, policy=policy,
                         on_close=on_close, on_refuse=on_refuse)
        self.hello = hello


class WebSocketAudioServer:
    """Accepts audio streams on ``ws://host:port/`` (any path); ``async for stream in server.streams()``.

    ``port=0`` picks a free port (see :attr:`port`). ``max_frame_bytes`` bounds one binary frame; frames up
    to 4x that size are refused with a JSON error, larger ones are cut off by the WebSocket layer itself
    (close code 1009, no JSON). ``max_pending`` streams may wait to be taken by ``streams()``; further
    clients are refused with ``server_busy`` (1013). ``limits`` are the admission rules (token, streams per
    client, connection rate, connections without a hello yet, idle timeout): see :mod:`.guard`.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, max_frame_bytes: int = 256 * 1024,
                 queue_size: int = 64, policy: OverflowPolicy = "block", hello_timeout: float = 5.0,
                 max_pending: int = 16, limits: AccessLimits | None = None) -> None:
        self.host, self._port = host, port
        self.limits = limits or AccessLimits()
        self._admission = Admission(self.limits)
        self.max_frame_bytes, self.queue_size, self.policy = max_frame_bytes, queue_size, policy
        self.hello_timeout = hello_timeout
        self._pending: asyncio.Queue[WebSocketStream | None] = asyncio.Queue(max_pending)
        self._active: dict[str, WebSocketStream] = {}
        self._server: Server | None = None
        self._closed = False

    @property
    def port(self) -> int:
        """The port listened on (the chosen one when started with ``port=0``)."""
        if self._server is None:
            return self._port
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    async def start(self) -> None:
        # open_timeout bounds the HTTP upgrade itself (a client that connects and sends nothing), before any
        # of our rules can run; its handshake errors are logged in one line (see _HandshakeLog)
        self._server = await serve(self._admit, self.host, self._port, max_size=4 * self.max_frame_bytes,
                                   compression=None, open_timeout=self.hello_timeout, logger=_HANDSHAKE_LOG)

    async def close(self) -> None:
        """Stop accepting; open connections are closed (1001) and their streams end."""
        self._closed = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(asyncio.QueueFull):  # a full queue ends streams() by itself once drained
            self._pending.put_nowait(None)

    async def __aenter__(self) -> WebSocketAudioServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def streams(self) -> AsyncIterator[WebSocketStream]:
        """New streams, in the order clients sent their hello, until the server is closed."""
        while not (self._closed and self._pending.empty()):
            stream = await self._pending.get()
            if stream is None:
                return
            yield stream

    async def _admit(self, ws: ServerConnection) -> None:
        """The admission rules first (connection rate, streams per client, connections without a hello), then
        the connection itself; whatever happens, its counts are released when it ends."""
        peer = ws.remote_address
        try:
            ticket = self._admission.admit(str(peer[0]) if peer else "unknown")
        except Denied as d:
            log.warning("refused %s: %s", peer, d.message)
            await _refuse(ws, Refusal(d.code, d.message, CLOSE_TRY_AGAIN))
            return
        try:
            await self._handle(ws, ticket)
        finally:
            ticket.leave()

    async def _handle(self, ws: ServerConnection, ticket: Ticket) -> None:
        """One connection: hello, then frames until the end, a refusal, or the connection's loss."""
        peer = ws.remote_address
        try:
            hello = parse_hello(await asyncio.wait_for(ws.recv(), self.hello_timeout))
            try:
                self._admission.authenticate(ws.request.headers.get("Authorization") if ws.request else None,
                                             hello.token)
            except Denied as d:
                raise Refusal(d.code, d.message, CLOSE_POLICY) from None
            ticket.ready()
            if hello.stream_id in self._active:
                raise Refusal("stream_id_in_use", f"stream_id {hello.stream_id!r} is already streaming; "
                              "choose another id or wait until that stream ends", CLOSE_POLICY)
            if self._closed:
                raise Refusal("server_closing", "the server is shutting down; try again later",
                              CLOSE_TRY_AGAIN)
        except asyncio.TimeoutError:
            log.warning("refused %s: no hello within %g s", peer, self.hello_timeout)
            await _refuse(ws, Refusal("hello_timeout", f"no hello within {self.hello_timeout:g} s; the first "
                                      f"message must be the JSON text hello {HELLO_EXAMPLE}", CLOSE_POLICY))
            return
        except Refusal as r:
            log.warning("refused %s: %s", peer, r.message)
            await _refuse(ws, r)
            return
        except ConnectionClosed:
            log.info("%s left before its hello", peer)
            return
        stream = WebSocketStream(hello, queue_size=self.queue_size, policy=self.policy,
                                 on_close=lambda: ws.close(CLOSE_NORMAL, "closed by the server"),
                                 on_refuse=lambda code, message: _refuse(ws, Refusal(code, message, CLOSE_TRY_AGAIN)))
        try:
            self._pending.put_nowait(stream)
        except asyncio.QueueFull:
            await _refuse(ws, Refusal("server_busy", "too many new streams are waiting to be processed; try "
                                      "again later", CLOSE_TRY_AGAIN))
            return
        self._active[hello.stream_id] = stream
        try:
            await self._receive(ws, stream)
        finally:
            stream.queue.finish()
            del self._active[hello.stream_id]

    async def _receive(self, ws: ServerConnection, stream: WebSocketStream) -> None:
        """Frames -> chunks until the end. Whatever arrived before an error is still delivered."""
        hello, stats = stream.hello, stream.stats
        resampler = Resampler(hello.sample_rate)
        source = f"stream {hello.stream_id!r}"

        async def put(samples: np.ndarray, start: int) -> None:
            if len(samples):
                await stream.queue.put(AudioChunk(hello.stream_id, samples, start, time.monotonic()))

        try:
            await ws.send(json.dumps({"type": "ready", "stream_id": hello.stream_id,
                                      "output_rate": SAMPLE_RATE, "max_frame_bytes": self.max_frame_bytes}))
            while True:
                try:
                    message = await asyncio.wait_for(ws.recv(), self.limits.idle_timeout)
                except asyncio.TimeoutError:
                    raise Refusal("idle_timeout", f"nothing received for {self.limits.idle_timeout:g} s; the stream "
                                  'is closed. Send audio continuously and {"type": "end"} when done',
                                  CLOSE_POLICY) from None
                if isinstance(message, str):
                    parse_control(message)  # the end, or a Refusal
                    start = resampler.output_index
                    await put(resampler.flush(), start)
                    await ws.send(json.dumps({"type": "done", "stream_id": hello.stream_id,
                                              "samples_in": stats.samples_in,
                                              "samples_out": resampler.output_index}))
                    await ws.close(CLOSE_NORMAL, "end of stream")
                    return
                if len(message) > self.max_frame_bytes:
                    raise Refusal("frame_too_big", f"a frame of {len(message)} bytes exceeds the limit of "
                                  f"{self.max_frame_bytes} bytes; send smaller frames (e.g. 20-100 ms)",
                                  CLOSE_TOO_BIG)
                try:
                    frames = decode_pcm(message, hello.format, hello.channels, source="audio frame")
                except AudioError as e:
                    raise Refusal("invalid_frame", str(e), CLOSE_INVALID_DATA) from e
                stats.samples_in += len(frames)
                start = resampler.output_index
                await put(resampler.process(mixdown(frames)), start)
        except Refusal as r:
            stats.error(r.message)
            log.warning("%s: %s", source, r.message)
            await _refuse(ws, r)
        except ConnectionClosedError as e:
            stats.error(f"connection lost mid-stream ({e}); the audio received until then was kept")
            log.warning("%s: %s", source, stats.last_error)
        except ConnectionClosed:  # closed by the client without "end": a normal end of stream as well
            pass
        except Exception as e:  # a bug of ours must not take other streams down
            stats.error(f"internal error: {e!r}")
            log.exception("%s: internal error", source)
            await _refuse(ws, Refusal("internal_error", f"internal server error: {e!r}", CLOSE_INTERNAL))
        start = resampler.output_index
        await put(resampler.flush(), start)


class _HandshakeLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The websockets server's logger, minus tracebacks for what the network does: a port scanner, a plain
    HTTP request or a client that hangs up mid-handshake is routine on a public port and gets one warning
    line with the reason, not a stack. Anything else (a bug) keeps its traceback."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        error = sys.exc_info()[1] if kwargs.get("exc_info") is True else kwargs.get("exc_info")
        if isinstance(error, (InvalidHandshake, OSError, EOFError)):
            del kwargs["exc_info"]
            msg, level = f"{msg}: {error!r}", min(level, logging.WARNING)
        super().log(level, msg, *args, **kwargs)


_HANDSHAKE_LOG = _HandshakeLog(logging.getLogger(f"{__name__}.handshake"))


def parse_control(message: str) -> str:
    """Check a text message after the hello: only ``{"type": "end"}`` is one (returns ``"end"``)."""
    with contextlib.suppress(ValueError):
        decoded = _loads(message)
        if isinstance(decoded, dict) and decoded.get("type") == "end":
            return "end"
    raise Refusal("unexpected_text", 'after the hello only binary audio frames and {"type": "end"} are '
                  "accepted", CLOSE_POLICY)


def _loads(message: str) -> Any:
    """``json.loads`` whose every refusal is a ValueError: nesting deeper than the decoder's recursion limit
    raises RecursionError, which escaped the hello check as an internal error (found by tests/test_fuzz.py;
    integers beyond Python's 4300 digits raise a plain ValueError, not a JSONDecodeError)."""
    try:
        return json.loads(message)
    except RecursionError:
        raise ValueError("nested too deeply") from None


async def _refuse(ws: ServerConnection, refusal: Refusal) -> None:
    """Tell the client what was wrong (JSON), then close with the matching close code."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps({"type": "error", "code": refusal.code, "message": refusal.message}))
    await ws.close(refusal.close_code, refusal.code)


async def send_audio(url: str, frames: np.ndarray, sample_rate: int, stream_id: str, *,
                     frame_samples: int | None = None, realtime: bool = False,
                     open_timeout: float = 10.0, token: str | None = None) -> dict[str, Any]:
    """Stream ``frames`` (``(N, channels)`` int16 -> s16le, float32 -> f32le) to a server; return its
    ``done`` message. Raises :class:`AudioError` with the server's message if it refuses the stream.

    ``frame_samples`` defaults to 20 ms; ``realtime`` paces the frames at the audio's own speed; ``token`` is
    sent as ``Authorization: Bearer <token>`` to a server that requires one.
    """
    frames = frames.reshape(len(frames), -1)
    fmt = {np.dtype(np.int16): "s16le", np.dtype(np.float32): "f32le"}.get(frames.dtype)
    if fmt is None:
        raise AudioError(f"send_audio sends int16 or float32 frames, not {frames.dtype}")
    data = frames.astype(PCM_FORMATS[fmt], copy=False)
    step = frame_samples or max(1, sample_rate // 50)
    hello = {"stream_id": stream_id, "sample_rate": sample_rate, "format": fmt, "channels": frames.shape[1]}
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    async with connect(url, open_timeout=open_timeout, max_size=None, compression=None,
                       additional_headers=headers) as ws:
        try:
            await ws.send(json.dumps(hello))
            _expect(await ws.recv(), "ready", stream_id)
            t0 = time.monotonic()
            for i in range(0, len(data), step):
                await ws.send(data[i:i + step].tobytes())
                if realtime:
                    await asyncio.sleep(max(0.0, t0 + (i + step) / sample_rate - time.monotonic()))
            await ws.send(json.dumps({"type": "end"}))
            return _expect(await ws.recv(), "done", stream_id)
        except ConnectionClosed as closed:
            with contextlib.suppress(ConnectionClosed):  # the server's error, if it sent one before closing
                while True:
                    _expect(await ws.recv(), "done", stream_id)
            code = closed.rcvd.code if closed.rcvd else "none"
            raise AudioError(f"server closed stream {stream_id!r} (close code {code})") from closed


async def send_file(url: str, path: str | Path, stream_id: str, *, format: str = "s16le",
                    frame_samples: int | None = None, realtime: bool = False,
                    token: str | None = None) -> dict[str, Any]:
    """Stream a sound file at its own rate and channel count (``format`` s16le or f32le); see
    :func:`send_audio`."""
    if format not in PCM_FORMATS:
        raise AudioError(f"format {format!r} is not supported; use one of {sorted(PCM_FORMATS)}")
    data, rate = sf.read(str(path), dtype="int16" if format == "s16le" else "float32", always_2d=True)
    return await send_audio(url, data, rate, stream_id, frame_samples=frame_samples, realtime=realtime,
                            token=token)


def _expect(message: str | bytes, kind: str, stream_id: str) -> dict[str, Any]:
    decoded = json.loads(message)
    if decoded.get("type") == "error":
        raise AudioError(f"server refused stream {stream_id!r}: {decoded['code']}: {decoded['message']}")
    if decoded.get("type") != kind:
        raise AudioError(f"stream {stream_id!r}: expected a {kind!r} message from the server, got {decoded}")
    return decoded
