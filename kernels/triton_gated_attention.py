"""Triton kernel for WavLM attention with a gated relative position bias (flash-attention style, forward).

Semantics are those of :func:`gated_rel_attention_torch` (see ``gated_attention.py``)::

    logit = (q_i . k_j) / sqrt(d) + gate[b, h, i] * table[h, clamp(pos_k[j] - pos_q[i], -M, M) + M]

One program owns ``BLOCK_M`` queries of one (batch row, head) and streams over the keys ``BLOCK_N`` at a
time with an online softmax in fp32, so neither the ``Tq x Tk`` bias nor the scores ever reach memory. The
bias is a gather from the per-head table (6.4 KB for WavLM's 1601 distances, L1/L2-resident), never a
logarithm: a fast-math GPU log could move a distance to the neighbouring bucket (wavlm.md §9.2).

Masks are computed in-kernel from the positions, the per-row valid key count and the chunk/left rule, so a
call passes only O(B*T) metadata. The per-element integer work is kept at 32 bits: each key position is
first clamped (in int64, once per key) to the window ``[q_lo - pad, q_hi + pad]`` around the block's
queries, with ``pad`` beyond both the table's reach ``M`` and the mask's reach ``chunk + left``; a key
outside it gets the same bias (the table's end) and the same mask decision as at the window's edge. So key
positions may be any int64 (a far-past sentinel for empty cache slots included) as long as the queries of
one batch row lie within ``2**30`` frames of each other. Rows with no allowed key produce 0.

With ``layout.rows`` a batch row reads its keys and values from another row of K/V (a pool's caches, which
stay in place however the ready streams are scattered over the pool).

The file reads as the Triton tutorials do: the kernel, its launcher :func:`gated_rel_attention_triton`, and
:func:`reference_attention`, the naive oracle with the whole ``Tq x Tk`` bias and mask materialised, which
the tests hold both backends to.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from .gated_attention import KeyLayout, allowed_keys

_HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _floor_div(a, c):
    """Python-style floor division of int64 ``a`` by a positive ``c`` (``//`` in Triton truncates)."""
    return tl.where(a >= 0, a // c, -((c - 1 - a) // c))


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, k_base, v_base, s_kn, s_vn, tab, max_dist, cols, key_ok, k_rel, q_rel,
    min_dist, end_dist, g2, qk_scale,
    BLOCK_MASK: tl.constexpr, HAS_LEFT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold one key tile into the running max ``m_i``, denominator ``l_i`` and accumulator ``acc``.

    Scores are in base 2 (``qk_scale`` and ``g2`` carry ``log2(e)``) so the exponentials are ``exp2``.
    A row whose keys have all been masked so far keeps ``m_i = -inf``; subtracting a 0 instead of ``-inf``
    then makes its probabilities exactly 0 instead of NaN. ``k_rel``/``q_rel`` are int32 positions relative
    to the block's first query (keys clamped near the block); the block mask is the per-row distance window
    ``min_dist <= dist < end_dist`` (``min_dist`` read only with ``HAS_LEFT``, both only with ``BLOCK_MASK``).
    """
    k = tl.load(k_base + cols[None, :] * s_kn, mask=key_ok[None, :], other=0.0)
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)
    dist = k_rel[None, :] - q_rel[:, None]
    bias = tl.load(tab + tl.minimum(tl.maximum(dist, -max_dist), max_dist))
    s = qk * qk_scale + g2[:, None] * bias
    allowed = key_ok[None, :]
    if BLOCK_MASK:
        allowed = allowed & (dist < end_dist[:, None])
        if HAS_LEFT:
            allowed = allowed & (dist >= min_dist[:, None])
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    v = tl.load(v_base + cols[:, None] * s_vn, mask=key_ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit(do_not_specialize=["tq", "tk", "chunk", "left", "tq_bucket", "tk_bucket"])
def _gated_rel_attn_fwd(
    q_ptr, k_ptr, v_ptr, gate_ptr, table_ptr, qpos_ptr, kpos_ptr, klen_ptr, rows_ptr, out_ptr,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_gb, s_gh, s_gm,
    s_th,
    s_qpb, s_qpm, s_kpb, s_kpn, s_kl, s_r,
    s_ob, s_oh, s_om, s_od,
    n_heads, tq, tk, sm_scale, max_dist, pad, chunk, left,
    tq_bucket, tk_bucket,  # only read by the autotuner: its cache key, a power-of-two bucket of tq / tk
    HEAD_DIM: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    BLOCK_MASK: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid: one program per (query block, head, batch row); a head's query blocks are adjacent (L2 reuse)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    n_mblocks = tl.cdiv(tq, BLOCK_M)
    pid_m = pid % n_mblocks
    pid_bh = pid // n_mblocks
    b = (pid_bh // n_heads).to(tl.int64)  # int64 base offsets: K/V caches of many streams exceed 2**31
    h = (pid_bh % n_heads).to(tl.int64)
    kv_b = b
    if HAS_ROWS:
        kv_b = tl.load(rows_ptr + b * s_r).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < tq

    q = tl.load(
        q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
        mask=row_ok[:, None],
        other=0.0,
    )
    gate = tl.load(gate_ptr + b * s_gb + h * s_gh + offs_m * s_gm, mask=row_ok, other=0.0).to(tl.float32)
    g2 = gate * LOG2E
    qk_scale = sm_scale * LOG2E

    qp_ptrs = qpos_ptr + b * s_qpb + offs_m * s_qpm
    first_qp = tl.load(qpos_ptr + b * s_qpb + pid_m * BLOCK_M * s_qpm).to(tl.int64)
    qp = tl.where(row_ok, tl.load(qp_ptrs, mask=row_ok, other=0).to(tl.int64), first_qp)  # padding: a copy
    q_lo = tl.min(qp)
    key_lo = q_lo - pad
    key_hi = tl.max(qp) + pad
    q_rel = (qp - q_lo).to(tl.int32)
    if BLOCK_MASK:
        # Query i may see keys in [chunk_start_i - left, chunk_start_i + C): a window on the distance
        # kpos - qpos, so the per-element test reuses the int32 distance of the bias lookup.
        chunk_start = _floor_div(qp, chunk) * chunk
        min_dist = (chunk_start - left - qp).to(tl.int32)
        end_dist = (chunk_start + chunk - qp).to(tl.int32)
    else:
        min_dist = q_rel  # unread placeholders: _attend_tile only reads them under BLOCK_MASK
        end_dist = q_rel

    n_end = tk
    if HAS_KLEN:
        n_end = tl.minimum(tl.load(klen_ptr + b * s_kl).to(tl.int32), tk)

    k_base = k_ptr + kv_b * s_kb + h * s_kh + offs_d[:, None] * s_kd  # K read transposed: (HEAD_DIM, BLOCK_N)
    v_base = v_ptr + kv_b * s_vb + h * s_vh + offs_d[None, :] * s_vd
    kp_base = kpos_ptr + b * s_kpb
    tab = table_ptr + h * s_th + max_dist

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + offs_n
        key_ok = cols < n_end
        kp = tl.load(kp_base + cols * s_kpn, mask=key_ok, other=0).to(tl.int64)
        k_rel = (tl.minimum(tl.maximum(kp, key_lo), key_hi) - q_lo).to(tl.int32)
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_base, v_base, s_kn, s_vn, tab, max_dist, cols, key_ok, k_rel, q_rel,
            min_dist, end_dist, g2, qk_scale, BLOCK_MASK, HAS_LEFT, DOT_PRECISION,
        )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )


def _gpu_configs() -> list[triton.Config]:
    """H100 search space: small query tiles for streaming chunks (8-50 queries), large ones for long T.

    Every entry was cross-compiled for sm_90 with ptxas at d=64: fp16/bf16 tiles stay within 255 registers
    and at most 32 bytes of stack, with and without the block mask; the larger ones spill in fp32.
    """
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n, warps, stages in (
            (16, 32, 4, 3),
            (16, 64, 4, 2),
            (16, 128, 4, 3),
            (32, 64, 4, 3),
            (64, 32, 4, 3),
            (64, 64, 4, 3),
            (64, 64, 8, 4),
            (64, 128, 8, 3),
            (128, 32, 8, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 2),
        )
    ]


def _prune_configs(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """Keep the tiles that fit the problem, so tuning a new shape costs a handful of launches.

    Query tiles larger than the query count only add masked rows; small query tiles on long sequences
    re-read K/V once per 16 queries. fp32 (IEEE products on FMA units: parity runs) spills on any tile
    above 16x64, so it gets those only.
    """
    if kwargs["DOT_PRECISION"] == "ieee":
        return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 1024]
    tq_bucket, tk_bucket = named_args["tq_bucket"], named_args["tk_bucket"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(16, tq_bucket)
        and c.kwargs["BLOCK_N"] <= max(32, tk_bucket)
        and (tq_bucket < 256 or c.kwargs["BLOCK_M"] >= 64)
    ]
    return kept or configs[:1]


_INTERPRETED = isinstance(_gated_rel_attn_fwd, InterpretedFunction)
# Under TRITON_INTERPRET=1 (CPU tests) one small tile and no benchmarking: every program costs milliseconds.
_kernel = triton.autotune(
    configs=[triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})] if _INTERPRETED else _gpu_configs(),
    key=["tq_bucket", "tk_bucket", "HEAD_DIM", "HAS_ROWS", "HAS_KLEN", "BLOCK_MASK", "HAS_LEFT"],
    prune_configs_by=None if _INTERPRETED else {"early_config_prune": _prune_configs},
)(_gated_rel_attn_fwd)


def _check_shapes(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, table: Tensor, layout: KeyLayout) -> None:
    """Reject inputs the kernel would silently misread (it trusts shapes, devices and dtypes)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, Tq, d), got {tuple(q.shape)}")
    batch, heads, tq, dim = q.shape
    q_pos, k_pos, k_len, rows, chunk, left = (layout.q_pos, layout.k_pos, layout.k_len, layout.rows,
                                              layout.chunk, layout.left)
    kv_rows = batch if rows is None else k.shape[0]
    if k.dim() != 4 or k.shape[0] != kv_rows or k.shape[1] != heads or k.shape[3] != dim or v.shape != k.shape:
        raise ValueError(
            f"k and v must be (B, H, Tk, d) matching q {tuple(q.shape)}: {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one of {_DTYPES}: {q.dtype}, {k.dtype}, {v.dtype}")
    if dim not in _HEAD_DIMS:
        raise ValueError(f"head dim {dim} unsupported by the Triton kernel (supported: {_HEAD_DIMS})")
    if gate.shape != q.shape[:3]:
        raise ValueError(f"gate must be (B, H, Tq) = {tuple(q.shape[:3])}, got {tuple(gate.shape)}")
    if table.dim() != 2 or table.shape[0] != heads or table.shape[1] % 2 != 1:
        raise ValueError(f"table must be (H, 2M+1) with H={heads}, got {tuple(table.shape)}")
    if q_pos.shape != (batch, tq) or k_pos.shape != (batch, k.shape[2]):
        raise ValueError(f"q_pos/k_pos must be (B, Tq)/(B, Tk): {tuple(q_pos.shape)}, {tuple(k_pos.shape)}")
    if k_len is not None and k_len.shape != (batch,):
        raise ValueError(f"k_len must be (B,), got {tuple(k_len.shape)}")
    if rows is not None and rows.shape != (batch,):
        raise ValueError(f"rows must be (B,), got {tuple(rows.shape)}")
    integers = [t for t in (q_pos, k_pos, k_len, rows) if t is not None]
    if any(t.dtype not in (torch.int32, torch.int64) for t in integers):
        raise TypeError(f"positions, k_len and rows must be int32 or int64: {[t.dtype for t in integers]}")
    if table.shape[1] >= 2**30 or (chunk is not None and not 1 <= chunk < 2**29):
        raise ValueError(f"chunk must be in [1, 2**29), the table under 2**30 wide: {chunk}, {table.shape}")
    if left is not None and not abs(left) < 2**29:  # the kernel compares int32 distances
        raise ValueError(f"left must be below 2**29 in magnitude, got {left}")
    if any(t.device != q.device for t in (k, v, gate, *integers)):
        raise ValueError("q, k, v, the gate, positions, k_len and rows must be on one device")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            f"the Triton kernel needs CUDA tensors, got {q.device}; on the CPU set TRITON_INTERPRET=1 before "
            "triton is first imported, or use the torch backend"
        )


