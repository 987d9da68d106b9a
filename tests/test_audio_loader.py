"""One audio loader: ``run``, ``fidelity`` and ``embed`` accept every file ``stream`` accepts (any rate and
channel count, resampled to 16 kHz mono), and refuse audio too short for one frame in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamwavlm import cli
from streamwavlm.audio.files import load_audio
from streamwavlm.audio.validate import AudioError
from streamwavlm.config import WavLMConfig

SECONDS = 0.6


@pytest.fixture(scope="module")
def odd_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.6 s of a two-tone stereo signal at 44.1 kHz in FLAC: neither 16 kHz nor mono nor WAV."""
    rate = 44100
    t = np.arange(int(SECONDS * rate)) / rate
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 330 * t)], axis=1)
    path = tmp_path_factory.mktemp("audio") / "stereo44.flac"
    sf.write(path, stereo, rate, subtype="PCM_16")
    return path


def test_run_accepts_any_rate_and_channels(odd_file: Path, tmp_path: Path, hf_models) -> None:
    out = tmp_path / "frames.npz"
    assert cli.main(["run", "--checkpoint", str(hf_models["base"][1]), "--audio", str(odd_file), "--out", str(out),
                     "--chunk", "8", "--left", "25"]) == 0
    frames = np.load(out)["frames"]
    assert len(load_audio(odd_file)) == round(SECONDS * 16000)
    assert frames.shape[1] == WavLMConfig().num_frames(round(SECONDS * 16000))  # the 16 kHz duration


def test_fidelity_accepts_any_rate_and_channels(odd_file: Path, tmp_path: Path, hf_models,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["fidelity", str(hf_models["base"][1]), str(odd_file), "--chunk", "8", "--left", "25", "--lookahead", "0",
            "--norm", "running", "--png", str(tmp_path / "f.png")]
    assert cli.main(argv) == 0
    assert f"{SECONDS:.2f} s of {SECONDS:.2f} s" in capsys.readouterr().out


def test_too_short_for_one_frame_is_refused(tmp_path: Path, hf_models, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "short.wav"
    sf.write(path, np.zeros(399, np.int16), 16000)
    with pytest.raises(AudioError, match="too short"):
        load_audio(path, min_samples=WavLMConfig().receptive_field)
    assert cli.main(["run", "--checkpoint", str(hf_models["base"][1]), "--audio", str(path),
                     "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too short" in err
