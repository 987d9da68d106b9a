"""Audio input: resampler, ring buffer, microphone (fake and real PortAudio), files, WebSocket, MQTT."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from streamwavlm.audio.files import FileSource, load_audio
from streamwavlm.audio.microphone import MicrophoneSource
from streamwavlm.audio.resample import Resampler, resample
from streamwavlm.audio.ring import RingBuffer
from streamwavlm.audio.source import AudioChunk, AudioSource, Blocker, ChunkQueue, SourceStats
from streamwavlm.audio.validate import AudioError, mixdown

RNG = np.random.default_rng(1234)


def run(coro, timeout: float = 20.0):
    """Run a coroutine with a hard time limit (no pytest-asyncio needed)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(source) -> tuple[np.ndarray, list[AudioChunk]]:
    chunks = [c async for c in source]
    samples = np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)
    return samples, chunks


def assert_contiguous(chunks: list[AudioChunk], first: int = 0) -> None:
    starts = [c.start for c in chunks]
    ends = [first] + [c.end for c in chunks[:-1]]
    assert starts == ends


def noise_file(path: Path, rate: int, channels: int, seconds: float, **kw) -> Path:
    """Band-limited-ish test audio (tones plus noise), written with soundfile (subtype/format in ``kw``)."""
    t = np.arange(int(rate * seconds)) / rate
    cols = [0.3 * np.sin(2 * np.pi * (300 + 200 * c) * t) + 0.05 * RNG.standard_normal(len(t))
            for c in range(channels)]
    sf.write(path, np.stack(cols, axis=1), rate, **kw)
    return path


# ---------------------------------------------------------------- resampler

