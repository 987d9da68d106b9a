"""Shared fixtures: random-weight reference models from transformers, saved as real checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_hf_config(kind: str, **overrides):
    """A small transformers WavLMConfig with the released models' CNN geometry, buckets and pos-conv kernel.

    ``kind`` is ``base`` (GroupNorm front end, post-LN) or ``large`` (LayerNorm front end, pre-LN).
    """
    from transformers import WavLMConfig as HFConfig

    args = dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
        conv_dim=(32,) * 7, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
        feat_extract_norm="group" if kind == "base" else "layer", do_stable_layer_norm=kind == "large",
        num_buckets=320, max_bucket_distance=800,
    )
    args.update(overrides)
    return HFConfig(**args)


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its initial value (LN weights of 1, zero biases, gate constants of 1), so
    that a parity test exercises every tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def save_hf_model(model, directory: Path, *, normalize: bool = False, safe: bool = True) -> Path:
    model.save_pretrained(directory, safe_serialization=safe)
    (directory / "preprocessor_config.json").write_text(json.dumps({"do_normalize": normalize}))
    return directory


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Random transformers ``WavLMModel``s (base- and large-type) and their saved HF directories."""
    from transformers import WavLMModel

    out = {}
    for i, kind in enumerate(("base", "large")):
        torch.manual_seed(i)
        model = perturb_(WavLMModel(tiny_hf_config(kind)), seed=i)
        out[kind] = (model, save_hf_model(model, tmp_path_factory.mktemp(f"hf-{kind}")))
    return out


@pytest.fixture(scope="session")
def speech() -> torch.Tensor:
    """Two seconds of the bundled speech sample (real voiced audio, not noise)."""
    from streamwavlm.audio.files import load_audio
    from streamwavlm.commands.common import bundled_sample

    return torch.from_numpy(load_audio(bundled_sample())[16000:48000].copy())


@pytest.fixture
def pulse_mic(monkeypatch):
    """A fake microphone through a real PulseAudio server and PortAudio's ALSA 'pulse' device."""
    if shutil.which("pulseaudio") is None:
        pytest.skip("pulseaudio is not installed (apt pulseaudio pulseaudio-utils libasound2-plugins)")
    try:
        import sounddevice  # noqa: F401
    except OSError as e:
        pytest.skip(f"PortAudio is not installed (apt libportaudio2): {e}")
    from pulse import PulseMic

    from streamwavlm.audio.microphone import refresh_devices

    mic = PulseMic()
    mic.start()
    for key, value in mic.env.items():
        monkeypatch.setenv(key, value)
    refresh_devices()  # PortAudio lists devices once; the 'pulse' device needs the server up
    yield mic
    mic.stop()


@pytest.fixture
def mosquitto(tmp_path):
    """A fresh mosquitto on a free loopback port (stopped by PID afterwards)."""
    from streamwavlm.mqtt import Mosquitto
    from streamwavlm.mqtt.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed (apt mosquitto)")
    with Mosquitto(workdir=tmp_path / "broker") as broker:
        yield broker


def password_broker_config(directory: Path, users: dict[str, str]) -> list[str]:
    """mosquitto config lines for a broker that admits only ``users`` (a password file written with
    mosquitto_passwd); skips the test where that tool is missing."""
    import subprocess

    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed (apt mosquitto)")
    directory.mkdir(parents=True, exist_ok=True)
    passwd = directory / "passwd"
    for i, (user, password) in enumerate(users.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, password],
                       check=True)
    return ["allow_anonymous false", f"password_file {passwd}"]


@pytest.fixture
def spawned() -> Iterator[list]:
    """Child processes a test starts (objects with a ``proc`` Popen): killed at the end if still running, so
    a failed test leaves none behind."""
    started: list = []
    yield started
    for child in started:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
