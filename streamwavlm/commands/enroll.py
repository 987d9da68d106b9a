"""``streamwavlm enroll NAME AUDIO``: add a named speaker to a profile file, from the speech in AUDIO.

The enrolment embedding is the mean of the same windows diarization compares (same backend, same window
length, speech-only), so a profile matches what the live clustering sees."""

from __future__ import annotations

import argparse
import asyncio

import numpy as np

from ..audio.files import FileSource, load_audio
from ..audio.validate import SAMPLE_RATE
from ..checkpoint import model_from_setting
from ..diarization.embedders import ResemblyzerEmbedder, windows_from_output
from ..diarization.profiles import enroll as enroll_speaker
from ..diarization.vad import make_vad, speech_fraction
from ..diarization.window import Window
from ..engine import Engine, EngineOutput
from ..model.wavlm import WavLM
from ..streaming import StreamPool, StreamSettings, XVectorSettings
from .common import add_checkpoint_option
from .diarize import add_diarization_options, backend_id, xvector_settings

MIN_SPEECH = 0.5  # windows at least half speech enrol


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enroll", help="enrol a named speaker from audio into a profile file")
    p.add_argument("name", help="the speaker's name, as diarization will print it")
    p.add_argument("audio", help="audio of that speaker alone (any format libsndfile reads; a few seconds or more)")
    add_checkpoint_option(p)
    add_diarization_options(p)
    p.add_argument("--profiles", metavar="FILE", default="speakers.json",
                   help="the profile file to add the speaker to (JSON; default: %(default)s)")
    p.set_defaults(func=enroll)


def backend_model(args: argparse.Namespace) -> WavLM | None:
    """The checkpoint's model for the wavlm backend (load it once per command, not per file); ``None`` for
    resemblyzer, whose windows need no checkpoint."""
    return model_from_setting(args.checkpoint)[0] if args.backend == "wavlm" else None


async def _xvector_windows(model: WavLM, xs: XVectorSettings, path: str) -> list[Window]:
    """The model's streaming x-vectors over the file, through the engine as ``diarize`` gets them."""
    windows: list[Window] = []

    async def collect(out: EngineOutput) -> None:
        windows.extend(windows_from_output(out, xs.window, model.cfg.hop))

    async with Engine(StreamPool(model, StreamSettings(xvector=xs)), [collect]) as engine:
        engine.add(FileSource(path), "enroll", live=False)
        await engine.drain()
    return windows


def speech_windows(args: argparse.Namespace, path: str, audio: np.ndarray, model: WavLM | None) -> list[Window]:
    """The backend's windows over ``audio`` (the file ``path``) that are mostly speech; ``model`` is
    :func:`backend_model`'s."""
    flags = make_vad(args.vad).push(audio) if args.vad != "none" else None

    def speech(start: float, end: float) -> bool:
        return flags is None or speech_fraction(flags, start, end) >= MIN_SPEECH

    if model is None:  # resemblyzer: windows that are not speech are not embedded at all
        return ResemblyzerEmbedder().push(audio, lambda a, b: a if speech(a / SAMPLE_RATE, b / SAMPLE_RATE) else None)
    return [w for w in asyncio.run(_xvector_windows(model, xvector_settings(args), path)) if speech(w.start, w.end)]


def enroll(args: argparse.Namespace) -> int:
    audio = load_audio(args.audio)
    windows = speech_windows(args, args.audio, audio, backend_model(args))
    speaker = enroll_speaker(args.profiles, backend_id(args), args.name,
                             np.stack([w.vector for w in windows]) if windows else np.zeros((0, 1)))
    print(f"enrolled {speaker.name!r} from {len(windows)} windows of {args.audio} "
          f"({len(audio) / SAMPLE_RATE:.1f} s) into {args.profiles}")
    return 0
