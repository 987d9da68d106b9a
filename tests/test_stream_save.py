"""``stream --save``: the file holds exactly what was published, with frame times; ``--broker none`` gives the
same file without any broker; ``--listen`` shows the input level; mistakes are one line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamwavlm import cli
from streamwavlm.cli import build_parser
from streamwavlm.commands.stream import stream
from streamwavlm.mqtt import EmbeddingMessage, subscribe

OPTIONS = ["--prefix", "t", "--chunk", "8", "--left", "20", "--layers", "1,3"]


@pytest.fixture
def audio(speech, tmp_path: Path) -> Path:
    path = tmp_path / "in.wav"
    sf.write(path, speech[:20000].numpy(), 16000, subtype="FLOAT")
    return path


async def _published_and_saved(argv: list[str], url: str) -> list[EmbeddingMessage]:
    got: list[EmbeddingMessage] = []
    subscribed = asyncio.Event()

    async def listen() -> None:
        async for item in subscribe(url, "t", on_subscribed=subscribed.set):
            if isinstance(item, EmbeddingMessage):
                got.append(item)

    task = asyncio.create_task(listen())
    await asyncio.wait_for(subscribed.wait(), 10)
    assert await stream(build_parser().parse_args(argv)) == 0
    await asyncio.sleep(1.0)  # the last messages are on their way
    task.cancel()
    return got


def test_saved_file_equals_what_was_published(hf_models, audio: Path, tmp_path: Path, mosquitto) -> None:
    directory = str(hf_models["large"][1])
    base = ["stream", "--checkpoint", directory, "--input", str(audio), *OPTIONS]
    published = asyncio.run(_published_and_saved(
        [*base, "--broker", mosquitto.url, "--save", str(tmp_path / "with-broker.npz"), "--payload-dtype", "float16"],
        mosquitto.url))
    saved = np.load(tmp_path / "with-broker.npz")
    assert published and [m.seq for m in published] == list(range(len(published)))
    emb = saved["in/embeddings"]
    assert emb.dtype == np.float16 and list(saved["in/layers"]) == [1, 3]
    expected = np.concatenate([m.data.transpose(1, 0, 2) for m in published])  # (frames, layers, dim)
    np.testing.assert_array_equal(emb, expected)
    first = published[0].first_frame
    np.testing.assert_allclose(saved["in/frame_times"], (first + np.arange(len(emb))) / 50.0)
    assert float(saved["frame_rate"]) == 50.0

    assert cli.main([*base, "--broker", "none", "--save", str(tmp_path / "alone"), "--payload-dtype", "float16"]) == 0
    alone = np.load(tmp_path / "alone.npz")  # the suffix is added
    assert sorted(alone.files) == sorted(saved.files)
    for key in saved.files:
        np.testing.assert_array_equal(alone[key], saved[key])


def test_listen_shows_the_input_level(hf_models) -> None:
    proc = subprocess.run([sys.executable, "-m", "streamwavlm.cli", "stream", "--checkpoint",
                           str(hf_models["base"][1]), "--listen", "--chunk", "50", "--seconds", "60"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "sample/embeddings seq" in line]
    assert lines and all(" dBFS " in line and len(line.rstrip()) <= 80 for line in lines)
    levels = [float(line.split(", input ")[1].split()[0]) for line in lines]
    assert -60 < max(levels) < 0  # speech, not silence or clipping


@pytest.mark.parametrize("argv, message", [
    (["--broker", "none", "--listen"], "--broker none"),
    (["--input", "missing.wav"], "missing.wav"),
    (["--device", "cuda"], "no CUDA GPU"),
])
def test_mistakes_are_one_line(argv: list[str], message: str, hf_models, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["stream", "--checkpoint", str(hf_models["base"][1]), "--broker", "none", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
