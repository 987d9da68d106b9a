"""The errors of fetching a model: shared by the direct downloader (``download``) and the Hub (``hub``)."""

from __future__ import annotations


class DownloadError(RuntimeError):
    """A download that produced no verified file; the message says what happened and what to do next."""


class NetworkError(DownloadError):
    """The source could not be reached (no network, DNS failure, connection refused, timeout, offline mode)."""


class IntegrityError(DownloadError):
    """A file whose size or hash is not the expected one; it is never left in place as a cached file."""
