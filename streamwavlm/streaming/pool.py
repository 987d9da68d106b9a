"""A pool of stream slots whose states are batched tensors, so one forward steps every ready stream.

Each slot is one stream. A step consumes ``hop * chunk`` new samples per stream (the first step also the
``lookahead`` frames and the CNN's extra window) and yields ``chunk`` encoder frames per stream:

1. waveform normalisation (Large) with the stream's running or frozen statistics;
2. the CNN over the new samples plus a tail of ``receptive_field - hop`` samples (exact), with GroupNorm
   statistics (Base/Base+) accumulated over conv-0 frames;
3. projection, then the positional convolution over a window of the 64 previous frames, the chunk and the
   ``lookahead`` next frames (taps beyond the lookahead are dropped: the future is zero);
4. every Transformer layer, the chunk's queries against a K/V ring buffer of ``left + chunk`` frames with
   absolute positions; stale and empty entries are excluded by the block rule on positions;
5. the requested outputs, and sliding-window x-vectors through a TDNN cache.

The states are plain tensors indexed by slot; :meth:`StreamPool.save` and :meth:`StreamPool.restore` move a
stream's state out of and into a pool, which makes pause/resume and migration possible.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..audio.validate import SAMPLE_RATE, to_float_mono
from ..model.attention import AttentionContext
from ..model.wavlm import WavLM
from .settings import NormPolicy, StreamSettings

# position of an empty cache entry: far enough back that the left-context rule masks it
EMPTY_POS = -(1 << 40)


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


@dataclass
class _Slot:
    stream_id: str
    pending: deque[np.ndarray] = field(default_factory=deque)
    pending_len: int = 0
    started: bool = False  # first step (with its lookahead) done
    frames_out: int = 0  # encoder frames emitted (= next chunk start)
    tdnn_frames: int = 0  # TDNN frames computed (x-vectors)
    next_xvector: int = 0  # TDNN frame count at which the next x-vector is due
    tdnn_window: Tensor | None = None  # recent TDNN frames (<= window + chunk, F)

    def take(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.float32)
        filled = 0
        while filled < n:
            head = self.pending[0]
            k = min(n - filled, len(head))
            out[filled:filled + k] = head[:k]
            filled += k
            if k == len(head):
                self.pending.popleft()
            else:
                self.pending[0] = head[k:]
        self.pending_len -= n
        return out


@dataclass
class StreamState:
    """One stream's complete state, detached from any pool (save/restore, reset, migration)."""

    settings: StreamSettings
    slot: _Slot
    tensors: dict[str, Tensor]


