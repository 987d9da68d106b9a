"""Checkpoint formats: conversion round trips, both weight-norm spellings, and refusal of bad files."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from streamwavlm.checkpoint import CheckpointError, convert, load_model, read_checkpoint
from streamwavlm.cli import main as cli_main


def _outputs(model, wav):
    with torch.no_grad():
        return model(wav[None]).hidden_states


def _same(a, b, tol=1e-5):
    assert max((x - y).abs().max().item() for x, y in zip(a, b, strict=True)) < tol


@pytest.mark.parametrize("kind", ["base", "large"])
def test_hf_to_original_round_trip(hf_models, speech, tmp_path, kind):
    ref_model, directory = hf_models[kind]
    pt = convert(directory, tmp_path / "wavlm.pt", "original")
    raw = read_checkpoint(pt)
    assert raw.format == "original"
    assert raw.config == read_checkpoint(directory).config.replace(normalize_eps=1e-5)
    assert "encoder.pos_conv.0.weight_g" in raw.state and "mask_emb" in raw.state
    # the cfg holds plain types only: it loads under weights_only=True
    assert isinstance(torch.load(pt, weights_only=True)["cfg"], dict)
    with torch.no_grad():
        ref = ref_model(speech[None], output_hidden_states=True).hidden_states
    _same(ref, _outputs(load_model(pt), speech), tol=1e-4)
    back = convert(pt, tmp_path / "back", "hf")
    _same(_outputs(load_model(pt), speech), _outputs(load_model(back), speech), tol=1e-6)


@pytest.mark.parametrize("spelling", ["legacy", "parametrizations"])
@pytest.mark.parametrize("safe", [True, False])
def test_hf_directories_load_with_either_spelling(hf_models, speech, tmp_path, spelling, safe):
    _, directory = hf_models["base"]
    out = convert(directory, tmp_path / "d", "hf", weight_norm=spelling, safetensors=safe)
    keys = set(read_checkpoint(out).state)
    g_key = ("encoder.pos_conv_embed.conv.weight_g" if spelling == "legacy"
             else "encoder.pos_conv_embed.conv.parametrizations.weight.original0")
    assert g_key in keys
    assert (out / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    _same(_outputs(load_model(directory), speech), _outputs(load_model(out), speech), tol=1e-6)


def test_transformers_loads_our_hf_output(hf_models, speech, tmp_path):
    """A directory we write is a valid transformers checkpoint (both directions agree)."""
    from transformers import WavLMModel

    ref_model, directory = hf_models["large"]
    pt = convert(directory, tmp_path / "w.pt", "original")
    out = convert(pt, tmp_path / "hf", "hf", weight_norm="parametrizations")
    reloaded = WavLMModel.from_pretrained(out).eval()
    with torch.no_grad():
        a = ref_model(speech[None]).last_hidden_state
        b = reloaded(speech[None]).last_hidden_state
    assert (a - b).abs().max() < 1e-6


def test_task_model_prefix_and_speaker_head(tmp_path):
    from conftest import perturb_, save_hf_model, tiny_hf_config
    from transformers import WavLMForXVector

    model = perturb_(WavLMForXVector(tiny_hf_config("base", tdnn_dim=(16, 16, 16, 16, 32),
                                                    xvector_output_dim=8)))
    directory = save_hf_model(model, tmp_path / "sv")
    assert any(k.startswith("wavlm.") for k in read_checkpoint(directory).state)
    assert load_model(directory).xvector is not None
    with pytest.raises(CheckpointError, match="speaker head"):
        convert(directory, tmp_path / "x.pt", "original")
    pt = convert(directory, tmp_path / "x.pt", "original", backbone_only=True)
    assert load_model(pt).xvector is None


# ----------------------------------------------------------------------------- refusals
@pytest.fixture
def original_pt(hf_models, tmp_path):
    return convert(hf_models["base"][1], tmp_path / "good.pt", "original")


def test_truncated_original_is_refused(original_pt, tmp_path):
    data = original_pt.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"(?s)truncated or corrupt.*Download it again"):
        load_model(bad)


def test_truncated_safetensors_is_refused(hf_models, tmp_path):
    out = convert(hf_models["base"][1], tmp_path / "d", "hf")
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors"):
        load_model(out)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-checkpoint",))


def test_pickle_with_arbitrary_object_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    torch.save({"cfg": {}, "model": {}, "x": _Exploit()}, bad)
    with pytest.raises(CheckpointError, match=r"refused to load.*posix.system.*arbitrary code"):
        load_model(bad)
    raw_pickle = tmp_path / "evil.pkl"
    with open(raw_pickle, "wb") as f:
        pickle.dump({"cfg": {}, "model": {}, "x": _Exploit()}, f)
    with pytest.raises(CheckpointError):
        load_model(raw_pickle)
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_missing_and_unexpected_keys_are_refused(original_pt, tmp_path):
    ckpt = torch.load(original_pt, weights_only=True)
    del ckpt["model"]["encoder.layers.1.fc1.weight"]
    torch.save(ckpt, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing \['encoder.layers.1.ffn.fc1.weight'\]"):
        load_model(tmp_path / "missing.pt")
    ckpt = torch.load(original_pt, weights_only=True)
    ckpt["model"]["encoder.extra.weight"] = torch.zeros(3)
    torch.save(ckpt, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*encoder.extra.weight"):
        load_model(tmp_path / "extra.pt")


def test_wrong_shapes_are_refused(original_pt, tmp_path):
    ckpt = torch.load(original_pt, weights_only=True)
    ckpt["cfg"]["encoder_ffn_embed_dim"] = 128  # the weights say 96
    torch.save(ckpt, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"wrong shapes.*fc1.weight"):
        load_model(tmp_path / "shape.pt")


def test_non_wavlm_config_is_refused(original_pt, tmp_path):
    ckpt = torch.load(original_pt, weights_only=True)
    ckpt["cfg"]["gru_rel_pos"] = False
    torch.save(ckpt, tmp_path / "hubert.pt")
    with pytest.raises(CheckpointError, match="gru_rel_pos=False"):
        load_model(tmp_path / "hubert.pt")


def test_nan_weights_and_non_checkpoints_are_refused(original_pt, tmp_path):
    ckpt = torch.load(original_pt, weights_only=True)
    ckpt["model"]["encoder.layers.0.fc2.bias"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_model(tmp_path / "nan.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an original WavLM checkpoint"):
        load_model(tmp_path / "other.pt")
    (tmp_path / "hfdir").mkdir()
    (tmp_path / "hfdir" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path / "hfdir")


def test_cli_reports_checkpoint_errors_cleanly(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    assert cli_main(["info", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and "Traceback" not in err


def test_cli_info_and_convert(hf_models, tmp_path, capsys):
    _, directory = hf_models["large"]
    assert cli_main(["convert", str(directory), str(tmp_path / "l.pt"), "--to", "original"]) == 0
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "l.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "original" and info["variant"].startswith("pre-LN")
    assert info["parameters"] == sum(t.numel() for t in load_model(tmp_path / "l.pt").state_dict().values())
    assert "NO final LayerNorm" in info["layer_outputs"]
