"""The background model (``diarization/background.py``): the projection separates held-out speakers that a
raw cosine confuses, its file round-trips exactly and anything else is refused (nothing unpickled), and
``streamwavlm background`` learns one from real espeak-ng speech with one-line errors for a user's mistakes."""

from __future__ import annotations

import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import perturb_, save_hf_model, tiny_hf_config
from safetensors.numpy import save_file

from streamwavlm.checkpoint import model_from_setting
from streamwavlm.cli import main
from streamwavlm.diarization import espeak
from streamwavlm.diarization.background import (
    FORMAT,
    MIN_SPEAKERS,
    VERSION,
    Background,
    BackgroundError,
    learn,
    load_background,
)

D = 32
ROOT = Path(__file__).resolve().parents[1]


def _speakers(rng: np.random.Generator, n: int, per: int, rotation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``per`` windows of each of ``n`` speakers in D dimensions: speakers differ along 4 directions (spread
    1), along which a window varies little (0.2); along 4 others a window varies a lot (4: what is said),
    along the rest little (0.2); every vector shares one large offset, as real embeddings do. The axes are
    rotated so that nothing is axis-aligned."""
    centres = np.zeros((n, D))
    centres[:, :4] = rng.normal(size=(n, 4))
    noise = rng.normal(size=(n, per, D)) * np.r_[np.full(4, 0.2), np.full(4, 4.0), np.full(D - 8, 0.2)]
    x = (centres[:, None] + noise).reshape(-1, D) @ rotation + 6.0 * rotation[-1]
    return x, np.repeat(np.arange(n), per)


def _identified(vectors: np.ndarray, labels: np.ndarray, enrol: int) -> float:
    """Fraction of windows after the first ``enrol`` of each speaker whose nearest centroid (cosine; the
    centroid is the mean of the first ``enrol``) is their own speaker's."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    speakers = np.unique(labels)
    first = np.concatenate([np.flatnonzero(labels == s)[:enrol] for s in speakers])
    rest = np.setdiff1d(np.arange(len(labels)), first)
    centroids = np.stack([unit[first][labels[first] == s].mean(0) for s in speakers])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return float((speakers[np.argmax(unit[rest] @ centroids.T, axis=1)] == labels[rest]).mean())


def test_projection_identifies_held_out_speakers_a_raw_cosine_confuses():
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(D, D)))[0]
    windows = _speakers(rng, 60, 20, rotation)  # the background's speakers
    bg, unwhitened = learn(*windows, "synthetic", dims=4), learn(*windows, "synthetic", dims=4, shrinkage=1e6)
    x, labels = _speakers(rng, 10, 25, rotation)  # other speakers, as diarization meets them
    raw, projected = _identified(x, labels, 5), _identified(bg.apply(x), labels, 5)
    # measured: raw 0.23, projected 0.97; without the whitening (a huge shrinkage) 0.24
    assert projected > 0.85 and projected > raw + 0.5, (raw, projected)
    assert projected > _identified(unwhitened.apply(x), labels, 5) + 0.5
    assert (bg.speakers, bg.windows, bg.dims, bg.embedder) == (60, 1200, 4, "synthetic")


def test_apply_gives_unit_float32_vectors_for_one_or_many():
    rng = np.random.default_rng(1)
    bg = learn(rng.normal(size=(40, D)), np.repeat(np.arange(10), 4), "synthetic", dims=5)
    many, one = bg.apply(rng.normal(size=(7, D))), bg.apply(rng.normal(size=D).astype(np.float16))
    assert many.shape == (7, 5) and one.shape == (5,)
    assert many.dtype == one.dtype == np.float32
    assert np.allclose(np.linalg.norm(many, axis=1), 1, atol=1e-5) and abs(np.linalg.norm(one) - 1) < 1e-5
    assert np.allclose(bg.apply(np.zeros((0, D))), np.zeros((0, 5)))  # no windows, no rows
    with pytest.raises(BackgroundError, match=r"32-dimensional.*same backend"):
        bg.apply(np.zeros(D + 1))


