"""``streamwavlm download NAME``: fetch a released WavLM checkpoint into a local cache, verified; and
:func:`resolve`, which turns a model name into the local path that ``load_model`` reads.

Hugging Face repositories go through huggingface_hub (``hub.py``): its cache, offline mode, tokens and
endpoint are what our users already have configured. The original unilm ``.pt`` files are not on the Hub:
they come from a signed Azure URL, fetched here with urllib. They are 380 MB to 1.3 GB, so a download
resumes (HTTP ``Range``) instead of restarting, is checked against a known or server-declared size and
sha256 before it replaces anything, and records what it verified in a manifest next to the file so
``--verify`` can re-check it later without network.

Cache layout of the ``.pt`` files: ``<root>/<NAME>/<file>`` plus ``<root>/<NAME>/manifest.json``, root being
``--cache-dir``, ``$STREAMWAVLM_CACHE`` or ``~/.cache/streamwavlm``. A mirror given with ``--base-url`` serves
the same layout (``<base>/<NAME>/<file>``), so a copy of a cache directory behind any static file server is a
mirror. Hub models live in the Hugging Face cache (``--cache-dir``, else ``$HF_HUB_CACHE`` / ``$HF_HOME``).
"""

from __future__ import annotations

import argparse
import email.message
import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import IO, Any

from . import hub
from .errors import DownloadError, IntegrityError, NetworkError
from .progress import Bar

CACHE_ENV = "STREAMWAVLM_CACHE"
BASE_URL_ENV = "STREAMWAVLM_DOWNLOAD_BASE_URL"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
DEFAULT_TIMEOUT = 30.0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_OFFLINE = 3  # distinct so scripts can tell "no network" from "bad file"
_CHUNK = 1 << 20
_USER_AGENT = "streamwavlm-download (python-urllib)"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")

Manifest = dict[str, Any]
Entry = dict[str, Any]


__all__ = ["DownloadError", "IntegrityError", "NetworkError", "cached_path", "download", "resolve", "verify"]


@dataclass(frozen=True)
class RemoteFile:
    """One published file. ``size``/``sha256`` are set only where the true value is known: otherwise the
    server's own declaration (Content-Length, the Hub's LFS sha256 ETag) is the reference."""

    name: str
    size: int | None = None
    sha256: str | None = None
    url: str | None = None  # fixed source URL (a mirror given with --base-url replaces it)


@dataclass(frozen=True)
class ModelSpec:
    """A released model: a Hub repository (``hf_repo``, with any known sha256 per file in ``hf_sha256``), or
    the files of an original checkpoint, each a tuple of alternatives (the first the server has wins)."""

    name: str
    summary: str
    slots: tuple[tuple[RemoteFile, ...], ...] = ()
    hf_repo: str | None = None
    hf_sha256: tuple[tuple[str, str], ...] = ()
    note: str = ""  # caveats of the source, repeated in error messages
    manual: str = ""  # where a person can fetch the file by hand (named in the offline message)

    @property
    def source(self) -> str:
        if self.hf_repo is not None:
            endpoint = os.environ.get(hub.ENDPOINT_ENV) or DEFAULT_HF_ENDPOINT
            return f"{endpoint.rstrip('/')}/{self.hf_repo} (revision {hub.REVISION})"
        return (self.slots[0][0].url or "").split("?", 1)[0]

    def local_path(self, model_dir: Path) -> Path:
        """What ``--checkpoint`` takes for an original checkpoint: its ``.pt`` file."""
        return model_dir / self.slots[0][0].name

    def url(self, file: RemoteFile, base_url: str | None) -> str:
        if base_url or file.url is None:
            quote = urllib.parse.quote
            return f"{(base_url or '').rstrip('/')}/{quote(self.name)}/{quote(file.name)}"
        return file.url


