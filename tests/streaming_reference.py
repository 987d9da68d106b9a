"""The masked offline reference of the streaming encoder, built from the offline model's parts.

It follows the definition in docs/streaming.md rather than the pool's code path: statistics come from
prefixes of the raw audio, the positional convolution is the offline one with the taps beyond the lookahead
zeroed, and the attention is the offline one with the block mask (chunk C, left context L).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamwavlm.model.wavlm import WavLM, WavLMOutput
from streamwavlm.streaming import NormPolicy, StreamSettings


def step_ends(n: int, model: WavLM, s: StreamSettings) -> list[int]:
    """Sample index where each step's audio ends; the last entry is the end of the stream (flush)."""
    cfg = model.cfg
    ends, e = [], cfg.receptive_field - cfg.hop + cfg.hop * (s.chunk + s.lookahead)
    while e <= n:
        ends.append(e)
        e += cfg.hop * s.chunk
    return [*ends, n]


def _stat_ends(ends: list[int], s: StreamSettings) -> list[int]:
    """For each step, the prefix (in samples) whose statistics the step uses: every sample up to the step's
    end (running), or, once the audio before a step reaches ``warmup`` seconds, the prefix reached then."""
    out, last = [], 0
    for e in ends:
        if s.norm == NormPolicy.RUNNING or last < s.warmup * 16000:
            last = e
        out.append(last)
    return out


@torch.no_grad()
def masked_reference(model: WavLM, wav: torch.Tensor, s: StreamSettings) -> WavLMOutput:
    cfg = model.cfg
    n = wav.numel()
    ends = step_ends(n, model, s)
    tail = cfg.receptive_field - cfg.hop
    x = wav.double()
    if cfg.normalize:
        norm_ends = _stat_ends(ends, s)
        parts, prev = [], 0
        for e, se in zip(ends, norm_ends, strict=True):
            ref = x[:se]
            parts.append((x[prev:e] - ref.mean()) / torch.sqrt(ref.var(unbiased=False) + cfg.normalize_eps))
            prev = e
        x = torch.cat(parts)
    x = x.float()
    feats, prev = [], 0
    gn_ends = _stat_ends(ends, s)
    for e, se in zip(ends, gn_ends, strict=True):
        start = max(0, prev - tail)
        seg = x[None, start:e]
        stats = None
        if model.frontend.group_norm:
            y0 = model.frontend.conv0(x[None, :se]).double()  # (1, T0, C): plain statistics over time
            stats = (y0.mean(1), y0.var(1, unbiased=False))
        if cfg.num_frames(seg.shape[1]) > 0:
            feats.append(model.frontend(seg, stats))
        prev = e
    h = model.projection(torch.cat(feats, 1))
    pc = model.encoder.pos_conv
    w = pc.conv.weight.clone()
    w[:, :, pc.left + s.lookahead + 1:] = 0
    y = F.conv1d(h.transpose(1, 2), w, pc.conv.bias, padding=pc.left, groups=pc.groups)[:, :, : h.shape[1]]
    h0 = model.encoder.input_norm(h + F.gelu(y).transpose(1, 2))
    return model.transformer(h0, chunk=s.chunk, left=s.left)