def test_dims_are_capped_at_speakers_minus_one():
    rng = np.random.default_rng(2)
    x, labels = rng.normal(size=(27, D)), np.repeat(np.arange(9), 3)
    assert learn(x, labels, "synthetic").dims == 8
    assert learn(x, labels, "synthetic", dims=3).dims == 3


def test_learn_refuses_what_it_cannot_learn_from():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, D))
    few = np.repeat(np.arange(MIN_SPEAKERS - 1), 6)[:40]
    with pytest.raises(BackgroundError, match=f"at least {MIN_SPEAKERS} speakers.*give it more speakers"):
        learn(x[:len(few)], few, "synthetic")
    singles = np.r_[np.repeat(np.arange(MIN_SPEAKERS - 1), 2), np.arange(100, 126)]  # one window: no covariance
    with pytest.raises(BackgroundError, match=f"got {MIN_SPEAKERS - 1}"):
        learn(x, singles, "synthetic")
    labels = np.repeat(np.arange(10), 4)
    nan = x.copy()
    nan[3, 7] = np.nan
    with pytest.raises(BackgroundError, match="finite embeddings"):
        learn(nan, labels, "synthetic")
    with pytest.raises(BackgroundError, match="one label per embedding"):
        learn(x, labels[:-1], "synthetic")
    with pytest.raises(BackgroundError, match="dims >= 1"):
        learn(x, labels, "synthetic", dims=0)
    with pytest.raises(BackgroundError, match="finite shrinkage"):
        learn(x, labels, "synthetic", shrinkage=-1.0)
    with pytest.raises(BackgroundError, match="singular: raise the shrinkage"):  # 40 windows, 32 dims, 10 means
        learn(x, labels, "synthetic", shrinkage=0.0)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Background, Path]:
    rng = np.random.default_rng(4)
    bg = learn(rng.normal(size=(40, D)), np.repeat(np.arange(10), 4), "wavlm:model.pt", dims=6)
    bg.save(tmp_path / "bg.safetensors")
    return bg, tmp_path / "bg.safetensors"


def test_save_and_load_round_trip_exactly(saved):
    bg, path = saved
    back = load_background(path, "wavlm:model.pt")
    assert np.array_equal(back.mean, bg.mean) and np.array_equal(back.projection, bg.projection)
    assert (back.embedder, back.speakers, back.windows, back.dims) == ("wavlm:model.pt", 10, 40, 6)
    assert back.mean.dtype == back.projection.dtype == np.float32
    assert load_background(path).embedder == "wavlm:model.pt"  # no embedder given: nothing to compare


def test_save_to_an_unwritable_path_is_a_background_error(saved, tmp_path):
    bg, _ = saved
    with pytest.raises(BackgroundError, match="cannot write the background"):
        bg.save(tmp_path / "no-such-dir" / "bg.safetensors")


META = {"format": FORMAT, "version": str(VERSION), "embedder": "resemblyzer", "speakers": "10", "windows": "40"}
MEAN, PROJECTION = np.zeros(4, np.float32), np.eye(4, 2, dtype=np.float32)