# ------------------------------------------------------------------------------------------------ registry
# Original checkpoints: the "Azure Storage" links of https://github.com/microsoft/unilm/blob/master/wavlm/README.md
# They carry the read-only (sp=rl) SAS token published in that README, valid until 2033-03-02.
_UNILM_README = "https://github.com/microsoft/unilm/tree/master/wavlm"
_UNILM_BLOB = "https://valle.blob.core.windows.net/share/wavlm/"
_UNILM_SAS = (
    "sv=2020-08-04&st=2023-03-01T07%3A51%3A05Z&se=2033-03-02T07%3A51%3A00Z&sr=c&sp=rl"
    "&sig=QJXmSJG9DbMKf48UDIU1MfzIro8HQOf3sqlNXiflY1I%3D"
)


def _unilm(name: str, file: str, gdrive_id: str, summary: str) -> ModelSpec:
    note = (
        f"The source is the Azure link of the unilm README ({_UNILM_README}); it works only with the "
        "read-only SAS token published there (expires 2033-03-02) and answers HTTP 403 once that token is "
        f"revoked. The README's other mirror, https://drive.google.com/file/d/{gdrive_id}/view, cannot be "
        "fetched by a plain GET (Google Drive answers large files with a confirmation page): download it in "
        "a browser instead."
    )
    source = RemoteFile(file, url=f"{_UNILM_BLOB}{file}?{_UNILM_SAS}")
    return ModelSpec(name, summary, ((source,),), note=note,
                     manual=f"https://drive.google.com/file/d/{gdrive_id}/view, in a browser")


def _hub(name: str, repo: str, summary: str, bin_sha256: str | None = None) -> ModelSpec:
    # The files are those of hub.REQUIRED and hub.WEIGHTS; main of these repos serves pytorch_model.bin (read
    # with weights_only); their safetensors conversions exist only as unmerged pull requests today.
    return ModelSpec(name, summary, hf_repo=repo,
                     hf_sha256=(("pytorch_model.bin", bin_sha256),) if bin_sha256 else ())


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _unilm("unilm-wavlm-base", "WavLM-Base.pt", "1BhTPLUkfN6e2xkqR8LEm9lByXbLY1IYd",
               "WavLM Base, original unilm checkpoint"),
        _unilm("unilm-wavlm-base-plus", "WavLM-Base+.pt", "1-zlAj2SyVJVsbhifwpTlAfrgc9qu-HDb",
               "WavLM Base+, original unilm checkpoint"),
        _unilm("unilm-wavlm-large", "WavLM-Large.pt", "12-cB34qCTvByWT-QtOcZaqwwO21FLSqU",
               "WavLM Large, original unilm checkpoint"),
        # sha256: the Hub's "Git LFS details" of microsoft/wavlm-base main:pytorch_model.bin (commit 14e28e3)
        _hub("wavlm-base", "microsoft/wavlm-base", "WavLM Base, Hugging Face directory",
             bin_sha256="b41ab60fdcdc113ff164212c72b371dcd420a5773ca1f6c8f54d6809225ce072"),
        _hub("wavlm-base-plus", "microsoft/wavlm-base-plus", "WavLM Base+, Hugging Face directory"),
        _hub("wavlm-large", "microsoft/wavlm-large", "WavLM Large, Hugging Face directory"),
        _hub("wavlm-base-plus-sv", "microsoft/wavlm-base-plus-sv",
             "WavLM Base+ with the x-vector speaker-verification head, Hugging Face directory"),
    )
}


def _spec(name: str) -> ModelSpec:
    """The registry entry of ``name``, or an ad-hoc entry for any Hub repository id ``owner/name``."""
    spec = REGISTRY.get(name)
    if spec is not None:
        return spec
    if hub.is_repo_id(name):
        return ModelSpec(name, "Hugging Face repository", hf_repo=name)
    raise DownloadError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}, or a Hub repository id "
                        "such as microsoft/wavlm-base-plus")


