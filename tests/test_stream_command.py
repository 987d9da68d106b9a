"""The main job end to end: file -> streaming encoder -> MQTT (real mosquitto, MQTT 5 and 3.1.1, and the
embedded broker) -> subscriber; every message decodes to exactly the tensors the encoder produced."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import soundfile as sf
import torch

from streamwavlm.checkpoint import load_model
from streamwavlm.cli import build_parser
from streamwavlm.commands.stream import stream
from streamwavlm.mqtt import EmbeddingMessage, subscribe
from streamwavlm.streaming import StreamPool, StreamSettings, stream_audio


def expected_frames(directory, wav, settings: StreamSettings) -> list[torch.Tensor]:
    return [o.frames for o in stream_audio(StreamPool(load_model(directory), settings), wav) if o.num_frames]


async def run_and_collect(argv: list[str], broker_url: str, n_expected: int) -> list[EmbeddingMessage]:
    got: list[EmbeddingMessage] = []
    subscribed = asyncio.Event()

    async def listen() -> None:
        async for item in subscribe(broker_url, "t", on_subscribed=subscribed.set):
            if isinstance(item, EmbeddingMessage):
                got.append(item)
                if len(got) == n_expected:
                    return

    task = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), 10)
    assert await stream(build_parser().parse_args(argv)) == 0
    await asyncio.wait_for(task, 15)
    return got


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_file_to_mqtt_delivers_exact_tensors(hf_models, speech, tmp_path, mosquitto, protocol):
    _, directory = hf_models["large"]
    wav = speech[:24000]
    sf.write(tmp_path / "in.wav", wav.numpy(), 16000, subtype="FLOAT")
    settings = StreamSettings(chunk=8, left=20, lookahead=3, layers=(1, 3))
    expected = expected_frames(directory, wav, settings)
    argv = ["stream", "--checkpoint", str(directory), "--dtype", "float32", "--input", str(tmp_path / "in.wav"),
            "--broker", mosquitto.url, "--prefix", "t", "--protocol", protocol, "--chunk", "8", "--left", "20",
            "--lookahead", "3", "--layers", "1,3"]
    got = asyncio.run(run_and_collect(argv, mosquitto.url, len(expected)))
    assert [m.seq for m in got] == list(range(len(expected)))
    for m, e in zip(got, expected, strict=True):
        assert m.stream_id == "in" and m.layers == (1, 3) and m.data.dtype.name == "float32"
        assert torch.equal(torch.from_numpy(m.data), e)


def test_embedded_broker_and_listen_output(hf_models, tmp_path):
    """With no --broker the command starts one itself, and --listen prints what arrives."""
    _, directory = hf_models["base"]
    proc = subprocess.run(
        [sys.executable, "-m", "streamwavlm.cli", "stream", "--checkpoint", str(directory), "--listen",
         "--chunk", "25"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "broker: embedded, mqtt://127.0.0.1:" in out
    assert "sample/embeddings seq 0: frames 0..24" in out
    assert "subscriber received 23 messages" in out and "dropped 0 samples" in out


def test_xvectors_are_published(speech, tmp_path, mosquitto):
    from conftest import perturb_, save_hf_model, tiny_hf_config
    from transformers import WavLMForXVector

    from streamwavlm.streaming import XVectorSettings

    cfg = tiny_hf_config("base", use_weighted_layer_sum=True, tdnn_dim=(24, 24, 24, 24, 48), xvector_output_dim=16)
    directory = save_hf_model(perturb_(WavLMForXVector(cfg), seed=4), tmp_path / "sv")
    wav = speech[:24000]
    sf.write(tmp_path / "in.wav", wav.numpy(), 16000, subtype="FLOAT")
    pool = StreamPool(load_model(directory), StreamSettings(chunk=8, left=20, xvector=XVectorSettings(30, 10)))
    expected = [v for o in stream_audio(pool, wav) for v in o.xvectors]
    argv = ["stream", "--checkpoint", str(directory), "--dtype", "float32", "--input", str(tmp_path / "in.wav"),
            "--broker", mosquitto.url, "--prefix", "t", "--chunk", "8", "--left", "20", "--xvector", "30,10"]

    async def main() -> list[EmbeddingMessage]:
        got: list[EmbeddingMessage] = []
        subscribed = asyncio.Event()

        async def listen() -> None:
            async for item in subscribe(mosquitto.url, "t", kinds=("xvector",), on_subscribed=subscribed.set):
                if isinstance(item, EmbeddingMessage):
                    got.append(item)
                    if len(got) == len(expected):
                        return

        task = asyncio.create_task(listen())
        await asyncio.wait_for(subscribed.wait(), 10)
        assert await stream(build_parser().parse_args(argv)) == 0
        await asyncio.wait_for(task, 15)
        return got

    got = asyncio.run(main())
    assert len(expected) >= 3
    for m, (end, vec) in zip(got, expected, strict=True):
        assert m.kind == "xvector" and m.first_frame == end and m.data.shape == (16,)
        assert torch.equal(torch.from_numpy(m.data), vec)