def _file(path: Path, tensors: dict[str, np.ndarray] | None, meta: dict[str, str] | None) -> Path:
    save_file(tensors if tensors is not None else {"mean": MEAN, "projection": PROJECTION}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("make,expected", [
    (lambda d: d / "missing.safetensors", "no such background file.*make one with `streamwavlm background`"),
    (lambda d: (d / "t.safetensors").write_text("not a background\n") and d / "t.safetensors",
     "not a background file.*make one with `streamwavlm background`"),
    (lambda d: _file(d / "n.safetensors", None, None), "not a version 1 background.*streamwavlm background"),
    (lambda d: _file(d / "f.safetensors", None, {**META, "format": "other"}),
     "format 'other'.*streamwavlm background"),
    (lambda d: _file(d / "v.safetensors", None, {**META, "version": "2"}), "version '2'.*streamwavlm background"),
    (lambda d: _file(d / "s.safetensors", {"mean": MEAN[:3], "projection": PROJECTION}, META),
     "damaged background.*make it again"),
    (lambda d: _file(d / "k.safetensors", {"mean": MEAN, "projection": np.zeros((4, 0), np.float32)}, META),
     "damaged background.*make it again"),
    (lambda d: _file(d / "m.safetensors", {"projection": PROJECTION}, META), "damaged background.*make it again"),
    (lambda d: _file(d / "x.safetensors", {"mean": MEAN + np.nan, "projection": PROJECTION}, META),
     "damaged background.*make it again"),
    (lambda d: _file(d / "c.safetensors", None, {**META, "speakers": "many"}), "damaged background metadata"),
    (lambda d: _file(d / "e.safetensors", None, {**META, "embedder": "wavlm:other.pt"}),
     "learnt on 'wavlm:other.pt'.*this run uses 'resemblyzer'.*same backend"),
], ids=["missing", "text", "no-metadata", "format", "version", "shapes", "no-dims", "no-mean", "nan", "counts",
        "embedder"])
def test_load_refuses_anything_but_a_background_of_this_backend(tmp_path, make, expected):
    with pytest.raises(BackgroundError, match=expected):
        load_background(make(tmp_path), "resemblyzer")


class _Marker:
    """Unpickling this creates a file: a background loader must never run it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def test_a_pickle_is_refused_without_being_unpickled(tmp_path):
    path = tmp_path / "bg.safetensors"
    path.write_bytes(pickle.dumps({"mean": _Marker(tmp_path / "ran")}))
    with pytest.raises(BackgroundError, match="not a background file"):
        load_background(path)
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------------- the command, on real speech
needs_espeak = pytest.mark.skipif(not espeak.available(), reason="needs espeak-ng and sox (apt espeak-ng sox)")
VOICES = list(espeak.VOICES) + [(v, p + 15, s - 20) for v, p, s in espeak.VOICES[:2]]  # 10 distinct voices


@pytest.fixture(scope="module")
def speakers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file per voice (a few seconds), except the last voice: a subdirectory of two files; and a file
    that is not audio, which is not a speaker."""
    d = tmp_path_factory.mktemp("speakers")
    rng = np.random.default_rng(5)
    for i, voice in enumerate(VOICES):
        texts = [" ".join(rng.choice(espeak.WORDS, 8)) for _ in range(2)]
        if i < len(VOICES) - 1:
            sf.write(d / f"voice{i}.wav", np.concatenate([espeak.synthesize(t, voice) for t in texts]), 16000)
        else:
            (d / f"voice{i}").mkdir()
            for j, t in enumerate(texts):
                sf.write(d / f"voice{i}" / f"part{j}.flac", espeak.synthesize(t, voice), 16000)
    (d / "README.txt").write_text("ten espeak-ng voices\n")
    return d


@needs_espeak
def test_background_command_learns_from_real_speech(speakers_dir, tmp_path, capsys):
    pytest.importorskip("resemblyzer")
    out = tmp_path / "bg.safetensors"
    assert main(["background", str(speakers_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    bg = load_background(out, "resemblyzer")
    assert (bg.speakers, bg.dims, bg.mean.shape) == (len(VOICES), len(VOICES) - 1, (256,))
    assert bg.windows >= 3 * len(VOICES)  # a few seconds of speech each, windows every 0.5 s
    assert printed.count("\n") == 1 and f"from {len(VOICES)} speakers ({bg.windows} speech windows" in printed
    assert str(out) in printed


@needs_espeak
def test_background_command_with_wavlm_x_vectors(speakers_dir, tmp_path, capsys, monkeypatch):
    """The same windows as ``diarize --backend wavlm`` (the engine's streaming x-vectors of each file); a tiny
    random WavLMForXVector checkpoint stands in for a real one, loaded once for all eleven files."""
    from transformers import WavLMForXVector

    from streamwavlm.commands import enroll

    loads = []
    monkeypatch.setattr(enroll, "model_from_setting", lambda *a, **k: loads.append(a) or model_from_setting(*a, **k))
    cfg = tiny_hf_config("base", use_weighted_layer_sum=True, tdnn_dim=(24, 24, 24, 24, 48), xvector_output_dim=16)
    checkpoint = save_hf_model(perturb_(WavLMForXVector(cfg), seed=4), tmp_path / "sv")
    out = tmp_path / "bg.safetensors"
    assert main(["background", str(speakers_dir), "--out", str(out), "--backend", "wavlm", "--checkpoint",
                 str(checkpoint), "--xvector", "30,10"]) == 0
    bg = load_background(out, f"wavlm:{Path(checkpoint).name}")
    assert (bg.speakers, bg.dims, bg.mean.shape) == (len(VOICES), len(VOICES) - 1, (16,))
    assert len(loads) == 1
    with pytest.raises(BackgroundError, match="same backend"):
        load_background(out, "resemblyzer")


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refusing an option
        code = int(e.code or 0)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("streamwavlm background: error: ")
    return err


@needs_espeak
def test_background_command_mistakes_are_one_line(speakers_dir, tmp_path, capsys):
    err = _one_line_error(["background", str(tmp_path / "missing")], capsys)
    assert "no such directory" in err
    err = _one_line_error(["background", str(speakers_dir / "voice0.wav")], capsys)
    assert "not a directory" in err
    few = tmp_path / "few"
    few.mkdir()
    for name in ("voice0.wav", "voice1.wav", "voice2.wav"):
        (few / name).write_bytes((speakers_dir / name).read_bytes())
    err = _one_line_error(["background", str(few)], capsys)
    assert f"3 speakers with audio files, a background needs at least {MIN_SPEAKERS}" in err
    for i in range(MIN_SPEAKERS):
        (few / f"extra{i}.wav").write_text("not audio\n")
    assert "extra0.wav: cannot read audio" in _one_line_error(["background", str(few)], capsys)
    err = _one_line_error(["background", str(speakers_dir), "--out", str(tmp_path / "missing" / "bg")], capsys)
    assert "cannot write the background there" in err
    assert "--dims: 0 must be greater than 0" in _one_line_error(["background", str(speakers_dir), "--dims", "0"],
                                                                  capsys)
    assert not (tmp_path / "background.safetensors").exists()


@needs_espeak
def test_speakers_without_speech_are_named_or_refused(speakers_dir, tmp_path, capsys):
    pytest.importorskip("resemblyzer")
    silent = tmp_path / "silent"
    silent.mkdir()
    for i in range(MIN_SPEAKERS + 1):
        sf.write(silent / f"quiet{i}.wav", np.zeros(3 * 16000, np.float32), 16000)
    # the installed entry point, so that a library's warning on stderr would show (webrtcvad's did)
    exe = shutil.which("streamwavlm", path=str(ROOT / ".venv" / "bin")) or shutil.which("streamwavlm")
    if exe is None:
        pytest.skip("the streamwavlm entry point is not installed")
    proc = subprocess.run([exe, "background", str(silent), "--out", str(tmp_path / "bg")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"0 of {MIN_SPEAKERS + 1} speakers have speech" in proc.stderr
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for path in [*speakers_dir.glob("voice[0-7].wav"), silent / "quiet0.wav"]:
        (mixed / path.name).write_bytes(path.read_bytes())
    assert main(["background", str(mixed), "--out", str(tmp_path / "bg")]) == 0
    printed = capsys.readouterr().out
    assert "from 8 speakers" in printed and "left out 1 with too little speech: quiet0" in printed


def test_a_background_file_is_readable_as_the_umask_allows(tmp_path):
    """safetensors creates files as 0600 whatever the umask; ours get 0666 & ~umask like any other file."""
    import os

    from streamwavlm.diarization.background import learn

    rng = np.random.default_rng(0)
    bg = learn(rng.standard_normal((40, 6)), np.repeat(np.arange(10), 4), "synthetic", dims=3)
    old = os.umask(0o022)
    try:
        bg.save(tmp_path / "bg.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "bg.safetensors").stat().st_mode & 0o777 == 0o644