def resolve(name: str, *, progress: bool = True) -> Path:
    """The local path of a checkpoint given as a path, a registry NAME or a Hub repository id.

    An existing path wins; a name is fetched into its cache if needed (see :func:`download`). This is what
    ``load_model`` and every ``--checkpoint`` option call, so ``load_model("wavlm-base-plus")`` works.
    """
    path = Path(name).expanduser()
    if path.exists() or not (name in REGISTRY or (hub.is_repo_id(name) and not _looks_like_path(path))):
        return path
    return download(name, progress=progress)


_FILE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".json"}


def _looks_like_path(path: Path) -> bool:
    """A missing ``dir/file.pt`` is a mistyped path, not a Hub repository to download."""
    return path.suffix in _FILE_SUFFIXES or path.parent.is_dir()


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$STREAMWAVLM_CACHE``, else ``~/.cache/streamwavlm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamwavlm"


# ------------------------------------------------------------------------------------------------ manifest
def _load_manifest(model_dir: Path) -> Manifest:
    """The manifest, or an empty one if missing or unreadable (its files are then re-hashed, not trusted)."""
    try:
        data = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        data = None
    valid = isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT
    return data if valid and isinstance(data.get("files"), dict) else {"format": MANIFEST_FORMAT, "files": {}}


def _save_manifest(model_dir: Path, spec: ModelSpec, manifest: Manifest) -> None:
    manifest.update(name=spec.name, source=spec.source)
    tmp = model_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, model_dir / MANIFEST)  # atomic: a crash never leaves a half-written manifest


def _cached_choice(model_dir: Path, manifest: Manifest, slot: tuple[RemoteFile, ...]) -> RemoteFile | None:
    """The alternative of ``slot`` that the manifest vouches for and that is still there at its size."""
    for file in slot:
        entry = manifest["files"].get(file.name)
        path = model_dir / file.name
        if isinstance(entry, dict) and path.is_file() and path.stat().st_size == entry.get("size"):
            return file
    return None


