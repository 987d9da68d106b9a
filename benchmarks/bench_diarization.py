"""Online diarization: clustering against the diart-style baseline on synthetic embedding streams, DER per
latency on espeak-ng conversations through the resemblyzer backend (without and with a background model
learnt on other voices), and the cost diarization adds to the engine. Thresholds are tuned on development
seeds / conversations that are not reported; the background's size was chosen on validation ones.

    python benchmarks/bench_diarization.py [--out benchmarks/results/diarization.md] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_report, finish

from streamwavlm.audio.files import FileSource
from streamwavlm.checkpoint import model_from_setting
from streamwavlm.diarization import espeak, synthetic
from streamwavlm.diarization.background import CLUSTER, SHRINKAGE, Background, learn
from streamwavlm.diarization.baseline import BaselineSettings, IncrementalClustering, WindowDiarizer
from streamwavlm.diarization.clustering import ClusterSettings, OnlineClustering
from streamwavlm.diarization.der import Score, score
from streamwavlm.diarization.diarizer import Diarizer
from streamwavlm.diarization.embedders import RESEMBLYZER, ResemblyzerEmbedder
from streamwavlm.diarization.pipeline import BLOCK, Session
from streamwavlm.diarization.rttm import Segment
from streamwavlm.diarization.vad import FRAME_SECONDS, SileroVad, speech_span
from streamwavlm.diarization.window import Window
from streamwavlm.engine import Engine
from streamwavlm.streaming import StreamPool, StreamSettings

LATENCIES = (0.5, 1.0, 2.0, 5.0)


def replay(speech: np.ndarray, windows: list[Window], clustering: object, latency: float,
           background: Background | None = None) -> list[Segment]:
    """The diarizer over recorded VAD frames and windows, stepped as ``StreamDiarization`` steps it live:
    every ``BLOCK`` seconds the block's speech frames, then at the end of each window that ended in it."""
    if isinstance(clustering, IncrementalClustering):
        d: Diarizer = WindowDiarizer(clustering, latency=latency, frame=FRAME_SECONDS)
    else:
        d = Diarizer(clustering, latency=latency, frame=FRAME_SECONDS, background=background)  # type: ignore[arg-type]
    step, i = round(BLOCK / FRAME_SECONDS), 0
    for first in range(0, len(speech), step):
        d.add_speech(speech[first:first + step])
        now = min(first + step, len(speech)) * FRAME_SECONDS
        while i < len(windows) and windows[i].end <= now + 1e-9:
            d.add_window(Window(windows[i].start, windows[i].end, windows[i].vector))
            d.advance(windows[i].end)
            i += 1
        d.advance(now)
    for w in windows[i:]:
        d.add_window(Window(w.start, w.end, w.vector))
    d.finish()
    return d.segments()


def total(cases: list, make: Callable[[], object], latency: float, background: Background | None = None) -> Score:
    s = Score()
    for case in cases:
        s = s.add(score(case.reference, replay(case.speech, case.windows, make(), latency, background)))
    return s


def ours(threshold: float) -> Callable[[], OnlineClustering]:
    settings = ClusterSettings().with_threshold(threshold)
    return lambda: OnlineClustering(settings)


def baseline(delta: float) -> Callable[[], IncrementalClustering]:
    return lambda: IncrementalClustering(BaselineSettings(delta_new=delta))


def compare(lines: list[str], title: str, dev: list, test: list, grid_ours: list[float],
            grid_base: list[float]) -> float:
    """Tune each method's threshold on ``dev`` at 2 s latency, report DER on ``test`` at every latency;
    returns our threshold."""
    dev_o = {t: total(dev, ours(t), 2.0).der for t in grid_ours}
    dev_b = {t: total(dev, baseline(t), 2.0).der for t in grid_base}
    best_o, best_b = min(dev_o, key=dev_o.__getitem__), min(dev_b, key=dev_b.__getitem__)
    lines += [f"### {title}", "", f"Tuned on the development split ({len(dev)} conversations) at 2 s latency: ours "
              f"new_threshold {best_o}, baseline delta_new {best_b}. Development DER at 2 s per threshold, ours: "
              + ", ".join(f"{t} {100 * d:.1f} %" for t, d in dev_o.items()) + "; baseline: "
              + ", ".join(f"{t} {100 * d:.1f} %" for t, d in dev_b.items()) + ".", "",
              "| latency (s) | ours DER % | (miss / FA / confusion) | baseline DER % | (miss / FA / confusion) |",
              "|---|---|---|---|---|"]
    for lat in LATENCIES:
        o, b = total(test, ours(best_o), lat), total(test, baseline(best_b), lat)
        parts = [f"{100 * x.der:.1f} | {100 * x.missed / x.total:.1f} / {100 * x.false_alarm / x.total:.1f} / "
                 f"{100 * x.confusion / x.total:.1f}" for x in (o, b)]
        lines.append(f"| {lat} | {parts[0]} | {parts[1]} |")
    lines.append("")
    return best_o


