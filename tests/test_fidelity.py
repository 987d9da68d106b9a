"""The fidelity tool: exact settings measure as exact, truncation ranks lower; the CLI's files and errors."""

from __future__ import annotations

import json

import pytest
import soundfile as sf

from streamwavlm import cli
from streamwavlm.checkpoint import load_model
from streamwavlm.streaming import NormPolicy, StreamSettings
from streamwavlm.streaming.fidelity import measure, settings_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def large(hf_models):
    """LayerNorm front end, no waveform normalisation: nothing utterance-level, so streaming can be exact."""
    model = load_model(hf_models["large"][1])
    assert not model.frontend.group_norm and not model.cfg.normalize
    return model


@pytest.fixture(scope="module")
def rows(large, speech):
    wav = speech[:16000]
    t = large.cfg.num_frames(wav.numel())
    exact = StreamSettings(chunk=t, left=t, lookahead=63)
    truncated = StreamSettings(chunk=4, left=8, lookahead=0)
    return measure(large, wav, [exact, truncated])


def test_exact_setting_measures_as_exact_at_every_layer(large, rows):
    exact = rows[0]
    assert len(exact.cosine) == len(exact.rel_error) == large.cfg.num_layers + 1
    for layer, (cos, err) in enumerate(zip(exact.cosine, exact.rel_error, strict=True)):
        assert cos > 0.99999 and err < 1e-4, f"layer {layer}: cosine {cos}, relative error {err}"
    assert exact.rtf > 0
    assert exact.latency_ms == exact.settings.latency_ms(large.cfg)


def test_truncated_setting_ranks_below_the_exact_one(rows):
    exact, truncated = rows
    assert truncated.cosine[-1] < exact.cosine[-1]
    assert truncated.worst_rel_error > exact.worst_rel_error
    assert truncated.latency_ms < exact.latency_ms


def test_default_grid_has_norm_policies_only_where_they_matter(hf_models, large):
    assert {s.norm for s in settings_grid(large)} == {NormPolicy.RUNNING}
    base = load_model(hf_models["base"][1])  # GroupNorm front end: running statistics are inexact
    grid = settings_grid(base)
    assert len(grid) == 3 * 2 * 3 * 2 and {s.norm for s in grid} == set(NormPolicy)


@pytest.fixture
def short_wav(speech, tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, speech[:12000].numpy(), 16000)
    return path


def test_cli_writes_table_png_and_json(hf_models, short_wav, tmp_path, capsys):
    png, js = tmp_path / "plots" / "f.png", tmp_path / "f.json"
    code = cli.main(["fidelity", str(hf_models["base"][1]), str(short_wav), "--chunk", "8", "--left", "16",
                     "--lookahead", "0,4", "--warmup", "0.3", "--png", str(png), "--json", str(js)])
    assert code == 0
    out = capsys.readouterr().out
    assert "worst rel err" in out and "frozen 0.3s" in out
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    report = json.loads(js.read_text())
    keys = {"checkpoint", "random_weights", "audio", "seconds", "frames", "num_layers", "rows"}
    assert keys <= report.keys()
    assert report["random_weights"] is False
    assert len(report["rows"]) == 2 * 2  # lookahead x {running, frozen} (a GroupNorm model)
    row = report["rows"][0]
    assert {"chunk", "left", "lookahead", "norm", "warmup", "latency_ms", "rtf", "cosine", "rel_error",
            "mean_cosine", "worst_rel_error"} <= row.keys()
    assert len(row["cosine"]) == len(row["rel_error"]) == report["num_layers"] + 1


def test_cli_refuses_unreadable_audio(hf_models, tmp_path, capsys):
    """(Any rate and channel count is accepted: tests/test_audio_loader.py.)"""
    path = tmp_path / "text.wav"
    path.write_text("not audio")
    code = cli.main(["fidelity", str(hf_models["large"][1]), str(path), "--png", str(tmp_path / "x.png")])
    assert code == 2
    assert "cannot read audio" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_refuses_a_lookahead_the_model_cannot_run(hf_models, short_wav, tmp_path, capsys):
    code = cli.main(["fidelity", str(hf_models["large"][1]), str(short_wav), "--lookahead", "64",
                     "--png", str(tmp_path / "x.png")])
    assert code == 2
    assert "lookahead must be in 0..63" in capsys.readouterr().err
