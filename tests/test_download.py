"""``streamwavlm download`` of the original ``.pt`` files against a local HTTP server: resume, verification,
offline messages, CLI. (Hub models go through huggingface_hub: tests/test_hub.py.)

The server (http.server in a thread on 127.0.0.1, a free port) serves random bytes with ``Range`` support
and records every request, so the tests can assert what was asked for and how many bytes were sent.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import random
import re
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from streamwavlm import download as dl

SIZE = 300_000  # bytes per served file: small, so the whole module runs in about a second


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # extra response headers per path
    redirects: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)  # path: (target, headers)
    truncate: dict[str, int] = field(default_factory=dict)  # path -> bytes actually sent of the body
    errors: dict[str, int] = field(default_factory=dict)  # path -> HTTP error status to answer
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    sent: dict[str, int] = field(default_factory=dict)  # body bytes sent per path


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        rng = self.headers.get("Range")
        state.requests.append((path, rng))
        if path in state.redirects:
            target, extra = state.redirects[path]
            self.send_response(302)
            self.send_header("Location", target)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = state.files.get(path)
        if data is None or path in state.errors:
            self.send_error(state.errors.get(path, 404))
            return
        start, status = 0, 200
        if rng and not state.ignore_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            assert m, rng
            start = int(m[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for k, v in state.headers.get(path, {}).items():
            self.send_header(k, v)
        self.end_headers()
        n = state.truncate.get(path, len(body))
        state.sent[path] = state.sent.get(path, 0) + n  # first: the client may be done before we return
        self.wfile.write(body[:n])


@dataclass
class Server:
    url: str
    state: ServerState


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may touch the real cache, the real hub or a proxy."""
    monkeypatch.setenv(dl.CACHE_ENV, str(tmp_path / "default-cache"))
    for var in (dl.BASE_URL_ENV, "HF_ENDPOINT", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state)  # type: ignore[attr-defined]
    finally:
        httpd.shutdown()
        httpd.server_close()