def gated_rel_attention_triton(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, table: Tensor,
                               layout: KeyLayout) -> Tensor:
    """The attention in one fused kernel launch; output ``(B, H, Tq, d)`` in q's dtype.

    Any strides are accepted (K/V cache views, q/k/v sliced from a fused projection). fp32 inputs use IEEE
    fp32 products (no TF32), matching torch's default ``matmul.allow_tf32 = False``.
    """
    _check_shapes(q, k, v, gate, table, layout)
    batch, heads, tq, dim = q.shape
    tk = k.shape[2]
    out = torch.empty((batch, heads, tq, dim), dtype=q.dtype, device=q.device)
    if tq == 0:
        return out
    table = table.to(device=q.device, dtype=torch.float32).contiguous()
    max_dist = (table.shape[1] - 1) // 2
    chunk, left, k_len, rows = layout.chunk, layout.left, layout.k_len, layout.rows
    # Keys farther than this from every query of a block all look alike to the bias and to the mask.
    pad = max(max_dist, chunk + abs(left or 0) if chunk is not None else 0) + 1

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(tq, meta["BLOCK_M"]) * batch * heads,)

    _kernel[grid](
        q, k, v, gate, table, layout.q_pos, layout.k_pos, k_len, rows, out,
        *q.stride(), *k.stride(), *v.stride(), *gate.stride(), table.stride(0),
        *layout.q_pos.stride(), *layout.k_pos.stride(), k_len.stride(0) if k_len is not None else 0,
        rows.stride(0) if rows is not None else 0, *out.stride(),
        heads, tq, tk, dim**-0.5, max_dist, pad, chunk or 1, left or 0,
        triton.next_power_of_2(tq), triton.next_power_of_2(max(tk, 1)),
        HEAD_DIM=dim,
        HAS_ROWS=rows is not None,
        HAS_KLEN=k_len is not None,
        BLOCK_MASK=chunk is not None,
        HAS_LEFT=chunk is not None and left is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out


def reference_attention(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, table: Tensor,
                        layout: KeyLayout) -> Tensor:
    """The oracle: every bias entry, mask entry and score of the ``Tq x Tk`` problem materialised, in fp64.

    Slow and memory-hungry on purpose: it shares no code path with either backend beyond the mask rule of
    :func:`~.gated_attention.allowed_keys`, so it checks the blocking, the diagonal fast path, the row
    indirection and the kernel's clamped-window arithmetic. Rows with no allowed key give 0.
    """
    if layout.rows is not None:
        k, v = k[layout.rows], v[layout.rows]
    max_d = (table.shape[1] - 1) // 2
    dist = (layout.k_pos[:, None, :] - layout.q_pos[:, :, None]).clamp(-max_d, max_d) + max_d  # (B, Tq, Tk)
    bias = table.double()[:, dist].permute(1, 0, 2, 3)  # (B, H, Tq, Tk)
    scores = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5 + gate.double()[..., None] * bias
    mask = allowed_keys(layout)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row is NaN: make it 0
    return (probs @ v.double()).to(q.dtype)