def cached_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The local path of ``name`` if all its files are in the cache at their recorded size (no hashing)."""
    spec = _spec(name)
    if spec.hf_repo is not None:
        files = hub.repo_files(spec.hf_repo, cache_dir)
        return files[0].parent if files else None
    model_dir = cache_root(cache_dir) / spec.name
    manifest = _load_manifest(model_dir)
    if all(_cached_choice(model_dir, manifest, slot) for slot in spec.slots):
        return spec.local_path(model_dir)
    return None


# ------------------------------------------------------------------------------------------------ HTTP
class _NotFound(Exception):
    """HTTP 404: the next alternative of the slot is tried."""


class _StatusError(DownloadError):
    """An HTTP error status other than 404 and 416 (e.g. 403 from an expired signed URL)."""


@dataclass(frozen=True)
class _Declared:
    """What the server says about the whole file, and which header said it (recorded in the manifest)."""

    size: int | None = None
    size_header: str | None = None
    sha256: str | None = None
    sha256_header: str | None = None


class _Unsatisfiable(Exception):
    """HTTP 416 to a ``Range`` request: the ``.part`` is not shorter than the file."""

    def __init__(self, declared: _Declared) -> None:
        super().__init__(declared)
        self.declared = declared


class _RedirectRecorder(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of every redirect response: the Hub puts the LFS sha256 (``X-Linked-Etag``) and
    size (``X-Linked-Size``) on its redirect to the CDN, and the CDN's response does not repeat them."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[email.message.Message] = []

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: email.message.Message, newurl: str) -> urllib.request.Request | None:
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _declared(redirects: list[email.message.Message], final: email.message.Message, status: int) -> _Declared:
    size: int | None = None
    size_header: str | None = None
    if status in (206, 416):
        m = _CONTENT_RANGE.fullmatch((final.get("Content-Range") or "").strip())
        if m and m[2] != "*":
            size, size_header = int(m[2]), "Content-Range"
    elif (final.get("Content-Length") or "").strip().isdigit():
        size, size_header = int(final["Content-Length"]), "Content-Length"
    if size is None:
        linked = [h["X-Linked-Size"] for h in redirects if (h.get("X-Linked-Size") or "").strip().isdigit()]
        if linked:
            size, size_header = int(linked[0]), "X-Linked-Size"
    # The Hub's LFS etag is the file's sha256 (other etags, e.g. git blob ids, are ignored). A plain ETag only
    # counts on the response to the URL asked for: after a redirect it is the CDN's own (a Xet hash is 64 hex
    # digits too), so only X-Linked-Etag is trusted anywhere in the chain.
    chain = (*redirects, final)
    for header, h in (*(("X-Linked-Etag", h) for h in chain), ("ETag", chain[0])):
        value = (h.get(header) or "").strip().removeprefix("W/").strip('"').lower()
        if _SHA256.fullmatch(value):
            return _Declared(size, size_header, value, header)
    return _Declared(size, size_header)


def _open(url: str, offset: int, timeout: float) -> tuple[HTTPResponse, _Declared]:
    recorder = _RedirectRecorder()
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response: HTTPResponse = urllib.request.build_opener(recorder).open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404:
            raise _NotFound(url) from e
        if e.code == 416 and offset:
            raise _Unsatisfiable(_declared(recorder.headers, e.headers, 416)) from e
        raise _StatusError(f"{url} answered HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise NetworkError(f"cannot reach {url}: {e.reason}") from e
    except (OSError, HTTPException) as e:  # a timeout or reset while waiting for the status line
        raise NetworkError(f"cannot reach {url}: {e!r}") from e
    return response, _declared(recorder.headers, response.headers, response.status)


def _hash_file(path: Path) -> hashlib._Hash:
    return hub.hash_file(hashlib.sha256(), path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fetch(url: str, dest: Path, expected: RemoteFile, timeout: float, stream: IO[str] | None) -> Entry:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming it; returns the manifest entry."""
    part = dest.with_name(dest.name + ".part")
    while True:
        offset = part.stat().st_size if part.exists() else 0
        try:
            response, declared = _open(url, offset, timeout)
        except _Unsatisfiable as e:
            if e.declared.size == offset:  # the .part holds the whole file: an earlier run stopped at the end
                return _finish(part, dest, url, expected, e.declared, _hash_file(part).hexdigest(), offset)
            part.unlink()  # longer than the file, so not a prefix of it: start over (no Range, no 416)
            continue
        with response:
            _check_declared(url, expected, declared)
            if response.status == 206:
                content_range = response.headers.get("Content-Range")
                m = _CONTENT_RANGE.fullmatch((content_range or "").strip())
                if not m or m[1] is None or int(m[1]) != offset:
                    raise DownloadError(f"{url} answered a request for bytes {offset}- with Content-Range "
                                        f"{content_range!r}; delete {part} and run again")
                hasher, mode = _hash_file(part), "ab"
            else:  # 200: the whole body; a server that ignores Range restarts the file from byte 0
                hasher, mode, offset = hashlib.sha256(), "wb", 0
            received = _receive(response, part, mode, hasher, offset, declared.size, url, stream)
        return _finish(part, dest, url, expected, declared, hasher.hexdigest(), received)


def _check_declared(url: str, expected: RemoteFile, declared: _Declared) -> None:
    """Refuse before transferring anything when the server announces another file than the registry's."""
    if expected.size is not None and declared.size is not None and expected.size != declared.size:
        raise IntegrityError(f"size mismatch for {url}: the server declares {declared.size} bytes "
                             f"({declared.size_header}), the registry expects {expected.size}; "
                             "nothing was saved")
    if expected.sha256 and declared.sha256 and expected.sha256 != declared.sha256:
        raise IntegrityError(f"sha256 mismatch for {url}: the server declares {declared.sha256} "
                             f"({declared.sha256_header}), the registry expects {expected.sha256}; "
                             "nothing was saved")


