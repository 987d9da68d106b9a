"""Live microphone input through PortAudio (sounddevice), as an audio source.

The PortAudio callback runs at real-time priority: it only copies the device's block into a preallocated
:class:`~streamwavlm.audio.ring.RingBuffer` and counts the device's ``input_overflow`` flag. Everything
else (mixdown, resampling to 16 kHz, cutting into blocks) happens in the reader, on the event loop. If the
reader falls behind by more than ``buffer_seconds``, the oldest audio is overwritten; the resulting gap is
visible in ``AudioChunk.start`` and counted in ``stats.dropped`` (16 kHz samples) and ``stats.overflows``.

sounddevice is imported lazily, so this module (and the tests that drive it with a fake stream) works on
machines without the PortAudio library.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from streamwavlm.audio.resample import Resampler
from streamwavlm.audio.ring import RingBuffer
from streamwavlm.audio.source import AudioChunk, Blocker, SourceStats
from streamwavlm.audio.validate import SAMPLE_RATE, AudioError, mixdown


@dataclass(frozen=True)
class InputDevice:
    """One PortAudio device that can record."""

    index: int
    name: str
    hostapi: str
    channels: int
    default_samplerate: float


def list_devices() -> list[InputDevice]:
    """The input devices PortAudio sees now (see :func:`refresh_devices` after plugging one in)."""
    import sounddevice as sd

    hostapis = sd.query_hostapis()
    return [InputDevice(d["index"], d["name"], hostapis[d["hostapi"]]["name"], d["max_input_channels"],
                        d["default_samplerate"])
            for d in sd.query_devices() if d["max_input_channels"] > 0]


def refresh_devices() -> None:
    """Make PortAudio enumerate the devices again.

    PortAudio lists devices once, when it is initialised (at ``import sounddevice``); a device that appears
    later (a USB microphone, a sound server started afterwards) is invisible until it is re-initialised.
    sounddevice documents ``_terminate``/``_initialize`` for exactly this; no stream may be open.
    """
    import sounddevice as sd

    sd._terminate()
    sd._initialize()


def find_device(device: int | str | None) -> InputDevice:
    """The input device given by index, by name (exact, case-insensitive) or by a unique name substring;
    ``None`` is PortAudio's default input."""
    import sounddevice as sd

    devices = list_devices()
    listing = "; ".join(f"{d.index}: {d.name} ({d.channels} ch, {d.default_samplerate:g} Hz)"
                        for d in devices)
    if not devices:
        raise AudioError("no input device found by PortAudio. On a machine without a sound card, start a "
                         "sound server (see docs/audio.md: PulseAudio with module-pipe-source), then call "
                         "refresh_devices().")
    if device is None:
        default = sd.default.device[0]
        if default is None or default < 0:
            return devices[0]
        device = int(default)
    if isinstance(device, int):
        for d in devices:
            if d.index == device:
                return d
        raise AudioError(f"input device {device} does not exist or cannot record. Input devices: {listing}")
    wanted = device.lower()
    exact = [d for d in devices if d.name.lower() == wanted]
    matches = exact or [d for d in devices if wanted in d.name.lower()]
    if len(matches) == 1:
        return matches[0]
    what = "matches several input devices" if matches else "matches no input device"
    raise AudioError(f"device {device!r} {what}; give an index or a more precise name. "
                     f"Input devices: {listing}")


