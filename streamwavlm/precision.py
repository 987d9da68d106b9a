"""Compute precision of the CPU path: which one this CPU runs natively, which is fastest, and applying it.

The model's parameters and activations stay fp32; a precision is a derived, packed copy of each weight
(:mod:`streamwavlm.model.linear`, :meth:`FrontEnd.derive`), so the offline forward, the streaming pool and the
x-vector head all follow the model's setting without knowing about it. ``docs/precision.md`` has the
semantics and the measured numbers.

Why detection *and* a benchmark: a path the CPU lacks instructions for still runs, but emulated (bf16 on
AVX-512 without BF16: about 2x slower than fp32) or less accurate (int8 without VNNI: 7-bit weights), and on
an AVX2-only CPU oneDNN cannot run bf16 at all; so ``auto`` considers only the paths that the CPU's flags
(:mod:`streamwavlm.cpu`, oneDNN's ISA cap included) say are native, and then times them on the shapes of a
streaming step, because which native path wins depends on the core (AMX, VNNI width, memory bandwidth). The
result is cached per CPU, its usable flags, thread count and torch version, so start-up pays for the benchmark
once.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from .cpu import bf16_runs, cpu_flags, cpu_name, isa_cap, x86
from .model.linear import PRECISIONS, Linear, Precision, pack, packing

Dtype = Literal["float32", "bfloat16", "int8", "auto"]
DTYPES: tuple[str, ...] = get_args(Dtype)
CACHE_FILE = "precision.json"
CACHE_VERSION = 1

# x86 flags (as /proc/cpuinfo names them) that give each path native instructions; any one suffices
NATIVE_FLAGS: dict[Precision, tuple[str, ...]] = {
    "bfloat16": ("avx512_bf16", "amx_bf16"),
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8"),
}
# a faster path must beat fp32 by this factor in the start-up benchmark to be chosen (noise margin)
MIN_GAIN = 1.1
# what a forced path that is not native costs; measured under oneDNN's ISA caps (docs/precision.md)
NOT_NATIVE: dict[Precision, str] = {
    "bfloat16": "oneDNN emulates it by conversion, measured 2.1-2.5x slower than float32 on AVX-512 without BF16. "
                "Use --dtype auto or float32.",
    "int8": "without VNNI its 16-bit pair sums would saturate, so weights take 7 bits: less accurate, and measured "
            "no faster than float32 for one stream. Use --dtype auto or float32.",
}
# the benchmark's shapes: one C=16 streaming step of a Base linear, and a batch of streams / offline rows
BENCH_ROWS = (16, 256)
BENCH_IN, BENCH_OUT = 768, 3072


class PrecisionError(ValueError):
    """An unknown dtype, or one the CPU cannot run natively where emulation is not allowed."""


@dataclass(frozen=True)
class Choice:
    """The precision a model runs in and why: ``source`` is ``forced``, ``measured`` or ``cached``."""

    precision: Precision
    reason: str
    source: str
    ms: dict[str, float] = field(default_factory=dict)  # benchmark time per candidate (sum over shapes)

    def describe(self) -> str:
        """One line for people: what was chosen and why."""
        timing = ", ".join(f"{k} {v:.2f} ms" for k, v in self.ms.items())
        return f"{self.precision} ({self.source}: {self.reason}{'; benchmark ' + timing if timing else ''})"


def missing(precision: Precision, flags: frozenset[str] | None = None) -> str | None:
    """Why ``precision`` is not native on this CPU, or ``None`` if it is."""
    if precision == "float32":
        return None
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if not x86():
        return f"native {precision} is detected on x86-64 only (this CPU: {platform.machine()})"
    flags = cpu_flags() if flags is None else flags
    wanted = NATIVE_FLAGS[precision]
    if not flags & set(wanted):
        cap = isa_cap()
        return f"the CPU has none of {', '.join(wanted)}" + (f" under oneDNN's ISA cap {cap}" if cap else "")
    return None


def native_precisions(flags: frozenset[str] | None = None) -> list[Precision]:
    """The precisions this CPU runs natively, fp32 first."""
    return [p for p in PRECISIONS if missing(p, flags) is None]


def _time_candidates(candidates: list[Precision], repeats: int = 5) -> dict[str, float]:
    """Median milliseconds per candidate of one product at each :data:`BENCH_ROWS` shape, interleaved so
    that load from other processes hits every candidate alike."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(BENCH_OUT, BENCH_IN, generator=gen) * 0.02
    bias = torch.zeros(BENCH_OUT)
    inputs = [torch.randn(m, BENCH_IN, generator=gen) for m in BENCH_ROWS]
    packed = {}
    for p in candidates:
        with packing(p):
            packed[p] = pack(weight, bias)
    times: dict[str, list[float]] = {p: [] for p in candidates}
    with torch.no_grad():
        for rep in range(repeats + 1):
            for p, fn in packed.items():
                assert fn is not None
                start = time.perf_counter()
                for x in inputs:
                    fn(x)
                if rep:  # the first round warms up (oneDNN creates its kernels on the first call)
                    times[p].append(1000 * (time.perf_counter() - start))
    return {p: statistics.median(t) for p, t in times.items()}