@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_resampler_output_does_not_depend_on_block_sizes(rate):
    x = (0.3 * RNG.standard_normal(rate)).astype(np.float32)
    whole = resample(x, rate)
    assert len(whole) == math.ceil(len(x) * 16000 / rate)
    for sizes in ([1, 2, 3, 5, 7, 11], [rate // 3], [4096, 1], [100000]):
        r, out, i, k = Resampler(rate), [], 0, 0
        while i < len(x):
            n = sizes[k % len(sizes)]
            out.append(r.process(x[i:i + n]))
            i, k = i + n, k + 1
            if k > 2000:  # tiny blocks for a while, then the rest at once: keeps the test fast
                out.append(r.process(x[i:]))
                i = len(x)
        out.append(r.flush())
        np.testing.assert_array_equal(np.concatenate(out), whole)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampler_passes_in_band_sines_within_0_1_db_and_on_time(rate):
    t = np.arange(rate) / rate
    for f in (100, 1000, 3000, 6000, 7000):
        if f > 0.9 * min(rate, 16000) / 2:
            continue
        y = resample(np.sin(2 * np.pi * f * t).astype(np.float32), rate)[400:-400]
        ideal = np.sin(2 * np.pi * f * (np.arange(len(y)) + 400) / 16000)
        gain_db = 20 * np.log10(np.sqrt(np.mean(y ** 2) / np.mean(ideal ** 2)))
        assert abs(gain_db) < 0.1, (rate, f, gain_db)
        assert np.abs(y - ideal).max() < 1e-3  # no delay: output sample j is input time j / 16000


@pytest.mark.parametrize("f", [8200, 9000, 12000, 16000, 23000])
def test_resampler_attenuates_tones_above_8khz_by_60db(f):
    t = np.arange(48000) / 48000
    y = resample(np.sin(2 * np.pi * f * t).astype(np.float32), 48000)[400:-400]
    level_db = 20 * np.log10(np.sqrt(np.mean(y ** 2)) / np.sqrt(0.5))
    assert level_db < -60, (f, level_db)


def test_resampler_latency_skip_and_bad_ratio():
    r = Resampler(48000)
    assert r.latency_samples == r.half > 0 and r.latency_seconds == pytest.approx(r.half / 48000)
    assert r.latency_seconds < 0.005
    assert Resampler(16000).latency_samples == 0
    out = r.process(np.ones(4800, np.float32))
    assert len(out) == (4799 - r.half) // 3 + 1  # output j needs input 3j + half
    tail = r.skip(3000)  # a gap of 3000 input samples = 1000 output samples
    assert r.output_index == 1600 + 1000 and len(out) + len(tail) == 1600
    with pytest.raises(AudioError, match="interpolation factor"):
        Resampler(44099)


def test_blocker_cuts_exact_blocks_and_breaks_at_gaps():
    b = Blocker(4)
    got = b.push(np.arange(6, dtype=np.float32), 0) + b.push(np.arange(3, dtype=np.float32), 6)
    assert [(list(s), at) for s, at in got] == [([0, 1, 2, 3], 0), ([4, 5, 0, 1], 4)]
    got = b.push(np.ones(5, np.float32), 20)  # gap: pending [2] is flushed short
    assert [(len(s), at) for s, at in got] == [(1, 8), (4, 20)]
    assert [(len(s), at) for s, at in b.flush()] == [(1, 24)]


def test_chunk_queue_policies():
    def chunk(i):
        return AudioChunk("s", np.zeros(10, np.float32), 10 * i, 0.0)

    async def main():
        stats = SourceStats()
        lossy = ChunkQueue(2, "drop_oldest", stats)
        for i in range(5):
            await lossy.put(chunk(i))
        lossy.finish()
        kept = [(await lossy.get()).start, (await lossy.get()).start, await lossy.get()]
        assert kept == [30, 40, None] and stats.dropped == 30 and stats.overflows == 3
        lossless = ChunkQueue(2, "block", SourceStats())
        await lossless.put(chunk(0))
        await lossless.put(chunk(1))
        waiting = asyncio.create_task(lossless.put(chunk(2)))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # back-pressure: waits for room
        assert (await lossless.get()).start == 0
        await asyncio.wait_for(waiting, 1)
        with pytest.raises(asyncio.QueueFull):
            lossless.put_nowait(chunk(3))

    run(main())


# ---------------------------------------------------------------- ring buffer

def test_ring_wraps_and_drops_oldest_exactly():
    ring = RingBuffer(100, channels=2)
    data = np.arange(500, dtype=np.float32).reshape(250, 2)
    for i in range(0, 250, 30):
        ring.write(data[i:i + 30])
    frames, start, _ = ring.read()
    assert start == 150 and ring.dropped == 150 and ring.overruns == 1
    np.testing.assert_array_equal(frames, data[150:])
    ring.write(data[:7])
    frames, start, _ = ring.read(max_frames=5)
    assert start == 250 and len(frames) == 5 and ring.dropped == 150
    ring.write(np.zeros((300, 2), np.float32))  # one block longer than the buffer
    frames, start, _ = ring.read()
    assert start == 457 and len(frames) == 100 and ring.dropped == 150 + 202 and ring.overruns == 2


def test_ring_concurrent_writer_reader_delivers_intact_or_counts():
    ring = RingBuffer(512)
    total, done = 300_000, threading.Event()

    def producer():
        i, rng = 0, np.random.default_rng(0)
        while i < total:
            n = min(int(rng.integers(1, 400)), total - i)
            ring.write(np.arange(i, i + n, dtype=np.float32))
            i += n
        ring.close()
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    delivered, expected = 0, 0
    while True:
        ring.wait_blocking(256, timeout=1.0)
        frames, start, _ = ring.read()
        if len(frames):
            # every delivered frame is intact: it equals its own index
            indices = np.arange(start, start + len(frames), dtype=np.float32)
            np.testing.assert_array_equal(frames[:, 0], indices)
            assert start >= expected
            delivered, expected = delivered + len(frames), start + len(frames)
        elif ring.closed and ring.available == 0:
            break
    thread.join()
    frames, _, _ = ring.read()
    assert delivered + len(frames) + ring.dropped == total


# ---------------------------------------------------------------- microphone, fake stream

class FakeStream:
    """Stands in for sounddevice.InputStream: same keyword arguments and callback interface."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.callback, self.finished = kwargs["callback"], kwargs["finished_callback"]
        self.started = self.closed = False

    def start(self):
        self.started = True

    def feed(self, block: np.ndarray, overflow: bool = False):
        self.callback(block, len(block), None, SimpleNamespace(input_overflow=overflow))

    def stop(self):
        self.finished()

    def close(self):
        self.closed = True


def fake_mic(**kwargs) -> tuple[MicrophoneSource, list[FakeStream]]:
    streams: list[FakeStream] = []

    def factory(**kw):
        streams.append(FakeStream(**kw))
        return streams[-1]

    return MicrophoneSource(stream_factory=factory, **kwargs), streams


def test_microphone_mixes_down_resamples_and_blocks():
    audio = (0.2 * RNG.standard_normal((48000, 2))).astype(np.float32)

    async def main():
        mic, streams = fake_mic(samplerate=48000, channels=2, block=1600)
        await mic.start()
        assert streams[0].kwargs["blocksize"] == 0 and streams[0].kwargs["latency"] == "high"

        def device():
            for i in range(0, len(audio), 512):
                streams[0].feed(audio[i:i + 512])
                time.sleep(0.001)
            asyncio.run_coroutine_threadsafe(mic.close(), loop)

        loop = asyncio.get_running_loop()
        thread = threading.Thread(target=device)
        thread.start()
        samples, chunks = await collect(mic)
        thread.join()
        return mic, streams, samples, chunks

    mic, streams, samples, chunks = run(main())
    np.testing.assert_array_equal(samples, resample(mixdown(audio), 48000))
    assert_contiguous(chunks)
    assert all(len(c.samples) == 1600 for c in chunks[:-1]) and all(c.stream_id == "mic" for c in chunks)
    assert isinstance(mic, AudioSource) and streams[0].closed
    assert mic.stats.samples_in == 48000 and mic.stats.samples_out == 16000 and mic.stats.dropped == 0


def test_microphone_overflow_is_dropped_oldest_and_counted_exactly():
    async def main():
        mic, streams = fake_mic(samplerate=16000, channels=1, block=400, buffer_seconds=0.1)  # 1600 frames
        await mic.start()
        signal = np.arange(1, 6001, dtype=np.float32)[:, None] / 8192
        streams[0].feed(signal[:1000], overflow=True)
        first = await mic.__anext__()  # reads all 1000 frames: 2 blocks + 200 pending
        streams[0].feed(signal[1000:6000])  # 5000 frames into 1600 slots: 3400 overwritten
        await mic.close()
        rest = [c async for c in mic]
        return mic, [first, *rest], signal[:, 0]

    mic, chunks, signal = run(main())
    delivered = np.concatenate([c.samples for c in chunks])
    gaps = sum(b.start - a.end for a, b in itertools.pairwise(chunks))
    assert mic.stats.dropped == gaps == 3400
    assert mic.stats.overflows == 2  # the device's flag once, one ring overrun
    assert mic.stats.samples_out + mic.stats.dropped == chunks[-1].end == 6000
    np.testing.assert_array_equal(delivered, np.concatenate([signal[:1000], signal[4400:]]))
    assert [(c.start, len(c.samples)) for c in chunks[:4]] == [(0, 400), (400, 400), (800, 200), (4400, 400)]


def test_microphone_reader_sleeps_while_idle_and_wakes_on_data():
    async def main():
        mic, streams = fake_mic(samplerate=16000, channels=1, block=320)
        await mic.start()
        feeder = threading.Timer(0.4, lambda: streams[0].feed(np.ones((320, 1), np.float32)))
        cpu0, t0 = time.process_time(), time.monotonic()
        feeder.start()
        chunk = await mic.__anext__()
        woke, cpu = time.monotonic() - t0, time.process_time() - cpu0
        await mic.close()
        return chunk, woke, cpu

    chunk, woke, cpu = run(main())
    assert len(chunk.samples) == 320 and 0.39 < woke < 0.7
    assert cpu < 0.05, f"the idle reader used {cpu:.3f} s of CPU in 0.4 s: it is polling"


# ---------------------------------------------------------------- microphone, real PortAudio

def test_microphone_through_real_portaudio_is_bit_exact(pulse_mic):
    from streamwavlm.audio.microphone import find_device, list_devices

    assert any(d.name == "pulse" for d in list_devices()), pulse_mic.log
    signal = RNG.integers(1, 30000, 8000) * RNG.choice([-1, 1], 8000)  # never 0: easy to find after silence

    async def main():
        mic = MicrophoneSource(find_device("pulse").index, samplerate=16000, channels=1, block=800)
        chunks = []
        async with mic:
            await asyncio.sleep(0.2)
            pulse_mic.play(signal)
            async for chunk in mic:
                chunks.append(chunk)
                if pulse_mic.played.is_set() and chunk.end > 0.6 * 16000 and len(chunks) > 30:
                    break
        return mic, chunks

    mic, chunks = run(main(), timeout=15)
    captured = np.concatenate([c.samples for c in chunks])
    first = int(np.flatnonzero(captured)[0])
    np.testing.assert_array_equal(captured[first:first + len(signal)] * 32768, signal.astype(np.float32))
    assert mic.stats.dropped == 0 and mic.stats.overflows == 0
    assert_contiguous(chunks)
    assert mic.stats.samples_in > len(signal) and mic.stats.errors == 0


# ---------------------------------------------------------------- files

@pytest.mark.parametrize(("rate", "channels", "kw"), [
    (44100, 2, {"subtype": "PCM_16"}),
    (22050, 1, {"format": "FLAC"}),
    (48000, 3, {"format": "OGG", "subtype": "VORBIS"}),
    (8000, 1, {"subtype": "FLOAT"}),
    (16000, 1, {"subtype": "PCM_16"}),
])
def test_file_source_equals_resampling_the_whole_file(tmp_path, rate, channels, kw):
    suffix = {"FLAC": ".flac", "OGG": ".ogg"}.get(kw.get("format", ""), ".wav")
    path = noise_file(tmp_path / f"a{suffix}", rate, channels, 0.7, **kw)
    seen = []
    source = FileSource(path, block=1000, progress=lambda done, total: seen.append((done, total)))
    samples, chunks = run(collect(source))
    np.testing.assert_array_equal(samples, load_audio(path))
    assert len(samples) == math.ceil(sf.info(str(path)).frames * 16000 / rate)
    assert_contiguous(chunks)
    assert all(len(c.samples) == 1000 for c in chunks[:-1]) and chunks[0].stream_id == "a"
    assert seen[-1][0] == seen[-1][1] == source.stats.samples_in


def test_file_source_realtime_pacing(tmp_path):
    path = noise_file(tmp_path / "half.wav", 16000, 1, 0.5)
    t0 = time.monotonic()
    samples, chunks = run(collect(FileSource(path, block=1600, realtime=True)))
    elapsed = time.monotonic() - t0
    assert len(samples) == 8000 and 0.49 < elapsed < 0.8
    assert chunks[2].arrival - chunks[0].arrival == pytest.approx(0.2, abs=0.08)


def test_file_source_refuses_unreadable_and_nan(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="cannot read audio"):
        run(collect(FileSource(tmp_path / "junk.wav")))
    bad = np.zeros(4000, np.float32)
    bad[3000] = np.nan
    sf.write(tmp_path / "nan.wav", bad, 16000, subtype="FLOAT")
    source = FileSource(tmp_path / "nan.wav", block=1000)
    with pytest.raises(AudioError, match=r"NaN/Inf samples \(first at frame 3000\)"):
        run(collect(source))
    assert source.stats.errors == 1


def test_samples_far_beyond_full_scale_are_refused_where_they_enter(tmp_path):
    """Finite but huge float samples (int16 values sent as float, 1e30 from a broken capture) are not audio:
    refused by every decoder with a message that says what to do, before the model can see them."""
    from streamwavlm.audio.mqtt_audio import decode_payload
    from streamwavlm.audio.validate import decode_pcm, to_float_mono

    int_as_float = (np.sin(np.arange(1600) / 5) * 20000).astype(np.float32)
    with pytest.raises(AudioError, match="divide by 32768"):
        to_float_mono(int_as_float, 16000)
    with pytest.raises(AudioError, match=r"reach 1e\+30.*\[-1, 1\]"):
        decode_pcm(np.full(64, 1e30, "<f4").tobytes(), "f32le", 1)
    sf.write(tmp_path / "loud.wav", np.full(800, 1e30, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="WAV chunk samples reach"):
        decode_payload((tmp_path / "loud.wav").read_bytes())
    with pytest.raises(AudioError, match="reach"):
        run(collect(FileSource(tmp_path / "loud.wav")))
    ok = np.full(800, 1.5, np.float32)  # a little over full scale (float overs) is still audio
    assert to_float_mono(ok, 16000).abs().max() == 1.5


# ---------------------------------------------------------------- WebSocket

def ws_server(**kw):
    from streamwavlm.audio.websocket import WebSocketAudioServer

    return WebSocketAudioServer(**kw)


async def serve_and_collect(server, client_coros):
    """Run clients against ``server``; return {stream_id: (samples, chunks, stream)} and client results."""
    results: dict[str, tuple] = {}
    consumers: list[asyncio.Task] = []

    async def consume(stream):
        samples, chunks = await collect(stream)
        results[stream.stream_id] = (samples, chunks, stream)

    async def accept():
        async for stream in server.streams():
            consumers.append(asyncio.create_task(consume(stream)))

    async with server:
        acceptor = asyncio.create_task(accept())
        outcomes = await asyncio.gather(*client_coros, return_exceptions=True)
        await asyncio.sleep(0.05)
        await asyncio.gather(*consumers)
    acceptor.cancel()
    return results, outcomes


@pytest.fixture(scope="module")
def wav_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ws")
    return {
        "stereo44": noise_file(d / "stereo44.wav", 44100, 2, 0.6, subtype="PCM_16"),
        "mono48": noise_file(d / "mono48.wav", 48000, 1, 0.5, subtype="FLOAT"),
        "mono16": noise_file(d / "mono16.wav", 16000, 1, 0.5, subtype="PCM_16"),
    }


def test_websocket_many_clients_each_get_their_file_intact(wav_files):
    from streamwavlm.audio.websocket import send_file

    port = _free_port()
    url = f"ws://127.0.0.1:{port}/"
    clients = [send_file(url, wav_files["stereo44"], "s44"),
               send_file(url, wav_files["mono48"], "m48", format="f32le", frame_samples=999),
               send_file(url, wav_files["mono16"], "m16", frame_samples=160)]
    results, outcomes = run(serve_and_collect(ws_server(port=port), clients))
    assert not [o for o in outcomes if isinstance(o, BaseException)], outcomes
    assert {o["stream_id"] for o in outcomes} == {"s44", "m48", "m16"}
    for stream_id, name in (("s44", "stereo44"), ("m48", "mono48"), ("m16", "mono16")):
        samples, chunks, stream = results[stream_id]
        np.testing.assert_array_equal(samples, load_audio(wav_files[name]))
        assert_contiguous(chunks)
        assert stream.stats.errors == 0 and stream.stats.samples_in == sf.info(str(wav_files[name])).frames


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _raw_client(url, *messages):
    """Send ``messages`` (str/bytes; after a hello, wait for its answer); return (error JSON, close code)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with connect(url, max_size=None) as ws:
        error = None
        try:
            for m in messages:
                await ws.send(m)
                if isinstance(m, str) and m.startswith('{"stream_id"'):
                    ready = json.loads(await ws.recv())
                    if ready["type"] == "error":
                        error = ready
                        break
            while error is None:
                reply = json.loads(await ws.recv())
                if reply["type"] == "error":
                    error = reply
        except ConnectionClosed:
            pass
        with contextlib.suppress(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 2)
        return error, ws.close_code


def _hello(stream_id="bad", rate=16000, fmt="s16le", channels=1, **extra):
    return json.dumps({"stream_id": stream_id, "sample_rate": rate, "format": fmt, "channels": channels,
                       **extra})


BAD_INPUTS = {
    "binary_before_hello": ((b"\x00\x01" * 10,), "missing_hello", 1008,
                            "first message must be the JSON text"),
    "hello_not_json": (("{stream_id: 1",), "invalid_hello", 1008, "not valid JSON"),
    "hello_missing_fields": ((json.dumps({"stream_id": "x"}),), "invalid_hello", 1008,
                             "lacks sample_rate, format, channels"),
    "bad_stream_id": ((_hello(stream_id="a/b"),), "invalid_hello", 1008, "stream_id 'a/b' must be"),
    "unsupported_rate": ((_hello(rate=12345),), "unsupported_rate", 1003,
                         "sample_rate 12345 is not supported"),
    "unsupported_format": ((_hello(fmt="mp3"),), "unsupported_format", 1003, "format 'mp3' is not supported"),
    "unsupported_channels": ((_hello(channels=9),), "unsupported_channels", 1003,
                             "channels 9 is not supported"),
    "odd_byte_count": ((_hello(channels=2), b"\x00" * 1000, b"\x00" * 6), "invalid_frame", 1007,
                       "6 bytes is not a whole number of 4-byte frames"),
    "nan_in_f32": ((_hello(fmt="f32le"), np.array([0.1, np.nan, 0.2], "<f4").tobytes()), "invalid_frame",
                   1007, "1 NaN/Inf f32le samples"),
    "oversized_frame": ((_hello(), b"\x00" * 4098), "frame_too_big", 1009,
                        "a frame of 4098 bytes exceeds the limit of 4096 bytes"),
    "text_after_hello": ((_hello(), "hello again"), "unexpected_text", 1008, "only binary audio frames"),
    "duplicate_stream_id": ((_hello(stream_id="good"),), "stream_id_in_use", 1008,
                            "stream_id 'good' is already streaming"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_websocket_bad_input_is_refused_clearly_and_others_go_on(case, wav_files):
    from streamwavlm.audio.websocket import send_audio

    messages, code, close_code, text = BAD_INPUTS[case]
    port = _free_port()
    server = ws_server(port=port, max_frame_bytes=4096)
    url = f"ws://127.0.0.1:{port}/"
    good = sf.read(str(wav_files["mono16"]), dtype="int16", always_2d=True)[0]

    async def bad_client():
        if case == "duplicate_stream_id":
            await asyncio.sleep(0.1)  # while "good" streams (paced in real time)
        return await _raw_client(url, *messages)

    async def good_client():
        return await send_audio(url, good, 16000, "good", realtime=case == "duplicate_stream_id")

    results, (bad, done) = run(serve_and_collect(server, [bad_client(), good_client()]))
    assert not isinstance(bad, BaseException) and not isinstance(done, BaseException), (bad, done)
    error, got_close = bad
    assert error is not None and error["type"] == "error" and error["code"] == code
    assert text in error["message"], error["message"]
    assert got_close == close_code
    samples, chunks, stream = results["good"]
    np.testing.assert_array_equal(samples, load_audio(wav_files["mono16"]))
    assert_contiguous(chunks)
    assert stream.stats.errors == 0 and done["samples_in"] == len(good)
    if "bad" in results:  # refused after its hello was accepted: the stream ended with the error counted
        assert results["bad"][2].stats.errors == 1 and text in results["bad"][2].stats.last_error


def test_websocket_hello_timeout_and_vanishing_client(wav_files, caplog):
    from websockets.asyncio.client import connect

    from streamwavlm.audio.websocket import send_file

    port = _free_port()
    server = ws_server(port=port, hello_timeout=0.2)
    url = f"ws://127.0.0.1:{port}/"
    sent = (0.25 * RNG.standard_normal(3200) * 32767).astype("<i2")

    async def silent_client():
        return await _raw_client(url)

    async def vanishing_client():
        async with connect(url) as ws:
            await ws.send(_hello(stream_id="gone"))
            await ws.recv()
            await ws.send(sent.tobytes())
            await asyncio.sleep(0.1)
            ws.transport.abort()  # no close frame: like a crashed client or a pulled cable
        return "aborted"

    clients = [silent_client(), vanishing_client(), send_file(url, wav_files["stereo44"], "good")]
    results, (silent, vanished, done) = run(serve_and_collect(server, clients))
    error, close_code = silent
    assert error["code"] == "hello_timeout" and close_code == 1008
    assert "no hello within 0.2 s" in error["message"]
    assert vanished == "aborted"
    samples, _, stream = results["gone"]
    assert stream.stats.errors == 1 and "connection lost mid-stream" in stream.stats.last_error
    np.testing.assert_array_equal(samples, resample(sent.astype(np.float32) / 32768, 16000))
    assert "connection lost mid-stream" in caplog.text
    np.testing.assert_array_equal(results["good"][0], load_audio(wav_files["stereo44"]))
    assert done["type"] == "done"


def test_websocket_client_helper_reports_refusals_and_server_side_close():
    from streamwavlm.audio.websocket import send_audio

    port = _free_port()
    url = f"ws://127.0.0.1:{port}/"
    bad = np.zeros((1600, 1), np.float32)
    bad[100] = np.inf

    async def main():
        async with ws_server(port=port) as server:
            with pytest.raises(AudioError, match="invalid_frame: audio frame: 1 NaN/Inf f32le samples"):
                await send_audio(url, bad, 16000, "inf")
            client = asyncio.create_task(send_audio(url, np.zeros((16000, 1), np.int16), 16000, "long",
                                                    realtime=True))
            streams = server.streams()
            assert (await anext(streams)).stream_id == "inf"
            stream = await anext(streams)
            first = await anext(stream)
            await stream.close()  # the consumer stops this stream: the client sees a normal close
            with pytest.raises(AudioError, match="server closed stream 'long' \\(close code 1000\\)"):
                await client
            rest = [c async for c in stream]
            assert first.start == 0 and all(c.start >= first.end for c in rest)

    run(main())


# ---------------------------------------------------------------- MQTT audio

@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory):
    """A real mosquitto on a free loopback port, stopped by its PID."""
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt mosquitto)")
    d = tmp_path_factory.mktemp("mosquitto")
    port = _free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"
                    f"log_dest file {d / 'mosquitto.log'}\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while True:  # setup only: wait until it accepts connections
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mosquitto did not start: {(d / 'mosquitto.log').read_text()}")
        time.sleep(0.01)
    yield port
    proc.terminate()
    proc.wait(5)


async def _mqtt_session(port, publishers):
    """Start an MqttAudioInput, run ``publishers(client)``, collect every stream until its end."""
    import aiomqtt

    from streamwavlm.audio.mqtt_audio import MqttAudioInput

    results, consumers = {}, []

    async def consume(stream):
        results[stream.stream_id] = (*await collect(stream), stream)

    async def accept(inp):
        async for stream in inp.streams():
            consumers.append(asyncio.create_task(consume(stream)))

    async with MqttAudioInput(f"mqtt://127.0.0.1:{port}", prefix="t") as inp, \
            aiomqtt.Client("127.0.0.1", port) as pub:
        acceptor = asyncio.create_task(accept(inp))
        errors = []
        await pub.subscribe("t/audio/+/error")

        async def listen():
            async for m in pub.messages:
                errors.append(json.loads(m.payload))

        listener = asyncio.create_task(listen())
        await publishers(pub)
        for _ in range(200):  # wait for every stream to end (bounded)
            if consumers and all(c.done() for c in consumers) and len(consumers) == len(results):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        listener.cancel()
        acceptor.cancel()
    return results, errors


def test_mqtt_audio_two_streams_intact(mosquitto, wav_files):
    from streamwavlm.audio.mqtt_audio import publish_file

    async def publishers(client):
        await asyncio.gather(publish_file(client, "t", "raw16", wav_files["mono16"], wav=False),
                             publish_file(client, "t", "wav44", wav_files["stereo44"], wav=True,
                                          frame_samples=882))

    results, errors = run(_mqtt_session(mosquitto, publishers))
    assert not errors
    for stream_id, name in (("raw16", "mono16"), ("wav44", "stereo44")):
        samples, chunks, stream = results[stream_id]
        np.testing.assert_array_equal(samples, load_audio(wav_files[name]))
        assert_contiguous(chunks)
        assert stream.stats.errors == 0 and stream.stats.dropped == 0


def test_mqtt_audio_stream_closed_by_consumer_is_ignored_until_its_end(mosquitto):
    import aiomqtt

    from streamwavlm.audio.mqtt_audio import MqttAudioInput, publish_audio

    tone = (1000 * np.sin(np.arange(3200) / 5)).astype(np.int16)

    async def main():
        async with MqttAudioInput(f"mqtt://127.0.0.1:{mosquitto}", prefix="c") as inp, \
                aiomqtt.Client("127.0.0.1", mosquitto) as pub:
            streams = inp.streams()
            await pub.publish("c/audio/x", tone[:320].tobytes(), qos=1)
            first = await anext(streams)
            assert (await anext(first)).end == 320
            await first.close()
            await publish_audio(pub, "c", "x", tone, 16000)  # ignored, then its end re-opens the id
            await publish_audio(pub, "c", "x", tone, 16000)
            second = await anext(streams)
            samples, _ = await collect(second)
            assert [c async for c in first] == []
            np.testing.assert_array_equal(samples * 32768, tone.astype(np.float32))

    run(main())


def test_mqtt_audio_bad_payload_ends_only_that_stream(mosquitto, wav_files):
    from streamwavlm.audio.mqtt_audio import publish_file

    async def publishers(client):
        await client.publish("t/audio/bad", b"\x00" * 640, qos=1)
        await client.publish("t/audio/bad", b"\x00" * 641, qos=1)  # not whole samples
        await publish_file(client, "t", "good", wav_files["mono16"], wav=False)

    results, errors = run(_mqtt_session(mosquitto, publishers))
    assert errors and errors[0]["code"] == "invalid_payload"
    assert "641 bytes is not a whole number of 2-byte frames" in errors[0]["message"]
    samples, _, bad = results["bad"]
    assert bad.stats.errors == 1 and len(samples) == 320
    np.testing.assert_array_equal(results["good"][0], load_audio(wav_files["mono16"]))
