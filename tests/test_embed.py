"""``streamwavlm.embed`` and ``streamwavlm embed``: outputs equal the model's offline forward over each file
alone, whatever the batching; the saved files hold exactly those tensors, with an index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.numpy import load_file, safe_open

import streamwavlm
from streamwavlm import cli
from streamwavlm.audio.files import load_audio
from streamwavlm.checkpoint import load_model
from streamwavlm.embedding import batches

LENGTHS = {"a.wav": 7000, "sub/b.flac": 12000, "sub/c.wav": 7000, "d.wav": 9500}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four files of three lengths in a tree; one FLAC at 44.1 kHz stereo."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for name, n in LENGTHS.items():
        path = root / name
        path.parent.mkdir(exist_ok=True)
        if name.endswith(".flac"):
            sf.write(path, 0.2 * rng.standard_normal((n * 441 // 160, 2)), 44100, subtype="PCM_16")
        else:
            sf.write(path, 0.2 * rng.standard_normal(n), 16000, subtype="FLOAT")
    (root / "notes.txt").write_text("not audio: skipped")
    return root


def _reference(model: torch.nn.Module, wav: np.ndarray, layers: tuple[int, ...]) -> torch.Tensor:
    with torch.no_grad():
        states = model(torch.from_numpy(wav)[None]).layers("hf4")
    return torch.stack([states[i][0] for i in layers])


@pytest.mark.parametrize("kind", ["base", "large"])
def test_batched_embeddings_equal_the_offline_forward_of_each_file(kind: str, hf_models, corpus: Path) -> None:
    model = load_model(hf_models[kind][1])
    results = streamwavlm.embed(corpus, model, layers=(0, 2, 3), batch_size=3)
    assert [Path(r.source).relative_to(corpus).as_posix() for r in results] == sorted(LENGTHS)
    for r in results:
        wav = load_audio(r.source)
        ref = _reference(model, wav, (0, 2, 3))
        assert r.layers == (0, 2, 3) and r.frames == model.cfg.num_frames(len(wav)) == ref.shape[1]
        torch.testing.assert_close(r.hidden_states, ref, rtol=1e-4, atol=1e-5)
    assert r.times()[1] == pytest.approx(0.02)


def test_group_norm_models_batch_only_equal_lengths() -> None:
    lengths = [7000, 12000, 7000, 9500, 7000]
    assert list(batches(lengths, 2, equal_lengths_only=False)) == [[0, 2], [4, 3], [1]]
    assert list(batches(lengths, 2, equal_lengths_only=True)) == [[0, 2], [4], [3], [1]]


def test_three_lines_with_a_path_or_an_array(hf_models, corpus: Path) -> None:
    directory = str(hf_models["large"][1])
    e = streamwavlm.embed(corpus / "a.wav", model=directory)
    assert e.hidden_states.shape == (1, e.frames, 64) and e.layers == (3,)
    wav = load_audio(corpus / "a.wav")
    pcm = np.round(wav * 32767).astype(np.int16)  # int16 PCM is scaled, like a file
    from_array = streamwavlm.embed(pcm, model=directory)
    torch.testing.assert_close(from_array.hidden_states, e.hidden_states, rtol=0, atol=2e-3)
    resampled = streamwavlm.embed(load_audio(corpus / "sub/b.flac"), model=directory)
    at_8k = streamwavlm.embed(load_audio(corpus / "sub/b.flac")[::2].copy(), model=directory, sample_rate=8000)
    assert at_8k.frames == resampled.frames  # an 8 kHz array is resampled to 16 kHz first


def _cli(*argv: str) -> int:
    return cli.main(list(argv))


def test_cli_writes_per_file_outputs_with_an_index(hf_models, corpus: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    directory = hf_models["base"][1]
    model = load_model(directory)
    assert _cli("embed", str(corpus), "--checkpoint", str(directory), "--out", str(tmp_path / "npy"),
                "--layers", "1,3") == 0
    assert capsys.readouterr().out == f"{tmp_path / 'npy' / 'index.json'}\n"
    index = json.loads((tmp_path / "npy" / "index.json").read_text())
    assert [e["files"] for e in index] == [["a.npy"], ["d.npy"], ["sub/b.npy"], ["sub/c.npy"]]
    for entry in index:
        saved = np.load(tmp_path / "npy" / entry["files"][0])
        ref = _reference(model, load_audio(entry["source"]), (1, 3))
        assert saved.shape == (2, entry["frames"], entry["dim"]) and entry["frame_rate"] == 50.0
        np.testing.assert_allclose(saved, ref.numpy(), rtol=1e-4, atol=1e-5)

    assert _cli("embed", str(corpus / "a.wav"), str(corpus / "sub"), "--checkpoint", str(directory), "--out",
                str(tmp_path / "st"), "--format", "safetensors", "--out-dtype", "float16") == 0
    st = load_file(str(tmp_path / "st" / "c.safetensors"))
    assert st["hidden_states"].dtype == np.float16
    np.testing.assert_allclose(st["hidden_states"], np.load(tmp_path / "npy" / "sub" / "c.npy")[1:], atol=2e-3)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_cli_writes_one_file_with_an_index(suffix: str, hf_models, corpus: Path, tmp_path: Path) -> None:
    directory = hf_models["large"][1]
    out = tmp_path / f"all{suffix}"
    assert _cli("embed", str(corpus), "--checkpoint", str(directory), "--out", str(out), "--batch-size", "4") == 0
    if suffix == ".safetensors":
        tensors = load_file(str(out))
        with safe_open(str(out), "np") as f:
            index = json.loads(f.metadata()["index"])
    else:
        tensors = dict(np.load(out))
        index = json.loads(str(tensors.pop("index")))
    expected = streamwavlm.embed(corpus, load_model(directory))
    assert [e["source"] for e in index] == [e.source for e in expected]
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(tensors[f"hidden_states.{i}"], e.hidden_states.numpy())


def test_xvectors(tmp_path: Path, corpus: Path) -> None:
    from conftest import perturb_, save_hf_model, tiny_hf_config
    from transformers import WavLMForXVector

    cfg = tiny_hf_config("large", tdnn_dim=(24, 24, 24, 24, 48), xvector_output_dim=16)
    directory = save_hf_model(perturb_(WavLMForXVector(cfg), seed=4), tmp_path / "sv")
    model = load_model(directory)
    results = streamwavlm.embed([corpus / "a.wav", corpus / "d.wav"], model, xvector=True)
    for r in results:
        with torch.no_grad():
            ref = model.xvector_embedding(model(torch.from_numpy(load_audio(r.source))[None]))[0]
        torch.testing.assert_close(r.xvector, ref, rtol=1e-4, atol=1e-5)
    assert _cli("embed", str(corpus / "a.wav"), "--checkpoint", str(directory), "--xvector", "--out",
                str(tmp_path / "xv")) == 0
    np.testing.assert_allclose(np.load(tmp_path / "xv" / "a.xvector.npy"), results[0].xvector.numpy(), atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--xvector"], "speaker head"),
    (["--layers", "9"], "out of range"),
])
def test_cli_mistakes_are_one_line(argv: list[str], message: str, hf_models, corpus: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _cli("embed", str(corpus / "a.wav"), "--checkpoint", str(hf_models["base"][1]), "--out",
                str(tmp_path / "o"), *argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cli_missing_input_and_no_audio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("embed", str(tmp_path / "missing.wav"), "--out", str(tmp_path / "o")) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _cli("embed", str(tmp_path / "empty"), "--out", str(tmp_path / "o")) == 2
    assert "no audio files" in capsys.readouterr().err
