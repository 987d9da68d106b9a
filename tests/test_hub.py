"""Models by name through huggingface_hub, against a local server standing in for the Hub (``HF_ENDPOINT``),
and offline mode (``HF_HUB_OFFLINE``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fake_hub import COMMIT, FakeHub

from streamwavlm import download as dl
from streamwavlm import hub
from streamwavlm.checkpoint import CheckpointError, load_model


@pytest.fixture
def fake_hub(hf_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The tiny base model published as ``test-org/wavlm-tiny`` and as ``microsoft/wavlm-base-plus``; an empty
    Hugging Face cache; online."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub() as server:
        for repo in ("test-org/wavlm-tiny", "microsoft/wavlm-base-plus"):
            server.add(repo, hf_models["base"][1])
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    wav = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(wav).last_hidden_state, b(wav).last_hidden_state, rtol=0, atol=0)


def test_repo_id_downloads_into_the_hf_cache_then_needs_no_network(fake_hub: FakeHub, hf_models,
                                                                    tmp_path: Path) -> None:
    model = load_model("test-org/wavlm-tiny")
    _same_model(model, load_model(hf_models["base"][1]))
    snapshot = tmp_path / "hf-cache" / "models--test-org--wavlm-tiny" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors",
                                                         "preprocessor_config.json"]
    fetched = [p for m, p in fake_hub.requests if m == "GET"]
    assert "/test-org/wavlm-tiny/resolve/main/pytorch_model.bin" not in fetched  # a 404 on HEAD: no GET
    assert fetched[-1] == "/test-org/wavlm-tiny/resolve/main/model.safetensors"  # the fallback weights

    n = len(fake_hub.requests)
    load_model("test-org/wavlm-tiny")
    assert len(fake_hub.requests) == n  # cached: no network at all


def test_registry_name_resolves_to_its_repo(fake_hub: FakeHub, hf_models) -> None:
    _same_model(load_model("wavlm-base-plus"), load_model(hf_models["base"][1]))
    assert any(p.startswith("/microsoft/wavlm-base-plus/") for _, p in fake_hub.requests)
    assert dl.cached_path("wavlm-base-plus") == dl.verify("wavlm-base-plus")


def test_offline_and_missing_is_one_line_saying_what_to_run(fake_hub: FakeHub,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as e:
        load_model("test-org/wavlm-tiny")
    message = str(e.value)
    assert "\n" not in message
    assert "HF_HUB_OFFLINE" in message and "streamwavlm download test-org/wavlm-tiny" in message
    assert fake_hub.requests == []

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    load_model("test-org/wavlm-tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    load_model("test-org/wavlm-tiny")  # cached: offline is fine


def test_unreachable_hub_is_one_line(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    import time

    monkeypatch.setattr(time, "sleep", lambda _s: None)  # huggingface_hub backs off between its retries
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(dl.NetworkError) as e:
        dl.download("test-org/wavlm-tiny", timeout=2, progress=False)
    assert "\n" not in str(e.value) and "cannot be reached" in str(e.value)
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]  # no retry chatter


def test_unknown_repository_and_mistyped_paths(fake_hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such repository"):
        load_model("test-org/no-such-model")
    n = len(fake_hub.requests)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_model(str(tmp_path / "models" / "wavlm.pt"))  # a path, not a repository: no network
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_model("models/wavlm.pt")
    assert len(fake_hub.requests) == n


def test_a_file_that_is_not_what_the_hub_declared_is_deleted(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.repos["test-org/wavlm-tiny"].claimed_sha256["model.safetensors"] = "0" * 64
    with pytest.raises(dl.IntegrityError, match="is not the Hub sha256") as e:
        dl.download("test-org/wavlm-tiny", progress=False)
    assert "\n" not in str(e.value)
    blobs = tmp_path / "hf-cache" / "models--test-org--wavlm-tiny" / "blobs"
    assert not (blobs / ("0" * 64)).exists()
    assert dl.cached_path("test-org/wavlm-tiny") is None


def test_an_interrupted_transfer_is_one_line_and_resumes(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setattr(time, "sleep", lambda _s: None)  # huggingface_hub waits 1 s between its retries
    repo = fake_hub.repos["test-org/wavlm-tiny"]
    repo.cut_after["model.safetensors"] = 20_000
    with pytest.raises(dl.NetworkError, match="interrupted") as e:
        dl.download("test-org/wavlm-tiny", progress=False)
    assert "\n" not in str(e.value)
    del repo.cut_after["model.safetensors"]
    path = dl.download("test-org/wavlm-tiny", progress=False)
    assert dl.verify("test-org/wavlm-tiny") == path


def test_verify_rehashes_the_cached_blobs(fake_hub: FakeHub) -> None:
    path = dl.download("test-org/wavlm-tiny", progress=False)
    assert dl.verify("test-org/wavlm-tiny") == path
    config = (path / "config.json").resolve()
    data = config.read_bytes()
    config.write_bytes(data[:-1] + b" ")  # same size: only the hash can tell
    with pytest.raises(dl.IntegrityError, match="git blob id"):
        dl.verify("test-org/wavlm-tiny")
    assert dl.cached_path("test-org/wavlm-tiny") is None
    assert dl.download("test-org/wavlm-tiny", progress=False) == path  # fetched again
    assert (path / "config.json").read_bytes() == data


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamwavlm.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_cli_by_name_online_then_offline(fake_hub: FakeHub, tmp_path: Path) -> None:
    """The real environment variables, read by a fresh process as a user's shell would set them."""
    env = {"HF_HOME": str(tmp_path / "home"), "HF_ENDPOINT": fake_hub.url}
    offline = _cli(["info", "microsoft/wavlm-base-plus"], {**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert offline.stderr.count("\n") == 1 and "streamwavlm download microsoft/wavlm-base-plus" in offline.stderr

    online = _cli(["download", "wavlm-base-plus"], {**env, "HF_HUB_OFFLINE": "0"})
    assert online.returncode == 0, online.stderr
    snapshot = tmp_path / "home" / "hub" / "models--microsoft--wavlm-base-plus" / "snapshots" / COMMIT
    assert online.stdout == f"{snapshot}\n"
    assert _cli(["info", "wavlm-base-plus"], {**env, "HF_HUB_OFFLINE": "1"}).returncode == 0


def test_repo_ids() -> None:
    assert hub.is_repo_id("microsoft/wavlm-base-plus") and not hub.is_repo_id("wavlm-base-plus")
    assert not hub.is_repo_id("/abs/path") and not hub.is_repo_id("a/b/c")


def test_embed_with_the_default_model_name(fake_hub: FakeHub, hf_models) -> None:
    """The README's three lines: ``streamwavlm.embed(audio)`` fetches wavlm-base-plus by name, once."""
    import streamwavlm
    from streamwavlm.embedding import _named_model

    _named_model.cache_clear()
    wav = torch.randn(8000, generator=torch.Generator().manual_seed(1)) * 0.1
    e = streamwavlm.embed(wav, device="cpu")
    with torch.no_grad():
        ref = load_model(hf_models["base"][1])(wav[None]).last_hidden_state[0]
    torch.testing.assert_close(e.hidden_states[0], ref, rtol=1e-4, atol=1e-5)
    n = len(fake_hub.requests)
    streamwavlm.embed(wav, device="cpu")
    assert len(fake_hub.requests) == n  # loaded once per process
    _named_model.cache_clear()
