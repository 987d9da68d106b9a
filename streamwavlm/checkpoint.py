"""Reading, checking and writing WavLM checkpoints in both released formats, safely.

* original (unilm) ``.pt``: a dict ``{"cfg": {...}, "model": state_dict}``;
* Hugging Face directory: ``config.json`` (+ ``preprocessor_config.json``) and ``model.safetensors`` or
  ``pytorch_model.bin`` (possibly sharded), keys optionally prefixed ``wavlm.`` by task models, the
  positional-conv weight norm spelled ``weight_g/weight_v`` or ``parametrizations.weight.original0/1``.

Files are read with ``torch.load(weights_only=True)`` or safetensors only: a pickle that carries any Python
object other than tensors and plain containers is refused, never executed. Every problem surfaces as a
:class:`CheckpointError` that names the file and says what to do.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ConfigError, WavLMConfig
from .model.wavlm import WavLM
from .permissions import as_umask_allows

ORIGINAL = "original"
HF = "hf"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file, what is wrong and what to do."""


@dataclass
class RawCheckpoint:
    """A checkpoint's configuration and its state dict in the keys of its own format."""

    format: str  # ORIGINAL or HF
    config: WavLMConfig
    state: dict[str, Tensor]
    source: str


# --------------------------------------------------------------------------- key tables
# (original key, HF key) templates; {i} is a layer or block index. Verified with strict loads (wavlm.md 2.3).
_ORIGINAL_TO_HF: list[tuple[str, str]] = [
    ("feature_extractor.conv_layers.{i}.0.weight", "feature_extractor.conv_layers.{i}.conv.weight"),
    ("feature_extractor.conv_layers.{i}.0.bias", "feature_extractor.conv_layers.{i}.conv.bias"),
    ("feature_extractor.conv_layers.{i}.2.weight", "feature_extractor.conv_layers.{i}.layer_norm.weight"),
    ("feature_extractor.conv_layers.{i}.2.bias", "feature_extractor.conv_layers.{i}.layer_norm.bias"),
    ("feature_extractor.conv_layers.{i}.2.1.weight", "feature_extractor.conv_layers.{i}.layer_norm.weight"),
    ("feature_extractor.conv_layers.{i}.2.1.bias", "feature_extractor.conv_layers.{i}.layer_norm.bias"),
    ("layer_norm.weight", "feature_projection.layer_norm.weight"),
    ("layer_norm.bias", "feature_projection.layer_norm.bias"),
    ("post_extract_proj.weight", "feature_projection.projection.weight"),
    ("post_extract_proj.bias", "feature_projection.projection.bias"),
    ("mask_emb", "masked_spec_embed"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv_embed.conv.bias"),
    ("encoder.pos_conv.0.weight_g", "encoder.pos_conv_embed.conv.weight_g"),
    ("encoder.pos_conv.0.weight_v", "encoder.pos_conv_embed.conv.weight_v"),
    ("encoder.layer_norm.weight", "encoder.layer_norm.weight"),
    ("encoder.layer_norm.bias", "encoder.layer_norm.bias"),
    ("encoder.layers.0.self_attn.relative_attention_bias.weight",
     "encoder.layers.0.attention.rel_attn_embed.weight"),
    *[
        (f"encoder.layers.{{i}}.self_attn.{p}_proj.{w}", f"encoder.layers.{{i}}.attention.{p}_proj.{w}")
        for p in ("q", "k", "v", "out") for w in ("weight", "bias")
    ],
    ("encoder.layers.{i}.self_attn.grep_linear.weight", "encoder.layers.{i}.attention.gru_rel_pos_linear.weight"),
    ("encoder.layers.{i}.self_attn.grep_linear.bias", "encoder.layers.{i}.attention.gru_rel_pos_linear.bias"),
    ("encoder.layers.{i}.self_attn.grep_a", "encoder.layers.{i}.attention.gru_rel_pos_const"),
    ("encoder.layers.{i}.self_attn_layer_norm.weight", "encoder.layers.{i}.layer_norm.weight"),
    ("encoder.layers.{i}.self_attn_layer_norm.bias", "encoder.layers.{i}.layer_norm.bias"),
    ("encoder.layers.{i}.fc1.weight", "encoder.layers.{i}.feed_forward.intermediate_dense.weight"),
    ("encoder.layers.{i}.fc1.bias", "encoder.layers.{i}.feed_forward.intermediate_dense.bias"),
    ("encoder.layers.{i}.fc2.weight", "encoder.layers.{i}.feed_forward.output_dense.weight"),
    ("encoder.layers.{i}.fc2.bias", "encoder.layers.{i}.feed_forward.output_dense.bias"),
    ("encoder.layers.{i}.final_layer_norm.weight", "encoder.layers.{i}.final_layer_norm.weight"),
    ("encoder.layers.{i}.final_layer_norm.bias", "encoder.layers.{i}.final_layer_norm.bias"),
]

# original key -> our module's key (the pos-conv weight norm and grep_a are handled separately)
_ORIGINAL_TO_OURS: list[tuple[str, str]] = [
    ("feature_extractor.conv_layers.{i}.0.weight", "frontend.convs.{i}.weight"),
    ("feature_extractor.conv_layers.{i}.0.bias", "frontend.convs.{i}.bias"),
    ("feature_extractor.conv_layers.{i}.2.weight", "frontend.norms.{i}.weight"),
    ("feature_extractor.conv_layers.{i}.2.bias", "frontend.norms.{i}.bias"),
    ("feature_extractor.conv_layers.{i}.2.1.weight", "frontend.norms.{i}.weight"),
    ("feature_extractor.conv_layers.{i}.2.1.bias", "frontend.norms.{i}.bias"),
    ("layer_norm.weight", "projection.norm.weight"),
    ("layer_norm.bias", "projection.norm.bias"),
    ("post_extract_proj.weight", "projection.linear.weight"),
    ("post_extract_proj.bias", "projection.linear.bias"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv.conv.bias"),
    ("encoder.layer_norm.weight", "encoder.norm.weight"),
    ("encoder.layer_norm.bias", "encoder.norm.bias"),
    ("encoder.layers.0.self_attn.relative_attention_bias.weight", "encoder.rel_bias.weight"),
    *[
        (f"encoder.layers.{{i}}.self_attn.{p}_proj.{w}", f"encoder.layers.{{i}}.attn.{p}_proj.{w}")
        for p in ("q", "k", "v", "out") for w in ("weight", "bias")
    ],
    ("encoder.layers.{i}.self_attn.grep_linear.weight", "encoder.layers.{i}.attn.gate.weight"),
    ("encoder.layers.{i}.self_attn.grep_linear.bias", "encoder.layers.{i}.attn.gate.bias"),
    ("encoder.layers.{i}.self_attn.grep_a", "encoder.layers.{i}.attn.gate_const"),
    ("encoder.layers.{i}.self_attn_layer_norm.weight", "encoder.layers.{i}.attn_norm.weight"),
    ("encoder.layers.{i}.self_attn_layer_norm.bias", "encoder.layers.{i}.attn_norm.bias"),
    ("encoder.layers.{i}.fc1.weight", "encoder.layers.{i}.ffn.fc1.weight"),
    ("encoder.layers.{i}.fc1.bias", "encoder.layers.{i}.ffn.fc1.bias"),
    ("encoder.layers.{i}.fc2.weight", "encoder.layers.{i}.ffn.fc2.weight"),
    ("encoder.layers.{i}.fc2.bias", "encoder.layers.{i}.ffn.fc2.bias"),
    ("encoder.layers.{i}.final_layer_norm.weight", "encoder.layers.{i}.ffn_norm.weight"),
    ("encoder.layers.{i}.final_layer_norm.bias", "encoder.layers.{i}.ffn_norm.bias"),
]

# HF speaker-head key -> our module's key
_HF_XVECTOR_TO_OURS: list[tuple[str, str]] = [
    ("layer_weights", "xvector.layer_weights"),
    ("projector.weight", "xvector.projector.weight"),
    ("projector.bias", "xvector.projector.bias"),
    ("tdnn.{i}.kernel.weight", "xvector.tdnn.{i}.weight"),
    ("tdnn.{i}.kernel.bias", "xvector.tdnn.{i}.bias"),
    ("feature_extractor.weight", "xvector.embedding.weight"),
    ("feature_extractor.bias", "xvector.embedding.bias"),
    ("classifier.weight", "xvector.classifier.weight"),
    ("classifier.bias", "xvector.classifier.bias"),
]

# keys that exist in released files but play no part at inference
_TRAINING_ONLY = {"mask_emb", "masked_spec_embed", "objective.weight"}
_HF_WN_NEW = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


def _compile(table: list[tuple[str, str]], reverse: bool = False) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        pattern = re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)")
        out.append((re.compile(f"^{pattern}$"), dst))
    return out


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, dst in rules:
        m = pattern.match(key)
        if m:
            return dst.format(**m.groupdict())
    return None


_O2H = _compile(_ORIGINAL_TO_HF)
_H2O = _compile(_ORIGINAL_TO_HF, reverse=True)
_O2OURS = _compile(_ORIGINAL_TO_OURS)
_XV2OURS = _compile(_HF_XVECTOR_TO_OURS)


# --------------------------------------------------------------------------- safe file reading
def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` and clear errors for corrupt or hostile files."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a forbidden object: the pickle stream itself is broken
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint (not a readable torch file). "
                                  "Download it again (`streamwavlm download NAME` verifies it).") from e
        first = next(line for line in str(e).splitlines() if "GLOBAL" in line).strip()
        raise CheckpointError(
            f"{path}: refused to load: the file carries Python objects other than tensors and plain "
            f"containers ({first}). Loading it could run arbitrary code. Use a checkpoint from a trusted "
            "source, or convert it to safetensors where it came from."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise CheckpointError(f"{path}: no such file") from e
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__}). "
            "Download it again (`streamwavlm download NAME` verifies size and checksum)."
        ) from e


def _safetensors_load(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file ({e}). Download it again."
        ) from e


def _weights_files(directory: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: corrupt shard index ({e}); download it again") from e
            return [directory / s for s in shards]
        if (directory / single).exists():
            return [directory / single]
    raise CheckpointError(
        f"{directory}: no weights found (expected model.safetensors or pytorch_model.bin next to config.json)"
    )


def _check_tensors(state: Any, source: str) -> dict[str, Tensor]:
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{source}: the weights are not a state dict of named tensors")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:5]}")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"{source}: NaN or Inf in {nonfinite[:5]}: the file is corrupt; download it again")
    return state


def _local(path: str | Path) -> Path:
    """The local path of a checkpoint given as a path, a registry name (``wavlm-base-plus``) or a Hub
    repository id (``microsoft/wavlm-base-plus``), fetched into the download cache when needed."""
    from .download import resolve
    from .errors import DownloadError

    try:
        return resolve(str(path))
    except DownloadError as e:
        raise CheckpointError(str(e)) from e


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read either format (an HF directory, its ``config.json``, or an original ``.pt`` file), given as a
    path or a model name (see :func:`_local`)."""
    p = _local(path)
    if p.is_file() and p.name == "config.json":
        p = p.parent
    if p.is_dir():
        try:
            config = WavLMConfig.from_hf_dir(p)
        except ConfigError as e:
            raise CheckpointError(f"{p}: {e}") from e
        state: dict[str, Tensor] = {}
        for f in _weights_files(p):
            loaded = _safetensors_load(f) if f.suffix == ".safetensors" else _torch_load(f)
            state.update(_check_tensors(loaded, str(f)))
        return RawCheckpoint(HF, config, state, str(p))
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory, nor a model name (`streamwavlm download --list`) "
                              "or Hub repository id OWNER/NAME")
    if p.suffix == ".safetensors":
        raise CheckpointError(f"{p}: a bare safetensors file has no config; pass the directory with config.json")
    obj = _torch_load(p)
    if not isinstance(obj, dict) or "cfg" not in obj or "model" not in obj:
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{p}: not an original WavLM checkpoint (expected a dict with 'cfg' and 'model', found {keys}). "
            "For a Hugging Face model pass its directory (with config.json)."
        )
    cfg = obj["cfg"]
    if isinstance(cfg, dict) and "model" in cfg and isinstance(cfg["model"], dict):
        cfg = cfg["model"]  # fairseq-style nested cfg
    try:
        config = WavLMConfig.from_original(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{p}: {e}") from e
    return RawCheckpoint(ORIGINAL, config, _check_tensors(obj["model"], str(p)), str(p))


# --------------------------------------------------------------------------- format conversion
def hf_to_original_keys(
    state: dict[str, Tensor], config: WavLMConfig, source: str = "checkpoint"
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split an HF state dict into the backbone in original keys and the speaker head (HF keys)."""
    layer_norm = config.extractor_mode == "layer_norm"
    backbone: dict[str, Tensor] = {}
    head: dict[str, Tensor] = {}
    prefixed = any(k.startswith("wavlm.") for k in state)
    unknown = []
    for key, value in state.items():
        if prefixed and not key.startswith("wavlm."):
            head[key] = value
            continue
        k = key.removeprefix("wavlm.")
        for old, new in _HF_WN_NEW.items():
            k = k.replace(f"conv.{new}", f"conv.{old}")
        orig = _rename(k, _H2O)
        if orig is not None and layer_norm:  # HF spells GroupNorm and LayerNorm alike; unilm does not
            orig = re.sub(r"^(feature_extractor\.conv_layers\.\d+)\.2\.", r"\1.2.1.", orig)
        if orig is None:
            unknown.append(key)
        else:
            backbone[orig] = value
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: "
                              "not a WavLM checkpoint, or one with a head this engine does not know")
    return backbone, head


def original_to_hf_keys(state: dict[str, Tensor], weight_norm: str = "legacy") -> dict[str, Tensor]:
    """Original keys to ``WavLMModel`` keys; ``weight_norm`` spells the pos-conv norm ``legacy``
    (``weight_g/weight_v``, as in the hub files) or ``parametrizations`` (``original0/1``)."""
    if weight_norm not in ("legacy", "parametrizations"):
        raise ValueError("weight_norm must be 'legacy' or 'parametrizations'")
    out = {}
    for key, value in state.items():
        k = _rename(key, _O2H)
        if k is None:
            raise CheckpointError(f"unexpected key {key!r} in an original checkpoint")
        if weight_norm == "parametrizations":
            for old, new in _HF_WN_NEW.items():
                k = k.replace(f"conv.{old}", f"conv.{new}")
        out[k] = value
    return out


def to_model_state(raw: RawCheckpoint) -> dict[str, Tensor]:
    """The checkpoint's tensors under our module names, with the weight norm folded."""
    if raw.format == HF:
        backbone, head = hf_to_original_keys(raw.state, raw.config, raw.source)
    else:
        backbone, head = raw.state, {}
    out: dict[str, Tensor] = {}
    unknown = []
    g = v = None
    for key, value in backbone.items():
        if key in _TRAINING_ONLY:
            continue
        if key == "encoder.pos_conv.0.weight_g":
            g = value
        elif key == "encoder.pos_conv.0.weight_v":
            v = value
        elif key.endswith("self_attn.grep_a"):
            out[_rename(key, _O2OURS)] = value.reshape(-1)  # type: ignore[index]
        else:
            ours = _rename(key, _O2OURS)
            if ours is None:
                unknown.append(key)
            else:
                out[ours] = value
    if (g is None) != (v is None):
        raise CheckpointError(f"{raw.source}: the positional conv has only one of weight_g/weight_v")
    if g is not None and v is not None:
        out["encoder.pos_conv.conv.weight"] = fold_weight_norm(g, v)
    for key, value in head.items():
        if key in _TRAINING_ONLY:
            continue
        ours = _rename(key, _XV2OURS)
        if ours is None:
            unknown.append(key)
            continue
        if re.match(r"xvector\.tdnn\.\d+\.weight$", ours):
            i = int(ours.split(".")[2])
            k = raw.config.xvector.tdnn_kernel[i] if raw.config.xvector else 1
            value = value.view(value.shape[0], k, -1).transpose(1, 2).contiguous()
        out[ours] = value
    if unknown:
        raise CheckpointError(f"{raw.source}: unexpected keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return out


def fold_weight_norm(g: Tensor, v: Tensor) -> Tensor:
    """``W[:, :, k] = g[k] * V[:, :, k] / ||V[:, :, k]||`` (weight norm over dims 0 and 1, i.e. dim=2)."""
    return g * v / v.norm(dim=(0, 1), keepdim=True)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None) -> WavLM:
    """Build a :class:`WavLM` from a checkpoint in either format and load its weights strictly.

    ``dtype``: the CPU compute precision (``float32``, ``bfloat16``, ``int8`` or ``auto``; see
    :func:`streamwavlm.precision.set_precision`); ``None`` leaves the model in fp32.
    """
    raw = read_checkpoint(path)
    state = to_model_state(raw)
    model = WavLM(raw.config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{raw.source}: does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            "The file is incomplete or its config describes another architecture."
        )
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(t.shape)}"
             for k, t in expected.items() if state[k].shape != t.shape]
    if wrong:
        raise CheckpointError(f"{raw.source}: wrong shapes: {wrong[:3]}; the config and weights disagree")
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        from .precision import PrecisionError, set_precision

        if torch.device(device).type != "cpu":
            raise PrecisionError(f"dtype={dtype!r} selects a CPU precision path; on {device} leave it out and "
                                 "convert the model instead (model.half(), model.bfloat16())")
        set_precision(model, dtype)
    return model.to(device)


# --------------------------------------------------------------------------- writing
def save_original(config: WavLMConfig, state: dict[str, Tensor], path: str | Path) -> Path:
    """Write an original-format ``.pt`` (``cfg`` of plain types, so it loads with weights_only)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": config.to_original(), "model": state}, p)
    return p


def save_hf(config: WavLMConfig, state: dict[str, Tensor], directory: str | Path,
            safetensors: bool = True) -> Path:
    """Write an HF directory: config.json, preprocessor_config.json and the weights."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg_json, pre_json = config.to_hf()
    (d / "config.json").write_text(json.dumps(cfg_json, indent=2))
    (d / "preprocessor_config.json").write_text(json.dumps(pre_json, indent=2))
    state = {k: v.contiguous() for k, v in state.items()}
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(d / "model.safetensors"))
        as_umask_allows(d / "model.safetensors")
    else:
        torch.save(state, d / "pytorch_model.bin")
    return d


def convert(src: str | Path, dst: str | Path, to: str, *, weight_norm: str = "legacy",
            safetensors: bool = True, backbone_only: bool = False) -> Path:
    """Convert a checkpoint to ``to`` (``original`` or ``hf``); tensors are copied, never recomputed."""
    raw = read_checkpoint(src)
    if to == ORIGINAL:
        if raw.format == ORIGINAL:
            return save_original(raw.config, raw.state, dst)
        backbone, head = hf_to_original_keys(raw.state, raw.config, raw.source)
        if head and not backbone_only:
            raise CheckpointError(f"{raw.source}: has a speaker head, which the original format cannot hold; "
                                  "pass --backbone-only to write the encoder alone")
        return save_original(raw.config.replace(xvector=None), backbone, dst)
    if to == HF:
        if raw.format == HF:
            backbone, head = hf_to_original_keys(raw.state, raw.config, raw.source)
            state = original_to_hf_keys(backbone, weight_norm)
            if head:
                state = {**{f"wavlm.{k}": v for k, v in state.items()}, **head}
        else:
            state = original_to_hf_keys(raw.state, weight_norm)
        return save_hf(raw.config, state, dst, safetensors=safetensors)
    raise ValueError(f"unknown format {to!r}; use 'original' or 'hf'")


CHECKPOINT_ENV = "STREAMWAVLM_CHECKPOINT"


def model_from_setting(path: str | Path | None, seed: int = 0, dtype: str | None = None) -> tuple[WavLM, str]:
    """The model a command should use: ``path``, else ``$STREAMWAVLM_CHECKPOINT``, else a randomly
    initialised Base+-shaped model (seeded, so runs repeat). Returns the model and a description.

    ``dtype`` as in :func:`load_model`, except that a precision this CPU would emulate is refused
    (:class:`~streamwavlm.precision.PrecisionError`) instead of warned about: a command line gets an error.
    """
    import os

    from .precision import resolve, set_precision

    choice = None if dtype is None else resolve(dtype, allow_emulated=False)  # refuse before loading
    chosen = path or os.environ.get(CHECKPOINT_ENV)
    if chosen:
        model, description = load_model(chosen), f"checkpoint {chosen}"
    else:
        torch.manual_seed(seed)
        model, description = WavLM(WavLMConfig()), (
            "RANDOM WEIGHTS: no checkpoint configured, using a randomly initialised Base+-shaped model "
            f"(the embeddings mean nothing). Pass --checkpoint PATH or set {CHECKPOINT_ENV}.")
    if choice is not None:
        set_precision(model, choice)
    return model, description
