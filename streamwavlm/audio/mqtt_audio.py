"""Audio input over MQTT: one topic per stream, in the spirit of Hermes' per-site ``audioFrame``.

Topic ``<prefix>/audio/<stream_id>``; each message's payload is one of

* **raw**: little-endian signed 16-bit mono samples at 16 kHz (``s16le``), any whole number of samples:
  the cheap form for senders that already capture at the model's rate;
* **a WAV chunk**: a complete small RIFF/WAVE file (payload starts with ``RIFF`` and has ``WAVE`` at byte
  8), any PCM or float encoding, any supported rate and 1-8 channels (mixed down and resampled): the
  self-describing form, as Hermes/Rhasspy satellites send it;
* **empty**: the end of the stream.

One stream keeps the form and rate of its first message. A bad payload (odd byte count, unreadable WAV,
NaN/Inf, unsupported or changed rate) ends that stream with an error, logged and published as JSON on
``<prefix>/audio/<stream_id>/error``; the next payload on the topic starts a new stream. All streams
share one MQTT connection, so a slow consumer must not block the others: each stream's queue drops its
oldest chunks when full (counted in ``stats.dropped``). Use QoS 1 (the default here) for in-order, lossless
delivery per topic.

Offsets (optional, MQTT 5): a message may carry the user property ``offset``, the stream index (at the
payload's own rate, counted from the stream's first sample) of its first sample. With it a repeated message
is recognised and skipped, a lost one becomes silence of the right length, and an engine that takes a stream
over mid-way (``streamwavlm worker``) knows where each message lies in the stream. Without it messages are
numbered by their arrival, as before; ``publish_audio`` sets it on MQTT 5 connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiomqtt
import numpy as np
import soundfile as sf
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streamwavlm.audio.resample import Resampler
from streamwavlm.audio.source import STREAM_ID, SUPPORTED_RATES, AudioChunk, QueuedSource
from streamwavlm.audio.validate import SAMPLE_RATE, AudioError, check_samples, decode_pcm, mixdown
from streamwavlm.mqtt.connection import Connection, Protocol, TLSOptions
from streamwavlm.quoting import shown

log = logging.getLogger(__name__)

MAX_CHANNELS = 8
MAX_PAYLOAD_BYTES = 1 << 20
"""The default bound on one message: 32 s of raw 16 kHz s16le, or 5 s of 48 kHz stereo 16-bit WAV. Checked
before anything is decoded, so an oversized payload costs only the bytes the MQTT client already read (a
50 MB payload used to be decoded and resampled, growing the process by half a gigabyte)."""
DELIVERED_MULTIPLE = 8
OFFSET = "offset"
"""The MQTT 5 user property with the stream index of a message's first sample (at the payload's rate)."""

Claim = Callable[[str, int | None], bool]
Other = Callable[[str, bytes, int | None], None]


def audio_topic(prefix: str, stream_id: str) -> str:
    """The topic a stream's audio is published on."""
    return f"{prefix}/audio/{stream_id}"


@dataclass(frozen=True)
class Payload:
    """A decoded audio message: frames ``(N, channels)`` float32 at ``rate``; ``wav`` tells the form."""

    frames: np.ndarray
    rate: int
    wav: bool


def decode_payload(payload: bytes, *, source: str = "MQTT audio") -> Payload:
    """Decode one non-empty audio message (raw s16le 16 kHz mono, or a WAV chunk).

    Text is refused rather than played as noise: JSON, a base64 string or a log line sent to the audio
    topic by mistake would otherwise decode as loud positive samples (printable bytes pair into int16
    values of 8224..32382) and be embedded as if it were speech.
    """
    if payload[:4] != b"RIFF" or payload[8:12] != b"WAVE":
        if _is_text(payload):
            raise AudioError(f"{source}: the payload is text ({payload[:40]!r}{'...' if len(payload) > 40 else ''}"
                             "), not audio; send raw s16le 16 kHz mono bytes or a WAV file per message")
        return Payload(decode_pcm(payload, "s16le", 1, source=f"{source} (raw s16le 16 kHz mono)"),
                       SAMPLE_RATE, False)
    try:
        frames, rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(f"{source}: unreadable WAV chunk ({e}); send a complete RIFF/WAVE file per "
                         "message") from e
    if rate not in SUPPORTED_RATES:
        raise AudioError(f"{source}: WAV chunk at {rate} Hz; use one of "
                         f"{', '.join(map(str, SUPPORTED_RATES))} Hz")
    if frames.shape[1] > MAX_CHANNELS:
        raise AudioError(f"{source}: WAV chunk with {frames.shape[1]} channels; send 1 to {MAX_CHANNELS}")
    check_samples(frames, source, "WAV chunk samples")
    return Payload(frames, rate, True)