def _blob(seed: int, size: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(size)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: connecting is refused


def _manifest(model_dir: Path) -> dict:
    return json.loads((model_dir / dl.MANIFEST).read_text())


PT = "/unilm-wavlm-base/WavLM-Base.pt"


def test_redirect_keeps_range_and_its_target_etag_is_no_sha256(server: Server, tmp_path: Path) -> None:
    data = _blob(11)
    server.state.redirects[PT] = ("/cdn/other", {})
    server.state.files["/cdn/other"] = data
    server.state.headers["/cdn/other"] = {"ETag": '"' + "f" * 64 + '"'}
    (tmp_path / "unilm-wavlm-base").mkdir()
    (tmp_path / "unilm-wavlm-base" / "WavLM-Base.pt.part").write_bytes(data[:1000])
    path = dl.download("unilm-wavlm-base", tmp_path, base_url=server.url, progress=False)
    assert path.read_bytes() == data
    assert server.state.requests == [(PT, "bytes=1000-"), ("/cdn/other", "bytes=1000-")]  # Range follows
    assert _manifest(path.parent)["files"][path.name]["verified_against"] == "server size (Content-Range)"


def test_resume_sends_range_and_transfers_only_the_rest(server: Server, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    data = _blob(2)
    server.state.files[PT] = data
    model_dir = tmp_path / "unilm-wavlm-base"
    model_dir.mkdir()
    done = 120_000
    (model_dir / "WavLM-Base.pt.part").write_bytes(data[:done])

    path = dl.download("unilm-wavlm-base", tmp_path, base_url=server.url)

    assert path == model_dir / "WavLM-Base.pt" and path.read_bytes() == data
    assert server.state.requests == [(PT, f"bytes={done}-")]
    assert server.state.sent[PT] == len(data) - done
    assert not (model_dir / "WavLM-Base.pt.part").exists()
    assert _manifest(model_dir)["files"]["WavLM-Base.pt"]["sha256"] == _sha(data)
    assert capsys.readouterr().err == ""  # no progress bar off a terminal


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    data = _blob(3)
    server.state.files[PT] = data
    server.state.ignore_range = True
    model_dir = tmp_path / "unilm-wavlm-base"
    model_dir.mkdir()
    (model_dir / "WavLM-Base.pt.part").write_bytes(b"stale bytes of something else")

    path = dl.download("unilm-wavlm-base", tmp_path, base_url=server.url, progress=False)

    assert path.read_bytes() == data  # the 200 body replaced the .part instead of being appended to it
    assert server.state.sent[PT] == len(data)


def test_complete_part_is_finished_on_416(server: Server, tmp_path: Path) -> None:
    data = _blob(4)
    server.state.files[PT] = data
    model_dir = tmp_path / "unilm-wavlm-base"
    model_dir.mkdir()
    (model_dir / "WavLM-Base.pt.part").write_bytes(data)

    path = dl.download("unilm-wavlm-base", tmp_path, base_url=server.url, progress=False)

    assert path.read_bytes() == data
    assert server.state.sent.get(PT, 0) == 0


def test_part_longer_than_the_file_is_discarded(server: Server, tmp_path: Path) -> None:
    data = _blob(5)
    server.state.files[PT] = data
    model_dir = tmp_path / "unilm-wavlm-base"
    model_dir.mkdir()
    (model_dir / "WavLM-Base.pt.part").write_bytes(data + b"junk")

    path = dl.download("unilm-wavlm-base", tmp_path, base_url=server.url, progress=False)

    assert path.read_bytes() == data
    assert server.state.requests == [(PT, f"bytes={len(data) + 4}-"), (PT, None)]


def test_checksum_mismatch_is_refused_and_nothing_installed(server: Server, tmp_path: Path) -> None:
    data = _blob(6)
    server.state.files[PT] = data
    server.state.headers[PT] = {"ETag": f'"{_sha(b"another file")}"'}

    with pytest.raises(dl.IntegrityError, match="sha256 mismatch") as e:
        dl.download("unilm-wavlm-base", tmp_path, base_url=server.url, progress=False)

    assert _sha(data) in str(e.value) and _sha(b"another file") in str(e.value) and "ETag" in str(e.value)
    model_dir = tmp_path / "unilm-wavlm-base"
    assert not (model_dir / "WavLM-Base.pt").exists() and not (model_dir / "WavLM-Base.pt.part").exists()
    assert dl.cached_path("unilm-wavlm-base", tmp_path) is None


def test_registry_values_are_checked(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _blob(7)
    server.state.files[PT] = data
    spec = dl.REGISTRY["unilm-wavlm-base"]
    known = dl.RemoteFile("WavLM-Base.pt", size=len(data), sha256=_sha(data))
    monkeypatch.setitem(dl.REGISTRY, spec.name, dl.ModelSpec(spec.name, spec.summary, ((known,),)))
    path = dl.download(spec.name, tmp_path, base_url=server.url, progress=False)
    assert _manifest(path.parent)["files"][path.name]["verified_against"] == "registry sha256"

    # a server announcing another size is refused before anything is written
    wrong = dl.RemoteFile("WavLM-Base.pt", size=len(data) + 1)
    monkeypatch.setitem(dl.REGISTRY, spec.name, dl.ModelSpec(spec.name, spec.summary, ((wrong,),)))
    with pytest.raises(dl.IntegrityError, match=r"size mismatch.*declares"):
        dl.download(spec.name, tmp_path, base_url=server.url, force=True, progress=False)
    assert not list(path.parent.glob("WavLM-Base.pt*"))  # neither a final nor a partial file


def test_truncated_body_keeps_part_and_next_run_resumes(server: Server, tmp_path: Path) -> None:
    data = _blob(8)
    server.state.files[PT] = data
    server.state.truncate[PT] = 100_000  # Content-Length says SIZE, the connection closes after 100 kB
    model_dir = tmp_path / "unilm-wavlm-base"

    with pytest.raises(dl.DownloadError, match=rf"incomplete download.*got 100000 of {SIZE} bytes.*resume"):
        dl.download("unilm-wavlm-base", tmp_path, base_url=server.url, progress=False)
    assert not (model_dir / "WavLM-Base.pt").exists()
    assert (model_dir / "WavLM-Base.pt.part").read_bytes() == data[:100_000]

    del server.state.truncate[PT]
    path = dl.download("unilm-wavlm-base", tmp_path, base_url=server.url, progress=False)
    assert path.read_bytes() == data
    assert server.state.requests[-1] == (PT, "bytes=100000-")


def test_connection_refused_says_where_to_put_the_file(tmp_path: Path) -> None:
    url = _refused_url()
    with pytest.raises(dl.NetworkError) as e:
        dl.download("unilm-wavlm-large", tmp_path, base_url=url, timeout=5, progress=False)
    msg = str(e.value)
    assert f"cannot reach {url}/unilm-wavlm-large/WavLM-Large.pt" in msg
    assert str(tmp_path / "unilm-wavlm-large" / "WavLM-Large.pt") in msg
    assert "--checkpoint PATH" in msg and "drive.google.com" in msg  # the manual mirror is named
    assert "\n" not in msg


def test_http_error_names_the_url_and_the_source_caveat(server: Server, tmp_path: Path) -> None:
    server.state.files[PT] = b"x"
    server.state.errors[PT] = 403  # what Azure answers once the README's SAS token is revoked
    with pytest.raises(dl.DownloadError, match=r"WavLM-Base\.pt answered HTTP 403") as e:
        dl.download("unilm-wavlm-base", tmp_path, base_url=server.url, progress=False)
    assert "SAS token" in str(e.value) and "drive.google.com" in str(e.value)

    with pytest.raises(dl.DownloadError, match="not found at the source"):
        dl.download("unilm-wavlm-large", tmp_path, base_url=server.url, progress=False)


def test_files_put_by_hand_are_registered_without_network(tmp_path: Path) -> None:
    model_dir = tmp_path / "unilm-wavlm-base-plus"
    model_dir.mkdir()
    (model_dir / "WavLM-Base+.pt").write_bytes(b"a checkpoint copied from elsewhere")

    path = dl.download("unilm-wavlm-base-plus", tmp_path, base_url=_refused_url(), progress=False)

    assert path == model_dir / "WavLM-Base+.pt"
    entry = _manifest(model_dir)["files"]["WavLM-Base+.pt"]
    assert entry["verified_against"] == "none (placed by hand)"
    assert entry["sha256"] == _sha(b"a checkpoint copied from elsewhere")
    assert dl.verify("unilm-wavlm-base-plus", tmp_path) == path


def test_a_cached_file_that_changed_size_is_fetched_again(server: Server, tmp_path: Path) -> None:
    data = _blob(13)
    server.state.files[PT] = data
    path = dl.download("unilm-wavlm-base", tmp_path, base_url=server.url, progress=False)
    path.write_bytes(data[:1000])  # damaged on disk: the manifest still has the full size and its sha256
    assert dl.cached_path("unilm-wavlm-base", tmp_path) is None

    assert dl.download("unilm-wavlm-base", tmp_path, base_url=server.url, progress=False) == path
    assert path.read_bytes() == data and server.state.requests == [(PT, None), (PT, None)]


def test_verify_deletes_a_corrupted_file(server: Server, tmp_path: Path) -> None:
    data = _blob(9)
    server.state.files["/unilm-wavlm-base-plus/WavLM-Base+.pt"] = data
    path = dl.download("unilm-wavlm-base-plus", tmp_path, base_url=server.url, progress=False)
    assert server.state.requests == [("/unilm-wavlm-base-plus/WavLM-Base+.pt", None)]  # '+' quoted, served
    assert dl.verify("unilm-wavlm-base-plus", tmp_path) == path
    path.write_bytes(b"X" + data[1:])  # same size: only the hash can tell

    with pytest.raises(dl.IntegrityError, match=r"sha256 mismatch, file.*deleted"):
        dl.verify("unilm-wavlm-base-plus", tmp_path)
    assert not path.exists() and dl.cached_path("unilm-wavlm-base-plus", tmp_path) is None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamwavlm")
    dl.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_download_prints_the_path(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    data = _blob(10)
    server.state.files[PT] = data
    monkeypatch.setenv(dl.BASE_URL_ENV, server.url)  # the environment variable works like --base-url
    assert _run(["download", "unilm-wavlm-base", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out == f"{tmp_path / 'unilm-wavlm-base' / 'WavLM-Base.pt'}\n"

    assert _run(["download", "unilm-wavlm-base", "--cache-dir", str(tmp_path), "--verify"]) == 0
    assert _run(["download", "--list", "--cache-dir", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "wavlm-base-plus-sv" in listing and f"cached: {tmp_path / 'unilm-wavlm-base'}" in listing

    assert _run(["download", "unilm-wavlm-large", "--cache-dir", str(tmp_path), "--base-url",
                 _refused_url(), "--timeout", "5"]) == dl.EXIT_OFFLINE
    assert "put the file(s) here" in capsys.readouterr().err
    assert _run(["download"]) == dl.EXIT_USAGE
    assert _run(["download", "no-such-model"]) == dl.EXIT_USAGE
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_cli_main_routes_to_download(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamwavlm import cli

    for module in cli.COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            pytest.skip(f"{module} does not exist yet")
    assert cli.main(["download", "--list", "--cache-dir", str(tmp_path)]) == 0
    assert "unilm-wavlm-large" in capsys.readouterr().out


def test_default_cache_root_comes_from_the_environment(tmp_path: Path) -> None:
    assert dl.cache_root() == tmp_path / "default-cache"
    assert dl.cache_root(tmp_path / "x") == tmp_path / "x"
