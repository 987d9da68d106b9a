"""WavLM attention with a gated relative position bias: the key layout, the dispatcher, the torch backend.

For query i and key j of head h in batch row b::

    logit = (q_i . k_j) / sqrt(d) + gate[b, h, i] * table[h, clamp(pos_k[j] - pos_q[i], -M, M) + M]

followed by a softmax over the allowed keys (fp32) and the weighted sum of v. ``table`` is the per-head bias
for every clamped distance, built once on the CPU from the exact bucket formula (so no logarithm is ever
evaluated here), and ``M = (table.shape[1] - 1) // 2``. Where the keys sit and which ones a query may see is
one typed object, :class:`KeyLayout`: keys are allowed when ``j < k_len[b]`` and, in the streaming (block)
mode with chunk ``C`` and left context ``L``, when the key's chunk is not after the query's chunk and the
key lies at most ``L`` frames before the start of the query's chunk; the rule reads absolute positions, so it
holds equally for a whole utterance and for a chunk against its K/V cache.

Every backend has one entry point with the same signature ``(q, k, v, gate, table, layout)``; the naive,
fully materialised oracle that tests compare both against sits next to the Triton kernel
(:func:`~.triton_gated_attention.reference_attention`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

_BACKENDS = ("auto", "torch", "triton")
_forced: str | None = None


@dataclass(frozen=True)
class KeyLayout:
    """Positions of the queries and keys of one attention call and the rule for which keys a query sees.

    ``rows`` lets a batch of queries read K/V tensors with more rows than the batch (a pool of streams
    whose caches stay where they are): batch row ``b`` reads K/V row ``rows[b]``; ``None`` means row ``b``.
    ``k_pos`` and ``k_len`` are per batch row (already taken at ``rows``).
    """

    q_pos: Tensor  # (B, Tq) absolute frame index of each query
    k_pos: Tensor  # (B, Tk) absolute frame index of each key
    k_len: Tensor | None = None  # (B,) valid keys per row (padding); None: all
    chunk: int | None = None  # streaming block mask: chunk size in frames
    left: int | None = None  # ... and left context in frames (None: unlimited)
    rows: Tensor | None = None  # (B,) K/V row of each batch row


def set_backend(name: str | None) -> None:
    """Force ``torch`` or ``triton`` for every call (``None`` or ``auto`` restores the automatic choice)."""
    global _forced
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {_BACKENDS}")
    _forced = None if name == "auto" else name


def attention_backend(device: torch.device) -> str:
    """The backend a call on ``device`` takes: the forced one, else Triton on CUDA and torch elsewhere."""
    name = _forced or os.environ.get("STREAMWAVLM_ATTENTION", "auto")
    if name not in _BACKENDS:
        raise ValueError(f"STREAMWAVLM_ATTENTION={name!r} is not one of {_BACKENDS}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return name


def gated_rel_attention(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor, table: Tensor, layout: KeyLayout, memo: dict | None = None
) -> Tensor:
    """Attention output ``(B, H, Tq, d)`` in the dtype of ``q``, by the backend for ``q``'s device.

    Shapes: q ``(B, H, Tq, d)``; k, v ``(B, H, Tk, d)`` (or ``(N, H, Tk, d)`` with ``layout.rows``); gate
    ``(B, H, Tq)`` fp32; table ``(H, 2M+1)`` fp32. ``memo``: a dict shared by calls with the same layout (the
    layers of one forward), where the torch backend keeps the bias gathers and masks it derives from the
    positions instead of redoing them per layer.
    """
    if attention_backend(q.device) == "triton":
        from .triton_gated_attention import gated_rel_attention_triton

        return gated_rel_attention_triton(q, k, v, gate, table, layout)
    return gated_rel_attention_torch(q, k, v, gate, table, layout, memo)


def allowed_keys(layout: KeyLayout) -> Tensor | None:
    """Boolean ``(B, Tq, Tk)`` mask of the keys each query may see, or ``None`` when all are allowed."""
    q_pos, k_pos, chunk = layout.q_pos, layout.k_pos, layout.chunk
    mask: Tensor | None = None
    if layout.k_len is not None:
        idx = torch.arange(k_pos.shape[1], device=k_pos.device)
        mask = (idx[None, :] < layout.k_len[:, None])[:, None, :]
    if chunk is not None:
        q_chunk = torch.div(q_pos, chunk, rounding_mode="floor")[:, :, None]
        k_chunk = torch.div(k_pos, chunk, rounding_mode="floor")[:, None, :]
        block = k_chunk <= q_chunk
        if layout.left is not None:
            block = block & (k_pos[:, None, :] >= q_chunk * chunk - layout.left)
        mask = block if mask is None else mask & block
    return mask


def gated_rel_attention_torch(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor, table: Tensor, layout: KeyLayout, memo: dict | None = None,
    block_q: int = 128,
) -> Tensor:
    """The CPU backend, evaluated ``block_q`` queries at a time.

    Blocking keeps the fp32 score tile at ``B*H*block_q*Tk`` instead of the full ``T x T`` bias that the
    reference model materialises per layer (432 MB per tensor for a minute of Base audio). When queries
    and keys sit at the same consecutive positions (the offline case) the bias of a block is a strided
    view of one ``(H, 2T-1)`` row, read in reversed query order, instead of a gather.

    With ``layout.rows`` (a pool's K/V rings, which stay in place), a run of consecutive rows is a view;
    for scattered rows the two products run one batch row at a time over views of its K/V row, written into
    one batched score tensor, so nothing is gathered (a gather of the rows' K/V costs a full extra pass over
    them) and the bias, masks and softmax stay batched. Nothing is written back: the caller writes only the
    new entries into its rings.

    bf16 ``q`` (the CPU's bf16 and int8 precisions): both products run in bf16 (fp32 accumulation, 2.2x the
    fp32 speed at a 128 x 499 block); the scores are widened to fp32 for the bias, mask and softmax.
    """
    memo = {} if memo is None else memo
    scattered: list[int] | None = None
    if layout.rows is not None:
        if "rows" not in memo:  # read once per forward, not once per layer
            memo["rows"] = _row_plan(layout.rows)
        first, scattered = memo["rows"]
        if scattered is None:
            k, v = k[first:first + q.shape[0]], v[first:first + q.shape[0]]
        layout = KeyLayout(layout.q_pos, layout.k_pos, layout.k_len, layout.chunk, layout.left)
    return _attend_blocks(q, k, v, gate, table, layout, memo, block_q, scattered)


def _row_plan(rows: Tensor) -> tuple[int, list[int] | None]:
    """The first K/V row, and the row list unless the rows are consecutive (then a slice is a view)."""
    first = int(rows[0])
    consecutive = torch.equal(rows, torch.arange(first, first + len(rows), device=rows.device))
    return first, None if consecutive else rows.tolist()


def _matmul(a: Tensor, b: Tensor, rows: list[int] | None) -> Tensor:
    """``a (B, H, m, n) @ b (B, H, n, p)`` in the dtype of ``a``, or ``a[i] @ b[rows[i]]`` for a larger ``b``
    without copying it."""
    if rows is None:
        return torch.matmul(a, b.to(a.dtype))
    out = a.new_empty(*a.shape[:-1], b.shape[-1])
    for i, r in enumerate(rows):
        torch.matmul(a[i], b[r].to(a.dtype), out=out[i])
    return out


def _attend_blocks(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor, table: Tensor, layout: KeyLayout, memo: dict, block_q: int,
    rows: list[int] | None = None,
) -> Tensor:
    _, heads, tq, dim = q.shape
    tk = k.shape[2]
    max_d = (table.shape[1] - 1) // 2
    scale = dim**-0.5
    if "ext" not in memo:  # what the layers of one forward share is derived by the first of them
        memo["table"] = table = table.to(device=q.device, dtype=torch.float32)
        memo["ext"] = _diagonal_bias(table, tk, max_d) if _consecutive(layout.q_pos, layout.k_pos) else None
    table, ext = memo["table"], memo["ext"]
    if rows is None and tq > block_q:  # views into the fused projection: one copy here, not one per block
        k, v = k.contiguous(), v.contiguous()
    kt = k.transpose(-1, -2)
    # one block (a streaming chunk) is the output itself; several are written into one tensor
    out = None if 0 < tq <= block_q else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for s in range(0, tq, block_q):
        e = min(s + block_q, tq)
        if s not in memo:
            memo[s] = _block_terms(table, layout, s, e, ext, heads, max_d)
        bias, mask_add, empty = memo[s]
        qb, gb = (q[:, :, s:e].flip(2), gate[:, :, s:e].flip(2)) if ext is not None else (q[:, :, s:e], gate[:, :, s:e])
        # + gate * bias in fp32 (gate and bias are fp32, so bf16 products are widened by the same op)
        scores = torch.addcmul(_matmul(qb * scale, kt, rows), gb[..., None], bias)
        if mask_add is not None:
            scores.add_(mask_add)
        probs = torch.softmax(scores, dim=-1)
        if empty is not None:  # a query with no allowed key gives 0 (as the Triton kernel), not a mean of v
            probs.masked_fill_(empty, 0.0)
        block = _matmul(probs.to(q.dtype), v, rows)
        block = block.flip(2) if ext is not None else block
        if out is None:
            return block
        out[:, :, s:e] = block
    assert out is not None
    return out


def _block_terms(
    table: Tensor, layout: KeyLayout, start: int, end: int, ext: Tensor | None, heads: int, max_d: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """For queries ``start:end``: the ungated bias, the additive mask (0 or the fp32 minimum) and the rows
    without any allowed key; rows in reversed order when ``ext`` (the offline diagonal bias) is used."""
    q_pos, k_pos = layout.q_pos[:, start:end], layout.k_pos
    tq, tk = q_pos.shape[1], k_pos.shape[1]
    mask = allowed_keys(KeyLayout(q_pos, k_pos, layout.k_len, layout.chunk, layout.left))
    if ext is not None:  # row r is query tq-1-r of the block, whose bias starts at column tk-(start+tq)+r
        last = int((q_pos[0, -1] - k_pos[0, 0]).item()) + 1
        bias = ext.as_strided((heads, tq, tk), (ext.stride(0), 1, 1), tk - last)
        mask = None if mask is None else mask.flip(1)
    else:  # made contiguous once here: every layer reads it
        dist = (k_pos[:, None, :] - q_pos[:, :, None]).clamp_(-max_d, max_d).add_(max_d)
        bias = table[:, dist].permute(1, 0, 2, 3).contiguous()  # (B, H, blk, Tk)
    if mask is None or bool(mask.all()):  # a stream's full ring: every key allowed, no mask pass per layer
        return bias, None, None
    mask_add = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    mask_add.masked_fill_(~mask, torch.finfo(torch.float32).min)
    empty = ~mask.any(-1, keepdim=True)
    return bias, mask_add[:, None], (empty[:, None] if bool(empty.any()) else None)


def _consecutive(q_pos: Tensor, k_pos: Tensor) -> bool:
    """Whether queries and keys are the same run of consecutive frames in every row (offline case)."""
    if q_pos.shape != k_pos.shape or not torch.equal(q_pos, k_pos):
        return False
    step = torch.arange(q_pos.shape[1], device=q_pos.device)
    return bool((q_pos - q_pos[:, :1] == step).all())


def _diagonal_bias(table: Tensor, tk: int, max_d: int) -> Tensor:
    """``(H, 2*tk - 1)`` bias for distances ``-(tk-1) .. tk-1`` (column ``d + tk - 1``)."""
    d = torch.arange(-(tk - 1), tk, device=table.device).clamp_(-max_d, max_d).add_(max_d)
    return table[:, d].contiguous()
