"""A local HTTP server that answers like the Hugging Face Hub's ``resolve`` endpoint, for offline tests.

Point ``HF_ENDPOINT`` at :attr:`FakeHub.url`. It serves ``/<repo>/resolve/main/<file>`` for HEAD and GET with
the headers huggingface_hub reads: ``X-Repo-Commit``, an ``ETag`` that is the git blob id of a small file, and
``X-Linked-Etag`` / ``X-Linked-Size`` (the sha256 and size) of a large (LFS) file; a missing file is a 404
with ``X-Error-Code: EntryNotFound``, an unknown repository ``RepoNotFound``. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_FROM = 10_000  # files at least this large are served as LFS files


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    claimed_sha256: dict[str, str] = field(default_factory=dict)  # lie about a file's hash (corruption tests)
    cut_after: dict[str, int] = field(default_factory=dict)  # send only this many body bytes, then close


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        hub.requests.append((self.command, path))
        repo_id, sep, name = path.lstrip("/").partition("/resolve/main/")
        repo = hub.repos.get(repo_id)
        data = repo.files.get(name) if repo is not None and sep else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound" if repo is None else "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(data)))
        if len(data) >= LFS_FROM:
            sha = repo.claimed_sha256.get(name) or hashlib.sha256(data).hexdigest()  # type: ignore[union-attr]
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
        else:
            self.send_header("ETag", f'"{git_blob_id(data)}"')
        self.end_headers()
        if body:
            cut = repo.cut_after.get(name)  # type: ignore[union-attr]
            self.wfile.write(data if cut is None else data[:cut])
            if cut is not None:
                self.close_connection = True


class FakeHub:
    """``with FakeHub() as hub: hub.add("owner/name", directory)``; ``hub.url`` is the endpoint."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    def add(self, repo_id: str, directory: Path) -> Repo:
        repo = Repo({p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()})
        self.repos[repo_id] = repo
        return repo

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
