"""The asyncio engine: sources through the batched encoder to sinks, gaps, overload and failures."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from streamwavlm.audio.files import FileSource
from streamwavlm.audio.source import AudioChunk, SourceStats
from streamwavlm.checkpoint import load_model
from streamwavlm.engine import Engine, EngineOutput
from streamwavlm.streaming import StreamPool, StreamSettings, stream_audio

SETTINGS = StreamSettings(chunk=4, left=16, lookahead=2)


class ListSource:
    """A source over given chunks (optionally paced), standing in for a network stream."""

    def __init__(self, stream_id: str, chunks: list[tuple[np.ndarray, int]], pace: float = 0.0,
                 fail_after: int | None = None) -> None:
        self.stream_id, self.chunks, self.pace, self.fail_after = stream_id, chunks, pace, fail_after
        self.stats = SourceStats()
        self.closed = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for i, (samples, start) in enumerate(self.chunks):
            if self.closed:
                return
            if self.fail_after is not None and i == self.fail_after:
                raise ConnectionResetError("client vanished mid-frame")
            if self.pace:
                await asyncio.sleep(len(samples) / 16000 / self.pace)
            yield AudioChunk(self.stream_id, samples, start, time.monotonic())

    async def close(self) -> None:
        self.closed = True


def split(wav: np.ndarray, size: int) -> list[tuple[np.ndarray, int]]:
    return [(wav[i:i + size], i) for i in range(0, len(wav), size)]


def solo_frames(model, wav: np.ndarray) -> torch.Tensor:
    return torch.cat([o.frames[0] for o in stream_audio(StreamPool(model, SETTINGS), wav)])


def collect() -> tuple[dict[str, list[EngineOutput]], object]:
    got: dict[str, list[EngineOutput]] = {}

    async def sink(out: EngineOutput) -> None:
        got.setdefault(out.stream_id, []).append(out)

    return got, sink


@pytest.fixture(scope="module")
def model(hf_models):
    return load_model(hf_models["base"][1])


def test_files_through_engine_equal_solo_streaming(model, speech, tmp_path):
    wavs = {f"f{i}": speech.numpy()[i * 1000: 20000 + i * 3000] for i in range(3)}
    for name, wav in wavs.items():
        sf.write(tmp_path / f"{name}.wav", wav, 16000, subtype="FLOAT")
    got, sink = collect()

    async def main():
        async with Engine(StreamPool(model, SETTINGS, capacity=4), [sink]) as engine:
            for name in wavs:
                engine.add(FileSource(tmp_path / f"{name}.wav", block=700), name)
            await engine.drain()
            return engine.status()

    status = asyncio.run(main())
    for name, wav in wavs.items():
        frames = torch.cat([o.chunk.frames[0] for o in got[name]])
        assert (frames - solo_frames(model, wav)).abs().max() < 1e-5
        assert got[name][-1].chunk.final
    assert all(s["state"] == "closed" and s["dropped"] == 0 for s in status)


def test_source_gaps_are_filled_with_silence(model, speech):
    wav = speech.numpy()[:16000]
    chunks = split(wav, 1000)
    del chunks[5]  # the source lost samples 5000..5999
    got, sink = collect()

    async def main():
        async with Engine(StreamPool(model, SETTINGS), [sink]) as engine:
            st = engine.add(ListSource("g", chunks), "g")
            await engine.drain()
            return st

    st = asyncio.run(main())
    assert st.gap_filled == 1000
    expected = wav.copy()
    expected[5000:6000] = 0
    frames = torch.cat([o.chunk.frames[0] for o in got["g"]])
    assert (frames - solo_frames(model, expected)).abs().max() < 1e-5


def test_overload_drops_oldest_audio_counted_exactly_and_latency_stays_bounded(speech, tmp_path):
    """Six streams arriving 20x faster than real time: the CPU cannot keep up."""
    from conftest import perturb_, save_hf_model, tiny_hf_config
    from transformers import WavLMModel

    heavy = load_model(save_hf_model(perturb_(WavLMModel(tiny_hf_config(
        "base", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, conv_dim=(256,) * 7))), tmp_path))
    wav = np.tile(speech.numpy(), 3)  # 6 s each
    got, sink = collect()
    max_backlog = 0.5

    async def main():
        async with Engine(StreamPool(heavy, SETTINGS, capacity=6), [sink], max_backlog=max_backlog) as engine:
            statuses = [engine.add(ListSource(f"s{i}", split(wav, 320), pace=20.0), f"s{i}") for i in range(6)]
            await engine.drain()
            return statuses, list(engine.step_times)

    statuses, step_times = asyncio.run(main())
    assert sum(st.dropped for st in statuses) > 0
    for st in statuses:
        assert st.samples_in == len(wav)
        assert st.samples_processed + st.dropped == st.samples_in  # every sample accounted for
        frames = sum(o.chunk.num_frames for o in got[st.stream_id])
        assert frames == heavy.cfg.num_frames(st.samples_processed)
        # latency: at most the backlog bound's worth of queued steps plus one step, with slack
        assert max(st.latencies) < max_backlog * 6 * max(step_times) / (SETTINGS.chunk * 0.02) + 1.0
        starts = [o.stream_start for o in got[st.stream_id]]
        assert starts == sorted(starts) and starts[-1] <= len(wav)


def test_shed_policy_closes_only_the_stream_that_falls_behind(model, speech):
    wav = speech.numpy()[:16000]
    got, sink = collect()

    async def main():
        async with Engine(StreamPool(model, SETTINGS, capacity=2), [sink], max_backlog=0.25,
                          policy="shed") as engine:
            flood = engine.add(ListSource("flood", [(np.tile(wav, 2), 0)]), "flood")  # 2 s at once
            calm = engine.add(ListSource("calm", split(wav, 1600), pace=2.0), "calm")
            await engine.drain()
            return flood, calm

    flood, calm = asyncio.run(main())
    assert flood.state == "shed" and "backlog exceeded" in flood.error
    assert calm.state == "closed"
    frames = torch.cat([o.chunk.frames[0] for o in got["calm"]])
    assert (frames - solo_frames(model, wav)).abs().max() < 1e-5


def test_failing_source_ends_only_its_stream(model, speech):
    wav = speech.numpy()[:12000]
    got, sink = collect()

    async def main():
        async with Engine(StreamPool(model, SETTINGS, capacity=2), [sink]) as engine:
            bad = engine.add(ListSource("bad", split(wav, 1000), fail_after=4), "bad")
            good = engine.add(ListSource("good", split(wav, 1000)), "good")
            await engine.drain()
            return bad, good

    bad, good = asyncio.run(main())
    assert bad.state == "failed" and "vanished" in bad.error
    assert good.state == "closed"
    frames = torch.cat([o.chunk.frames[0] for o in got["good"]])
    assert (frames - solo_frames(model, wav)).abs().max() < 1e-5


def test_microphone_through_engine_equals_file(model, speech, pulse_mic, tmp_path):
    """Real PortAudio via the PulseAudio fake microphone: what the engine embeds from the microphone equals
    embedding the same captured samples from a file, and the played speech arrives intact."""
    from streamwavlm.audio.microphone import MicrophoneSource, find_device

    played = (speech.numpy()[:12000] * 32767).astype(np.int16)
    captured: list[np.ndarray] = []
    got, sink = collect()

    class Tee:  # record exactly what the microphone source delivered
        def __init__(self, source):
            self.source, self.stats = source, source.stats

        async def _gen(self):
            async for chunk in self.source:
                captured.append(chunk.samples)
                yield chunk

        def __aiter__(self):
            return self._gen()

        async def close(self):
            await self.source.close()

    async def main():
        mic = MicrophoneSource(find_device("pulse").index, samplerate=16000, channels=1, block=800)
        async with Engine(StreamPool(model, SETTINGS), [sink]) as engine, mic:
            engine.add(Tee(mic), "mic")
            await asyncio.sleep(0.2)
            pulse_mic.play(played)
            await asyncio.wait_for(asyncio.to_thread(pulse_mic.played.wait), 10)
            await asyncio.sleep(0.3)
            await mic.close()
            await engine.drain()

    asyncio.run(asyncio.wait_for(main(), 30))
    audio = np.concatenate(captured)
    first = int(np.flatnonzero(audio)[0])
    np.testing.assert_array_equal(np.round(audio[first:first + len(played)] * 32768), played.astype(np.float32))
    frames = torch.cat([o.chunk.frames[0] for o in got["mic"]])
    sf.write(tmp_path / "captured.wav", audio, 16000, subtype="FLOAT")
    file_got, file_sink = collect()

    async def from_file():
        async with Engine(StreamPool(model, SETTINGS), [file_sink]) as engine:
            engine.add(FileSource(tmp_path / "captured.wav", block=800), "file")
            await engine.drain()

    asyncio.run(from_file())
    assert torch.equal(frames, torch.cat([o.chunk.frames[0] for o in file_got["file"]]))


def test_websocket_clients_through_engine_equal_file_path(model, speech, tmp_path):
    """Three real WebSocket clients over loopback at once; each stream's embeddings equal the file path's."""
    from streamwavlm.audio.websocket import WebSocketAudioServer, send_file

    wavs = {f"ws{i}": speech.numpy()[i * 2000: 16000 + i * 2000] for i in range(3)}
    for name, wav in wavs.items():
        sf.write(tmp_path / f"{name}.wav", wav, 16000, subtype="FLOAT")
    got, sink = collect()

    async def main():
        async with WebSocketAudioServer() as server, \
                Engine(StreamPool(model, SETTINGS, capacity=4), [sink]) as engine:
            async def accept():
                async for stream in server.streams():
                    engine.add(stream, stream.stream_id)

            acceptor = asyncio.create_task(accept())
            await asyncio.gather(*(send_file(server.url, tmp_path / f"{n}.wav", n, format="f32le") for n in wavs))
            while len(engine.finished) < len(wavs):
                await asyncio.sleep(0.05)
            acceptor.cancel()

    asyncio.run(asyncio.wait_for(main(), 60))
    for name, wav in wavs.items():
        frames = torch.cat([o.chunk.frames[0] for o in got[name]])
        assert (frames - solo_frames(model, wav)).abs().max() < 1e-5
