"""GPU benchmark of WavLM's gated relative-position attention: the Triton kernel against the alternatives.

Per shape and dtype (d = 64, a 1601-entry bias table as in WavLM) it times

* ``triton``: :func:`gated_rel_attention_triton` (precomputed gate), the reference for every ratio;
* ``sdpa+bias``: gating a materialised ``(B, H, Tq, Tk)`` bias, then SDPA with it as a float mask (what
  the reference model does per layer; SDPA cannot use its flash backend with a float mask);
* ``flex``: compiled FlexAttention whose ``score_mod`` gathers the table and the gate (no ``T x T`` tensor);
* ``eager``: :func:`gated_rel_attention_torch`, the CPU/reference path;

at streaming shapes (many streams, tens of queries against a K/V cache of hundreds of keys) and offline
shapes (one utterance, Tq = Tk = T), plus SDPA's flash backend without any bias at the offline shapes
(the issue's target: the kernel at >= 70% of its throughput at T = 3000).

Columns: median time (``triton.testing.do_bench``), TFLOP/s (4*B*H*Tq*Tk*d, the two matmuls), GB/s
(the minimum traffic: q, k, v, out, gate and positions, the same bytes for every method), the time
relative to the kernel (> 1: the kernel is faster) and the max abs difference from the kernel's output.

    python benchmarks/bench_attention_gpu.py --quick            # a few shapes, fp16, ~1 min
    python benchmarks/bench_attention_gpu.py --out bench.md     # everything (tens of minutes: flex compiles)
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from streamwavlm.kernels import KeyLayout
from streamwavlm.kernels.gate import gate_from_logits
from streamwavlm.kernels.gated_attention import gated_rel_attention_torch
from torch import Tensor

HEAD_DIM = 64
MAX_DIST = 800  # WavLM's table: distances clamped to +-800, 1601 entries per head
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
METHODS = ("triton", "sdpa+bias", "flex", "eager")
SECTIONS = ("streaming", "offline")
FLASH_TARGET = 0.70


@dataclass(frozen=True)
class Shape:
    """One attention call: ``batch`` streams (or utterances), ``tq`` queries against ``tk`` keys each."""

    batch: int
    heads: int
    tq: int
    tk: int

    @property
    def offline(self) -> bool:
        return self.tq == self.tk and self.batch == 1

    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.tq * self.tk * HEAD_DIM

    def bytes(self, dtype: torch.dtype) -> float:
        size = torch.empty((), dtype=dtype).element_size()
        tensors = 2 * (self.tq + self.tk) * HEAD_DIM * size + 4 * self.tq  # q, out, k, v, gate per head
        return self.batch * (self.heads * tensors + 8 * (self.tq + self.tk))


@dataclass
class Row:
    section: str
    dtype: str
    shape: Shape
    method: str
    ms: float | None = None
    ratio: float | None = None
    err: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        s = self.shape
        if self.ms is None:
            timing = ["-", "-", "-", "-"]
        else:
            timing = [f"{self.ms * 1e3:.1f}", f"{s.flops() / self.ms / 1e9:.1f}",
                      f"{s.bytes(DTYPES[self.dtype]) / self.ms / 1e6:.0f}",
                      "-" if self.ratio is None else f"{self.ratio:.2f}"]
        err = "-" if self.err is None else f"{self.err:.1e}"
        return [self.section, self.dtype, str(s.batch), str(s.heads), str(s.tq), str(s.tk), self.method,
                *timing, err, self.note]


HEADER = ["section", "dtype", "B", "H", "Tq", "Tk", "method", "time us", "TFLOP/s", "GB/s", "x kernel",
          "max err", "note"]


def streaming_shapes(quick: bool) -> list[Shape]:
    if quick:
        return [Shape(1, 12, 25, 512), Shape(64, 12, 25, 512), Shape(256, 12, 8, 1024)]
    return [Shape(b, h, tq, tk) for b, h, tq, tk in
            itertools.product((1, 16, 64, 256), (12, 16), (8, 16, 25, 50), (128, 256, 512, 1024))]


def offline_shapes(quick: bool) -> list[Shape]:
    if quick:
        return [Shape(1, 12, 3000, 3000)]
    return [Shape(1, h, t, t) for h, t in itertools.product((12, 16), (500, 1500, 3000))]


class Inputs:
    """Random inputs on the GPU: queries at the last ``tq`` of ``tk`` consecutive key frames per stream."""

    def __init__(self, shape: Shape, dtype: torch.dtype, seed: int = 0, device: str = "cuda") -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        b, h, tq, tk = shape.batch, shape.heads, shape.tq, shape.tk

        def randn(*size: int, dt: torch.dtype = dtype) -> Tensor:
            return torch.randn(*size, generator=gen, device=device, dtype=dt)

        self.q = randn(b, h, tq, HEAD_DIM)
        self.k, self.v = randn(b, h, tk, HEAD_DIM), randn(b, h, tk, HEAD_DIM)
        # The gate as the model makes it: from two logits per head and query and a per-head constant.
        logits = randn(b, tq, h, 2, dt=torch.float32).permute(0, 2, 1, 3)
        self.gate = gate_from_logits(logits, 1.0 + 0.1 * randn(h, dt=torch.float32))
        self.table = randn(h, 2 * MAX_DIST + 1, dt=torch.float32)
        start = torch.randint(0, 10_000, (b, 1), generator=gen, device=device)
        self.k_pos = start + torch.arange(tk, device=device)
        self.q_pos = self.k_pos[:, tk - tq :].contiguous()

    def args(self) -> tuple[Tensor | KeyLayout, ...]:
        return self.q, self.k, self.v, self.gate, self.table, KeyLayout(self.q_pos, self.k_pos)


def bias_ungated(x: Inputs) -> Tensor:
    """The ``(B, H, Tq, Tk)`` table lookup that the reference model materialises (in the input dtype)."""
    dist = (x.k_pos[:, None, :] - x.q_pos[:, :, None]).clamp(-MAX_DIST, MAX_DIST) + MAX_DIST
    return x.table[:, dist].permute(1, 0, 2, 3).to(x.q.dtype).contiguous()


def make_methods(
    x: Inputs, wanted: set[str], flex_compiled: Callable | None
) -> dict[str, Callable[[], Tensor]]:
    """Zero-argument closures, one per method, over the same inputs."""
    from streamwavlm.kernels.triton_gated_attention import gated_rel_attention_triton

    methods: dict[str, Callable[[], Tensor]] = {"triton": lambda: gated_rel_attention_triton(*x.args())}
    if "sdpa+bias" in wanted:
        bias, row_gate = bias_ungated(x), x.gate.to(x.q.dtype)[..., None]
        sdpa = F.scaled_dot_product_attention
        methods["sdpa+bias"] = lambda: sdpa(x.q, x.k, x.v, attn_mask=row_gate * bias)
    if "flex" in wanted and flex_compiled is not None:
        gate, table, q_pos, k_pos = x.gate, x.table, x.q_pos, x.k_pos

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            dist = (k_pos[b, kv_idx] - q_pos[b, q_idx]).clamp(-MAX_DIST, MAX_DIST) + MAX_DIST
            return score + gate[b, h, q_idx] * table[h, dist]

        methods["flex"] = lambda: flex_compiled(x.q, x.k, x.v, score_mod=score_mod)
    if "eager" in wanted:
        methods["eager"] = lambda: gated_rel_attention_torch(*x.args())
    return methods


def bench(fn: Callable[[], object], rep: int) -> float:
    """Median milliseconds per call; the first calls (autotuning, compilation) are not timed."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median")


