"""Synthetic conversations in embedding space, with known speakers, for testing and tuning clustering.

Real speaker embeddings are not isotropic noise around one point per speaker, and the structure that
breaks online clustering is what this generator reproduces: speakers share a common direction (distinct
voices still have cosine ~0.5-0.8, as resemblyzer gives for distinct espeak voices), each speaker's
centre drifts slowly (a mean-reverting random walk), windows that straddle a turn change mix two
speakers, consecutive windows overlap and so share their noise, turns are separated by silences, some
turns are short interjections, and some speakers fall silent for minutes and then return.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rttm import Segment
from .window import Window


@dataclass(frozen=True)
class SyntheticSettings:
    dim: int = 64
    speakers: tuple[int, int] = (2, 5)  # inclusive range of speakers per conversation
    duration: float = 300.0  # seconds
    shared: float = 1.5  # weight of the direction all speakers share (higher: more similar voices)
    noise: float = 0.35  # noise norm of a fully voiced window relative to the unit speaker centre
    drift: float = 0.25  # stationary norm of a speaker's drift
    drift_time: float = 120.0  # seconds over which the drift decorrelates
    window: float = 1.5
    hop: float = 0.5
    interjection: float = 0.15  # probability that a turn is a short interjection (0.3-1 s)
    absence: float = 0.3  # probability that a speaker sits out a long stretch (returns after minutes)


@dataclass
class Conversation:
    reference: list[Segment]  # the true turns
    windows: list[Window]  # embeddings every hop over the last ``window`` seconds, speech fraction filled in
    speech: np.ndarray  # (frames,) bool, the true speech activity on the frame grid
    frame: float


def _turns(rng: np.random.Generator, n: int, cfg: SyntheticSettings) -> list[Segment]:
    absent = {k: (float(rng.uniform(0.2, 0.5) * cfg.duration),) for k in range(1, n) if rng.random() < cfg.absence}
    gone = {k: (a, a + float(rng.uniform(60, 150))) for k, (a,) in absent.items()}
    turns: list[Segment] = []
    t, last = float(rng.uniform(0.2, 1.0)), -1
    while t < cfg.duration - 1.0:
        present = [k for k in range(n) if k != last and not (k in gone and gone[k][0] <= t < gone[k][1])]
        k = int(rng.choice(present)) if present else last
        length = float(rng.uniform(0.3, 1.0)) if rng.random() < cfg.interjection else float(rng.uniform(1.0, 10.0))
        end = min(t + length, cfg.duration)
        turns.append(Segment(round(t, 3), round(end, 3), f"spk{k}"))
        last = k
        t = end + float(rng.choice([rng.uniform(0.0, 0.3), rng.uniform(0.3, 3.0)]))
    return turns


def conversation(seed: int, cfg: SyntheticSettings = SyntheticSettings(), frame: float = 0.032) -> Conversation:
    """One synthetic conversation; the same seed gives the same conversation."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(cfg.speakers[0], cfg.speakers[1] + 1))
    turns = _turns(rng, n, cfg)
    common = rng.standard_normal(cfg.dim)
    common /= np.linalg.norm(common)
    centres = []
    for _ in range(n):
        own = rng.standard_normal(cfg.dim)
        own /= np.linalg.norm(own)
        centres.append(cfg.shared * common * rng.uniform(0.8, 1.2) + own)
    # per-hop speaker activity and drift states on the hop grid
    steps = int(np.ceil(cfg.duration / cfg.hop))
    share = np.zeros((steps, n))  # seconds of speaker k in hop piece i
    for s in turns:
        k = int(s.speaker[3:])
        for i in range(int(s.start // cfg.hop), min(steps, int(np.ceil(s.end / cfg.hop)))):
            lo, hi = max(s.start, i * cfg.hop), min(s.end, (i + 1) * cfg.hop)
            share[i, k] += max(0.0, hi - lo)
    keep = np.exp(-cfg.hop / cfg.drift_time)
    drift = rng.standard_normal((n, cfg.dim)) * cfg.drift / np.sqrt(cfg.dim)
    pieces = np.zeros((steps, cfg.dim))
    for i in range(steps):
        drift = keep * drift + np.sqrt(1 - keep ** 2) * rng.standard_normal((n, cfg.dim)) * cfg.drift / np.sqrt(cfg.dim)
        for k in np.nonzero(share[i])[0]:
            c = centres[k] + drift[k] * np.linalg.norm(centres[k])
            pieces[i] += share[i, k] * c / np.linalg.norm(c)
        if share[i].sum() > 0:  # noise grows as the voiced time shrinks, like a short utterance's embedding
            noise = rng.standard_normal(cfg.dim) / np.sqrt(cfg.dim)
            pieces[i] += noise * cfg.noise * np.sqrt(share[i].sum() * cfg.window)
    per_window = round(cfg.window / cfg.hop)
    windows = []
    for i in range(per_window, steps + 1):
        v, voiced = pieces[i - per_window:i].sum(0), share[i - per_window:i].sum()
        if voiced > 0:
            windows.append(Window(round((i - per_window) * cfg.hop, 6), round(i * cfg.hop, 6), v,
                                  speech=float(voiced / cfg.window)))
    frames = int(np.ceil(cfg.duration / frame))
    speech = np.zeros(frames, bool)
    for s in turns:
        speech[round(s.start / frame):round(s.end / frame)] = True
    return Conversation(turns, windows, speech, frame)
