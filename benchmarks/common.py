"""Helpers shared by the benchmark scripts: timing, peak memory, random-weight models of released sizes."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_report() -> list[str]:
    """The first lines of every report: CPU model and the vector/matrix features that decide which precision
    paths run natively (ratios are only comparable within one run on one machine)."""
    from streamwavlm.cpu import cpu_flags, cpu_name, isa_cap

    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
    found = " ".join(f for f in wanted if f in cpu_flags()) or "none of the listed"
    cap = isa_cap()
    return [f"CPU: {cpu_name()}, {os.cpu_count()} cores; flags: {found}"
            + (f" (oneDNN's ISA capped at {cap}: the flags above it are hidden)" if cap else "")
            + f"; torch {torch.__version__}, {torch.get_num_threads()} threads"]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory ``fn`` adds above the current RSS (Linux: resets VmHWM via clear_refs).

    Memory freed by an earlier call is first given back to the system (glibc ``malloc_trim``); otherwise
    it stays resident, a later call reuses it without raising the high-water mark, and reads as free.
    """
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) / 1024


def hf_model(size: str, seed: int = 0):
    """A random-weight transformers ``WavLMModel`` with the released Base or Large architecture."""
    from transformers import WavLMConfig, WavLMModel

    large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 feat_extract_norm="layer", do_stable_layer_norm=True)
    torch.manual_seed(seed)
    return WavLMModel(WavLMConfig(**(large if size == "large" else {}))).eval()


def ours_from_hf(model, directory: Path):
    """Our model with the same weights, through a real HF directory and our loader."""
    import json

    from streamwavlm.checkpoint import load_model

    model.save_pretrained(directory)
    # transformers' WavLMModel never normalises the waveform; say so, so both see the same input
    (directory / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    return load_model(directory)


def speech(seconds: float) -> torch.Tensor:
    """``seconds`` of the bundled speech sample, repeated as needed."""
    from streamwavlm.audio.files import load_audio
    from streamwavlm.commands.common import bundled_sample

    wav = torch.from_numpy(load_audio(bundled_sample()))
    n = int(seconds * 16000)
    return wav.repeat(n // wav.numel() + 1)[:n].clone()


def finish(lines: list[str], out: Path | None) -> None:
    """Print the report and, when asked, write it where ``--out`` says."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text)
