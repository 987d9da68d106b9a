"""The offline WavLM: whole utterances in, every hidden state out.

Layer-output convention (``docs/model.md``): ``hidden_states[0]`` is the encoder input after the
positional convolution (and, for post-LN models, the encoder LayerNorm); ``hidden_states[i]`` is the output
of layer i, *without* the final encoder LayerNorm of pre-LN (Large) models, as in transformers 5.x and unilm
``layer_results``; ``last_hidden_state`` always includes it, as transformers' ``last_hidden_state`` does.
For post-LN models (Base, Base+) the two conventions coincide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import WavLMConfig
from ..kernels import KeyLayout
from .attention import AttentionContext, KVCache
from .encoder import EncoderLayer, FeatureProjection, PositionalConv
from .frontend import FrontEnd
from .moments import Moments
from .position import bias_table
from .threads import serial
from .xvector import XVectorHead

# CNN block size (frames) above which the front end runs block by block with two-pass GroupNorm statistics
FRONTEND_BLOCK_FRAMES = 64


@dataclass
class WavLMOutput:
    hidden_states: list[Tensor]  # L+1 tensors (B, T, D): h_0 .. h_L, no final LN on h_L
    last_hidden_state: Tensor  # (B, T, D): h_L, with the final LN for pre-LN models
    frame_lengths: Tensor  # (B,) valid frames per utterance

    def layers(self, convention: str = "hf5") -> list[Tensor]:
        """Hidden states under a named convention: ``hf5``/``unilm`` (raw h_L) or ``hf4``/``s3prl`` (LN'd).

        They differ only in the last entry of pre-LN models.
        """
        if convention in ("hf5", "unilm"):
            return self.hidden_states
        if convention in ("hf4", "s3prl"):
            return [*self.hidden_states[:-1], self.last_hidden_state]
        raise ValueError(f"unknown layer convention {convention!r}; use hf5, unilm, hf4 or s3prl")


class Encoder(nn.Module):
    def __init__(self, cfg: WavLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pos_conv = PositionalConv(cfg)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.rel_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)  # layer 0's, shared by all layers
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.register_buffer("table", torch.empty(cfg.num_heads, 2 * cfg.max_distance + 1), persistent=False)
        self.build_table()

    def build_table(self) -> None:
        """Recompute the per-distance bias table from the bucket embedding (after loading weights)."""
        self.table = bias_table(self.rel_bias.weight, self.cfg.num_buckets, self.cfg.max_distance).to(
            self.rel_bias.weight.device)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        """Keep the bias table fp32 when the model is cast (``.half()``, ``.to(dtype)``): the kernels read it in
        fp32, and a half table would be cast back once per layer of every step."""
        super()._apply(fn, recurse)
        self.table = self.table.float()
        return self

    def input_norm(self, x: Tensor) -> Tensor:
        """The LayerNorm applied before layer 0 in post-LN models (identity for pre-LN)."""
        return x if self.cfg.layer_norm_first else self.norm(x)

    def output_norm(self, x: Tensor) -> Tensor:
        """The LayerNorm applied after the last layer in pre-LN models (identity for post-LN)."""
        return self.norm(x) if self.cfg.layer_norm_first else x

    def forward(self, x: Tensor, layout: KeyLayout, caches: list[KVCache] | None = None,
                depth: int | None = None) -> list[Tensor]:
        """Hidden states ``[h_0 .. h_depth]`` of the Transformer over the encoder input ``h_0 = x (B, T, D)``.

        Offline, ``layout`` places the queries and keys at the frames of ``x``; the streaming pool passes
        each layer's K/V cache and a layout over what the caches hold. ``depth``: stop after that many layers.
        A small call (a chunk of one or two streams) runs its elementwise work on one thread (:mod:`.threads`).
        """
        ctx = AttentionContext(self.table, layout)
        hidden = [x]
        with serial(x.shape[0] * x.shape[1]):
            for i, layer in enumerate(self.layers[:depth]):
                x = layer(x, ctx, None if caches is None else caches[i])
                hidden.append(x)
        return hidden


class WavLM(nn.Module):
    """WavLM encoder (and optional x-vector head) with the checkpoint's architecture."""

    def __init__(self, cfg: WavLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.frontend = FrontEnd(cfg)
        self.projection = FeatureProjection(cfg)
        self.encoder = Encoder(cfg)
        self.xvector = XVectorHead(cfg, cfg.xvector) if cfg.xvector is not None else None
        self.register_load_state_dict_post_hook(lambda module, _keys: module.derive())
        self.derive()
        self.eval()

    def derive(self) -> None:
        """Recompute the tensors derived from the parameters (after loading weights): the bias table, and the
        fused and packed projections and convolutions in the model's precision (:mod:`streamwavlm.precision`)."""
        from ..precision import apply, precision_of

        self.encoder.build_table()
        apply(self, precision_of(self).precision)

    def normalize_waveform(self, wav: Tensor, lengths: Tensor | None = None) -> Tensor:
        """The checkpoint's waveform normalisation (zero mean, unit variance over each utterance's valid
        samples, eps ``cfg.normalize_eps``); padding stays zero. Identity when the checkpoint expects none."""
        if not self.cfg.normalize:
            return wav
        if lengths is None:
            return F.layer_norm(wav, wav.shape[-1:], eps=self.cfg.normalize_eps)
        out = torch.zeros_like(wav)
        for i, n in enumerate(lengths.tolist()):
            out[i, :n] = F.layer_norm(wav[i, :n], (n,), eps=self.cfg.normalize_eps)
        return out

    def cnn(self, wav: Tensor, block_frames: int = FRONTEND_BLOCK_FRAMES) -> Tensor:
        """CNN features ``(B, T, C)``, computed in blocks of ``block_frames`` frames for long inputs.

        Blocks overlap by ``receptive_field - hop`` samples, so every frame sees exactly its own samples;
        GroupNorm statistics come from a first pass over conv 0 that adds up per-block moments.
        """
        cfg = self.cfg
        t = cfg.num_frames(wav.shape[-1])
        if t <= block_frames:
            return self.frontend(wav)
        stats = None
        if self.frontend.group_norm:
            stats = self._conv0_stats(wav, block_frames)  # over every sample, as the reference does
        span = (block_frames - 1) * cfg.hop + cfg.receptive_field
        blocks = [
            self.frontend(wav[:, s * cfg.hop: s * cfg.hop + span], stats) for s in range(0, t, block_frames)
        ]
        return torch.cat(blocks, dim=1)

    def _conv0_stats(self, wav: Tensor, block_frames: int) -> tuple[Tensor, Tensor]:
        _, k0, s0 = self.cfg.conv_layers[0]
        n0 = (wav.shape[-1] - k0) // s0 + 1  # conv-0 frames the whole input makes
        step = block_frames * self.cfg.hop // s0  # conv-0 frames per block
        moments = Moments.zeros(wav.shape[0], self.cfg.conv_layers[0][0], wav.device)
        for u in range(0, n0, step):
            end = min(u + step, n0)
            moments.add(self.frontend.conv0(wav[:, u * s0: (end - 1) * s0 + k0]))
        return moments.mean_var()

    def forward(self, wav: Tensor, lengths: Tensor | None = None) -> WavLMOutput:
        """All hidden states of ``wav (B, N)`` float 16 kHz; ``lengths (B,)`` valid samples when padded.

        Padding follows transformers: a frame is valid when the CNN makes it from valid samples alone;
        padded frames are zeroed before the positional convolution and masked as keys in every layer.
        """
        if wav.dim() == 1:
            wav = wav[None]
        wav = self.normalize_waveform(wav, lengths)
        x = self.projection(self.cnn(wav))
        b, t, _ = x.shape
        if lengths is None:
            frame_lengths = torch.full((b,), t, dtype=torch.long)
            k_len = None
        else:
            frame_lengths = torch.tensor([self.cfg.num_frames(int(n)) for n in lengths], dtype=torch.long)
            k_len = frame_lengths.to(x.device)
            valid = torch.arange(t, device=x.device)[None, :] < k_len[:, None]
            x = x * valid[:, :, None]
        return self.transformer(self.encoder.input_norm(self.encoder.pos_conv(x)), k_len, frame_lengths)

    def transformer(
        self,
        x: Tensor,
        k_len: Tensor | None = None,
        frame_lengths: Tensor | None = None,
        chunk: int | None = None,
        left: int | None = None,
    ) -> WavLMOutput:
        """The Transformer layers over the encoder input ``h_0 (B, T, D)`` (after the positional conv);
        ``chunk``/``left`` apply the streaming block mask (the masked offline reference of the streaming
        encoder)."""
        b, t, _ = x.shape
        pos = torch.arange(t, device=x.device).expand(b, t)
        hidden = self.encoder(x, KeyLayout(pos, pos, k_len, chunk, left))
        if frame_lengths is None:
            frame_lengths = torch.full((b,), t, dtype=torch.long)
        return WavLMOutput(hidden, self.encoder.output_norm(hidden[-1]), frame_lengths)

    def xvector_embedding(self, out: WavLMOutput) -> Tensor:
        """The 512-d speaker embedding of each utterance (statistics over its valid TDNN frames)."""
        if self.xvector is None:
            raise ValueError("this checkpoint has no speaker head; load a WavLMForXVector checkpoint")
        frames = self.xvector.tdnn_frames(self.xvector.frame_input(out.hidden_states))
        shrink = out.hidden_states[0].shape[1] - frames.shape[1]
        return torch.stack([
            self.xvector.pool(frames[i: i + 1, : max(int(n) - shrink, 2)])[0]
            for i, n in enumerate(out.frame_lengths)
        ])
