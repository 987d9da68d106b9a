"""Multi-speaker conversations synthesised with espeak-ng voices, with their exact reference turns.

No recorded multi-speaker speech can be downloaded where this project is tested, so conversations are made
from distinct espeak-ng voices (variant, pitch and speed differ per speaker): turns of 1-10 s of generated
sentences, short interjections, silences between turns. Each turn's reference boundaries are where its
synthesised audio is above the silence floor (espeak pads its output with silence). Needs the espeak-ng and
sox programs (apt espeak-ng sox).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import numpy as np

from .rttm import Segment

# (variant, pitch, speed): chosen to be audibly distinct (en+m1 and en-us+m3, for one, are nearly the same)
VOICES = [("en+m3", 40, 165), ("en+f3", 70, 150), ("en-us+m7", 25, 140), ("en+f5", 85, 175),
          ("en+klatt", 55, 155), ("en+m1", 60, 185), ("en-us+f2", 60, 135), ("en+croak", 35, 160)]
_WORD_TEXT = ("the a this that weather report meeting project budget team river morning train station coffee "
         "window garden computer music yesterday tomorrow quickly slowly really maybe because although "
         "people city market number letter question answer problem idea picture story evening friend "
         "should could would will might must have take make find give think know see come go look want "
         "green bright small large early late quiet loud simple careful important different")
WORDS = tuple(_WORD_TEXT.split())
INTERJECTIONS = ("yes", "okay", "right", "no way", "I see", "sure", "really", "uh huh")


def available() -> bool:
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def synthesize(text: str, voice: tuple[str, int, int]) -> np.ndarray:
    """16 kHz float32 mono speech of ``text`` in ``voice``."""
    variant, pitch, speed = voice
    wav = subprocess.run(["espeak-ng", "-v", variant, "-p", str(pitch), "-s", str(speed), "--stdout", text],
                         capture_output=True, check=True).stdout
    raw = subprocess.run(["sox", "-t", "wav", "-", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer",
                          "-t", "raw", "-"], input=wav, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.int16).astype(np.float32) / 32768


def _sentence(rng: np.random.Generator) -> str:
    """3 to 25 random words."""
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 26))))


def other_voices(rng: np.random.Generator, per_variant: int = 2) -> list[tuple[str, int, int]]:
    """Voices that no conversation uses: every English variant espeak-ng has but those of ``VOICES`` and
    the whispers, ``per_variant`` times with a random pitch and speed (a background model's speakers)."""
    listing = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    used = {v.split("+")[1] for v, _, _ in VOICES} | {"whisper", "whisperf", "fast"}
    variants = sorted({line.split()[4].split("/")[-1] for line in listing.splitlines()[1:]} - used)
    return [(f"en+{v}", int(rng.integers(25, 86)), int(rng.integers(135, 186)))
            for v in variants for _ in range(per_variant)]


def monologue(rng: np.random.Generator, voice: tuple[str, int, int], seconds: float) -> np.ndarray:
    """About ``seconds`` of ``voice`` saying random sentences, with short pauses between them."""
    pieces: list[np.ndarray] = []
    while sum(map(len, pieces)) < seconds * 16000:
        audio = synthesize(_sentence(rng), voice)
        a, b = _voiced_extent(audio)
        pieces += [audio[a:b], np.zeros(int(rng.uniform(0.15, 0.6) * 16000), np.float32)]
    return np.concatenate(pieces)


def _voiced_extent(audio: np.ndarray, floor_db: float = -45.0) -> tuple[int, int]:
    """First and last sample of 10 ms blocks louder than ``floor_db``."""
    blocks = len(audio) // 160
    level = 10 * np.log10(np.mean(audio[: blocks * 160].reshape(blocks, 160) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(level > floor_db)
    return (int(loud[0]) * 160, (int(loud[-1]) + 1) * 160) if len(loud) else (0, 0)


@dataclass
class SpokenConversation:
    audio: np.ndarray  # 16 kHz float32
    reference: list[Segment]
    voices: dict[str, tuple[str, int, int]]


def conversation(seed: int, speakers: int, duration: float) -> SpokenConversation:
    """About ``duration`` seconds of ``speakers`` distinct voices taking turns (the seed picks everything)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(VOICES), size=speakers, replace=False)
    voices = {f"spk{i}": VOICES[int(v)] for i, v in enumerate(chosen)}
    pieces, reference, t, last = [], [], 0, None
    pieces.append(np.zeros(int(rng.uniform(0.3, 1.0) * 16000), np.float32))
    t = len(pieces[0])
    while t < duration * 16000:
        name = str(rng.choice([n for n in voices if n != last]))
        text = str(rng.choice(INTERJECTIONS)) if rng.random() < 0.12 else _sentence(rng)
        audio = synthesize(text, voices[name])
        a, b = _voiced_extent(audio)
        if b <= a:
            continue
        audio = audio[a:b]
        reference.append(Segment(round(t / 16000, 3), round((t + len(audio)) / 16000, 3), name))
        gap = np.zeros(int(rng.choice([rng.uniform(0.15, 0.5), rng.uniform(0.5, 2.0)]) * 16000), np.float32)
        pieces += [audio, gap]
        t += len(audio) + len(gap)
        last = name
    return SpokenConversation(np.concatenate(pieces), reference, voices)
