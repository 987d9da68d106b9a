"""``stream --save PATH``: what the engine publishes, written to one ``.npz`` file, with or without a broker.

A sink on :class:`~streamwavlm.engine.EngineOutput` like the MQTT sink, holding the same arrays (same dtype)
that go into the MQTT payloads, so a file and a subscriber see identical tensors. Per stream ``S``:

* ``S/embeddings`` ``(frames, layers, dim)`` and ``S/frame_times`` ``(frames,)``: each frame's start in
  seconds from the stream's start (frame ``t`` starts at ``t / frame_rate``, dropped audio included);
* ``S/xvectors`` ``(n, dim)`` and ``S/xvector_times`` ``(n,)``: the end of each x-vector's window, seconds;
* ``S/layers``: the hidden-state index of each embedding row.

plus ``frame_rate`` and ``model``. The file is written when the run ends (also after Ctrl-C); until then
the outputs are kept in memory, about 150 kB per second of audio per saved 768-d layer in float32.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from .engine import EngineOutput


class FileSink:
    """Collects engine outputs per stream; :meth:`write` saves them."""

    def __init__(self, path: str | os.PathLike[str], model_id: str, frame_rate: float, dtype: str = "float32") -> None:
        self.path = Path(path)
        if self.path.suffix != ".npz":
            self.path = self.path.with_name(self.path.name + ".npz")
        self.model_id, self.frame_rate, self.dtype = model_id, frame_rate, np.dtype(dtype)
        self._frames: dict[str, list[np.ndarray]] = defaultdict(list)  # (n, layers, dim) pieces
        self._first: dict[str, list[int]] = defaultdict(list)
        self._xvectors: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
        self._layers: dict[str, tuple[int, ...]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after an hour of streaming

    async def __call__(self, out: EngineOutput) -> None:
        chunk = out.chunk
        if chunk.num_frames:
            self._frames[chunk.stream_id].append(chunk.frames.numpy().astype(self.dtype).transpose(1, 0, 2))
            self._first[chunk.stream_id].append(out.stream_frame)  # stream time: frames dropped count
            self._layers[chunk.stream_id] = tuple(chunk.layers)
        self._xvectors[chunk.stream_id] += [(end + out.frame_offset, v.numpy().astype(self.dtype))
                                            for end, v in chunk.xvectors]

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything collected so far, under the names the file uses."""
        out: dict[str, np.ndarray] = {"frame_rate": np.array(self.frame_rate), "model": np.array(self.model_id)}
        for sid in sorted(set(self._frames) | set(self._xvectors)):
            pieces = self._frames.get(sid, [])
            if pieces:
                out[f"{sid}/embeddings"] = np.concatenate(pieces)
                out[f"{sid}/frame_times"] = np.concatenate(
                    [np.arange(f, f + len(p)) for f, p in zip(self._first[sid], pieces, strict=True)]
                ) / self.frame_rate
                out[f"{sid}/layers"] = np.array(self._layers[sid])
            vectors = self._xvectors.get(sid, [])
            if vectors:
                out[f"{sid}/xvectors"] = np.stack([v for _, v in vectors])
                out[f"{sid}/xvector_times"] = np.array([end for end, _ in vectors]) / self.frame_rate
        return out

    def write(self) -> Path:
        """Write the file (atomically: a reader never sees half of it)."""
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, **self.arrays())
        os.replace(tmp, self.path)
        return self.path