def synthetic_cases(seeds: range) -> list[synthetic.Conversation]:
    return [synthetic.conversation(seed) for seed in seeds]


@dataclass
class Spoken:
    reference: list[Segment]
    speech: np.ndarray
    windows: list[Window]
    audio: np.ndarray


def spoken_cases(seeds: range, minutes: float) -> tuple[list[Spoken], float]:
    """espeak-ng conversations with the speech frames and windows the live pipeline computes (in its blocks)."""
    out, seconds = [], 0.0
    block = int(BLOCK * 16000)
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        conv = espeak.conversation(1000 + seed, int(rng.integers(2, 5)), minutes * 60)
        vad = SileroVad()
        speech = np.concatenate([vad.push(conv.audio[i:i + block]) for i in range(0, len(conv.audio), block)])
        windows = []
        emb = ResemblyzerEmbedder()
        select = functools.partial(speech_span, speech, min_speech=ClusterSettings().min_speech)
        for i in range(0, len(conv.audio), block):  # windows chosen as StreamDiarization chooses them
            windows += emb.push(conv.audio[i:i + block], select)
        out.append(Spoken(conv.reference, speech, windows, conv.audio))
        seconds += len(conv.audio) / 16000
    return out, seconds


def through_engine(lines: list[str], test: list[Spoken], settings: ClusterSettings, latency: float,
                   background: Background | None = None) -> None:
    """The test conversations through the engine (random Base+ weights) with a diarization ``Session``,
    as ``streamwavlm diarize`` runs them: the DER must be the replay's."""
    import soundfile as sf

    s = Score()
    for n, case in enumerate(test):
        path = Path("/tmp") / f"bench-diarization-{n}.wav"
        sf.write(path, case.audio, 16000, subtype="FLOAT")
        session = Session(latency=latency, vad="silero", cluster=settings, background=background)
        asyncio.run(_engine_run(path, session))
        s = s.add(score(case.reference, session.finished["c"]))
    replayed = total(test, lambda: OnlineClustering(settings), latency, background)
    lines += [f"Through the engine (`Session` taps on an `Engine`, silero-vad, {latency} s latency"
              f"{', with the background' if background else ''}): DER {100 * s.der:.2f} % (the replay: "
              f"{100 * replayed.der:.2f} %).", ""]


def background_windows(seed: int = 11, per_variant: int = 2, seconds: float = 16.0) -> tuple[np.ndarray, np.ndarray]:
    """resemblyzer windows of espeak-ng voices that no conversation uses (``espeak.other_voices``: pitch and
    speed drawn with ``seed``), and their speaker labels: what a background model learns from."""
    rng = np.random.default_rng(seed)
    vectors, labels = [], []
    for k, voice in enumerate(espeak.other_voices(rng, per_variant)):
        windows = ResemblyzerEmbedder().push(espeak.monologue(rng, voice, seconds))
        vectors += [w.vector for w in windows]
        labels += [k] * len(windows)
    return np.stack(vectors), np.array(labels)


def tune(dev: list[Spoken], background: Background) -> tuple[ClusterSettings, float]:
    """Threshold and spread for projected windows, chosen at 2 s latency on ``dev``; and its DER there."""
    grid = [dataclasses.replace(CLUSTER, new_threshold=t, spread=sp) for t in (0.8, 0.85, 0.9, 0.93, 0.95)
            for sp in (0.6, 1.2, 2.5)]
    ders = [total(dev, functools.partial(OnlineClustering, g), 2.0, background).der for g in grid]
    return grid[int(np.argmin(ders))], min(ders)


def scores_at_latencies(test: list[Spoken], settings: ClusterSettings, background: Background) -> list[Score]:
    """The test conversations' scores at each of ``LATENCIES``, projected by ``background``."""
    return [total(test, functools.partial(OnlineClustering, settings), lat, background) for lat in LATENCIES]


