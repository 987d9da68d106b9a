"""Online diarization: clustering against the diart-style baseline on synthetic embedding streams, DER per
latency on espeak-ng conversations through the resemblyzer backend, and the cost diarization adds to the
engine. Thresholds are tuned on development seeds / conversations that are not reported.

    python benchmarks/bench_diarization.py [--out benchmarks/results/diarization.md] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_report, finish

from streamwavlm.audio.files import FileSource
from streamwavlm.checkpoint import model_from_setting
from streamwavlm.diarization import espeak, synthetic
from streamwavlm.diarization.baseline import BaselineSettings, IncrementalClustering
from streamwavlm.diarization.clustering import ClusterSettings, OnlineClustering
from streamwavlm.diarization.der import Score, score
from streamwavlm.diarization.diarizer import Diarizer
from streamwavlm.diarization.embedders import ResemblyzerEmbedder
from streamwavlm.diarization.pipeline import Session
from streamwavlm.diarization.rttm import Segment
from streamwavlm.diarization.vad import FRAME_SECONDS, SileroVad, speech_span
from streamwavlm.diarization.window import Window
from streamwavlm.engine import Engine
from streamwavlm.streaming import StreamPool, StreamSettings

LATENCIES = (0.5, 1.0, 2.0, 5.0)


def replay(speech: np.ndarray, windows: list[Window], clustering: object, latency: float) -> list[Segment]:
    """The diarizer over recorded VAD frames and windows, stepped at each window's end as live."""
    d = Diarizer(clustering, latency=latency, frame=FRAME_SECONDS)  # type: ignore[arg-type]
    d.add_speech(speech)
    for w in windows:
        d.add_window(Window(w.start, w.end, w.vector))
        d.advance(w.end)
    d.finish()
    return d.segments()


def total(cases: list[tuple[list[Segment], np.ndarray, list[Window]]], make: Callable[[], object],
          latency: float) -> Score:
    s = Score()
    for ref, speech, windows in cases:
        s = s.add(score(ref, replay(speech, windows, make(), latency)))
    return s


def ours(threshold: float) -> Callable[[], OnlineClustering]:
    settings = ClusterSettings().with_threshold(threshold)
    return lambda: OnlineClustering(settings)


def baseline(delta: float) -> Callable[[], IncrementalClustering]:
    return lambda: IncrementalClustering(BaselineSettings(delta_new=delta))


def compare(lines: list[str], title: str, dev: list, test: list, grid_ours: list[float],
            grid_base: list[float]) -> None:
    """Tune each method's threshold on ``dev`` at 2 s latency, report DER on ``test`` at every latency."""
    best_o = min(grid_ours, key=lambda t: total(dev, ours(t), 2.0).der)
    best_b = min(grid_base, key=lambda t: total(dev, baseline(t), 2.0).der)
    lines += [f"### {title}", "", f"Tuned on the development split at 2 s latency: ours new_threshold {best_o}, "
              f"baseline delta_new {best_b}.", "",
              "| latency (s) | ours DER % | (miss / FA / confusion) | baseline DER % | (miss / FA / confusion) |",
              "|---|---|---|---|---|"]
    for lat in LATENCIES:
        o, b = total(test, ours(best_o), lat), total(test, baseline(best_b), lat)
        parts = [f"{100 * x.der:.1f} | {100 * x.missed / x.total:.1f} / {100 * x.false_alarm / x.total:.1f} / "
                 f"{100 * x.confusion / x.total:.1f}" for x in (o, b)]
        lines.append(f"| {lat} | {parts[0]} | {parts[1]} |")
    lines.append("")


def synthetic_cases(seeds: range) -> list:
    out = []
    for seed in seeds:
        c = synthetic.conversation(seed)
        out.append((c.reference, c.speech, c.windows))
    return out


