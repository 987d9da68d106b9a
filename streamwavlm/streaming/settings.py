"""What a stream is asked to do: chunking, context, lookahead, normalisation policy and outputs.

Semantics (``docs/streaming.md``): the encoder advances in chunks of ``chunk`` frames aligned to multiples
of ``chunk`` from the stream's frame 0; every query of a chunk sees the keys of its own chunk and the
``left`` frames before the chunk; the positional convolution sees ``lookahead`` frames ahead (0..63 for the
released models) and zeros beyond; statistics that the reference takes over the whole utterance follow
``norm``. Algorithmic latency is ``chunk + lookahead`` frames plus the CNN's 25 ms window.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..config import WavLMConfig


class NormPolicy(str, Enum):
    """How utterance-level statistics (GroupNorm of Base/Base+, waveform normalisation of Large) stream.

    ``running``: cumulative statistics from the start of the stream up to the current chunk.
    ``frozen``: cumulative during the first ``warmup`` seconds, then fixed.
    """

    RUNNING = "running"
    FROZEN = "frozen"


@dataclass(frozen=True)
class XVectorSettings:
    """Sliding-window speaker embeddings: ``window`` TDNN frames pooled every ``hop`` frames."""

    window: int = 150  # 3 s
    hop: int = 50  # 1 s

    def __post_init__(self) -> None:
        if self.window < 2 or self.hop < 1:
            raise ValueError("x-vector window must be >= 2 frames and hop >= 1 frame")


@dataclass(frozen=True)
class StreamSettings:
    chunk: int = 16  # C: frames per encoder step (20 ms each)
    left: int = 250  # L: frames of attention left context
    lookahead: int = 0  # P: positional-conv lookahead in frames
    norm: NormPolicy = NormPolicy.RUNNING
    warmup: float = 3.0  # seconds of audio before the frozen policy stops updating
    layers: tuple[int, ...] = ()  # hidden-state indices to emit (0..L); empty: the last layer
    final_norm: bool = True  # for pre-LN models, emit LN(h_L) for layer L (the model's last_hidden_state)
    layer_weights: tuple[float, ...] | None = None  # emit sum_i w_i h_i as well (L+1 weights)
    xvector: XVectorSettings | None = None

    def validate(self, cfg: WavLMConfig) -> None:
        """Refuse settings this model cannot run, naming the setting."""
        max_p = cfg.conv_pos - 1 - cfg.conv_pos // 2
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1 frame, got {self.chunk}")
        if self.left < 0:
            raise ValueError(f"left context must be >= 0 frames, got {self.left}")
        if not 0 <= self.lookahead <= max_p:
            raise ValueError(f"lookahead must be in 0..{max_p} frames for this model, got {self.lookahead}")
        if self.warmup <= 0:
            raise ValueError("warmup must be positive")
        bad = [i for i in self.layers if not 0 <= i <= cfg.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range 0..{cfg.num_layers}")
        if self.layer_weights is not None and len(self.layer_weights) != cfg.num_layers + 1:
            n = len(self.layer_weights)
            raise ValueError(f"layer_weights needs {cfg.num_layers + 1} values, got {n}")
        if self.xvector is not None and cfg.xvector is None:
            raise ValueError("x-vectors need a checkpoint with a speaker head (WavLMForXVector)")

    def output_layers(self, cfg: WavLMConfig) -> tuple[int, ...]:
        return self.layers or (cfg.num_layers,)

    def depth(self, cfg: WavLMConfig) -> int:
        """How many Transformer layers a step must run to produce the requested outputs."""
        if self.layer_weights is not None or self.xvector is not None:
            return cfg.num_layers
        return max(self.output_layers(cfg))

    def latency_ms(self, cfg: WavLMConfig) -> float:
        """Algorithmic latency, ``(C + P)`` frames plus one CNN window (25 ms): the longest a sample waits
        for the chunk that contains its frame to be computable."""
        return 1000 * ((self.chunk + self.lookahead) * cfg.hop + cfg.receptive_field) / 16000