class MicrophoneSource:
    """Audio from a PortAudio input device, yielded as 16 kHz mono chunks of ``block`` samples.

    ``samplerate``/``channels``: what to open the device with; by default 16 kHz if the device accepts it
    (no resampling at all), else its default rate, and one channel if accepted, else all of them (mixed
    down). ``blocksize=0`` lets the host choose its natural block size and ``latency='high'`` gives it the
    most room: the robust settings for a callback that must never miss a deadline. ``stream_factory``
    replaces ``sounddevice.InputStream`` (same keyword arguments and callback), e.g. for tests.

    Use as ``async with MicrophoneSource("USB") as mic: async for chunk in mic: ...``; ``close()`` (also
    from another task) stops the device, and iteration ends after the buffered audio is delivered.
    """

    def __init__(self, device: int | str | None = None, *, stream_id: str = "mic", block: int = 1600,
                 samplerate: int | None = None, channels: int | None = None, blocksize: int = 0,
                 latency: float | str = "high", buffer_seconds: float = 2.0,
                 stream_factory: Callable[..., Any] | None = None) -> None:
        if block <= 0:
            raise ValueError(f"block must be a positive number of 16 kHz samples, got {block}")
        self.stream_id, self.block = stream_id, block
        self._device, self._samplerate, self._channels = device, samplerate, channels
        self._blocksize, self._latency, self._buffer_seconds = blocksize, latency, buffer_seconds
        self._factory = stream_factory
        self._stats = SourceStats()
        self._stream: Any = None
        self._ring: RingBuffer | None = None
        self._resampler: Resampler | None = None
        self._blocker = Blocker(block)
        self._ready: deque[AudioChunk] = deque()
        self._ring_pos = 0
        self._device_overflows = 0
        self._ended = False
        self._closing = False
        self._lost: str | None = None  # why the device stopped by itself, raised once the buffer is read

    @property
    def stats(self) -> SourceStats:
        return self._stats

    @property
    def samplerate(self) -> int | None:
        """The rate the device was opened with (None before :meth:`start`)."""
        return self._resampler.in_rate if self._resampler is not None else None

    async def start(self) -> None:
        """Open and start the device (iteration does this on first use)."""
        if self._stream is not None or self._closing:
            return
        device, rate, channels = self._resolve()
        self._stats.input_rate = rate
        self._ring = RingBuffer(max(1, round(self._buffer_seconds * rate)), channels)
        self._resampler = Resampler(rate)
        factory = self._factory
        if factory is None:
            import sounddevice as sd

            factory = sd.InputStream
        try:
            stream = factory(device=device, samplerate=rate, channels=channels, dtype="float32",
                             blocksize=self._blocksize, latency=self._latency, callback=self._callback,
                             finished_callback=self._finished)
            stream.start()
        except Exception as e:  # PortAudioError, or anything a host API raises on open
            self._stats.error(str(e))
            raise AudioError(f"cannot open input device {device!r} at {rate} Hz, {channels} channel(s): {e}. "
                             "See list_devices() for what the device supports.") from e
        self._stream = stream

    def _resolve(self) -> tuple[int | str | None, int, int]:
        """Device, rate and channel count to open: asks PortAudio only for what was not given."""
        if self._samplerate is not None and self._channels is not None and not isinstance(self._device, str):
            return self._device, int(self._samplerate), int(self._channels)
        import sounddevice as sd

        info = find_device(self._device)

        def accepts(rate: float, channels: int) -> bool:
            try:
                sd.check_input_settings(device=info.index, samplerate=rate, channels=channels,
                                        dtype="float32")
            except Exception:  # PortAudioError / ValueError: not supported
                return False
            return True

        rate = self._samplerate
        if rate is None:
            rate = SAMPLE_RATE if accepts(SAMPLE_RATE, 1) else int(info.default_samplerate)
        channels = self._channels
        if channels is None:
            channels = 1 if accepts(rate, 1) else info.channels
        return info.index, int(rate), int(channels)

    def _callback(self, indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        """PortAudio's real-time thread: count overflows, copy the block, nothing else."""
        if status.input_overflow:
            self._device_overflows += 1
        self._ring.write(indata)  # type: ignore[union-attr]

    def _finished(self) -> None:
        """PortAudio stopped the stream (by close(), or by itself, e.g. the device went away)."""
        if not self._closing:
            self._lost = ("microphone lost: the input stream stopped by itself (device removed, or the sound "
                          "server ended); check the device (demos/live_mic.py --list-devices) and start again")
            self._stats.error(self._lost)
        self._ring.close()  # type: ignore[union-attr]

    def __aiter__(self) -> MicrophoneSource:
        return self

    async def __anext__(self) -> AudioChunk:
        """The next chunk; at the end, an :class:`AudioError` instead of the plain end if the device stopped
        by itself, so that a lost microphone ends the stream as failed rather than as finished."""
        while not self._ready:
            if self._ended:
                lost, self._lost = self._lost, None
                if lost is not None:
                    raise AudioError(lost)
                raise StopAsyncIteration
            await self._fill()
        chunk = self._ready.popleft()
        self._stats.samples_out += len(chunk.samples)
        return chunk

    async def _fill(self) -> None:
        """Wait for about one block of device frames, then turn everything buffered into chunks."""
        await self.start()
        ring, resampler = self._ring, self._resampler
        if ring is None or resampler is None:  # closed before it was ever started
            self._ended = True
            return
        if not ring.closed:
            await ring.wait(math.ceil(self.block * resampler.in_rate / SAMPLE_RATE))
        frames, start, arrival = ring.read()
        self._stats.samples_in += len(frames)
        self._stats.overflows = self._device_overflows + ring.overruns
        pieces = []
        if start > self._ring_pos:  # frames overwritten before we read them
            before = resampler.output_index
            pieces.append((before, resampler.skip(start - self._ring_pos)))
            self._stats.dropped += resampler.output_index - before - len(pieces[-1][1])
        self._ring_pos = start + len(frames)
        pieces.append((resampler.output_index, resampler.process(mixdown(frames))))
        blocks = [b for at, samples in pieces for b in self._blocker.push(samples, at)]
        if ring.closed and ring.available == 0:
            tail_at = resampler.output_index
            blocks += self._blocker.push(resampler.flush(), tail_at) + self._blocker.flush()
            self._ended = True
        self._ready.extend(AudioChunk(self.stream_id, s, at, arrival) for s, at in blocks)

    async def close(self) -> None:
        """Stop and close the device; the reader then gets what is buffered, and the end."""
        if self._closing:
            return
        self._closing = True
        if self._stream is not None:
            await asyncio.to_thread(_shut, self._stream)
        if self._ring is not None:
            self._ring.close()

    async def __aenter__(self) -> MicrophoneSource:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def _shut(stream: Any) -> None:
    """Stop then close a PortAudio stream (may block for up to one device period)."""
    try:
        stream.stop()
    finally:
        stream.close()
