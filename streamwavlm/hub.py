"""Hugging Face Hub checkpoints through huggingface_hub, verified.

Why huggingface_hub rather than our own HTTP: its cache (``HF_HOME``, ``HF_HUB_CACHE``), offline mode
(``HF_HUB_OFFLINE``), tokens (``HF_TOKEN``, ``hf auth login``), mirror endpoint (``HF_ENDPOINT``) and
resumable downloads are what transformers users have already configured, so a model fetched by either tool
is shared, not downloaded twice. What it does not do is check what it downloaded: a blob in its cache is
named after the hash the Hub declared (the sha256 of an LFS file, the git blob id of a small file), so after
a download we hash the blob and compare, and ``verify_repo`` repeats that later without network.

A model directory is a snapshot folder with ``config.json``, ``preprocessor_config.json`` (its
``do_normalize`` decides the waveform normalisation) and the weights: ``pytorch_model.bin`` (what ``main``
of the microsoft/wavlm-* repos holds, read with ``weights_only``) or else ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import DownloadError, IntegrityError, NetworkError
from .progress import HubBar, QuietHubBar

ENDPOINT_ENV = "HF_ENDPOINT"
REVISION = "main"
REQUIRED = ("config.json", "preprocessor_config.json")
WEIGHTS = ("pytorch_model.bin", "model.safetensors")  # alternatives, the first the repo has wins
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repository id (``owner/name``)."""
    return REPO_ID.fullmatch(name) is not None


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _endpoint() -> str | None:
    """``$HF_ENDPOINT`` read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get(ENDPOINT_ENV) or None


def _missing_line(repo: str, why: str, cache_dir: Path | None) -> str:
    from huggingface_hub import constants

    where = cache_dir or constants.HF_HUB_CACHE
    return (f"{repo} is not in the Hugging Face cache ({where}) and {why}: run `streamwavlm download {repo}` "
            "where there is network (then copy the cache), or pass a local directory with --checkpoint PATH")


def _cached(repo: str, name: str, cache_dir: Path | None) -> Path | None:
    """The cached file of revision ``main``, without network."""
    from huggingface_hub import try_to_load_from_cache

    found: Any = try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=REVISION)
    return Path(found) if isinstance(found, str) else None  # else None or a "known not to exist" marker


def _fetch(repo: str, name: str, cache_dir: Path | None, force: bool, progress: bool, timeout: float) -> Path | None:
    """Download one file (``None``: the repo has no such file); raise a one-line error otherwise."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if force and _offline():
        raise NetworkError(f"{repo}: --force downloads again, which needs the network; HF_HUB_OFFLINE is set")
    try:
        with _quiet_hub_logs():
            path = hf_hub_download(repo, name, revision=REVISION, cache_dir=cache_dir, force_download=force,
                                   endpoint=_endpoint(), etag_timeout=timeout, local_files_only=_offline(),
                                   tqdm_class=HubBar if progress else QuietHubBar)  # type: ignore[arg-type]
    except RemoteEntryNotFoundError:
        return None
    except GatedRepoError as e:
        raise DownloadError(f"{repo} is gated: accept its terms on the Hub and log in (`hf auth login` or "
                            f"HF_TOKEN) ({_first_line(e)})") from e
    except RepositoryNotFoundError as e:
        raise DownloadError(f"{repo}: no such repository on {_endpoint() or 'the Hub'} (or it is private: log "
                            "in with `hf auth login` or set HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise DownloadError(f"{repo}: no revision {REVISION!r}") from e
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if _offline() else f"the Hub cannot be reached ({_first_line(e.__cause__ or e)})"
        raise NetworkError(_missing_line(repo, why, cache_dir)) from e
    except HfHubHTTPError as e:
        raise DownloadError(f"{repo}/{name}: {_first_line(e)}") from e
    except Exception as e:
        # a transfer cut off after huggingface_hub's own retries raises its HTTP library's error (httpx2 in
        # huggingface_hub 2.x, httpx in 1.x); its .incomplete file stays and the next run resumes it
        if not type(e).__module__.startswith("httpx"):
            raise
        raise NetworkError(f"{repo}/{name}: the transfer was interrupted ({_first_line(e)}); run the same "
                           "command again to resume") from e
    return Path(path)


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """huggingface_hub logs each retry of an unreachable Hub as two lines; the one-line error we raise after
    its retries says it all, so its warnings are held back while it works for us."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file: what the Hub names a small (non-LFS) file by."""
    return hash_file(hashlib.sha1(f"blob {path.stat().st_size}\0".encode()), path).hexdigest()


def sha256_file(path: Path) -> str:
    return hash_file(hashlib.sha256(), path).hexdigest()


def hash_file(h: Any, path: Path) -> Any:
    """``h`` updated with the bytes of ``path`` (read in 1 MiB pieces); shared with ``download``."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h


def check_blob(path: Path, sha256: str | None = None) -> str:
    """Hash the cache blob behind ``path`` against the hash it is named after (and ``sha256`` when known).

    A blob that fails is deleted with its snapshot link, so the next download fetches it again; the
    :class:`IntegrityError` says so. Returns what the file was checked against.
    """
    blob = path.resolve()
    name = blob.name
    checks: list[tuple[str, str, str]] = []  # (label, expected, actual)
    if _SHA256.fullmatch(name) or sha256:
        digest = sha256_file(blob)
        checks += [("Hub sha256", name, digest)] if _SHA256.fullmatch(name) else []
        checks += [("registry sha256", sha256, digest)] if sha256 else []
    elif _GIT_SHA1.fullmatch(name):
        checks.append(("Hub git blob id", name, git_blob_sha1(blob)))
    for label, expected, actual in checks:
        if expected != actual:
            blob.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            raise IntegrityError(f"{path}: hash {actual} is not the {label} {expected}; the file was deleted: "
                                 "run the same command again to download it again")
    return " and ".join(label for label, _, _ in checks) or "none (the cache does not name blobs by hash)"


def _root(cache_dir: str | os.PathLike[str] | None) -> Path | None:
    """``--cache-dir`` as huggingface_hub takes it (``~`` expanded); ``None``: its own default."""
    return Path(cache_dir).expanduser() if cache_dir is not None else None


def repo_files(repo: str, cache_dir: str | os.PathLike[str] | None = None) -> list[Path] | None:
    """The cached files of a complete model (required files and one weights file), or ``None``; no network."""
    root = _root(cache_dir)
    found = [_cached(repo, name, root) for name in REQUIRED]
    weights = next((p for p in (_cached(repo, name, root) for name in WEIGHTS) if p is not None), None)
    if weights is None or None in found:
        return None
    return [*found, weights]  # type: ignore[list-item]


def download_repo(repo: str, cache_dir: str | os.PathLike[str] | None = None, *, force: bool = False,
                  sha256: Mapping[str, str] | None = None, progress: bool = True, timeout: float = 10.0) -> Path:
    """Make sure the model files of Hub repository ``repo`` are cached; return the snapshot directory.

    Cached files are used without network (the released checkpoints do not change; ``force`` fetches them
    again). Each new file is hashed against its blob name and ``sha256[filename]`` when given. Errors are
    one line: :class:`NetworkError` when offline or unreachable and not cached, :class:`IntegrityError`,
    :class:`DownloadError`.
    """
    root = _root(cache_dir)
    sha256 = sha256 or {}
    cached = None if force else repo_files(repo, root)
    if cached is not None:
        return cached[0].parent
    paths = []
    for name in REQUIRED:
        path = _fetch(repo, name, root, force, progress, timeout)
        if path is None:
            raise DownloadError(f"{repo} has no {name}: not a WavLM model directory")
        check_blob(path, sha256.get(name))
        paths.append(path)
    for name in WEIGHTS:
        path = _fetch(repo, name, root, force, progress, timeout)
        if path is not None:
            check_blob(path, sha256.get(name))
            return path.parent
    raise DownloadError(f"{repo} has neither {' nor '.join(WEIGHTS)}")


def verify_repo(repo: str, cache_dir: str | os.PathLike[str] | None = None,
                sha256: Mapping[str, str] | None = None) -> Path:
    """Re-hash the cached files of ``repo`` against their blob names, without network."""
    root = _root(cache_dir)
    files = repo_files(repo, root)
    if files is None:
        raise DownloadError(f"{repo} is not (completely) in the Hugging Face cache; run "
                            f"`streamwavlm download {repo}` first")
    for path in files:
        check_blob(path, (sha256 or {}).get(path.name))
    return files[0].parent
