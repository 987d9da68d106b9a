"""``streamwavlm background SPEAKERS_DIR --out FILE``: learn a background model (``diarization/background.py``)
from recordings of other speakers, for ``diarize --background``.

The windows are the ones diarization compares (same backend, window length and speech detector, speech
only: :func:`~.enroll.speech_windows`), so the projection is learnt on what it will later be applied to.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

import numpy as np

from ..audio.files import audio_extensions, audio_files, audio_length, load_audio
from ..diarization.background import DIMS, MIN_SPEAKERS, MIN_WINDOWS, SHRINKAGE, BackgroundError, learn
from ..progress import Bar
from .common import add_checkpoint_option, positive
from .diarize import add_diarization_options, backend_id
from .enroll import backend_model, speech_windows

DESCRIPTION = f"""\
Learn a background model for `streamwavlm diarize --background FILE`: a projection that keeps the
directions along which voices differ, learnt from labelled speech. SPEAKERS_DIR holds one entry per
speaker: a subdirectory (the speaker is its name; every audio file in it, any format libsndfile reads) or
a single audio file (the speaker is its file name without extension).

The speakers must be OTHER people than the ones diarized later: the projection generalises from them.
At least {MIN_SPEAKERS} speakers with speech are needed; it was measured with 180 voices of 16 s each
(docs/benchmarks.md): about 50 or more speakers with 15 s or more of speech each is what to aim for.
Use the same --backend (and --checkpoint for wavlm) as the diarization runs that will load it.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("background", help="learn a background model from other speakers' speech, for "
                                          "`diarize --background` (docs/diarization.md)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("speakers", metavar="SPEAKERS_DIR",
                   help="one subdirectory or audio file per speaker (other people than those diarized later)")
    p.add_argument("--out", default="background.safetensors", metavar="FILE",
                   help="where to write the background (safetensors; default: %(default)s)")
    p.add_argument("--dims", type=positive(int), default=DIMS, metavar="N",
                   help="discriminant directions kept, at most speakers - 1 (default: %(default)s)")
    p.add_argument("--shrinkage", type=positive(float), default=SHRINKAGE, metavar="X",
                   help="weight of the identity added to the within-speaker covariance, so directions the "
                        "background saw little variation along stay usable (default: %(default)s)")
    add_checkpoint_option(p)
    add_diarization_options(p)
    p.set_defaults(func=background)


def speaker_files(root: Path) -> dict[str, list[Path]]:
    """Each speaker's audio files under ``root``: a subdirectory per speaker (its name), or one file (its stem)."""
    if not root.is_dir():
        raise BackgroundError(f"{root}: {'not a directory' if root.exists() else 'no such directory'}; give a "
                              "directory with one subdirectory or audio file per speaker")
    extensions = audio_extensions()
    speakers: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = [path for path, _ in audio_files([entry])]
        elif entry.suffix.lower() in extensions:
            files = [entry]
        else:
            continue
        if files:
            speakers.setdefault(entry.stem if entry.is_file() else entry.name, []).extend(files)
    if len(speakers) < MIN_SPEAKERS:
        raise BackgroundError(f"{root}: {len(speakers)} speakers with audio files, a background needs at least "
                              f"{MIN_SPEAKERS} (about 50 or more is better): add one subdirectory or audio file "
                              "per speaker, other people than those you will diarize")
    return speakers


def _check_out(out: Path) -> None:
    """Refuse an unwritable ``--out`` before minutes of embedding, not after."""
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise BackgroundError(f"{out}: cannot write the background there; check --out, its directory and its "
                              "permissions")


def background(args: argparse.Namespace) -> int:
    root, out = Path(args.speakers), Path(args.out)
    _check_out(out)
    speakers = speaker_files(root)
    files = [(name, path) for name, paths in speakers.items() for path in paths]
    for _, path in files:  # an unreadable file is refused now, from its header, before any embedding
        audio_length(path)
    vectors: list[np.ndarray] = []
    labels: list[str] = []
    embedder = backend_model(args)
    with Bar("embedding speakers' speech", len(files), unit="files") as bar:
        for name, path in files:
            windows = speech_windows(args, str(path), load_audio(path), embedder)
            vectors += [w.vector for w in windows]
            labels += [name] * len(windows)
            bar.advance()
    counts = Counter(labels)
    short = [name for name in speakers if counts[name] < MIN_WINDOWS]
    if len(speakers) - len(short) < MIN_SPEAKERS:
        raise BackgroundError(
            f"{root}: {len(speakers) - len(short)} of {len(speakers)} speakers have speech ({MIN_WINDOWS} or more "
            f"windows), a background needs at least {MIN_SPEAKERS}: give each speaker a few seconds of speech")
    bg = learn(np.stack(vectors), np.array(labels), backend_id(args), dims=args.dims, shrinkage=args.shrinkage)
    bg.save(out)
    skipped = f"; left out {len(short)} with too little speech: {', '.join(short)[:200]}" if short else ""
    print(f"learnt a background from {bg.speakers} speakers ({bg.windows} speech windows, "
          f"{bg.embedder}): {bg.dims} dimensions, written to {out}{skipped}")
    return 0
