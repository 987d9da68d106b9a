"""Enrolled speakers on disk: a small JSON file, readable by people and by any language, never pickle.

    {"format": "streamwavlm-speaker-profiles", "version": 1, "backend": "resemblyzer", "dim": 256,
     "speakers": [{"name": "alice", "embedding": [0.01, ...], "windows": 37}, ...]}

``backend`` names the embedding space (``resemblyzer``, or ``wavlm:<checkpoint name>`` for x-vectors):
embeddings of different backends cannot be compared, so loading refuses a mismatch. ``embedding`` is the
unit-norm mean of the enrolment windows; ``windows`` how many went into it (its weight when updated).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .clustering import Speaker

FORMAT = "streamwavlm-speaker-profiles"
VERSION = 1


class ProfileError(ValueError):
    """A profile file that cannot be used; the message says which file and why."""


def load_profiles(path: str | Path, backend: str | None = None) -> list[Speaker]:
    """The enrolled speakers of ``path`` (checked against ``backend`` when given)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"{p}: no such profile file (create one with `streamwavlm enroll`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"{p}: not a speaker profile file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ProfileError(f"{p}: not a speaker profile file (format must be {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise ProfileError(f"{p}: profile version {doc.get('version')!r} is not supported (expected {VERSION})")
    if backend is not None and doc.get("backend") != backend:
        raise ProfileError(f"{p}: profiles were enrolled with backend {doc.get('backend')!r}, but this run uses "
                           f"{backend!r}; embeddings of different backends cannot be compared")
    dim = doc.get("dim")
    speakers = []
    for i, entry in enumerate(doc.get("speakers") or []):
        try:
            name, vector, count = str(entry["name"]), np.asarray(entry["embedding"], np.float64), int(entry["windows"])
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{p}: speaker {i} needs name, embedding (numbers) and windows ({e})") from None
        norm = float(np.linalg.norm(vector)) if vector.ndim == 1 else math.nan
        if vector.shape != (dim,) or not math.isfinite(norm) or norm == 0 or count < 1 or not name:
            raise ProfileError(f"{p}: speaker {i} ({name!r}) needs a non-empty name, a finite non-zero embedding "
                               f"of {dim} numbers and windows >= 1")
        speakers.append(Speaker(name, (vector / norm).astype(np.float32), count, enrolled=True))
    return speakers


def save_profiles(path: str | Path, backend: str, speakers: list[Speaker]) -> None:
    """Write atomically (a crash leaves the old file, never half of a new one)."""
    dims = {s.centroid.shape for s in speakers}
    if len(dims) > 1:
        raise ProfileError(f"speaker embeddings of different sizes {sorted(dims)} cannot share a profile file")
    doc = {"format": FORMAT, "version": VERSION, "backend": backend,
           "dim": int(speakers[0].centroid.shape[0]) if speakers else 0,
           "speakers": [{"name": s.name, "embedding": [round(float(x), 7) for x in s.centroid], "windows": s.count}
                        for s in speakers]}
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def enroll(path: str | Path, backend: str, name: str, vectors: np.ndarray) -> Speaker:
    """Add (or replace) ``name`` with the mean of ``vectors`` (n, dim) in the profile file ``path``."""
    if not name.strip():
        raise ProfileError("a speaker name must not be empty")
    if len(vectors) == 0:
        raise ProfileError(f"no speech found to enrol {name!r}: the audio needs at least a few seconds of speech")
    mean = np.mean(vectors / np.linalg.norm(vectors, axis=1, keepdims=True), axis=0)
    speaker = Speaker(name, (mean / np.linalg.norm(mean)).astype(np.float32), len(vectors), enrolled=True)
    existing = load_profiles(path, backend) if Path(path).exists() else []
    if existing and existing[0].centroid.shape != speaker.centroid.shape:
        raise ProfileError(f"{path}: holds {existing[0].centroid.shape[0]}-d embeddings, {name!r} has "
                           f"{speaker.centroid.shape[0]}")
    save_profiles(path, backend, [s for s in existing if s.name != name] + [speaker])
    return speaker