def message_offset(message: aiomqtt.Message) -> int | None:
    """The ``offset`` user property of a received message, or None (absent, MQTT 3.1.1, or not a count)."""
    props = message.properties
    for key, value in getattr(props, "UserProperty", None) or ():
        if key == OFFSET:
            return int(value) if value.isdigit() else None
    return None


def _is_text(payload: bytes) -> bool:
    """Printable UTF-8 only (whitespace allowed). Real audio is not: silence and quiet samples are full of
    bytes below 0x20, and 20 ms of audio is 640 bytes that would all have to be printable."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return len(payload) >= 2 and "".join(text.split()).isprintable()


class MqttAudioStream(QueuedSource):
    """One stream received over MQTT (an :class:`~streamwavlm.audio.source.AudioSource`)."""

    def __init__(self, stream_id: str, rate: int, wav: bool, *, queue_size: int,
                 owner: MqttAudioInput) -> None:
        super().__init__(stream_id, rate, queue_size=queue_size, policy="drop_oldest",
                         on_close=lambda: owner._consumer_closed(self),
                         on_refuse=lambda code, message: owner._refused(self, code, message))
        self.wav = wav
        self.resampler = Resampler(rate)
        self.next_offset: int | None = None  # the offset (at ``rate``) the next message should carry

    def start_at(self, offset: int) -> None:
        """Begin the stream at input index ``offset`` (a stream taken over mid-way): its first chunk then
        starts at the 16 kHz index that offset stands for."""
        self.resampler.skip(offset)
        self.next_offset = offset

    def place(self, frames: np.ndarray, offset: int | None) -> np.ndarray:
        """Trim what was already received (a repeat) and skip over what was lost (the resampler's index
        jumps, so the engine fills the gap with silence); the frames to process. Offsets count from the
        first message seen, unless :meth:`start_at` placed the stream."""
        if offset is None:
            return frames
        if self.next_offset is None:  # the first message seen: indices count from it, as without offsets
            self.next_offset = offset
        if offset > self.next_offset:
            start = self.resampler.output_index
            tail = self.resampler.skip(offset - self.next_offset)
            if len(tail):
                self.queue.put_nowait(AudioChunk(self.stream_id, tail, start, time.monotonic()))
        end = offset + len(frames)
        frames = frames[max(0, self.next_offset - offset):]
        self.next_offset = max(self.next_offset, end)
        return frames


class MqttAudioInput:
    """Subscribes to ``<prefix>/audio/+`` and offers each new stream: ``async for s in mqtt.streams()``.

    A stream closed by its consumer is ignored until its sender publishes the end (an empty payload).

    ``claim(stream_id, offset)``: asked for a payload of a stream that is not open here; False leaves the
    stream to another engine and hands the payload to ``on_other(stream_id, payload, offset)`` instead (the
    end of such a stream too). Default: every stream is opened here. :meth:`attach` and :meth:`detach` move
    a running stream in and out (``streamwavlm worker``).
    """

    def __init__(self, broker: str = "mqtt://127.0.0.1:1883", *, prefix: str = "streamwavlm", qos: int = 1,
                 queue_size: int = 64, max_pending: int = 16, identifier: str | None = None,
                 username: str | None = None, password: str | None = None, protocol: Protocol | None = None,
                 tls: TLSOptions | None = None, timeout: float = 10.0, keepalive: int = 30,
                 max_payload_bytes: int = MAX_PAYLOAD_BYTES, claim: Claim | None = None,
                 on_other: Other | None = None) -> None:
        if max_payload_bytes < 2:
            raise ValueError(f"max_payload_bytes must be at least 2 (one sample), got {max_payload_bytes}")
        self.max_payload_bytes = max_payload_bytes
        # the same client path as the publisher and subscriber: TLS, credentials, protocol, TCP_NODELAY
        self._conn = Connection.create(broker, username=username, password=password, protocol=protocol, tls=tls,
                                       timeout=timeout, keepalive=keepalive)
        self.prefix, self.qos = prefix, qos
        self.queue_size = queue_size
        # payloads up to DELIVERED_MULTIPLE x the limit arrive and are refused on the error topic, so a sender
        # learns what is wrong; the broker drops larger ones unread (MQTT 5), so that memory stays flat
        self._client = self._conn.client(identifier or f"streamwavlm-audio-{uuid.uuid4().hex[:12]}",
                                         max_packet_size=DELIVERED_MULTIPLE * max_payload_bytes + 65536)
        self._streams: dict[str, MqttAudioStream] = {}
        self._ignored: set[str] = set()
        self._pending: asyncio.Queue[MqttAudioStream | None] = asyncio.Queue(max_pending)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._claim = claim
        self._on_other = on_other

    async def start(self) -> None:
        """Connect and subscribe."""
        start = time.monotonic()
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttError as e:
            raise self._conn.unavailable(e, time.monotonic() - start) from e
        await self._client.subscribe(audio_topic(self.prefix, "+"), qos=self.qos)
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop receiving; every open stream ends (its queued chunks are still delivered)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for stream_id in list(self._streams):
            self._end(stream_id)
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)
        with contextlib.suppress(asyncio.QueueFull):
            self._pending.put_nowait(None)

    async def __aenter__(self) -> MqttAudioInput:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def streams(self) -> AsyncIterator[MqttAudioStream]:
        """New streams in the order of their first message, until :meth:`close`."""
        while not (self._closed and self._pending.empty()):
            stream = await self._pending.get()
            if stream is None:
                return
            yield stream

    async def _run(self) -> None:
        try:
            async for message in self._client.messages:
                stream_id = message.topic.value.rsplit("/", 1)[-1]
                payload = message.payload if isinstance(message.payload, bytes) else b""
                try:
                    await self.feed(stream_id, payload, message_offset(message))
                except Exception as e:  # a bug of ours must not stop the other streams
                    log.exception("MQTT audio stream %r: internal error", stream_id)
                    await self._fail(stream_id, "internal_error", f"internal error: {e!r}")
        except aiomqtt.MqttError as e:
            log.error("MQTT audio input lost the broker: %s", e)
            for stream_id in list(self._streams):
                self._streams[stream_id].stats.error(f"broker connection lost ({e})")
                self._end(stream_id)

    async def feed(self, stream_id: str, payload: bytes, offset: int | None = None) -> None:
        """Take one message of the stream (as if it had just arrived): the input's own loop calls it, and a
        caller replays with it the messages it kept for a stream it now attaches (:meth:`attach`)."""
        if not STREAM_ID.fullmatch(stream_id):
            log.warning("ignored MQTT audio on invalid stream id %s", shown(stream_id))
            return
        if payload and stream_id in self._ignored:  # refused or closed here: until its sender ends it
            return
        if stream_id not in self._streams and self._claim is not None and not self._claim(stream_id, offset):
            if self._on_other is not None:
                self._on_other(stream_id, payload, offset)
            if stream_id not in self._streams:  # unless on_other attached it: then this message is its first
                return
        if not payload:
            self._ignored.discard(stream_id)
            self._end(stream_id)
            return
        if stream_id in self._ignored:
            return
        stream = self._streams.get(stream_id)
        if len(payload) > self.max_payload_bytes:  # before decoding: its size alone is the refusal
            await self._fail(stream_id, "payload_too_big", f"MQTT audio stream {stream_id!r}: a payload of "
                             f"{len(payload)} bytes exceeds the limit of {self.max_payload_bytes} bytes; send "
                             "20-100 ms of audio per message")
            return
        try:
            decoded = decode_payload(payload, source=f"MQTT audio stream {stream_id!r}")
        except AudioError as e:
            await self._fail(stream_id, "invalid_payload", str(e))
            return
        if stream is not None and (decoded.rate, decoded.wav) != (stream.stats.input_rate, stream.wav):
            form = f"{'WAV' if decoded.wav else 'raw'} at {decoded.rate} Hz"
            was = f"{'WAV' if stream.wav else 'raw'} at {stream.stats.input_rate} Hz"
            await self._fail(stream_id, "format_changed", f"MQTT audio stream {stream_id!r}: a payload "
                             f"{form} in a stream that started {was}; end the stream (empty payload) first")
            return
        if stream is None:
            stream = MqttAudioStream(stream_id, decoded.rate, decoded.wav, queue_size=self.queue_size,
                                     owner=self)
            try:
                self._pending.put_nowait(stream)
            except asyncio.QueueFull:
                await self._fail(stream_id, "server_busy", "too many new streams are waiting to be processed")
                return
            self._streams[stream_id] = stream
        stream.stats.samples_in += len(decoded.frames)
        frames = stream.place(decoded.frames, offset)
        start = stream.resampler.output_index
        samples = stream.resampler.process(mixdown(frames))
        if len(samples):  # never waits: the queue drops its oldest chunk when full
            stream.queue.put_nowait(AudioChunk(stream_id, samples, start, time.monotonic()))

    def attach(self, stream_id: str, rate: int, wav: bool, start: int) -> MqttAudioStream:
        """Open a stream here that was served elsewhere until now: its audio (of the form and rate it has)
        is taken from the 16 kHz stream index ``start`` on (earlier messages, replayed with :meth:`feed`,
        are trimmed). The caller hands the returned source to its engine."""
        if stream_id in self._streams:
            raise ValueError(f"MQTT audio stream {stream_id!r} is already open here")
        self._ignored.discard(stream_id)
        stream = MqttAudioStream(stream_id, rate, wav, queue_size=self.queue_size, owner=self)
        stream.start_at(math.ceil(start * rate / SAMPLE_RATE))
        self._streams[stream_id] = stream
        return stream

    def detach(self, stream_id: str) -> MqttAudioStream | None:
        """Stop feeding a stream here (another engine takes it over): its later messages go to ``claim``
        and ``on_other`` like those of any stream not open here. Returns the stream, or None."""
        return self._streams.pop(stream_id, None)

    async def _fail(self, stream_id: str, code: str, message: str) -> None:
        """End the stream with an error, log it and tell the sender on ``.../<stream_id>/error``."""
        log.warning("%s", message)
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.stats.error(message)
            self._end(stream_id)
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.publish(f"{audio_topic(self.prefix, stream_id)}/error",
                                       json.dumps({"type": "error", "code": code, "message": message}))

    def _end(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        start = stream.resampler.output_index
        tail = stream.resampler.flush()
        if len(tail):
            stream.queue.put_nowait(AudioChunk(stream_id, tail, start, time.monotonic()))
        stream.queue.finish()

    async def _refused(self, stream: MqttAudioStream, code: str, message: str) -> None:
        """The consumer refused or ended the stream with an error: tell the sender on the error topic and
        ignore the topic until the sender ends the stream (an empty payload)."""
        if self._streams.get(stream.stream_id) is stream:
            await self._fail(stream.stream_id, code, message)
            self._ignored.add(stream.stream_id)

    def _consumer_closed(self, stream: MqttAudioStream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            self._ignored.add(stream.stream_id)


async def publish_audio(client: aiomqtt.Client, prefix: str, stream_id: str, frames: np.ndarray,
                        sample_rate: int, *, wav: bool = False, frame_samples: int | None = None,
                        qos: int = 1, realtime: bool = False) -> None:
    """Publish int16 ``frames`` (``(N,)`` or ``(N, channels)``) as one stream, then its end.

    Raw form (``wav=False``) needs 16 kHz mono; WAV chunks carry any supported rate and channel count.
    ``frame_samples`` defaults to 20 ms; ``realtime`` paces the messages at the audio's own speed. On an
    MQTT 5 client every message carries its ``offset`` (see the module's docstring).
    """
    frames = frames.reshape(len(frames), -1).astype(np.int16, copy=False)
    if not wav and (sample_rate != SAMPLE_RATE or frames.shape[1] != 1):
        raise AudioError(f"raw MQTT audio is 16 kHz mono s16le, not {sample_rate} Hz with {frames.shape[1]} "
                         "channel(s); publish WAV chunks (wav=True) or resample first")
    topic = audio_topic(prefix, stream_id)
    step = frame_samples or max(1, sample_rate // 50)
    v5 = getattr(getattr(client, "_client", None), "protocol", None) == aiomqtt.ProtocolVersion.V5
    t0 = time.monotonic()
    for i in range(0, len(frames), step):
        block = frames[i:i + step]
        if wav:
            buf = io.BytesIO()
            sf.write(buf, block, sample_rate, format="WAV", subtype="PCM_16")
            payload = buf.getvalue()
        else:
            payload = block.astype("<i2").tobytes()
        await client.publish(topic, payload, qos=qos, properties=_offset(i) if v5 else None)
        if realtime:
            await asyncio.sleep(max(0.0, t0 + (i + step) / sample_rate - time.monotonic()))
    await client.publish(topic, b"", qos=qos)


def _offset(index: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [(OFFSET, str(index))]
    return props


async def publish_file(client: aiomqtt.Client, prefix: str, stream_id: str, path: str | Path, *,
                       wav: bool = True, **kwargs: Any) -> None:
    """Publish a sound file as one stream (see :func:`publish_audio`; raw form needs a 16 kHz mono file)."""
    data, rate = sf.read(str(path), dtype="int16", always_2d=True)
    await publish_audio(client, prefix, stream_id, data, rate, wav=wav, **kwargs)