class StreamPool:
    """Up to ``capacity`` concurrent streams over one model, stepped together."""

    def __init__(self, model: WavLM, settings: StreamSettings, capacity: int = 1) -> None:
        settings.validate(model.cfg)
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
        self.ring = settings.left + settings.chunk
        self._slots: list[_Slot | None] = [None] * capacity
        self._t = self._init_tensors(capacity)
        self._out_ids = tuple(settings.output_layers(cfg)) + ((-1,) if settings.layer_weights else ())
        if settings.layer_weights is not None:
            self._mix = torch.tensor(settings.layer_weights, dtype=torch.float32)

    # ------------------------------------------------------------------ state tensors
    def _init_tensors(self, n: int) -> dict[str, Tensor]:
        cfg, s = self.cfg, self.settings
        param = next(self.model.parameters())
        dev = param.device
        act, f64 = dict(dtype=param.dtype, device=dev), dict(dtype=torch.float64, device=dev)
        t = {
            "tail": torch.zeros(n, self.tail_len, **act),
            "hist": torch.zeros(n, self.pos_left + s.lookahead, cfg.embed_dim, **act),
            "kpos": torch.full((n, self.ring), EMPTY_POS, dtype=torch.long, device=dev),
        }
        if self.model.frontend.group_norm:
            c0 = cfg.conv_layers[0][0]
            t |= {"gn_sum": torch.zeros(n, c0, **f64), "gn_sq": torch.zeros(n, c0, **f64),
                  "gn_count": torch.zeros(n, **f64)}
        if cfg.normalize:
            t |= {"wav_sum": torch.zeros(n, **f64), "wav_sq": torch.zeros(n, **f64),
                  "wav_count": torch.zeros(n, **f64)}
        for i in range(self.depth):
            t[f"k{i}"] = torch.zeros(n, cfg.num_heads, self.ring, cfg.head_dim, **act)
            t[f"v{i}"] = torch.zeros(n, cfg.num_heads, self.ring, cfg.head_dim, **act)
        if s.xvector is not None and self.model.xvector is not None:
            rf = cfg.xvector.receptive_field  # type: ignore[union-attr]
            t["tdnn_in"] = torch.zeros(n, rf - 1, cfg.xvector.projector_dim, **act)  # type: ignore[union-attr]
        return t

    # ------------------------------------------------------------------ stream lifecycle
    def open(self, stream_id: str) -> int:
        """Give a new stream a free slot and return the slot index."""
        if any(s is not None and s.stream_id == stream_id for s in self._slots):
            raise ValueError(f"stream {stream_id!r} is already open")
        for i, s in enumerate(self._slots):
            if s is None:
                self._slots[i] = _Slot(stream_id)
                self._reset_tensors(i)
                return i
        raise RuntimeError(f"the pool is full ({self.capacity} streams); close one or use a larger capacity")

    def slot_of(self, stream_id: str) -> int:
        for i, s in enumerate(self._slots):
            if s is not None and s.stream_id == stream_id:
                return i
        raise KeyError(f"no open stream {stream_id!r}")

    @property
    def streams(self) -> dict[str, int]:
        return {s.stream_id: i for i, s in enumerate(self._slots) if s is not None}

    def push(self, slot: int, samples: np.ndarray | Tensor) -> None:
        """Queue 16 kHz mono samples (any length). Bad audio is refused before anything is queued."""
        st = self._slot(slot)
        x = to_float_mono(samples, SAMPLE_RATE, source=f"stream {st.stream_id}").numpy()
        if len(x):
            st.pending.append(x.copy())
            st.pending_len += len(x)

    def reset(self, slot: int) -> None:
        """Forget everything about the stream in ``slot`` (caches, statistics, queued audio)."""
        self._slots[slot] = _Slot(self._slot(slot).stream_id)
        self._reset_tensors(slot)

    def close(self, slot: int) -> list[ChunkOutput]:
        """Flush the stream (the end of audio counts as silence beyond it) and free the slot."""
        outputs = self._flush(slot)
        self._slots[slot] = None
        return outputs

    def save(self, slot: int) -> StreamState:
        st = self._slot(slot)
        return StreamState(self.settings, copy.deepcopy(st), {k: v[slot].clone() for k, v in self._t.items()})

    def restore(self, slot: int, state: StreamState) -> None:
        """Load a saved state into ``slot`` (which must be free or hold the same stream)."""
        if state.settings != self.settings:
            raise ValueError("the saved stream used other settings; restore it into a pool with the same")
        current = self._slots[slot]
        if current is not None and current.stream_id != state.slot.stream_id:
            raise ValueError(f"slot {slot} holds stream {current.stream_id!r}")
        for k, v in self._t.items():
            v[slot].copy_(state.tensors[k])
        self._slots[slot] = copy.deepcopy(state.slot)

    def _reset_tensors(self, slot: int) -> None:
        for k, v in self._t.items():
            v[slot].fill_(EMPTY_POS if k == "kpos" else 0)

    def _slot(self, slot: int) -> _Slot:
        st = self._slots[slot] if 0 <= slot < self.capacity else None
        if st is None:
            raise KeyError(f"slot {slot} holds no stream")
        return st

    # ------------------------------------------------------------------ stepping
    def _need(self, st: _Slot) -> int:
        """Samples the stream's next step consumes."""
        c, s = self.cfg, self.settings
        if st.started:
            return c.hop * s.chunk
        return self.tail_len + c.hop * (s.chunk + s.lookahead)

    def needed(self, slot: int) -> int:
        """Samples the stream in ``slot`` still needs queued before its next step can run."""
        st = self._slot(slot)
        return max(0, self._need(st) - st.pending_len)

    def discard(self, slot: int) -> None:
        """Free ``slot`` without flushing (a failed or shed stream)."""
        self._slot(slot)
        self._slots[slot] = None

    def ready(self) -> list[int]:
        """Slots with enough queued audio for a step."""
        return [i for i, st in enumerate(self._slots) if st is not None and st.pending_len >= self._need(st)]

    def step(self, slots: list[int] | None = None) -> list[ChunkOutput]:
        """Advance every ready slot (or the given ones) by one chunk, batching those at the same phase."""
        ready = self.ready() if slots is None else slots
        outputs: list[ChunkOutput] = []
        for first in (False, True):
            group = [i for i in ready if self._slot(i).started != first]
            if group:
                audio = [self._slot(i).take(self._need(self._slot(i))) for i in group]
                outputs += self._advance(group, audio, flush=False)
        return outputs

    def run(self, slot: int) -> list[ChunkOutput]:
        """Step one stream for as long as it has queued audio."""
        outputs: list[ChunkOutput] = []
        while slot in self.ready():
            outputs += self.step([slot])
        return outputs

    @torch.no_grad()
    def _advance(self, slots: list[int], new: list[np.ndarray], flush: bool) -> list[ChunkOutput]:
        cfg, s, model = self.cfg, self.settings, self.model
        idx = torch.tensor(slots, device=self._t["tail"].device)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        t = {k: (v[slots[0]:slots[0] + len(slots)] if contiguous else v.index_select(0, idx))
             for k, v in self._t.items()}
        states = [self._slot(i) for i in slots]
        started = [st.started for st in states]

        # 1-2: waveform normalisation and the CNN over tail + new samples
        raw = torch.from_numpy(np.stack(new)).to(t["tail"].device, t["tail"].dtype)
        wav = self._normalize(raw, t) if cfg.normalize else raw
        segment = torch.cat([t["tail"], wav], 1) if all(started) else wav
        n_old0 = self._conv0_frames(self.tail_len) if all(started) else 0
        feats = model.frontend(segment, (lambda y0: self._gn_stats(y0[:, n_old0:], t))
                               if model.frontend.group_norm else None)
        if segment.shape[1] >= self.tail_len:
            t["tail"].copy_(segment[:, segment.shape[1] - self.tail_len:])
        x_new = model.projection(feats)  # (B, n_cnn, D)

        # 3: positional convolution over [64 history | chunk | lookahead]
        hist = t["hist"] if all(started) else t["hist"][:, s.lookahead:]
        window = torch.cat([hist, x_new], 1)
        if flush:
            window = torch.cat([window, window.new_zeros(len(slots), s.lookahead, cfg.embed_dim)], 1)
        t["hist"].copy_(window[:, window.shape[1] - t["hist"].shape[1]:])
        n_out = window.shape[1] - self.pos_left - s.lookahead
        x = window[:, :0]
        if n_out > 0:
            conv = model.encoder.pos_conv.window(window, self.pos_weight)
            x = model.encoder.input_norm(window[:, self.pos_left:self.pos_left + n_out] + conv)

        # 4: the Transformer, chunk by chunk (one chunk except when flushing)
        starts = torch.tensor([st.frames_out for st in states], device=x.device)
        pieces = []
        for a in range(0, n_out, s.chunk):
            pieces.append(self._layers(x[:, a:a + s.chunk], starts + a, t))
        hidden = [torch.cat(h, 1) for h in zip(*pieces, strict=True)] if pieces else []

        if not contiguous:
            for k, v in t.items():
                self._t[k].index_copy_(0, idx, v)
        for st in states:
            st.started = True
        return self._emit(slots, states, hidden, n_out, flush)

    def _layers(self, x: Tensor, first: Tensor, t: dict[str, Tensor]) -> list[Tensor]:
        """One chunk of each row's frames ``first[b]..`` through the Transformer; updates the K/V rings."""
        b, n, _ = x.shape
        s, enc = self.settings, self.model.encoder
        q_pos = first[:, None] + torch.arange(n, device=x.device)
        where = (q_pos % self.ring)
        t["kpos"].scatter_(1, where, q_pos)
        ctx = AttentionContext(enc.table, q_pos, t["kpos"], chunk=s.chunk, left=s.left)
        hidden = [x]
        for i, layer in enumerate(enc.layers[: self.depth]):
            attn = layer.attn
            inp = layer.attn_norm(x) if layer.pre_norm else x
            q, k, v, gate = attn.project(inp)
            index = where[:, None, :, None].expand(b, attn.num_heads, n, attn.head_dim)
            t[f"k{i}"].scatter_(2, index, k)
            t[f"v{i}"].scatter_(2, index, v)
            a = attn.attend(q, t[f"k{i}"], t[f"v{i}"], gate, ctx)
            x = layer.finish(x, a)
            hidden.append(x)
        return hidden

    def _emit(self, slots: list[int], states: list[_Slot], hidden: list[Tensor], n_out: int,
              flush: bool) -> list[ChunkOutput]:
        cfg, s = self.cfg, self.settings
        rows = []
        for i in s.output_layers(cfg):
            h = hidden[i] if hidden else None
            if h is not None and i == cfg.num_layers and s.final_norm:
                h = self.model.encoder.output_norm(h)
            rows.append(h)
        if s.layer_weights is not None and hidden:
            rows.append(torch.einsum("l,lbtd->btd", self._mix, torch.stack(hidden)))
        xvectors = self._xvectors(slots, states, hidden, n_out, flush) if s.xvector is not None else None
        outputs = []
        for j, st in enumerate(states):
            frames = (torch.stack([r[j] for r in rows]) if hidden
                      else torch.zeros(len(self._out_ids), 0, cfg.embed_dim))
            outputs.append(ChunkOutput(st.stream_id, st.frames_out, self._out_ids, frames,
                                       xvectors[j] if xvectors else [], final=flush))
            st.frames_out += n_out
        return outputs

    # ------------------------------------------------------------------ statistics policies
    def _updating(self, count: Tensor, per_second: float) -> Tensor:
        if self.settings.norm == NormPolicy.RUNNING:
            return torch.ones_like(count, dtype=torch.bool)
        return count < self.settings.warmup * per_second

    def _normalize(self, raw: Tensor, t: dict[str, Tensor]) -> Tensor:
        """Waveform normalisation with running/frozen mean and variance over the stream's samples."""
        x = raw.double()
        upd = self._updating(t["wav_count"], SAMPLE_RATE)
        t["wav_sum"] += torch.where(upd, x.sum(1), 0.0)
        t["wav_sq"] += torch.where(upd, (x * x).sum(1), 0.0)
        t["wav_count"] += torch.where(upd, float(x.shape[1]), 0.0)
        mean = t["wav_sum"] / t["wav_count"]
        var = (t["wav_sq"] / t["wav_count"] - mean * mean).clamp_min(0.0)
        return ((x - mean[:, None]) / torch.sqrt(var[:, None] + self.cfg.normalize_eps)).to(raw.dtype)

    def _gn_stats(self, y0_new: Tensor, t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Add the new conv-0 frames to the GroupNorm sums (unless frozen) and return (mean, var)."""
        y = y0_new.double()
        rate = SAMPLE_RATE / self.cfg.conv_layers[0][2]
        upd = self._updating(t["gn_count"], rate)[:, None]
        t["gn_sum"] += torch.where(upd, y.sum(1), 0.0)
        t["gn_sq"] += torch.where(upd, (y * y).sum(1), 0.0)
        t["gn_count"] += torch.where(upd[:, 0], float(y.shape[1]), 0.0)
        mean = t["gn_sum"] / t["gn_count"][:, None]
        return mean, (t["gn_sq"] / t["gn_count"][:, None] - mean * mean).clamp_min(0.0)

    def _conv0_frames(self, n: int) -> int:
        _, k0, s0 = self.cfg.conv_layers[0]
        return 0 if n < k0 else (n - k0) // s0 + 1

    # ------------------------------------------------------------------ end of stream
    def _flush(self, slot: int) -> list[ChunkOutput]:
        st = self._slot(slot)
        rest = st.take(st.pending_len)
        if not st.started and self.cfg.num_frames(len(rest)) == 0:
            return [ChunkOutput(st.stream_id, st.frames_out, self._out_ids,
                                torch.zeros(len(self._out_ids), 0, self.cfg.embed_dim), final=True)]
        return self._advance([slot], [rest], flush=True)

    # ------------------------------------------------------------------ x-vectors
    def _xvectors(self, slots: list[int], states: list[_Slot], hidden: list[Tensor], n_out: int,
                  flush: bool) -> list[list[tuple[int, Tensor]]]:
        """Run the TDNN over the new frames (with a cache of ``receptive_field - 1`` projected frames) and
        pool every window whose hop boundary was reached."""
        head = self.model.xvector
        assert head is not None
        if hidden:
            cache = self._t["tdnn_in"]
            idx = torch.tensor(slots, device=cache.device)
            window = torch.cat([cache.index_select(0, idx), head.frame_input(hidden)], 1)
            cache.index_copy_(0, idx, window[:, window.shape[1] - cache.shape[1]:])
            frames = head.tdnn_frames(window)  # one TDNN frame ending at each new projected frame
            lag = cache.shape[1]
        result = []
        for j, st in enumerate(states):
            # new TDNN frames that read no empty cache entry (frames_out is this step's first frame)
            fresh = max(0, st.frames_out + n_out - lag) - max(0, st.frames_out - lag) if hidden else 0
            if fresh > 0:
                new = frames[j, frames.shape[1] - fresh:]
                st.tdnn_window = new if st.tdnn_window is None else torch.cat([st.tdnn_window, new])
                st.tdnn_frames += fresh
            result.append(self._pool_windows(st, flush))
        return result

    def _pool_windows(self, st: _Slot, flush: bool) -> list[tuple[int, Tensor]]:
        """x-vectors at every multiple of ``hop`` TDNN frames, each over the last ``window`` frames (fewer at
        the start); at the end of the stream one more over the frames since the last boundary."""
        head, xs = self.model.xvector, self.settings.xvector
        assert head is not None and xs is not None
        out: list[tuple[int, Tensor]] = []
        if st.tdnn_window is None:
            return out
        lag = self._t["tdnn_in"].shape[1]
        first = st.tdnn_frames - st.tdnn_window.shape[0]  # TDNN frame index of the buffer's first row
        ends = []
        if st.next_xvector == 0:
            st.next_xvector = xs.hop
        while st.tdnn_frames >= st.next_xvector:
            ends.append(st.next_xvector)
            st.next_xvector += xs.hop
        if flush and st.tdnn_frames > st.next_xvector - xs.hop:
            ends.append(st.tdnn_frames)
        for end in ends:
            rows = st.tdnn_window[max(0, end - xs.window - first): end - first]
            if len(rows) >= 2:  # an unbiased std needs two frames
                out.append((end + lag, head.pool(rows[None])[0]))
        st.tdnn_window = st.tdnn_window[-xs.window:]
        return out