def _cache_path() -> Path:
    from .download import cache_root

    return cache_root() / CACHE_FILE


def _cache_key(flags: frozenset[str]) -> str:
    relevant = sorted(flags & {f for fs in NATIVE_FLAGS.values() for f in fs} | flags & {"avx2", "avx512f"})
    text = json.dumps([CACHE_VERSION, cpu_name(), relevant, torch.__version__, torch.get_num_threads()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache() -> dict[str, dict]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(entries: dict[str, dict]) -> None:
    """Best effort: a read-only home only means the benchmark runs again next time."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(path)
    except OSError:
        pass


def choose_auto(use_cache: bool = True) -> Choice:
    """The fastest native precision on this CPU, from the cache or from a short benchmark (~0.5 s)."""
    flags = cpu_flags()
    key = _cache_key(flags)
    entries = _read_cache() if use_cache else {}
    if key in entries:
        e = entries[key]
        if e.get("precision") in native_precisions(flags):
            return Choice(e["precision"], e["reason"], "cached", e.get("ms", {}))
    candidates = native_precisions(flags)
    lacking = "; ".join(f"{p} not native ({missing(p, flags)})" for p in PRECISIONS if p not in candidates)
    if candidates == ["float32"]:
        choice = Choice("float32", lacking, "measured")
    else:
        ms = _time_candidates(candidates)
        best = min(ms, key=ms.__getitem__)
        if ms["float32"] / ms[best] < MIN_GAIN:
            best = "float32"
        gain = ms["float32"] / ms[best]
        why = (f"fastest native path, {gain:.1f}x fp32 on {'/'.join(map(str, BENCH_ROWS))} x {BENCH_IN} -> "
               f"{BENCH_OUT}" if best != "float32" else f"no native path beat fp32 by {MIN_GAIN}x")
        choice = Choice(best, why + (f"; {lacking}" if lacking else ""), "measured",  # type: ignore[arg-type]
                        {k: round(v, 3) for k, v in ms.items()})
    if use_cache:
        entries[key] = {"precision": choice.precision, "reason": choice.reason, "ms": choice.ms,
                        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        _write_cache(entries)
    return choice


def _check_runs(precision: Precision) -> None:
    """Raise :class:`PrecisionError` where oneDNN cannot run ``precision`` at all (bf16 on an AVX2-only CPU,
    where torch's oneDNN calls would fail deep inside with a RuntimeError)."""
    if precision == "bfloat16" and not bf16_runs(cpu_flags()):
        raise PrecisionError(f"dtype bfloat16 cannot run on this CPU ({missing(precision)}; oneDNN's bf16 needs "
                             "AVX-512 BW/VL/DQ or AVX-NE-CONVERT). Use --dtype auto or float32.")


def resolve(dtype: str, allow_emulated: bool = True) -> Choice:
    """The :class:`Choice` for a user's ``dtype``. A forced path that is not native raises
    :class:`PrecisionError` unless ``allow_emulated``, in which case it warns (:data:`NOT_NATIVE` says what it
    costs); one that cannot run here at all always raises."""
    if dtype not in DTYPES:
        raise PrecisionError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return choose_auto()
    precision: Precision = dtype  # type: ignore[assignment]
    why = missing(precision)
    if why is None:
        return Choice(precision, "requested; the CPU runs it natively", "forced")
    _check_runs(precision)
    message = f"dtype {dtype} is not native on this CPU ({why}); " + NOT_NATIVE[precision]
    if not allow_emulated:
        raise PrecisionError(message)
    warnings.warn(f"PRECISION NOT NATIVE: {message}", RuntimeWarning, stacklevel=3)
    return Choice(precision, f"forced although not native ({why})", "forced")


def conv_precision(precision: Precision) -> Precision:
    """The precision of the products outside the linear layers under a model precision: the CNN's
    convolutions 1.., the positional convolution and the attention's two products (with q, k, v and a
    pool's K/V rings kept in it).

    Every linear layer follows the model precision (int8 in every layer type measured above 0.9998 cosine:
    docs/precision.md). The positional convolution and the attention have no int8 path, so under int8 they
    run in bf16 where that is native (the CNN's convolutions: :func:`cnn_precision`). Conv 0 (one input
    channel, 0.2 % of the FLOPs), the x-vector head, every normalisation, softmax, the gate and the
    relative-position bias stay fp32 in every mode.
    """
    if precision == "int8":
        return "bfloat16" if missing("bfloat16") is None else "float32"
    return precision


def cnn_precision(precision: Precision) -> Precision:
    """The precision of CNN convolutions 1..: :func:`conv_precision`'s, except under native int8 on a CPU
    without native bf16 (VNNI but no BF16: Cascade Lake, Ice Lake), where they run in int8 instead of fp32:
    there the CNN is the largest fp32 part of an int8 step (docs/precision.md). Where bf16 is native it stays
    bf16, which is more accurate and nearly as fast."""
    low = conv_precision(precision)
    return "int8" if precision == "int8" and low == "float32" and missing("int8") is None else low


def apply(model: nn.Module, precision: Precision) -> None:
    """Re-derive every packed copy of ``model`` (a :class:`~streamwavlm.model.wavlm.WavLM`) for ``precision``."""
    _check_runs(precision)
    with packing(precision):
        for layer in model.encoder.layers:  # type: ignore[union-attr]
            layer.attn.fuse()
        for module in model.modules():
            if isinstance(module, Linear):
                module.derive()
    low = conv_precision(precision)
    param = next(model.parameters())
    on_cpu = param.device.type == "cpu" and param.dtype == torch.float32  # as pack() and FrontEnd.derive ask
    dtype = torch.bfloat16 if low == "bfloat16" and on_cpu else torch.float32
    for layer in model.encoder.layers:  # type: ignore[union-attr]
        layer.attn.kv_dtype = dtype
    model.encoder.pos_conv.derive(dtype)  # type: ignore[union-attr,operator]
    model.frontend.derive(cnn_precision(precision))  # type: ignore[union-attr,operator]


def set_precision(model: nn.Module, dtype: str | Choice = "auto", allow_emulated: bool = True) -> Choice:
    """Run ``model`` in ``dtype`` (``float32``, ``bfloat16``, ``int8``, ``auto``, or the :class:`Choice`
    that :func:`resolve` made) from now on, including after its weights are reloaded; returns what was
    chosen and why (also kept as ``model.precision``)."""
    choice = dtype if isinstance(dtype, Choice) else resolve(dtype, allow_emulated)
    model.precision = choice  # type: ignore[assignment]  # read by WavLM.derive after every load
    apply(model, choice.precision)
    return choice


def precision_of(model: nn.Module) -> Choice:
    """The model's current :class:`Choice` (fp32 when :func:`set_precision` was never called)."""
    return getattr(model, "precision", None) or Choice("float32", "default", "forced")


def report(choice: Choice) -> str:
    """The choice for a command's start-up line, with the CPU and thread count it was decided on."""
    return f"{choice.describe()}; CPU {cpu_name()}, {torch.get_num_threads()} threads"


def to_dict(choice: Choice) -> dict:
    """The choice with the facts it was made on, for ``--json`` output."""
    return asdict(choice) | {"cpu": cpu_name(), "threads": torch.get_num_threads(), "native": native_precisions()}