def _receive(response: HTTPResponse, part: Path, mode: str, hasher: hashlib._Hash, received: int,
             total: int | None, url: str, stream: IO[str] | None) -> int:
    progress = Bar(part.name.removesuffix(".part"), total, unit="B", done=received, stream=stream,
                   show=None if stream is not None else False)
    try:
        with open(part, mode) as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, HTTPException) as e:  # the network went away mid-transfer
                    raise DownloadError(f"transfer of {url} interrupted after {received} bytes ({e!r}); "
                                        f"the partial file {part} is kept: run the same command again to "
                                        "resume") from e
                if not chunk:
                    return received
                out.write(chunk)
                hasher.update(chunk)
                received += len(chunk)
                progress.update(received)
    finally:
        progress.close()


def _finish(part: Path, dest: Path, url: str, expected: RemoteFile, declared: _Declared, digest: str,
            received: int) -> Entry:
    """Check the complete ``.part`` and move it into place; a file that fails is deleted, never installed."""
    size, size_source = ((expected.size, "registry size") if expected.size is not None
                         else (declared.size, f"server size ({declared.size_header})"))
    if size is not None and received < size:
        raise DownloadError(f"incomplete download of {url}: got {received} of {size} bytes ({size_source}); "
                            f"the partial file {part} is kept: run the same command again to resume")
    if size is not None and received > size:
        part.unlink()
        raise IntegrityError(f"size mismatch for {url}: got {received} bytes, expected {size} "
                             f"({size_source}); the download was deleted")
    sha, sha_source = ((expected.sha256, "registry sha256") if expected.sha256
                       else (declared.sha256, f"server sha256 ({declared.sha256_header})"))
    if sha and digest != sha:
        part.unlink()
        raise IntegrityError(f"sha256 mismatch for {url}: got {digest}, expected {sha} ({sha_source}); the "
                             f"download was deleted and nothing was installed at {dest}. Run again to retry; "
                             "if it persists, the source serves another file than the expected one")
    os.replace(part, dest)
    verified = sha_source if sha else size_source if size is not None else "none"
    return {"size": received, "sha256": digest, "verified_against": verified, "url": url, "fetched": _now()}


# ------------------------------------------------------------------------------------------------ API
def _adopt(path: Path, expected: RemoteFile) -> Entry:
    """Register a file put in the cache by hand (the offline route), checked against what the registry
    knows; a file that fails stays where the user put it, and the error says so."""
    size = path.stat().st_size
    digest = _hash_file(path).hexdigest()
    wrong_size = expected.size is not None and size != expected.size
    if wrong_size or (expected.sha256 and digest != expected.sha256):
        raise IntegrityError(f"{path} is not the released file: size {size}, sha256 {digest}; the registry "
                             f"expects size {expected.size}, sha256 {expected.sha256}. Replace it, or delete "
                             "it and run again to download it")
    verified = ("registry sha256" if expected.sha256
                else "registry size" if expected.size is not None else "none")
    return {"size": size, "sha256": digest, "verified_against": f"{verified} (placed by hand)", "url": None,
            "fetched": _now()}


def _offline_help(spec: ModelSpec, model_dir: Path, manifest: Manifest) -> str:
    """One line: where the missing file(s) belong, and the manual source when there is one."""
    missing = [f"{model_dir / slot[0].name}" + (f" (or {', '.join(f.name for f in slot[1:])})" if len(slot) > 1
                                                  else "")
               for slot in spec.slots if _cached_choice(model_dir, manifest, slot) is None]
    manual = f" (e.g. from {spec.manual})" if spec.manual else ""
    return (f"without network, put the file(s) here{manual} and run again, which verifies them: "
            f"{'; '.join(missing)}; or pass a local checkpoint with --checkpoint PATH")


