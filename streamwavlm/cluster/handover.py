"""The hand-over message: one stream's complete state, sent from the worker that releases the stream to
the worker that continues it (docs/scaling.md, "Hand-over format").

Layout, version 1: ``SWHO`` (4 bytes), the version (uint8), three zero bytes, the JSON header's length
(uint32 little-endian), the JSON header (UTF-8), then a safetensors blob with every tensor. The header holds
the scalars and the structure; each tensor in it is ``{"tensor": NAME}``, a key of the blob. Nothing is
pickled: the JSON and safetensors readers build only numbers, strings, lists and tensors, and the dataclasses
of the stream state are rebuilt by name from the two modules that define them. The state is written field by
field from the dataclasses themselves, so a field or a dtype the pool adds travels without a change here
(both workers must run the same streamwavlm: a state layout the receiver does not know is refused).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..audio.queue import Ledger
from ..model import moments
from ..streaming import StreamSettings, StreamState, state

MAGIC = b"SWHO"
VERSION = 1
FORMAT = "streamwavlm-handover"
PREFIX = struct.Struct("<4sB3xI")
MAX_SIZE = 256 * 1024 * 1024  # MQTT's own limit on one message
STATE_MODULES = (state, moments)  # where the dataclasses of a stream state are defined


class HandoverError(ValueError):
    """A hand-over payload that is not one, of an unknown version, damaged, or for another setup."""


@dataclass
class Handover:
    """Everything a worker needs to continue a stream exactly where another left it."""

    stream_id: str
    sender: str  # the worker that released the stream
    recipient: str  # the worker that continues it
    model: str  # the sender's model fingerprint: the recipient must run the same weights
    settings: StreamSettings
    state: StreamState | None  # None: the stream had failed (nothing to continue)
    ledger: Ledger  # the sample ledger of the stream's queue, emptied
    backlog: np.ndarray  # float32 16 kHz samples queued but not stepped, from ``ledger.next_start``
    rate: int  # the input's sample rate and form (WAV chunks or raw), which the stream keeps
    wav: bool
    epoch: int  # the stream's sequence epoch and the next seq per kind
    seqs: dict[str, int] = field(default_factory=dict)

    @property
    def resume_at(self) -> int:
        """The 16 kHz stream index of the first sample the recipient takes from the audio topic."""
        return self.ledger.next_start + len(self.backlog)


def encode_handover(h: Handover) -> bytes:
    tensors: dict[str, torch.Tensor] = {"backlog": torch.from_numpy(np.ascontiguousarray(h.backlog, np.float32))}
    header = {
        "format": FORMAT, "version": VERSION, "stream_id": h.stream_id, "sender": h.sender,
        "recipient": h.recipient, "model": h.model, "settings": settings_tree(h.settings),
        "state": None if h.state is None else _tree(h.state.progress, "progress", tensors) | {
            "@tensors": _tree(h.state.tensors, "tensors", tensors)},
        "ledger": dataclasses.asdict(h.ledger), "audio": {"rate": h.rate, "wav": h.wav},
        "epoch": h.epoch, "seqs": h.seqs,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return PREFIX.pack(MAGIC, VERSION, len(head)) + head + save_tensors(tensors)


def decode_handover(payload: bytes, settings: StreamSettings, model: str, *, max_size: int = MAX_SIZE
                    ) -> Handover:
    """Parse a hand-over payload for a worker that runs ``model`` with ``settings``; HandoverError names what
    is wrong (a damaged payload, another version, or a stream computed with another model or settings)."""
    if len(payload) > max_size:
        raise HandoverError(f"hand-over of {len(payload)} bytes exceeds the limit of {max_size} bytes")
    if len(payload) < PREFIX.size or payload[:4] != MAGIC:
        raise HandoverError(f"not a streamwavlm hand-over: expected {MAGIC!r}, got {payload[:4]!r}")
    _, version, head_len = PREFIX.unpack_from(payload)
    if version != VERSION:
        raise HandoverError(f"hand-over version {version}; this worker reads version {VERSION}: run the same "
                            "streamwavlm on every worker of a group (or drain the old ones first)")
    end = PREFIX.size + head_len
    try:
        header = json.loads(payload[PREFIX.size:end])
        tensors = load_tensors(bytes(payload[end:]))
    except Exception as e:  # the readers raise many kinds; each means a damaged payload
        raise HandoverError(f"damaged hand-over: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise HandoverError("damaged hand-over: the header is not a streamwavlm-handover object")
    try:
        backlog = tensors["backlog"]
        if backlog.dtype != torch.float32 or backlog.dim() != 1:
            raise HandoverError(f"damaged hand-over: backlog of {backlog.dtype} {tuple(backlog.shape)}")
        _check_setup(header, settings, model)
        tree = header["state"]
        progress = None if tree is None else _build(
            {k: v for k, v in tree.items() if k != "@tensors"}, tensors)
        stream_tensors = None if tree is None else _build(tree["@tensors"], tensors)
        return Handover(
            stream_id=str(header["stream_id"]), sender=str(header["sender"]), recipient=str(header["recipient"]),
            model=model, settings=settings,
            state=None if tree is None else StreamState(settings, progress, stream_tensors),  # type: ignore[arg-type]
            ledger=Ledger(**{k: int(v) for k, v in header["ledger"].items()}), backlog=backlog.numpy(),
            rate=int(header["audio"]["rate"]), wav=bool(header["audio"]["wav"]), epoch=int(header["epoch"]),
            seqs={str(k): int(v) for k, v in header["seqs"].items()})
    except HandoverError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise HandoverError(f"damaged hand-over, or a state layout this worker does not know ({e!r}): run the "
                            "same streamwavlm on every worker of a group") from None


def _check_setup(header: dict[str, Any], settings: StreamSettings, model: str) -> None:
    """The stream must continue on the same weights with the same settings, or its state means nothing."""
    if header["model"] != model:
        raise HandoverError(f"stream {header['stream_id']!r} was computed with model {header['model']!r}, this "
                            f"worker runs {model!r}: every worker of a group must load the same checkpoint")
    if header["settings"] != settings_tree(settings):
        raise HandoverError(f"stream {header['stream_id']!r} was computed with other streaming settings "
                            f"({header['settings']}); every worker of a group needs the same")


def settings_tree(settings: StreamSettings) -> dict[str, Any]:
    """The settings as JSON values (enums by value, tuples as lists), as the header carries them."""
    return json.loads(json.dumps(dataclasses.asdict(settings),
                                 default=lambda v: v.value if isinstance(v, enum.Enum) else str(v)))


def _tree(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON values for a state object: dataclasses as ``{"@": class name, field: ...}``, tensors as
    references into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"tensor": path}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"@": type(obj).__name__} | {f.name: _tree(getattr(obj, f.name), f"{path}.{f.name}", tensors)
                                            for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, list | tuple):
        return [_tree(x, f"{path}.{i}", tensors) for i, x in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"{path}: a {type(obj).__name__} in a stream state has no hand-over form")


def _build(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_build(x, tensors) for x in tree]
    if not isinstance(tree, dict):
        return tree
    if "tensor" in tree:
        return tensors[tree["tensor"]]
    cls = _state_class(tree["@"])
    return cls(**{k: _build(v, tensors) for k, v in tree.items() if k != "@"})


def _state_class(name: str) -> type:
    """A dataclass of the stream state by its name: only those the state modules define."""
    for module in STATE_MODULES:
        cls = getattr(module, name, None)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__:
            return cls
    raise HandoverError(f"damaged hand-over: {name!r} is not a stream-state class of this streamwavlm")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights (names, dtypes, values): the same on every worker that loaded the same
    checkpoint the same way, so a hand-over between workers with different models is refused."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
