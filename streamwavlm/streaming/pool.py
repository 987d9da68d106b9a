"""A pool of stream slots whose states are batched tensors, so one forward steps every ready stream.

Each slot is one stream. The pool owns no audio: a caller hands it exactly one step's samples per ready
stream (``step({slot: samples})``, :meth:`StreamPool.need` says how many) and the end of a stream's audio
(``close``). A step turns ``hop * chunk`` new samples per stream (the first step also the ``lookahead``
frames and the CNN's extra window) into ``chunk`` encoder frames per stream:

1. waveform normalisation (Large) with the stream's running or frozen statistics;
2. the CNN over the new samples plus a tail of ``receptive_field - hop`` samples (exact), with GroupNorm
   statistics (Base/Base+) accumulated over conv-0 frames;
3. projection, then the positional convolution over a window of the 64 previous frames, the chunk and the
   ``lookahead`` next frames (taps beyond the lookahead are dropped: the future is zero);
4. the model's own Transformer layers, each with its K/V ring of ``left + chunk`` frames as cache; the rings
   stay where they are in the pool (scattered ready slots are read in place, only new entries written);
5. the requested outputs, and sliding-window x-vectors through a TDNN cache.

The state is typed (:mod:`.state`); :meth:`StreamPool.save` and :meth:`StreamPool.restore` move a stream's
state out of and into a pool, which makes pause/resume and migration possible.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..audio.validate import SAMPLE_RATE
from ..kernels import KeyLayout, attention_backend
from ..model.moments import Moments
from ..model.wavlm import WavLM
from .graphs import StageGraphs
from .settings import NormPolicy, StreamSettings
from .state import EMPTY_POS, FrontState, KVRings, StreamProgress, StreamState, StreamTensors, XVectorState

Samples = np.ndarray | Tensor


class PoolFull(RuntimeError):
    """Every slot of the pool holds a stream: a new one must wait or be refused (nothing else changed)."""


@dataclass
class ChunkOutput:
    """Encoder frames of one stream from one step, as soon as they are final."""

    stream_id: str
    first_frame: int
    layers: tuple[int, ...]  # hidden-state index of each row of ``frames``; -1 is the weighted sum
    frames: Tensor  # (len(layers), n, D)
    xvectors: list[tuple[int, Tensor]] = field(default_factory=list)  # (end frame, exclusive; embedding)
    final: bool = False

    @property
    def num_frames(self) -> int:
        return self.frames.shape[1]


class StreamPool:
    """Up to ``capacity`` concurrent streams over one model, stepped together."""

    def __init__(self, model: WavLM, settings: StreamSettings, capacity: int = 1,
                 cuda_graphs: bool | None = None) -> None:
        """``cuda_graphs``: replay the Transformer stage of a step from captured CUDA graphs (:mod:`.graphs`),
        which removes most of a GPU step's launch overhead; ``None`` does so when the model is on a CUDA device
        (steps whose attention takes the torch backend stay eager)."""
        settings.validate(model.cfg)
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 stream, got {capacity}")
        self.model = model.eval()
        self.settings = settings
        self.capacity = capacity
        cfg = model.cfg
        self.cfg = cfg
        self.depth = settings.depth(cfg)
        self.tail_len = cfg.receptive_field - cfg.hop
        pc = model.encoder.pos_conv
        self.pos_left = pc.left
        self.pos_weight = pc.truncated_weight(settings.lookahead)
        self._streams: list[StreamProgress | None] = [None] * capacity
        self._state = self._zeros(capacity)
        self._out_ids = tuple(settings.output_layers(cfg)) + ((-1,) if settings.layer_weights else ())
        on_cuda = self._state.rings.positions.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        self._graphs = StageGraphs(self._transformer_stage) if on_cuda and cuda_graphs is not False else None
        if settings.layer_weights is not None:
            self._mix = torch.tensor(settings.layer_weights, dtype=torch.float32)

    def _zeros(self, rows: int) -> StreamTensors:
        cfg, s = self.cfg, self.settings
        param = next(self.model.parameters())
        dev = param.device
        act = dict(dtype=param.dtype, device=dev)
        head = cfg.xvector if s.xvector is not None else None
        front = FrontState(
            cnn_tail=torch.zeros(rows, self.tail_len, **act),
            pos_history=torch.zeros(rows, self.pos_left + s.lookahead, cfg.embed_dim, **act),
            wav_moments=Moments.zeros(rows, None, dev) if cfg.normalize else None,
            gn_moments=Moments.zeros(rows, cfg.conv_layers[0][0], dev) if self.model.frontend.group_norm else None,
            tdnn_inputs=None if head is None else torch.zeros(rows, head.receptive_field - 1, head.projector_dim,
                                                              **act),
        )
        ring = s.left + s.chunk
        # in the attention's dtype (bf16 under the CPU's bf16 and int8 precisions); statistics stay fp64
        kv_dtype = self.model.encoder.layers[0].attn.kv_dtype if dev.type == "cpu" else param.dtype
        kv = [torch.zeros(rows, cfg.num_heads, ring, cfg.head_dim, dtype=kv_dtype, device=dev)
              for _ in range(2 * self.depth)]
        positions = torch.full((rows, ring), EMPTY_POS, dtype=torch.long, device=dev)
        return StreamTensors(front, KVRings(positions, kv[:self.depth], kv[self.depth:]))

    def _rows(self, slots: list[int]) -> Tensor:
        return torch.tensor(slots, device=self._state.rings.positions.device)

    # ------------------------------------------------------------------ stream lifecycle
    def open(self, stream_id: str) -> int:
        """Give a new stream a free slot and return the slot index."""
        if stream_id in self.streams:
            raise ValueError(f"stream {stream_id!r} is already open")
        for i, s in enumerate(self._streams):
            if s is None:
                self._streams[i] = StreamProgress(stream_id)
                self._state.clear(self._rows([i]))
                return i
        raise PoolFull(f"the engine is at its capacity of {self.capacity} streams; try again when one ends "
                       "(or run it with a larger --capacity)")

    def slot_of(self, stream_id: str) -> int:
        slot = self.streams.get(stream_id)
        if slot is None:
            raise KeyError(f"no open stream {stream_id!r}")
        return slot

    @property
    def streams(self) -> dict[str, int]:
        return {s.stream_id: i for i, s in enumerate(self._streams) if s is not None}

    def reset(self, slot: int) -> None:
        """Forget everything about the stream in ``slot`` (caches, statistics, counters)."""
        self._streams[slot] = StreamProgress(self._progress(slot).stream_id)
        self._state.clear(self._rows([slot]))

    def discard(self, slot: int) -> None:
        """Free ``slot`` without flushing (a failed or shed stream)."""
        self._progress(slot)
        self._streams[slot] = None

    def save(self, slot: int) -> StreamState:
        """A detached copy of the stream's state."""
        return StreamState(self.settings, copy.deepcopy(self._progress(slot)), self._state.take(self._rows([slot])))

    def restore(self, slot: int, state: StreamState) -> None:
        """Load a saved state into ``slot`` (which must be free or hold the same stream)."""
        if state.settings != self.settings:
            raise ValueError("the saved stream used other settings; restore it into a pool with the same")
        current = self._streams[slot]
        if current is not None and current.stream_id != state.progress.stream_id:
            raise ValueError(f"slot {slot} holds stream {current.stream_id!r}")
        if state.progress.stream_id in self.streams and self.streams[state.progress.stream_id] != slot:
            raise ValueError(f"stream {state.progress.stream_id!r} is open in another slot")
        self._state.put(self._rows([slot]), state.tensors)
        self._streams[slot] = copy.deepcopy(state.progress)

    def _progress(self, slot: int) -> StreamProgress:
        st = self._streams[slot] if 0 <= slot < self.capacity else None
        if st is None:
            raise KeyError(f"slot {slot} holds no stream")
        return st

    # ------------------------------------------------------------------ stepping
    @property
    def first_step(self) -> int:
        """Samples a stream's first (and largest) step consumes: ``80 + 320 (C + P)``."""
        return self.tail_len + self.cfg.hop * (self.settings.chunk + self.settings.lookahead)

    def need(self, slot: int) -> int:
        """Samples the stream's next step consumes: :attr:`first_step` the first time, then ``320 C``."""
        if self._progress(slot).started:
            return self.cfg.hop * self.settings.chunk
        return self.first_step

    def step(self, audio: Mapping[int, Samples]) -> list[ChunkOutput]:
        """Advance each given slot by one chunk with exactly :meth:`need` float32 16 kHz samples.

        Streams at the same phase (first step or not) share one batched forward. The samples must already be
        validated (finite, mono, 16 kHz: where audio enters, e.g. :func:`~streamwavlm.audio.validate.to_float_mono`).
        """
        batch = {slot: self._samples(slot, x, exact=True) for slot, x in audio.items()}
        outputs: list[ChunkOutput] = []
        for started in (True, False):
            group = [i for i in batch if self._progress(i).started == started]
            if group:
                outputs += self._advance(group, [batch[i] for i in group], flush=False)
        return outputs

    def close(self, slot: int, samples: Samples | None = None) -> list[ChunkOutput]:
        """End the stream with its remaining samples and free the slot.

        Whole steps among ``samples`` run as ordinary steps first, so closing equals stepping then flushing;
        the rest is flushed (frames beyond the end of the audio count as zero, as offline).
        """
        rest = self._samples(slot, samples if samples is not None else np.zeros(0, np.float32), exact=False)
        outputs: list[ChunkOutput] = []
        while len(rest) >= self.need(slot):
            n = self.need(slot)
            outputs += self._advance([slot], [rest[:n]], flush=False)
            rest = rest[n:]
        progress = self._progress(slot)
        if not progress.started and self.cfg.num_frames(len(rest)) == 0:
            outputs.append(ChunkOutput(progress.stream_id, progress.frames_out, self._out_ids, self._no_frames(),
                                       final=True))
        else:
            outputs += self._advance([slot], [rest], flush=True)
        self._streams[slot] = None
        return outputs

    def _samples(self, slot: int, x: Samples, exact: bool) -> Tensor:
        """The samples as a 1-D float32 tensor (no copy), refusing what a step cannot take."""
        stream = self._progress(slot).stream_id
        t = torch.as_tensor(x)
        if t.dim() != 1 or t.dtype != torch.float32:
            raise ValueError(f"stream {stream}: samples must be 1-D float32 at 16 kHz, got {t.dtype} of shape "
                             f"{tuple(t.shape)}; convert with streamwavlm.audio.validate.to_float_mono")
        if exact and len(t) != self.need(slot):
            raise ValueError(f"stream {stream}: this step takes exactly {self.need(slot)} samples, got {len(t)}")
        return t

    @torch.no_grad()
    def _advance(self, slots: list[int], audio: list[Tensor], flush: bool) -> list[ChunkOutput]:
        cfg, s, model = self.cfg, self.settings, self.model
        rows = self._rows(slots)
        progress = [self._progress(i) for i in slots]
        started = progress[0].started  # a batch is of one phase
        front = self._state.front.take(rows)
        updating = self._updating(progress, rows.device)

        # 1-2: waveform normalisation and the CNN over tail + new samples
        raw = torch.stack(audio).to(front.cnn_tail.device, front.cnn_tail.dtype)
        wav = self._normalize(raw, front.wav_moments, updating) if front.wav_moments is not None else raw
        segment = torch.cat([front.cnn_tail, wav], 1) if started else wav
        n_old0 = self._conv0_frames(self.tail_len) if started else 0
        gn = front.gn_moments
        feats = model.frontend(segment, None if gn is None else lambda y0: self._gn_stats(y0[:, n_old0:], gn, updating))
        if segment.shape[1] >= self.tail_len:
            front.cnn_tail.copy_(segment[:, segment.shape[1] - self.tail_len:])
        x_new = model.projection(feats)  # (B, n_cnn, D)

        # 3: positional convolution over [64 history | chunk | lookahead]
        hist = front.pos_history if started else front.pos_history[:, s.lookahead:]
        window = torch.cat([hist, x_new], 1)
        if flush:
            window = torch.cat([window, window.new_zeros(len(slots), s.lookahead, cfg.embed_dim)], 1)
        front.pos_history.copy_(window[:, window.shape[1] - front.pos_history.shape[1]:])
        n_out = window.shape[1] - self.pos_left - s.lookahead
        x = window[:, :0]
        if n_out > 0:
            conv = model.encoder.pos_conv.window(window, self.pos_weight)
            x = model.encoder.input_norm(window[:, self.pos_left:self.pos_left + n_out] + conv)

        # 4: the model's Transformer, chunk by chunk (one chunk except when flushing), over the K/V rings
        first = torch.tensor([p.frames_out for p in progress], device=x.device)
        pieces = [self._transformer(x[:, a:a + s.chunk], first + a, rows) for a in range(0, n_out, s.chunk)]
        hidden = [torch.cat(h, 1) for h in zip(*pieces, strict=True)] if pieces else []

        outputs = self._emit(progress, front, hidden, n_out, flush)
        self._state.front.put(rows, front)
        for p, a in zip(progress, audio, strict=True):
            p.started = True
            p.samples += len(a)
            p.frames_out += n_out
        return outputs

    def _transformer(self, x: Tensor, first: Tensor, rows: Tensor) -> list[Tensor]:
        """One chunk of each row's frames ``first[b]..`` through the model's layers with the rows' K/V rings."""
        if self._graphs is not None and x.shape[1] == self.settings.chunk and attention_backend(x.device) == "triton":
            return self._graphs(x, first, rows)
        return self._transformer_stage(x, first, rows, runs=True)

    def _transformer_stage(self, x: Tensor, first: Tensor, rows: Tensor, runs: bool = False) -> list[Tensor]:
        """:meth:`_transformer` itself; ``runs``: look for ring writes that are strided copies (host work that
        a CUDA graph cannot hold)."""
        q_pos = first[:, None] + torch.arange(x.shape[1], device=x.device)
        k_pos, caches = self._state.rings.advance(rows, q_pos, runs)
        layout = KeyLayout(q_pos, k_pos, chunk=self.settings.chunk, left=self.settings.left, rows=rows)
        return self.model.encoder(x, layout, caches, self.depth)

    def _no_frames(self) -> Tensor:
        return torch.zeros(len(self._out_ids), 0, self.cfg.embed_dim)

    def _emit(self, progress: list[StreamProgress], front: FrontState, hidden: list[Tensor], n_out: int,
              flush: bool) -> list[ChunkOutput]:
        cfg, s = self.cfg, self.settings
        rows = []
        for i in s.output_layers(cfg):
            h = hidden[i] if hidden else None
            if h is not None and i == cfg.num_layers and s.final_norm:
                h = self.model.encoder.output_norm(h)
            rows.append(h)
        if s.layer_weights is not None and hidden:  # the weights as given, over h_0 .. h_L without final LN
            rows.append(torch.einsum("l,lbtd->btd", self._mix, torch.stack(hidden)))
        xvectors = self._xvectors(progress, front, hidden, n_out, flush) if s.xvector is not None else None
        outputs = []
        for j, p in enumerate(progress):
            frames = torch.stack([r[j] for r in rows]) if hidden else self._no_frames()
            outputs.append(ChunkOutput(p.stream_id, p.frames_out, self._out_ids, frames,
                                       xvectors[j] if xvectors else [], final=flush))
        return outputs

    # ------------------------------------------------------------------ statistics policies
    def _updating(self, progress: list[StreamProgress], device: torch.device) -> Tensor:
        """Which streams' statistics take in this step: all (running), or those whose audio consumed so far is
        shorter than the warm-up (frozen)."""
        limit = float("inf") if self.settings.norm == NormPolicy.RUNNING else self.settings.warmup * SAMPLE_RATE
        return torch.tensor([p.samples < limit for p in progress], device=device)

    def _normalize(self, raw: Tensor, moments: Moments, updating: Tensor) -> Tensor:
        """Waveform normalisation with running/frozen mean and variance over the stream's samples."""
        moments.add(raw, updating)
        mean, var = moments.mean_var()
        x = raw.double()
        return ((x - mean[:, None]) / torch.sqrt(var[:, None] + self.cfg.normalize_eps)).to(raw.dtype)

    def _gn_stats(self, y0_new: Tensor, moments: Moments, updating: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new conv-0 frames to the GroupNorm moments (unless frozen) and return (mean, var)."""
        moments.add(y0_new, updating)
        return moments.mean_var()

    def _conv0_frames(self, n: int) -> int:
        _, k0, s0 = self.cfg.conv_layers[0]
        return 0 if n < k0 else (n - k0) // s0 + 1

    # ------------------------------------------------------------------ x-vectors
    def _xvectors(self, progress: list[StreamProgress], front: FrontState, hidden: list[Tensor], n_out: int,
                  flush: bool) -> list[list[tuple[int, Tensor]]]:
        """Run the TDNN over the new frames (with a cache of ``receptive_field - 1`` projected frames) and
        pool every window whose hop boundary was reached."""
        head, cache = self.model.xvector, front.tdnn_inputs
        assert head is not None and cache is not None
        lag = cache.shape[1]
        if hidden:
            window = torch.cat([cache, head.frame_input(hidden)], 1)
            cache.copy_(window[:, window.shape[1] - lag:])
            frames = head.tdnn_frames(window)  # one TDNN frame ending at each new projected frame
        result = []
        for j, p in enumerate(progress):
            xv = p.xvector
            # new TDNN frames that read no empty cache entry (frames_out is this step's first frame)
            fresh = max(0, p.frames_out + n_out - lag) - max(0, p.frames_out - lag) if hidden else 0
            if fresh > 0:
                new = frames[j, frames.shape[1] - fresh:]
                xv.window = new if xv.window is None else torch.cat([xv.window, new])
                xv.tdnn_frames += fresh
            result.append([(end + lag, emb) for end, emb in self._pool_windows(xv, flush)])
        return result

    def _pool_windows(self, xv: XVectorState, flush: bool) -> list[tuple[int, Tensor]]:
        """x-vectors at every multiple of ``hop`` TDNN frames, each over the last ``window`` frames (fewer at
        the start); at the end of the stream one more over the frames since the last boundary. Ends are in
        TDNN frames."""
        head, xs = self.model.xvector, self.settings.xvector
        assert head is not None and xs is not None
        out: list[tuple[int, Tensor]] = []
        if xv.window is None:
            return out
        first = xv.tdnn_frames - xv.window.shape[0]  # TDNN frame index of the buffer's first row
        ends = []
        if xv.next_end == 0:
            xv.next_end = xs.hop
        while xv.tdnn_frames >= xv.next_end:
            ends.append(xv.next_end)
            xv.next_end += xs.hop
        if flush and xv.tdnn_frames > xv.next_end - xs.hop:
            ends.append(xv.tdnn_frames)
        for end in ends:
            rows = xv.window[max(0, end - xs.window - first): end - first]
            if len(rows) >= 2:  # an unbiased std needs two frames
                out.append((end, head.pool(rows[None])[0]))
        xv.window = xv.window[-xs.window:]
        return out
