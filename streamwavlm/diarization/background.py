"""A background model for speaker embeddings: a linear discriminant projection learnt from labelled speech
of speakers other than the ones to diarize.

Why: two voices that a speaker encoder barely separates (resemblyzer's centroids of some espeak-ng voices
reach cosine 0.94) differ along a few directions, while what is said moves one voice's windows along many
others; a cosine in the raw space weighs both alike, so the mean of a new similar voice lands inside a
known speaker's bar. Linear discriminant analysis (the standard back end of x-vector diarization, fitted on
in-domain speech) keeps the directions along which speakers differ relative to how much one speaker
varies: windows are centred on the background's mean, whitened by the within-speaker covariance (shrunk
towards a multiple of the identity, so that directions the background never saw vary stay usable) and
projected on the leading discriminant directions. The background's speakers must not be the ones diarized
later (they are what the projection generalises from); measured in docs/benchmarks.md.

File format (safetensors, nothing executable): tensors ``mean`` (D,) and ``projection`` (D, K) float32;
metadata ``format`` (``streamwavlm-background``), ``version`` (1), ``embedder`` (backend id, as profiles
use), ``speakers`` and ``windows`` (what it was learnt from).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..permissions import as_umask_allows
from ..quoting import shown
from .clustering import ClusterSettings

FORMAT, VERSION = "streamwavlm-background", 1
DIMS = 48  # discriminant directions kept
SHRINKAGE = 1.0  # weight of the identity (scaled to the mean variance) added to the within-speaker covariance
# clustering settings with a background of DIMS and SHRINKAGE, tuned on the development espeak-ng
# conversations (threshold and spread at 2 s; confirm 2 rather than 3 also on the validation ones:
# docs/benchmarks.md); the cosines of projected windows are on another scale than raw ones
CLUSTER = ClusterSettings(new_threshold=0.9, spread=1.2, confirm=2)
MIN_SPEAKERS = 8
MIN_WINDOWS = 2  # per speaker: a covariance needs at least two


class BackgroundError(ValueError):
    """A background that cannot be learnt or read; the message says what to do."""


@dataclass(frozen=True)
class Background:
    mean: np.ndarray  # (D,) float32
    projection: np.ndarray  # (D, K) float32
    embedder: str
    speakers: int
    windows: int

    @property
    def dims(self) -> int:
        return int(self.projection.shape[1])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Unit vectors in the projected space, for one vector ``(D,)`` or a batch ``(N, D)``."""
        v = np.asarray(vectors, np.float32)
        if v.shape[-1] != len(self.mean):
            raise BackgroundError(f"the background was learnt on {len(self.mean)}-dimensional embeddings, got "
                                  f"{v.shape[-1]}: use a background learnt with the same backend")
        y = (v - self.mean) @ self.projection
        return (y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)).astype(np.float32)

    def save(self, path: str | Path) -> None:
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        meta = {"format": FORMAT, "version": str(VERSION), "embedder": self.embedder,
                "speakers": str(self.speakers), "windows": str(self.windows)}
        try:
            save_file({"mean": self.mean, "projection": self.projection}, str(path), metadata=meta)
            as_umask_allows(path)
        except SafetensorError as e:  # an unwritable path: safetensors' own error is not an OSError
            raise BackgroundError(f"{path}: cannot write the background ({e}); check the path") from None


def learn(vectors: np.ndarray, labels: np.ndarray, embedder: str, *, dims: int = DIMS,
          shrinkage: float = SHRINKAGE) -> Background:
    """The projection from windows ``vectors (N, D)`` of speakers ``labels (N,)``."""
    if dims < 1 or not shrinkage >= 0 or not np.isfinite(shrinkage):
        raise BackgroundError(f"a background needs dims >= 1 and a finite shrinkage >= 0, got {dims} and {shrinkage}")
    x, labels = np.asarray(vectors, np.float64), np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels) or not np.isfinite(x).all():
        raise BackgroundError("a background needs finite embeddings (N, D) and one label per embedding")
    _, index, counts = np.unique(labels, return_inverse=True, return_counts=True)
    speakers = np.flatnonzero(counts >= MIN_WINDOWS)  # labels with enough windows; the others are left out
    if len(speakers) < MIN_SPEAKERS:
        raise BackgroundError(f"a background needs at least {MIN_SPEAKERS} speakers with {MIN_WINDOWS} or more "
                              f"windows each, got {len(speakers)}: give it more speakers")
    kept = counts[index] >= MIN_WINDOWS
    x, index = x[kept], np.searchsorted(speakers, index[kept])
    means = np.stack([x[index == s].mean(0) for s in range(len(speakers))])
    centred = x - means[index]
    within = centred.T @ centred / max(len(x) - len(speakers), 1)
    d = x.shape[1]
    within += shrinkage * np.trace(within) / d * np.eye(d)
    w, v = np.linalg.eigh(within)
    if not w[0] > 1e-10 * w[-1]:  # fewer windows than dimensions, unshrunk: whitening would blow up
        raise BackgroundError("the windows' within-speaker covariance is singular: raise the shrinkage, or give "
                              "more windows per speaker")
    whiten = v @ np.diag(w ** -0.5) @ v.T
    between = np.cov((means @ whiten).T)
    _, directions = np.linalg.eigh(between)
    k = min(dims, len(speakers) - 1, d)
    projection = whiten @ directions[:, ::-1][:, :k]
    return Background(x.mean(0).astype(np.float32), projection.astype(np.float32), embedder, len(speakers), len(x))


def load_background(path: str | Path, embedder: str | None = None) -> Background:
    """Read a background file; refuse anything but this format (and another backend's, when ``embedder``)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise BackgroundError(f"{path}: no such background file (make one with `streamwavlm background`)")
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            names = f.keys()
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise BackgroundError(f"{path}: not a background file ({e}); make one with `streamwavlm background`") from None
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise BackgroundError(f"{path}: not a version {VERSION} background file (format {shown(meta.get('format'))}, "
                              f"version {shown(meta.get('version'))}); make one with `streamwavlm background`")
    mean, projection = tensors.get("mean"), tensors.get("projection")
    if (mean is None or projection is None or mean.ndim != 1 or projection.ndim != 2
            or projection.shape[0] != len(mean) or not 0 < projection.shape[1] <= len(mean)
            or not (np.isfinite(mean).all() and np.isfinite(projection).all())):
        raise BackgroundError(f"{path}: damaged background (needs a finite mean (D,) and projection (D, K)); make "
                              "it again with `streamwavlm background`")
    found = meta.get("embedder", "")
    if embedder is not None and found != embedder:
        raise BackgroundError(f"{path}: learnt on {shown(found)} embeddings, but this run uses {embedder!r}: "
                              "use a background learnt with the same backend")
    try:
        speakers, windows = int(meta.get("speakers", "0")), int(meta.get("windows", "0"))
    except ValueError:
        raise BackgroundError(f"{path}: damaged background metadata; make it again with `streamwavlm background`") \
            from None
    return Background(mean.astype(np.float32), projection.astype(np.float32), found, speakers, windows)