def _fetch_slot(spec: ModelSpec, slot: tuple[RemoteFile, ...], model_dir: Path, manifest: Manifest,
                base_url: str | None, timeout: float,
                stream: IO[str] | None) -> tuple[RemoteFile, Entry]:
    not_found = []
    for file in slot:
        url = spec.url(file, base_url)
        try:
            return file, _fetch(url, model_dir / file.name, file, timeout, stream)
        except _NotFound:
            not_found.append(url)
        except NetworkError as e:
            raise NetworkError(f"{e}; {_offline_help(spec, model_dir, manifest)}") from e
        except _StatusError as e:
            raise DownloadError(f"{e}; {spec.note}" if spec.note else str(e)) from e
    raise DownloadError(f"{spec.name}: not found at the source (HTTP 404): {', '.join(not_found)}")


def download(name: str, cache_dir: str | os.PathLike[str] | None = None, base_url: str | None = None, *,
             force: bool = False, timeout: float = DEFAULT_TIMEOUT, progress: bool = True) -> Path:
    """Make sure model ``name`` is in the cache and return its local path (file or directory).

    Files the manifest records at their size are trusted without network; files put in the cache by hand
    are hashed and registered; the rest are downloaded (resuming any ``.part``) from ``base_url``,
    ``$STREAMWAVLM_DOWNLOAD_BASE_URL``, or the official source. Hub models (a registry name or any
    ``owner/name``) go through huggingface_hub into its cache, ``cache_dir`` replacing ``$HF_HUB_CACHE``.
    ``force`` discards cached and partial files first. Raises :class:`NetworkError` when the source cannot
    be reached, :class:`IntegrityError` for a wrong file, :class:`DownloadError` otherwise.
    """
    spec = _spec(name)
    if spec.hf_repo is not None:
        return hub.download_repo(spec.hf_repo, cache_dir, force=force, sha256=dict(spec.hf_sha256),
                                 progress=progress, timeout=timeout)
    model_dir = cache_root(cache_dir) / spec.name
    base_url = base_url or os.environ.get(BASE_URL_ENV) or None
    stream = sys.stderr if progress else None
    if force:
        for file in (f for slot in spec.slots for f in slot):
            (model_dir / file.name).unlink(missing_ok=True)
            (model_dir / (file.name + ".part")).unlink(missing_ok=True)
        (model_dir / MANIFEST).unlink(missing_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest(model_dir)
    for slot in spec.slots:
        if _cached_choice(model_dir, manifest, slot) is not None:
            continue
        placed = next((f for f in slot if (model_dir / f.name).is_file()), None)
        if placed is not None and placed.name in manifest["files"]:  # ours, but no longer at its size
            if stream is not None:
                print(f"streamwavlm: {model_dir / placed.name} differs from its manifest entry: downloading "
                      "it again", file=stream)
            (model_dir / placed.name).unlink()
            del manifest["files"][placed.name]
            placed = None
        if placed is not None:
            manifest["files"][placed.name] = _adopt(model_dir / placed.name, placed)
        else:
            file, entry = _fetch_slot(spec, slot, model_dir, manifest, base_url, timeout, stream)
            manifest["files"][file.name] = entry
        _save_manifest(model_dir, spec, manifest)  # after each file: a later failure keeps the earlier ones
    return spec.local_path(model_dir)


def verify(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Re-hash the cached files of ``name`` against the manifest and the registry, without network.

    A file that fails is deleted and dropped from the manifest, so that the next :func:`download` fetches
    it again instead of trusting it; the :class:`IntegrityError` names every such file.
    """
    spec = _spec(name)
    if spec.hf_repo is not None:
        return hub.verify_repo(spec.hf_repo, cache_dir, dict(spec.hf_sha256))
    model_dir = cache_root(cache_dir) / spec.name
    manifest = _load_manifest(model_dir)
    files = [f for f in (_cached_choice(model_dir, manifest, slot) for slot in spec.slots) if f is not None]
    if len(files) != len(spec.slots):
        raise DownloadError(f"{name} is not (completely) in the cache at {model_dir}; run "
                            f"`streamwavlm download {name}` first")
    bad = []
    for file in files:
        recorded = manifest["files"][file.name]["sha256"]
        digest = _hash_file(model_dir / file.name).hexdigest()
        if digest != recorded or (file.sha256 and digest != file.sha256):
            (model_dir / file.name).unlink()
            del manifest["files"][file.name]
            bad.append(f"  {model_dir / file.name}: sha256 {digest}, expected {file.sha256 or recorded}")
    if bad:
        _save_manifest(model_dir, spec, manifest)
        raise IntegrityError("sha256 mismatch, file(s) deleted:\n" + "\n".join(bad) +
                             f"\nrun `streamwavlm download {name}` to fetch them again")
    return spec.local_path(model_dir)


# ------------------------------------------------------------------------------------------------ CLI
def _registry_table(cache_dir: Path | None) -> str:
    rows = []
    for spec in REGISTRY.values():
        cached = cached_path(spec.name, cache_dir)
        rows.append(f"{spec.name:<22} {spec.summary}\n{'':<22} source: {spec.source}\n"
                    f"{'':<22} cached: {cached or '-'}")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    """The ``download`` subcommand: the local path on stdout, progress and diagnostics on stderr."""
    if args.list:
        print(_registry_table(args.cache_dir))
        return 0
    if args.name is None or not (args.name in REGISTRY or hub.is_repo_id(args.name)):
        given = f"unknown model {args.name!r}" if args.name else "NAME is required"
        print(f"streamwavlm download: {given}; use one of {', '.join(REGISTRY)} (see --list) or a Hub "
              "repository id OWNER/NAME", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.verify:
            path = verify(args.name, args.cache_dir)
        else:
            path = download(args.name, args.cache_dir, args.base_url, force=args.force, timeout=args.timeout)
    except NetworkError as e:
        print(f"streamwavlm download: {e}", file=sys.stderr)
        return EXIT_OFFLINE
    except (DownloadError, OSError) as e:  # OSError: the cache itself (permissions, disk full)
        print(f"streamwavlm download: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(path)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``download`` on the ``streamwavlm`` subcommand parsers."""
    p = sub.add_parser(
        "download", help="download a released WavLM checkpoint into the local cache",
        description="Download a released WavLM checkpoint into the local cache (resumable, size- and "
        "sha256-verified) and print its local path, the value for --checkpoint.",
        epilog=f"Exit status: 0 ok, {EXIT_FAILED} failed (bad or incomplete file), {EXIT_USAGE} usage, "
        f"{EXIT_OFFLINE} source unreachable.",
    )
    p.add_argument("name", nargs="?", metavar="NAME",
                   help=f"model to fetch: {', '.join(REGISTRY)}, or any Hub repository id OWNER/NAME")
    p.add_argument("--list", action="store_true", help="print the registry and what is cached, then exit")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"cache root (default: ${CACHE_ENV} or ~/.cache/streamwavlm for the .pt files, the "
                   "Hugging Face cache ($HF_HOME, $HF_HUB_CACHE) for Hub models)")
    p.add_argument("--base-url", default=None,
                   help=f"fetch the .pt files from BASE_URL/NAME/FILE instead of the official source (default: "
                   f"${BASE_URL_ENV}); Hub models follow ${hub.ENDPOINT_ENV} (default {DEFAULT_HF_ENDPOINT})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds to wait for a connection or for data (default: %(default)s)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--verify", action="store_true",
                      help="re-hash the cached files against the manifest, offline; bad files are deleted")
    mode.add_argument("--force", action="store_true",
                      help="discard cached and partial files and download again")
    p.set_defaults(func=run)