def with_background(lines: list[str], dev: list[Spoken], val: list[Spoken] | None, test: list[Spoken]) -> None:
    """DER with a background model (``background.py``) learnt on other voices: the choice of its size on
    validation conversations (when ``val``), then the module's defaults on the test conversations."""
    t0 = time.perf_counter()
    vectors, labels = background_windows()
    lines += ["### With a background model", "",
              f"Learnt from {len(set(labels.tolist()))} espeak-ng voices that no conversation uses (every English "
              f"variant but the conversations' eight and the whispers, twice each with a random pitch and speed, "
              f"16 s each: {len(labels)} windows; {time.perf_counter() - t0:.0f} s to make). Threshold and spread "
              "tuned at 2 s on the development conversations for each background.", ""]
    if val is not None:
        lines += [f"Choice of the size on {len(val)} validation conversations (seeds 200-219), neither development "
                  "nor test:", "", "| dims | shrinkage | tuned threshold, spread | development 2 s | validation "
                  "0.5 / 1 / 2 / 5 s |", "|---|---|---|---|---|"]
        for shrinkage in (0.1, 1.0):
            for dims in (16, 24, 32, 48, 64):
                bg = learn(vectors, labels, RESEMBLYZER, dims=dims, shrinkage=shrinkage)
                settings, dev_der = tune(dev, bg)
                v = [total(val, lambda s=settings: OnlineClustering(s), lat, bg).der for lat in LATENCIES]
                lines.append(f"| {dims} | {shrinkage} | {settings.new_threshold}, {settings.spread} | "
                             f"{100 * dev_der:.1f} | {' / '.join(f'{100 * x:.1f}' for x in v)} |")
        lines.append("")
    bg = learn(vectors, labels, RESEMBLYZER)
    settings, dev_der = tune(dev, bg)
    lines += [f"The defaults ({bg.dims} dims, shrinkage {SHRINKAGE}): tuned threshold {settings.new_threshold}, "
              f"spread {settings.spread}, confirm {settings.confirm} (the module's: {CLUSTER.new_threshold}, "
              f"{CLUSTER.spread}, {CLUSTER.confirm}); development "
              f"DER at 2 s {100 * dev_der:.1f} %.", "",
              "| latency (s) | test DER % | (miss / FA / confusion) |", "|---|---|---|"]
    for lat, x in zip(LATENCIES, scores_at_latencies(test, settings, bg), strict=True):
        lines.append(f"| {lat} | {100 * x.der:.1f} | {100 * x.missed / x.total:.1f} / "
                     f"{100 * x.false_alarm / x.total:.1f} / {100 * x.confusion / x.total:.1f} |")
    lines.append("")
    through_engine(lines, test, settings, 2.0, bg)


def background_draws(lines: list[str], dev: list[Spoken], test: list[Spoken], seeds: range) -> None:
    """The same recipe with other draws of the background voices' pitch and speed: how much the test DER
    depends on the particular background (each draw tuned on development as above, test scored once)."""
    lines += ["### Background draws", "", "The background recipe above with other draws of its voices' pitch and "
              "speed (the one above is seed 11); threshold and spread tuned on development for each.", "",
              "| seed | tuned threshold, spread | test DER % at 0.5 / 1 / 2 / 5 s |", "|---|---|---|"]
    for seed in seeds:
        vectors, labels = background_windows(seed)
        bg = learn(vectors, labels, RESEMBLYZER)
        settings, _ = tune(dev, bg)
        lines.append(f"| {seed} | {settings.new_threshold}, {settings.spread} | "
                     f"{' / '.join(f'{100 * x.der:.1f}' for x in scores_at_latencies(test, settings, bg))} |")
    lines.append("")


async def _engine_run(path: Path, session: Session | None) -> tuple[float, float, float]:
    """One run of the engine over ``path``: wall seconds, process CPU seconds (every thread), and the CPU
    seconds of the diarization worker thread."""
    model, _ = model_from_setting(None)
    pool = StreamPool(model, StreamSettings(), capacity=1)
    wall, cpu = time.perf_counter(), time.process_time()
    sinks = [session.sink] if session else []
    async with Engine(pool, sinks) as engine:
        source = FileSource(path)
        engine.add(session.tap(source, "c", live=False) if session else source, "c", live=False)
        await engine.drain()
    worker = 0.0
    if session is not None:
        session.close_all()
        thread = session.worker
        await session.drain()
        worker = thread.cpu_seconds if thread else 0.0
    return time.perf_counter() - wall, time.process_time() - cpu, worker


