"""CPU precision paths (bf16, int8) against our fp32 and transformers' fp32, in one process.

Base-size random weights (transformers' initialisation, loaded through our loader). Every comparison runs
its candidates interleaved, round after round, and reports medians, so that load from other processes on
the machine hits all of them alike; only ratios within this run mean anything. Sections:

1. the one-GEMM shapes of a streaming step and of an offline forward (GFLOP/s), and every linear of the
   encoder once at the same row counts (weights from memory, as in the model);
2. offline Base, 10 s: transformers fp32 vs ours in each precision;
3. streaming C=16, L=250: one stream, and 8 streams stepped together (compute per second of audio);
4. per-layer cosine and relative error against fp32, offline and streaming, on speech;
5. int8 per layer type: one type at a time in int8, the rest fp32 (which layers are sensitive);
6. where a one-stream C=16 step spends its time in each precision: per part of the model (wall time, the
   precisions taking turns chunk by chunk) and per op (torch profiler, self time).

Run: ``OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/bench_precision.py [--out FILE]`` (passive OpenMP
threads: on a machine shared with other work, spinning threads make every small op wait for a descheduled
partner, which slows a streaming step up to 5x and would measure the neighbours, not the paths).
An older CPU's paths, on this one: ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 ... --paths float32,int8
--brief`` (``streamwavlm/cpu.py``: the cap hides the instructions above it, and auto sees what oneDNN sees).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_streaming import stream_latency
from common import cpu_report, finish, hf_model, ours_from_hf, speech

from streamwavlm.checkpoint import load_model
from streamwavlm.model import attention
from streamwavlm.model.linear import PRECISIONS, Linear, linear, pack, packing
from streamwavlm.model.wavlm import WavLM
from streamwavlm.precision import apply, choose_auto, cnn_precision, missing, native_precisions
from streamwavlm.precision_fidelity import measure_precision
from streamwavlm.streaming import StreamPool, StreamSettings
from streamwavlm.streaming.fidelity import compare

C16 = StreamSettings(chunk=16, left=250)


def interleaved(cands: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per candidate; one untimed warm-up call each, then ``repeats`` rounds over all."""
    for fn in cands.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(repeats):
        for k, fn in cands.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def gemm_section(paths: list[str], repeats: int) -> list[str]:
    w, b = torch.randn(3072, 768) * 0.02, torch.zeros(3072)
    lines = ["| rows x 768 -> 3072 | F.linear fp32 GFLOP/s | " + " | ".join(f"packed {p}" for p in paths) + " |",
             "|---|---|" + "---|" * len(paths)]
    packed = {}
    for p in paths:
        with packing(p):  # type: ignore[arg-type]
            packed[p] = pack(w, b)
    for rows in (16, 128, 500):
        x = torch.randn(rows, 768)
        reps = max(1, 2000 // rows)

        def loop(fn: Callable[[], object], reps: int = reps) -> Callable[[], None]:
            def run() -> None:
                for _ in range(reps):
                    fn()
            return run
        cands = {"dense": loop(lambda x=x: F.linear(x, w, b))}
        cands |= {p: loop(lambda x=x, k=packed[p]: linear(x, w, b, k)) for p in paths}
        t = interleaved(cands, repeats * 3)
        gflop = 2 * rows * 768 * 3072 * reps / 1e9
        lines.append(f"| {rows} | {gflop / t['dense']:.0f} | " + " | ".join(
            f"{gflop / t[p]:.0f} ({t['float32'] / t[p]:.2f}x)" for p in paths) + " |")
    return lines


def weight_set_section(paths: list[str], repeats: int) -> list[str]:
    """Every linear of a Base encoder (12 x 768 -> 2328, 768 -> 768, 768 -> 3072, 3072 -> 768: 85 M weights)
    applied once, as a forward does: unlike one matrix called in a loop, the weights stream from memory, which
    bounds a small-batch step. "int8 kernel" is the u8 x s8 product alone on pre-quantised input: the
    difference to "int8" is the per-row quantisation and dequantisation."""
    shapes = [(768, 2328), (768, 768), (768, 3072), (3072, 768)]
    weights = [(torch.randn(o, i) * 0.02, torch.zeros(o)) for _ in range(12) for i, o in shapes]
    packed: dict[str, list] = {}
    for p in paths:
        with packing(p):  # type: ignore[arg-type]
            packed[p] = [pack(w, b) for w, b in weights]
    paths = [*paths, "int8 kernel"] if "int8" in paths else paths
    flop_per_row = sum(2 * w.numel() for w, _ in weights)
    lines = ["| rows | " + " | ".join(f"{p} ms (GFLOP/s)" for p in paths) + " |", "|---|" + "---|" * len(paths)]
    for rows in (16, 128, 500):
        xs = {i: torch.randn(rows, i) for i, _ in shapes}
        cands: dict[str, Callable[[], object]] = {
            p: lambda p=p, xs=xs: [k(xs[w.shape[1]]) for k, (w, _) in zip(packed[p], weights, strict=True)]
            for p in paths if p in packed}
        if "int8 kernel" in paths:
            qs = {i: torch.randint(0, 255, (rows, i), dtype=torch.uint8) for i in xs}
            cands["int8 kernel"] = lambda qs=qs: [
                torch.ops.onednn.qlinear_pointwise(qs[w.shape[1]], 1.0, 128, k.weight, k.scale, k.zero_points,
                                                   k.bias, 1.0, 0, torch.float32, "none", [None], "")
                for k, (w, _) in zip(packed["int8"], weights, strict=True)]
        t = interleaved(cands, repeats)
        lines.append(f"| {rows} | " + " | ".join(
            f"{1000 * t[p]:.1f} ({flop_per_row * rows / t[p] / 1e9:.0f})" for p in paths) + " |")
    return lines


def sensitivity(model, wav: torch.Tensor) -> list[str]:
    """int8 in one layer type at a time (fp32 elsewhere): worst per-layer cosine and last-layer error."""
    apply(model, "float32")
    ref = model(wav[None]).hidden_states
    roles: dict[str, Callable[[], list]] = {
        "QKV+gate": lambda: [layer.attn for layer in model.encoder.layers],
        "attention output": lambda: [layer.attn.out_proj for layer in model.encoder.layers],
        "FFN in": lambda: [layer.ffn.fc1 for layer in model.encoder.layers],
        "FFN out": lambda: [layer.ffn.fc2 for layer in model.encoder.layers],
        "feature projection": lambda: [model.projection.linear],
    }
    lines = ["| int8 only in | worst layer cosine | last layer cosine | last layer rel err |", "|---|---|---|---|"]
    for role, modules in roles.items():
        apply(model, "float32")
        with packing("int8"):
            for m in modules():
                m.derive() if isinstance(m, Linear) else m.fuse()
        out = model(wav[None]).hidden_states
        pairs = [compare(a[0], r[0]) for a, r in zip(out, ref, strict=True)]
        lines.append(f"| {role} | {min(c for c, _ in pairs):.5f} | {pairs[-1][0]:.5f} | {pairs[-1][1]:.2e} |")
    apply(model, "float32")
    model.frontend.derive("bfloat16")
    out = model(wav[None]).hidden_states
    pairs = [compare(a[0], r[0]) for a, r in zip(out, ref, strict=True)]
    lines.append(f"| (bf16 CNN convs only) | {min(c for c, _ in pairs):.5f} | {pairs[-1][0]:.5f} | "
                 f"{pairs[-1][1]:.2e} |")
    apply(model, "float32")
    return lines


def profile(model, wav: torch.Tensor, paths: list[str], top: int = 10) -> list[str]:
    """Self CPU milliseconds of the ops that take most time in one 1-stream C=16 run, per precision."""
    per: dict[str, dict[str, float]] = {}
    calls: dict[str, float] = {}
    for p in paths:
        apply(model, p)  # type: ignore[arg-type]
        stream_latency(model, [wav], C16)  # oneDNN creates its kernels on the first run
        with torch.profiler.profile() as prof:
            steps, _ = stream_latency(model, [wav], C16)
        per[p] = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
        calls[p] = sum(e.count for e in prof.key_averages()) / len(steps)
    apply(model, "float32")
    ops = sorted({k for d in per.values() for k in d}, key=lambda k: -max(d.get(k, 0.0) for d in per.values()))
    lines = ["| op | " + " | ".join(f"{p} ms" for p in paths) + " |", "|---|" + "---|" * len(paths)]
    lines += [f"| {k} | " + " | ".join(f"{per[p].get(k, 0.0):.0f}" for p in paths) + " |" for k in ops[:top]]
    lines.append("| total | " + " | ".join(f"{sum(per[p].values()):.0f}" for p in paths) + " |")
    lines.append("| op calls per step (views included) | " + " | ".join(f"{calls[p]:.0f}" for p in paths) + " |")
    return lines


@contextlib.contextmanager
def timed_parts(models: dict[str, WavLM], clock: dict[str, float]) -> Iterator[None]:
    """Add the wall time of each part of the model's step to ``clock[part]`` (the model's methods wrapped on
    the instances; the attention core through the module's global) while the block runs."""
    def wrap(obj: object, name: str, part: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock[part] += 1000 * (time.perf_counter() - start)
        setattr(obj, name, timed)
        wrapped.append((obj, name, fn))

    wrapped: list[tuple[object, str, Callable]] = []
    for m in models.values():
        wrap(m.frontend, "forward", "CNN front end")
        wrap(m.projection, "forward", "feature projection")
        wrap(m.encoder.pos_conv, "window", "positional conv")
        wrap(m.encoder, "forward", "Transformer, 12 layers")
        for layer in m.encoder.layers:
            wrap(layer.attn, "project", "  QKV+gate linear (with split, bf16 cast, gate)")
            wrap(layer.attn.out_proj, "forward", "  attention output linear")
            wrap(layer.ffn.fc1, "forward", "  FFN in linear")
            wrap(layer.ffn.fc2, "forward", "  FFN out linear")
    wrap(attention, "gated_rel_attention", "  attention core (bias, softmax, two products)")
    try:
        yield
    finally:
        for obj, name, fn in reversed(wrapped):  # instances fall back to their class's method; the module's global
            delattr(obj, name) if obj is not attention else setattr(obj, name, fn)


def parts_section(models: dict[str, WavLM], wav: torch.Tensor, skip: int = 3) -> list[str]:
    """Mean wall milliseconds per one-stream C=16 step, per part of the model, the precisions taking turns."""
    pools = {p: StreamPool(m, C16) for p, m in models.items()}
    slots = {p: pool.open("s") for p, pool in pools.items()}
    sums: dict[str, dict[str, float]] = {p: defaultdict(float) for p in models}
    clock: dict[str, float] = defaultdict(float)
    steps, pos = 0, 0
    with timed_parts(models, clock):
        while pos + pools["float32"].need(slots["float32"]) <= wav.numel():
            n = pools["float32"].need(slots["float32"])
            for p, pool in pools.items():
                clock.clear()
                start = time.perf_counter()
                pool.step({slots[p]: wav[pos:pos + n]})
                clock["step"] = 1000 * (time.perf_counter() - start)
                if steps >= skip:
                    for k, v in clock.items():
                        sums[p][k] += v
            pos += n
            steps += 1
    counted = steps - skip
    order = ["step", "CNN front end", "feature projection", "positional conv", "Transformer, 12 layers",
             "  QKV+gate linear (with split, bf16 cast, gate)", "  attention core (bias, softmax, two products)",
             "  attention output linear", "  FFN in linear", "  FFN out linear"]
    mean = {p: {k: v / counted for k, v in d.items()} for p, d in sums.items()}
    for d in mean.values():
        d["  rest of the layers (K/V ring writes, norms, residuals, GELU)"] = d["Transformer, 12 layers"] - sum(
            d[k] for k in order[5:])
        d["rest of the step (statistics, pool state, outputs)"] = d["step"] - sum(d[k] for k in order[1:5])
    order += ["  rest of the layers (K/V ring writes, norms, residuals, GELU)",
              "rest of the step (statistics, pool state, outputs)"]
    lines = ["| part | " + " | ".join(f"{p} ms" for p in models) + " |", "|---|" + "---|" * len(models)]
    lines += [f"| {k} | " + " | ".join(f"{mean[p][k]:.1f}" for p in models) + " |" for k in order]
    return lines


def stepped_together(models: dict[str, WavLM], wavs: list[torch.Tensor], settings: StreamSettings,
                     skip: int = 3) -> dict[str, float]:
    """Median milliseconds of one step of ``len(wavs)`` streams, per model; the models take turns on every
    chunk, so that load from other processes hits each alike. The first ``skip`` steps (kernel creation,
    the longer first step) are left out."""
    pools = {p: StreamPool(m, settings, capacity=len(wavs)) for p, m in models.items()}
    slots = {p: [pool.open(f"s{i}") for i in range(len(wavs))] for p, pool in pools.items()}
    steps: dict[str, list[float]] = {p: [] for p in models}
    pos = 0
    while True:
        n = next(iter(pools.values())).need(0)
        if pos + n > wavs[0].numel():
            break
        for p, pool in pools.items():
            audio = {slot: wav[pos:pos + n] for slot, wav in zip(slots[p], wavs, strict=True)}
            start = time.perf_counter()
            pool.step(audio)
            steps[p].append(1000 * (time.perf_counter() - start))
        pos += n
    return {p: statistics.median(v[skip:]) for p, v in steps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0, help="audio length of the offline forward")
    ap.add_argument("--stream-seconds", type=float, default=20.0, help="audio length per stream")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--paths", type=lambda v: v.split(","), metavar="P,P",
                    help="precisions to measure, natively or not (default: the native ones); with oneDNN's ISA cap "
                         "(ONEDNN_MAX_CPU_ISA=AVX2 ...) this measures the paths an older CPU would run")
    ap.add_argument("--brief", action="store_true",
                    help="only the offline and streaming speeds and the agreement with fp32 (no GEMM, per-type, "
                         "per-part or per-op sections)")
    ap.add_argument("--out", type=Path, help="also write the report to this markdown file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    native = native_precisions()
    paths = args.paths or native
    if paths[0] != "float32" or not set(paths) <= set(PRECISIONS):
        ap.error(f"--paths: float32 first, then any of {', '.join(PRECISIONS[1:])}")
    auto = choose_auto(use_cache=False)
    lines = [*cpu_report(), "",
             f"Native precisions: {', '.join(native)}"
             + "".join(f"; {p} {'forced' if p in paths else 'skipped'} ({missing(p)})"
                       for p in PRECISIONS if p not in native)
             + f". auto: {auto.describe()}.",
             "Base size, random weights (transformers' initialisation), the bundled speech. One model per "
             "precision, so that the candidates take turns call by call (offline: median of "
             f"{args.repeats} rounds after a warm-up; streaming: median step, the models alternating chunk by "
             "chunk)."]
    if not args.brief:
        lines += ["", "### One GEMM", "", *gemm_section(paths, args.repeats),
                  "", "### Every linear of the encoder once (85 M weights from memory)", "",
                  *weight_set_section(paths, args.repeats)]

    ref = hf_model("base")
    with tempfile.TemporaryDirectory() as d:
        model = ours_from_hf(ref, Path(d))
        models = {p: load_model(d, dtype=p) for p in paths}
    wav = speech(args.seconds)
    secs = args.seconds
    t = interleaved({"transformers": lambda: ref(wav[None]),
                     **{p: lambda m=m: m(wav[None]) for p, m in models.items()}}, args.repeats)
    lines += ["", f"### Offline forward, {secs:.0f} s", "",
              "| path | seconds | RTF | vs our fp32 | speed-up over transformers fp32 |", "|---|---|---|---|---|",
              f"| transformers fp32 | {t['transformers']:.2f} | {t['transformers'] / secs:.3f} | | 1.00x |"]
    lines += [f"| ours {p} (CNN {cnn_precision(p)}) | {t[p]:.2f} | {t[p] / secs:.3f} | {t[p] / t['float32']:.2f}x "
              f"| {t['transformers'] / t[p]:.2f}x |" for p in paths]
    print("\n".join(lines), flush=True)

    long = speech(args.stream_seconds)
    wavs = [long.roll(i * 4000) for i in range(args.streams)]
    chunk_s = C16.chunk * model.cfg.hop / 16000
    one = stepped_together(models, wavs[:1], C16)
    many = stepped_together(models, wavs, C16)
    lines += ["", f"### Streaming C=16, L=250 ({C16.latency_ms(model.cfg):.0f} ms algorithmic latency; a step is "
              f"{chunk_s * 1000:.0f} ms of audio per stream)", "",
              f"| path | 1 stream: step ms (RTF) | vs our fp32 | {args.streams} streams: step ms (RTF per stream) | "
              f"vs our fp32 ({args.streams} streams) | vs our fp32 (1 stream) |", "|---|---|---|---|---|---|"]
    for p in paths:
        per = many[p] / args.streams
        lines.append(f"| {p} | {one[p]:.1f} ({one[p] / 1000 / chunk_s:.3f}) | {one[p] / one['float32']:.2f}x | "
                     f"{many[p]:.1f} ({per / 1000 / chunk_s:.3f}) | {many[p] / many['float32']:.2f}x | "
                     f"{per / one['float32']:.2f}x |")
    print("\n".join(lines[-len(paths) - 4:]), flush=True)

    lines += ["", "### Agreement with fp32 per hidden state (cosine: mean over frames; rel err: Frobenius)", ""]
    for p in paths[1:]:
        rows = measure_precision(model, wav, p, [C16])  # type: ignore[arg-type]
        lines += [f"{p}:", "", "| path | " + " | ".join(f"h{i}" for i in range(len(rows[0].cosine))) + " |",
                  "|---|" + "---|" * len(rows[0].cosine)]
        for r in rows:
            lines.append(f"| {r.path} cos | " + " | ".join(f"{c:.5f}" for c in r.cosine) + " |")
            lines.append(f"| {r.path} rel err | " + " | ".join(f"{e:.1e}" for e in r.rel_error) + " |")
        lines.append("")
    if args.brief:
        finish(lines, args.out)
        return
    if "int8" in paths:
        lines += ["### int8 per layer type (offline, the rest fp32)", "", *sensitivity(model, wav[: 4 * 16000])]
    lines += ["", "### Where one stream's step goes, per part (C=16, L=250; mean wall ms per step)", "",
              *parts_section(models, long)]
    lines += ["", "### Where one stream's time goes (C=16, L=250; self CPU time per op)", "",
              *profile(model, wav, paths)]
    finish(lines, args.out)


if __name__ == "__main__":
    main()