def spoken_cases(seeds: range, minutes: float) -> tuple[list, float]:
    out, seconds = [], 0.0
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        conv = espeak.conversation(1000 + seed, int(rng.integers(2, 5)), minutes * 60)
        speech = SileroVad().push(conv.audio)
        windows = []
        emb = ResemblyzerEmbedder()
        select = functools.partial(speech_span, speech, min_speech=ClusterSettings().min_speech)
        for i in range(0, len(conv.audio), 1600):  # windows chosen as StreamDiarization chooses them
            windows += emb.push(conv.audio[i:i + 1600], select)
        out.append((conv.reference, speech, windows))
        seconds += len(conv.audio) / 16000
    return out, seconds


async def _engine_run(path: Path, session: Session | None) -> float:
    model, _ = model_from_setting(None)
    pool = StreamPool(model, StreamSettings(), capacity=1)
    start = time.perf_counter()
    sinks = [session.sink] if session else []
    async with Engine(pool, sinks) as engine:
        source = FileSource(path)
        engine.add(session.tap(source, "c") if session else source, "c", live=False)
        await engine.drain()
    return time.perf_counter() - start


def speed(lines: list[str], seconds: float) -> None:
    import soundfile as sf

    torch.set_grad_enabled(False)
    conv = espeak.conversation(7, 3, seconds)
    path = Path("/tmp") / "bench-diarization.wav"
    sf.write(path, conv.audio, 16000)
    audio_s = len(conv.audio) / 16000
    asyncio.run(_engine_run(path, None))  # warm-up
    base = asyncio.run(_engine_run(path, None))
    rows = [("engine alone (random Base+ weights, chunk 16)", base, None)]
    for label, backend, vad in (("+ diarization, resemblyzer backend, silero-vad", "resemblyzer", "silero"),
                                ("+ diarization, resemblyzer backend, energy VAD", "resemblyzer", "energy"),
                                ("+ diarization, WavLM backend, silero-vad (no x-vector head: VAD and clock only)",
                                 "wavlm", "silero"),
                                ("+ diarization, WavLM backend, energy VAD (no x-vector head: VAD and clock only)",
                                 "wavlm", "energy")):
        t = asyncio.run(_engine_run(path, Session(backend=backend, latency=2.0, vad=vad)))  # type: ignore[arg-type]
        rows.append((label, t, t / base - 1))
    lines += ["### Cost added to the engine (2 s latency, one stream, file read as fast as possible)", "",
              f"{audio_s:.0f} s of audio; wall time and real-time factor; 2 CPU threads shared with other work.", "",
              "| run | wall s | RTF | added |", "|---|---|---|---|"]
    for label, t, added in rows:
        lines.append(f"| {label} | {t:.1f} | {t / audio_s:.3f} | {'' if added is None else f'{100 * added:+.0f} %'} |")
    lines.append("")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="fewer conversations (a smoke run)")
    p.add_argument("--sections", default="synthetic,espeak,speed", help="comma-separated subset to run")
    args = p.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(2)
    lines = ["# Online diarization", "", *cpu_report(), "",
             "`python benchmarks/bench_diarization.py` (DER at collar 0, overlap scored).", ""]
    n = 4 if args.quick else 12
    if "synthetic" in sections:
        compare(lines, f"Synthetic embedding streams ({n} test conversations of 5 minutes, 2-5 speakers)",
                synthetic_cases(range(100, 100 + n // 2)), synthetic_cases(range(n)),
                [0.65, 0.7, 0.75, 0.8, 0.85], [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4])
    if "espeak" in sections:
        minutes = 0.5 if args.quick else 1.4
        dev, _ = spoken_cases(range(100, 104), minutes)
        test, seconds = spoken_cases(range(6 if not args.quick else 2), minutes)
        compare(lines, f"espeak-ng conversations, resemblyzer 1.6 s windows every 0.5 s, silero-vad "
                       f"({len(test)} test conversations, {seconds / 60:.1f} minutes, 2-4 speakers)", dev, test,
                [0.74, 0.78, 0.8, 0.82, 0.84, 0.86], [0.1, 0.15, 0.2, 0.25, 0.3, 0.35])
    if "speed" in sections:
        speed(lines, 20 if args.quick else 60)
    finish(lines, args.out)


if __name__ == "__main__":
    main()