SPEED_RUNS = (("engine alone (random Base+ weights, chunk 16)", None, None),
              ("+ diarization, resemblyzer backend, silero-vad", "resemblyzer", "silero"),
              ("+ diarization, resemblyzer backend, energy VAD", "resemblyzer", "energy"),
              ("+ diarization, WavLM backend, silero-vad (no x-vector head: VAD and clock only)", "wavlm", "silero"))


def speed(lines: list[str], seconds: float, repeats: int) -> None:
    """CPU time of the whole process (engine and diarization threads), runs interleaved, median of
    ``repeats``: on a shared machine wall time measures the neighbours as much as the code."""
    import soundfile as sf

    torch.set_grad_enabled(False)
    conv = espeak.conversation(7, 3, seconds)
    path = Path("/tmp") / "bench-diarization.wav"
    sf.write(path, conv.audio, 16000)
    audio_s = len(conv.audio) / 16000
    results: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _, _ in SPEED_RUNS}
    for rep in range(repeats + 1):  # the first round warms up (imports, first calls of each model) unrecorded
        for label, backend, vad in SPEED_RUNS:
            session = Session(backend=backend, latency=2.0, vad=vad) if backend else None  # type: ignore[arg-type]
            result = asyncio.run(_engine_run(path, session))
            if rep:
                results[label].append(result)
    median = {label: np.median(np.array(r), axis=0) for label, r in results.items()}
    base = np.array(results[SPEED_RUNS[0][0]])
    base_cpu = median[SPEED_RUNS[0][0]][1]
    lines += ["### Cost added to the engine (2 s latency, one stream, file read as fast as possible)", "",
              f"{audio_s:.0f} s of audio; CPU seconds of the whole process (all threads), median of {repeats} "
              "interleaved rounds; added: each round's run against the same round's engine alone (median, and "
              "the range over rounds); diarization worker: the CPU seconds of its thread alone; wall time for "
              "reference (2 cores shared with other work).", "",
              "| run | process CPU s | added (process CPU) | range over rounds | worker CPU s | worker / engine alone "
              "| wall s |", "|---|---|---|---|---|---|---|"]
    for label, _, _ in SPEED_RUNS:
        wall, cpu, worker = median[label]
        first = label == SPEED_RUNS[0][0]
        paired = 100 * (np.array(results[label])[:, 1] / base[:, 1] - 1)
        added = "" if first else f"{np.median(paired):+.1f} %"
        spread = "" if first else f"{paired.min():+.1f} to {paired.max():+.1f} %"
        share = "" if first else f"{100 * worker / base_cpu:.1f} %"
        lines.append(f"| {label} | {cpu:.1f} | {added} | {spread} | {worker:.2f} | {share} | {wall:.1f} |")
    lines.append("")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="fewer conversations (a smoke run)")
    p.add_argument("--sections", default="synthetic,espeak,background-draws,speed",
                   help="comma-separated subset to run")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(2)
    lines = ["# Online diarization", "", *cpu_report(), "",
             "`python benchmarks/bench_diarization.py` (DER at collar 0, overlap scored).", ""]
    n = 4 if args.quick else 12
    if "synthetic" in sections:
        compare(lines, f"Synthetic embedding streams ({n} test conversations of 5 minutes, 2-5 speakers)",
                synthetic_cases(range(100, 100 + n // 2)), synthetic_cases(range(n)),
                [0.7, 0.75, 0.8, 0.85, 0.9], [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4])
    if sections & {"espeak", "background-draws"}:
        minutes = 0.5 if args.quick else 1.4
        dev, _ = spoken_cases(range(100, 104 if args.quick else 120), minutes)
        test, seconds = spoken_cases(range(6 if not args.quick else 2), minutes)
    if "espeak" in sections:
        threshold = compare(
            lines, f"espeak-ng conversations, resemblyzer 1.6 s windows every 0.5 s, silero-vad ({len(test)} test "
                   f"conversations, {seconds / 60:.1f} minutes, 2-4 speakers)", dev, test,
            [0.9, 0.91, 0.92, 0.93, 0.94, 0.95], [0.1, 0.15, 0.2, 0.25, 0.3, 0.35])
        through_engine(lines, test, ClusterSettings().with_threshold(threshold), 2.0)
        val = None if args.quick else spoken_cases(range(200, 220), minutes)[0]
        with_background(lines, dev, val, test)
    if "background-draws" in sections:
        background_draws(lines, dev, test, range(12, 14 if args.quick else 17))
    if "speed" in sections:
        speed(lines, 20 if args.quick else 60, 1 if args.quick else 5)
    finish(lines, args.out)


if __name__ == "__main__":
    main()
