"""The speaker-verification head of transformers' ``WavLMForXVector`` (microsoft/wavlm-base-plus-sv).

Weighted sum of the L+1 hidden states (softmax weights), a projector, five TDNN layers (valid dilated
convolutions with ReLU; 15 frames of receptive field), mean and *unbiased* standard deviation over time,
and a linear map to the 512-d x-vector. The TDNN kernels are stored here as ``Conv1d`` weights; the
checkpoint keeps them as ``Linear(in*k, out)`` and :mod:`streamwavlm.checkpoint` converts between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import WavLMConfig, XVectorConfig


class XVectorHead(nn.Module):
    def __init__(self, cfg: WavLMConfig, head: XVectorConfig) -> None:
        super().__init__()
        self.cfg = head
        self.layer_weights = (
            nn.Parameter(torch.ones(cfg.num_layers + 1) / (cfg.num_layers + 1)) if head.use_weighted_layer_sum
            else None
        )
        self.projector = nn.Linear(cfg.embed_dim, head.projector_dim)
        dims = (head.projector_dim, *head.tdnn_dim)
        self.tdnn = nn.ModuleList(
            nn.Conv1d(dims[i], dims[i + 1], head.tdnn_kernel[i], dilation=head.tdnn_dilation[i])
            for i in range(len(head.tdnn_dim))
        )
        self.embedding = nn.Linear(2 * head.tdnn_dim[-1], head.output_dim)
        self.classifier = nn.Linear(head.output_dim, head.output_dim)  # training-only, kept for round trips

    def frame_input(self, hidden_states: list[Tensor]) -> Tensor:
        """Projected per-frame input of the TDNN ``(B, T, P)``: the (weighted) layer mix, projected."""
        if self.layer_weights is not None:
            w = torch.softmax(self.layer_weights, dim=0)
            h = torch.einsum("l,lbtd->btd", w, torch.stack(hidden_states))
        else:
            h = hidden_states[-1]
        return self.projector(h)

    def tdnn_frames(self, projected: Tensor) -> Tensor:
        """TDNN output ``(B, T - receptive_field + 1, tdnn_dim[-1])`` from projected frames ``(B, T, P)``."""
        x = projected.transpose(1, 2)
        for conv in self.tdnn:
            x = F.relu(conv(x))
        return x.transpose(1, 2)

    def pool(self, frames: Tensor) -> Tensor:
        """Statistics pooling (mean, unbiased std over time) and the embedding layer: ``(B, out_dim)``."""
        return self.embedding(torch.cat([frames.mean(1), frames.std(1)], dim=-1))

    def forward(self, hidden_states: list[Tensor]) -> Tensor:
        return self.pool(self.tdnn_frames(self.frame_input(hidden_states)))
