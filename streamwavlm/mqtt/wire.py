"""The wire format (docs/mqtt.md is the contract; this is one implementation of it).

Binary, version 1: a 56-byte fixed header, a variable header (shape, layer ids, three length-prefixed
UTF-8 strings), then the raw little-endian array. Everything a consumer needs is in the payload itself,
because MQTT 3.1.1 has no properties and v5 brokers or bridges may drop them.

Policy choices, each written in the doc:
- NaN and Inf are refused on both sides: an embedding with a NaN is an upstream bug, and a subscriber
  must never hand one to a clusterer or a database. The encoder refuses to send, the decoder to accept.
- A payload larger than ``max_size`` (16 MiB by default) is refused before anything is parsed, so a
  corrupt or hostile length cannot make the decoder allocate.
- The header carries its own length; a decoder finds the array at ``header_len`` and skips header bytes it
  does not know. Fields may be appended to the header without a version change; the version changes only
  when a v1 decoder would misread the payload.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from .message import EMBEDDINGS, XVECTOR, EmbeddingMessage, Status
from .topics import check_level

MAGIC = b"SWLM"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
CONTENT_TYPE = "application/x-streamwavlm"
JSON_CONTENT_TYPE = "application/json"
DEFAULT_MAX_SIZE = 16 * 1024 * 1024
MAX_NDIM = 8

# magic, version, dtype code, ndim, n_layers, header_len, data_len, seq, epoch, first_frame, frame_rate,
# timestamp
FIXED = struct.Struct("<4sBBBBIIQQqdd")
assert FIXED.size == 56

DTYPE_CODES = {1: np.dtype("<f4"), 2: np.dtype("<f2")}
DTYPE_NAMES = {1: "float32", 2: "float16"}
_CODE_OF = {np.dtype(np.float32): 1, np.dtype(np.float16): 2}

STATUS_FORMAT = "streamwavlm-status"
JSON_FORMAT = "streamwavlm"
STATES = ("online", "offline")


class WireError(ValueError):
    """A payload (or a message to encode) that violates the wire format; the text says what and why."""


# ----------------------------------------------------------------------------------------------- binary
def encode(msg: EmbeddingMessage, *, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """The binary payload of ``msg``; raises WireError for anything a conforming decoder would refuse."""
    data = _check_message(msg)
    code = _CODE_OF[data.dtype.newbyteorder("=")]
    strings = b"".join(_pack_str(s, what) for s, what in
                       ((msg.stream_id, "stream_id"), (msg.kind, "kind"), (msg.model_id, "model_id")))
    variable = struct.pack(f"<{data.ndim}I{len(msg.layers)}h", *data.shape, *msg.layers) + strings
    header_len = FIXED.size + len(variable)
    body = np.ascontiguousarray(data, dtype=DTYPE_CODES[code]).tobytes()
    total = header_len + len(body)
    if total > max_size:
        raise WireError(f"message of {total} bytes exceeds the limit of {max_size} bytes (max_size); "
                        "send fewer frames or layers per message, or float16, or raise it on both ends")
    fixed = FIXED.pack(MAGIC, VERSION, code, data.ndim, len(msg.layers), header_len, len(body),
                       msg.seq, msg.epoch, msg.first_frame, float(msg.frame_rate), float(msg.timestamp))
    return fixed + variable + body


def decode(payload: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_SIZE) -> EmbeddingMessage:
    """Parse a binary payload; raises WireError naming the first violation found."""
    buf = bytes(payload)
    n = len(buf)
    if n > max_size:
        raise WireError(f"payload of {n} bytes exceeds the limit of {max_size} bytes (max_size); "
                        "raise max_size if the publisher really sends messages this large")
    if buf[:4] != MAGIC[:n]:
        hint = " (it starts with '{': the JSON form, use decode_json)" if buf[:1] == b"{" else ""
        raise WireError(f"not a streamwavlm payload: expected magic {MAGIC!r}, got {buf[:4]!r}{hint}")
    if n < 5:
        raise WireError(f"truncated header: {n} bytes, the fixed header needs {FIXED.size}")
    if buf[4] not in SUPPORTED_VERSIONS:
        raise WireError(f"unsupported wire version {buf[4]}; this decoder supports version(s) "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade streamwavlm on the subscriber")
    if n < FIXED.size:
        raise WireError(f"truncated header: {n} bytes, the fixed header needs {FIXED.size}")
    (_, _, code, ndim, n_layers, header_len, data_len, seq, epoch, first_frame, frame_rate,
     timestamp) = FIXED.unpack_from(buf)
    if code not in DTYPE_CODES:
        raise WireError(f"unknown dtype code {code} (known: 1 = float32, 2 = float16)")
    if not 1 <= ndim <= MAX_NDIM:
        raise WireError(f"ndim {ndim} out of range 1..{MAX_NDIM}")
    if header_len > n:
        raise WireError(f"truncated header: header_len says {header_len} bytes, the payload has {n}")
    off = FIXED.size
    try:
        shape_layers = struct.unpack_from(f"<{ndim}I{n_layers}h", buf, off)
        off += 4 * ndim + 2 * n_layers
        stream_id, off = _unpack_str(buf, off, header_len, "stream_id")
        kind, off = _unpack_str(buf, off, header_len, "kind")
        model_id, off = _unpack_str(buf, off, header_len, "model_id")
    except struct.error:
        raise WireError(f"truncated header: the shape and layer ids need {off + 4 * ndim + 2 * n_layers} "
                        f"bytes, header_len is {header_len}") from None
    if off > header_len:
        raise WireError(f"truncated header: its fields need {off} bytes, header_len is {header_len}")
    shape = tuple(shape_layers[:ndim])
    dtype = DTYPE_CODES[code]
    expected = math.prod(shape) * dtype.itemsize
    if data_len != expected:
        raise WireError(f"shape/size mismatch: shape {shape} of {DTYPE_NAMES[code]} needs {expected} bytes, "
                        f"data_len says {data_len}")
    if n != header_len + data_len:
        what = "truncated body" if n < header_len + data_len else "trailing bytes after the body"
        raise WireError(f"{what}: expected {header_len + data_len} bytes in all "
                        f"({header_len} header + {data_len} data), got {n}")
    data = np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=header_len).reshape(shape)
    msg = EmbeddingMessage(stream_id=stream_id, kind=kind, seq=seq, first_frame=first_frame,
                           frame_rate=frame_rate, timestamp=timestamp, model_id=model_id,
                           layers=tuple(shape_layers[ndim:]), data=data.astype(dtype.newbyteorder("=")),
                           epoch=epoch)
    _check_names_and_times(msg)
    _check_layout(msg, msg.data)
    _check_finite(msg.data, "received data")
    return msg


def _pack_str(value: str, what: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise WireError(f"{what} is {len(raw)} bytes of UTF-8; at most 65535 fit")
    return struct.pack("<H", len(raw)) + raw


def _unpack_str(buf: bytes, off: int, end: int, what: str) -> tuple[str, int]:
    (length,) = struct.unpack_from("<H", buf, off)
    off += 2
    if off + length > end:
        raise WireError(f"truncated header: {what} needs {length} bytes at offset {off}, header_len is {end}")
    try:
        return buf[off:off + length].decode("utf-8"), off + length
    except UnicodeDecodeError as e:
        raise WireError(f"{what} is not valid UTF-8: {e}") from None


# ----------------------------------------------------------------------------------------------- checks
def _check_message(msg: EmbeddingMessage) -> np.ndarray:
    """Everything the encoder refuses, checked before any byte is written; returns the array."""
    data = np.asarray(msg.data)
    if data.dtype.kind != "f" or data.dtype.newbyteorder("=") not in _CODE_OF:
        raise WireError(f"data dtype {data.dtype} is not supported: convert with .astype(np.float32) or "
                        ".astype(np.float16)")
    if not 1 <= data.ndim <= MAX_NDIM:
        raise WireError(f"data must have 1..{MAX_NDIM} dimensions, got shape {data.shape}")
    _check_names_and_times(msg)
    for name in ("seq", "epoch"):
        value = getattr(msg, name)
        if not 0 <= value < 2**64:
            raise WireError(f"{name} {value} out of range 0..2**64-1")
    if not -(2**63) <= msg.first_frame < 2**63:
        raise WireError(f"first_frame {msg.first_frame} out of the int64 range")
    if len(msg.layers) > 255 or any(not -(2**15) <= int(x) < 2**15 for x in msg.layers):
        raise WireError(f"layers {msg.layers}: at most 255 ids, each in the int16 range")
    _check_layout(msg, data)
    _check_finite(data, "data")
    return data


def _check_names_and_times(msg: EmbeddingMessage) -> None:
    """The header fields the binary layout cannot rule out by itself: checked by the encoder and the decoder
    alike, so that a subscriber never yields what no publisher could send (an empty or NUL stream id, a NaN
    frame rate: found by tests/test_fuzz.py)."""
    try:
        check_level(msg.stream_id, "stream_id")
        check_level(msg.kind, "kind")
    except ValueError as e:
        raise WireError(str(e)) from None
    if not (math.isfinite(msg.frame_rate) and math.isfinite(msg.timestamp)):
        raise WireError(f"frame_rate {msg.frame_rate} and timestamp {msg.timestamp} must be finite")


def _check_layout(msg: EmbeddingMessage, data: np.ndarray) -> None:
    """The per-kind layout: embeddings (layers, frames, dim) with one layer id per row; xvector (dim,).
    Layer ids of a 1-D array say which layers it was pooled from, so their number is free."""
    shape = data.shape
    if msg.kind == EMBEDDINGS and len(shape) != 3:
        raise WireError(f"kind 'embeddings' needs data of shape (layers, frames, dim), got {shape}")
    if msg.kind == XVECTOR and len(shape) != 1:
        raise WireError(f"kind 'xvector' needs data of shape (dim,), got {shape}")
    if msg.layers and len(shape) >= 2 and len(msg.layers) != shape[0]:
        raise WireError(f"{len(msg.layers)} layer ids {tuple(msg.layers)} for a layer axis of "
                        f"{shape[0]} rows (shape {shape})")
    if msg.kind == EMBEDDINGS and not msg.layers:
        raise WireError("kind 'embeddings' needs one layer id per row of the layer axis; layers is empty")


def _check_finite(data: np.ndarray, what: str) -> None:
    if not np.isfinite(data).all():
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise WireError(f"{what} contains {bad} non-finite values (NaN/Inf); the format refuses them: "
                        "fix the producer (or, for float16, values beyond +-65504 overflow: send float32)")


# ------------------------------------------------------------------------------------------------- JSON
def encode_json(msg: EmbeddingMessage) -> str:
    """The JSON form: the header fields by name and ``data`` as nested lists.

    Lists, not base64, because this form is for people and tools like jq; it is still lossless, since every
    float32/float16 value prints as the shortest float64 repr that reads back to the same value.
    """
    data = _check_message(msg)
    return json.dumps({
        "format": JSON_FORMAT, "version": VERSION, "stream_id": msg.stream_id, "kind": msg.kind,
        "seq": msg.seq, "epoch": msg.epoch, "first_frame": msg.first_frame, "frame_rate": msg.frame_rate,
        "timestamp": msg.timestamp, "model_id": msg.model_id, "layers": [int(x) for x in msg.layers],
        "dtype": DTYPE_NAMES[_CODE_OF[data.dtype.newbyteorder("=")]], "shape": list(data.shape),
        "data": data.tolist(),
    }, allow_nan=False)


def decode_json(payload: str | bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> EmbeddingMessage:
    """Parse the JSON form; raises WireError like ``decode``."""
    if len(payload) > max_size:
        raise WireError(f"payload of {len(payload)} bytes exceeds the limit of {max_size} bytes (max_size)")
    obj = _load_json(payload, JSON_FORMAT)
    try:
        dtype = {"float32": np.float32, "float16": np.float16}[obj["dtype"]]
        with np.errstate(over="ignore"):  # beyond float16's range becomes inf: refused below, with the reason
            data = np.array(obj["data"], dtype=dtype)
        shape = tuple(int(x) for x in obj["shape"])
        msg = EmbeddingMessage(
            stream_id=str(obj["stream_id"]), kind=str(obj["kind"]), seq=int(obj["seq"]),
            first_frame=int(obj["first_frame"]), frame_rate=float(obj["frame_rate"]),
            timestamp=float(obj["timestamp"]), model_id=str(obj["model_id"]),
            layers=tuple(int(x) for x in obj["layers"]), data=data, epoch=int(obj.get("epoch", 0)))
    except KeyError as e:
        raise WireError(f"JSON message lacks field {e.args[0]!r} (or has an unknown dtype)") from None
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(Infinity) (found by test_fuzz.py)
        raise WireError(f"JSON message has a field of the wrong type: {e}") from None
    if data.shape != shape:
        raise WireError(f"shape/size mismatch: shape says {shape}, data has {data.shape}")
    _check_message(msg)
    return msg


def decode_any(payload: bytes | bytearray, *, max_size: int = DEFAULT_MAX_SIZE) -> EmbeddingMessage:
    """Either form: a payload starting with '{' is JSON, anything else must be binary."""
    if bytes(payload[:1]) == b"{":
        return decode_json(bytes(payload), max_size=max_size)
    return decode(payload, max_size=max_size)


def _load_json(payload: str | bytes, fmt: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError(f"not valid JSON ({e}); expected the {fmt} JSON form") from None
    except RecursionError:  # nesting beyond the decoder's recursion limit (found by tests/test_fuzz.py)
        raise WireError(f"JSON nested too deeply; expected the {fmt} JSON form") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise WireError(f"not a {fmt} JSON payload: format is {got!r}")
    if obj.get("version") not in SUPPORTED_VERSIONS:
        raise WireError(f"unsupported version {obj.get('version')!r} of the {fmt} JSON form; this decoder "
                        f"supports version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}")
    return obj


# ----------------------------------------------------------------------------------------------- status
def encode_status(status: Status) -> bytes:
    """The JSON status payload (UTF-8): retained on ``.../status``, and the engine's last will."""
    if status.state not in STATES:
        raise WireError(f"status state {status.state!r} must be one of {STATES}")
    return json.dumps({
        "format": STATUS_FORMAT, "version": VERSION, "stream_id": status.stream_id, "state": status.state,
        "timestamp": status.timestamp, "engine_id": status.engine_id,
        "counters": {k: int(v) for k, v in status.counters.items()}, "info": status.info,
    }, allow_nan=False, default=str).encode()


def decode_status(payload: str | bytes) -> Status:
    obj = _load_json(payload, STATUS_FORMAT)
    try:
        status = Status(stream_id=str(obj["stream_id"]), state=str(obj["state"]),
                        timestamp=float(obj["timestamp"]), engine_id=str(obj["engine_id"]),
                        counters={str(k): int(v) for k, v in obj.get("counters", {}).items()},
                        info=dict(obj.get("info", {})))
    except KeyError as e:
        raise WireError(f"status lacks field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as e:
        raise WireError(f"status has a field of the wrong type: {e}") from None
    if status.state not in STATES:
        raise WireError(f"status state {status.state!r} is not one of {STATES}")
    return status
