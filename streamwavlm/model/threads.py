"""Small steps run their elementwise work on one thread and only their products on all of them.

Torch splits an elementwise op or a row-wise reduction over its OpenMP threads once it has more than 32,768
elements, and every such split wakes the other threads. With passive OpenMP threads (``OMP_WAIT_POLICY=
passive``, what a machine shared with other work wants: spinning threads are descheduled and make every op
wait for them) a wake-up costs about 45 us on the 2-core CPU measured, against 2-5 us for the whole op on one
thread (a 16 x 3072 add). A one-stream C=16 step makes a few hundred such splits: the int8 quantisation
passes, GELU, LayerNorm, the attention's softmax and bias. So a small step (:data:`SERIAL_ROWS`) runs them
on the calling thread alone (:func:`serial`), and gives the GEMMs and convolutions, which do use every
core, all threads back for the call (:func:`all_threads`).

Thread counts in torch are per calling thread (OpenMP's setting is per thread), so a thread that already runs
torch work keeps its count; only a thread that first touches torch while a small step runs starts with one
thread (torch copies the last count set). Results do not change (these ops split over rows or elements, not
within a sum; ``tests/test_threads.py`` compares a stream bit for bit).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar

import torch

SERIAL_ROWS = 64
"""Most rows (frames times streams) of a Transformer call whose elementwise work runs on one thread: a 16-frame
chunk of up to four streams (measured: 1, 2 and 4 streams gain 5-7 %, 8 streams neither gain nor lose)."""
PASSIVE = os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive"
"""Whether OpenMP's threads sleep between parallel regions (read at start-up, as OpenMP does). Spinning
threads wake in a microsecond, so then nothing is serialised (measured: no gain, up to 5 % loss)."""

_full: ContextVar[int] = ContextVar("streamwavlm_full_threads", default=0)


@contextlib.contextmanager
def serial(rows: int) -> Iterator[None]:
    """One thread inside the block when OpenMP's threads are :data:`PASSIVE` and ``rows`` is at most
    :data:`SERIAL_ROWS` (else nothing changes)."""
    threads = torch.get_num_threads()
    if not PASSIVE or rows > SERIAL_ROWS or threads == 1 or _full.get():
        yield
        return
    token = _full.set(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _full.reset(token)


@contextlib.contextmanager
def all_threads() -> Iterator[None]:
    """Inside :func:`serial`, every thread again for the block (one GEMM or convolution call)."""
    threads = _full.get()
    if not threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)