def run_section(section: str, shapes: list[Shape], dtypes: list[str], wanted: set[str], rep: int,
                flex_compiled: Callable | None, rows: list[Row]) -> None:
    for dtype, shape in itertools.product(dtypes, shapes):
        x = Inputs(shape, DTYPES[dtype])
        methods = make_methods(x, wanted, flex_compiled)
        ref = methods["triton"]().float()
        t_kernel = None
        for name, fn in methods.items():
            row = Row(section, dtype, shape, name)
            try:
                row.err = (fn().float() - ref).abs().max().item()
                row.ms = bench(fn, rep)
            except (RuntimeError, torch.OutOfMemoryError) as exc:  # a failing baseline must not stop the run
                row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            if name == "triton":
                t_kernel = row.ms
            elif row.ms is not None and t_kernel is not None:
                row.ratio = row.ms / t_kernel
            emit(row, rows)
        if shape.offline:
            flash_row(section, dtype, shape, x, t_kernel, rep, rows)
        del x, methods
        torch.cuda.empty_cache()


def flash_row(section: str, dtype: str, shape: Shape, x: Inputs, t_kernel: float | None, rep: int,
              rows: list[Row]) -> None:
    """SDPA's flash backend on the same q, k, v without any bias: the throughput ceiling to compare with."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    row = Row(section, dtype, shape, "sdpa-flash (no bias)")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises rather than falling back to another backend
        row.ms = bench(lambda: F.scaled_dot_product_attention(x.q, x.k, x.v), rep)
    if t_kernel is not None:
        row.ratio = row.ms / t_kernel  # = the kernel's share of flash's throughput (same FLOPs)
        verdict = "meets" if row.ratio >= FLASH_TARGET else "misses"
        row.note = f"kernel at {row.ratio:.0%} of flash throughput: {verdict} the {FLASH_TARGET:.0%} target"
    emit(row, rows)


def emit(row: Row, rows: list[Row]) -> None:
    rows.append(row)
    print("| " + " | ".join(row.cells()) + " |", flush=True)


def markdown(rows: list[Row], device: str) -> str:
    lines = [f"Gated relative-position attention on {device}, d={HEAD_DIM}, table 2*{MAX_DIST}+1.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few representative shapes, fp16 only")
    parser.add_argument("--out", type=Path, help="also write the results as a markdown table to this file")
    parser.add_argument("--dtypes", help="comma list of fp16,bf16 (default: both; with --quick: fp16)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma list of baselines besides the kernel (default: {','.join(METHODS[1:])})")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma list of sections (default all)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms (default 100)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention_gpu: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)
        return 2
    dtypes = (args.dtypes or ("fp16" if args.quick else "fp16,bf16")).split(",")
    wanted = set(args.methods.split(",")) | {"triton"}
    sections = set(args.sections.split(","))
    unknown = (set(dtypes) - set(DTYPES)) | (wanted - set(METHODS)) | (sections - set(SECTIONS))
    if unknown:
        print(f"bench_attention_gpu: unknown choice(s) {sorted(unknown)}", file=sys.stderr)
        return 2

    flex_compiled = None
    if "flex" in wanted:
        from torch._dynamo import config as dynamo_config
        from torch.nn.attention.flex_attention import flex_attention

        dynamo_config.recompile_limit = 1024  # one compilation per shape and dtype
        flex_compiled = torch.compile(flex_attention, dynamic=False)

    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}", flush=True)
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER), flush=True)
    rows: list[Row] = []
    with torch.inference_mode():
        for section, shapes in (("streaming", streaming_shapes), ("offline", offline_shapes)):
            if section in sections:
                run_section(section, shapes(args.quick), dtypes, wanted, args.rep, flex_compiled, rows)
    if args.out:
        args.out.write_text(markdown(rows, device))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
