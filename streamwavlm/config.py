"""One configuration for every WavLM variant, built from either checkpoint format.

The original (unilm) checkpoints carry a ``cfg`` dict whose defaults are *not* WavLM's (relative position
embedding and the gate are off, ``max_distance`` is 1280), and Hugging Face directories carry a
``config.json`` with other key names and their own defaults. Both are translated here into one explicit
:class:`WavLMConfig`; anything the engine cannot run is refused with :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .quoting import shown

ConvSpec = tuple[int, int, int]  # (out channels, kernel, stride)
MAX_SIZE = 1 << 20  # bound on every count and size in a config: far above any WavLM, far below a memory bomb
MAX_CONV_LAYERS = 64

DEFAULT_CONV_LAYERS: tuple[ConvSpec, ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


class ConfigError(ValueError):
    """A checkpoint configuration the engine cannot run; the message names the key and the fix."""


@dataclass(frozen=True)
class XVectorConfig:
    """The speaker-verification head of transformers' ``WavLMForXVector``."""

    use_weighted_layer_sum: bool = True
    projector_dim: int = 512  # HF: tdnn_dim[0]
    tdnn_dim: tuple[int, ...] = (512, 512, 512, 512, 1500)
    tdnn_kernel: tuple[int, ...] = (5, 3, 3, 1, 1)
    tdnn_dilation: tuple[int, ...] = (1, 2, 3, 1, 1)
    output_dim: int = 512
    num_labels: int = 2  # size of the (training-only) classifier kept for a faithful round trip

    def __post_init__(self) -> None:
        if not len(self.tdnn_dim) == len(self.tdnn_kernel) == len(self.tdnn_dilation) > 0:
            raise ConfigError("unsupported config: tdnn_dim, tdnn_kernel and tdnn_dilation must be non-empty and "
                              "of one length")

    @property
    def receptive_field(self) -> int:
        """Frames of projector output that one TDNN output frame depends on (15 for the released head)."""
        return 1 + sum((k - 1) * d for k, d in zip(self.tdnn_kernel, self.tdnn_dilation, strict=True))


@dataclass(frozen=True)
class WavLMConfig:
    """Architecture of a WavLM encoder, independent of the checkpoint format it came from."""

    extractor_mode: str = "default"  # "default": GroupNorm in conv block 0; "layer_norm": LN in every block
    conv_layers: tuple[ConvSpec, ...] = DEFAULT_CONV_LAYERS
    conv_bias: bool = False
    embed_dim: int = 768
    ffn_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_first: bool = False  # pre-LN (Large) vs post-LN (Base, Base+)
    conv_pos: int = 128
    conv_pos_groups: int = 16
    num_buckets: int = 320
    max_distance: int = 800
    layer_norm_eps: float = 1e-5
    normalize: bool = False  # waveform layer norm expected by the checkpoint (Large)
    normalize_eps: float = 1e-5  # 1e-5 as unilm/s3prl apply it; HF's feature extractor uses 1e-7
    xvector: XVectorConfig | None = None
    extras: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ derived geometry
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def conv_dim(self) -> int:
        return self.conv_layers[-1][0]

    @property
    def hop(self) -> int:
        """Samples between frames (320 for every released model: 50 frames/s at 16 kHz)."""
        h = 1
        for _, _, s in self.conv_layers:
            h *= s
        return h

    @property
    def receptive_field(self) -> int:
        """Samples one frame depends on (400 for the released models)."""
        rf, jump = 1, 1
        for _, k, s in self.conv_layers:
            rf += (k - 1) * jump
            jump *= s
        return rf

    def num_frames(self, num_samples: int) -> int:
        """Frames the CNN makes from ``num_samples`` samples (valid convolutions, no padding)."""
        return 0 if num_samples < self.receptive_field else (num_samples - self.receptive_field) // self.hop + 1

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"unsupported config: {key}: {why}")

        need(self.extractor_mode in ("default", "layer_norm"), "extractor_mode",
             f"{shown(self.extractor_mode)} is not 'default' (group norm) or 'layer_norm'")
        need(len(self.conv_layers) > 0, "conv_feature_layers", "the CNN needs at least one layer")
        need(all(len(c) == 3 and min(c) > 0 for c in self.conv_layers), "conv_feature_layers",
             "every layer must be a positive (dim, kernel, stride) triple")
        need(len(self.conv_layers) <= MAX_CONV_LAYERS, "conv_feature_layers",
             f"{len(self.conv_layers)} layers; at most {MAX_CONV_LAYERS} are accepted")
        need(self.embed_dim > 0 and self.num_heads > 0 and self.embed_dim % self.num_heads == 0,
             "encoder_attention_heads", f"embed dim {self.embed_dim} is not divisible by {self.num_heads} heads")
        need(self.conv_pos_groups > 0 and self.embed_dim % self.conv_pos_groups == 0, "conv_pos_groups",
             f"embed dim {self.embed_dim} is not divisible by {self.conv_pos_groups} groups")
        need(self.conv_pos > 0, "conv_pos", "the positional convolution needs a kernel")
        need(self.num_buckets >= 4 and self.num_buckets % 2 == 0, "num_buckets",
             "bidirectional buckets need an even count of at least 4")
        need(self.max_distance > self.num_buckets // 4, "max_distance",
             f"must exceed num_buckets/4 = {self.num_buckets // 4} (the exact-distance range)")
        need(self.num_layers > 0, "encoder_layers", "the encoder needs at least one layer")

    # ------------------------------------------------------------------ original (unilm) cfg
    @classmethod
    def from_original(cls, cfg: dict[str, Any]) -> WavLMConfig:
        """Build from the ``cfg`` dict of an original ``.pt`` checkpoint (unilm ``WavLMConfig`` keys)."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"checkpoint 'cfg' must be a dict, got {type(cfg).__name__}")
        c = {**_UNILM_DEFAULTS, **cfg}
        if c["extractor_mode"] not in ("default", "layer_norm"):
            raise ConfigError(f"unsupported config: extractor_mode={shown(c['extractor_mode'])}: expected 'default' "
                              "(group norm) or 'layer_norm'")
        if not c["relative_position_embedding"]:
            raise ConfigError("unsupported config: relative_position_embedding=False: every WavLM checkpoint "
                              "uses the relative position bias; this looks like a HuBERT/wav2vec2 cfg")
        if not c["gru_rel_pos"]:
            raise ConfigError("unsupported config: gru_rel_pos=False: the engine implements WavLM's gated "
                              "relative position bias only")
        if c["activation_fn"] != "gelu":
            raise ConfigError(f"unsupported config: activation_fn={shown(c['activation_fn'])}: "
                              "only 'gelu' is implemented")
        layers = c["conv_feature_layers"]
        conv_layers = parse_conv_layers(layers) if isinstance(layers, str) else _conv_triples(layers, shown(layers))
        known = set(_UNILM_DEFAULTS)
        return cls(
            extractor_mode=c["extractor_mode"],
            conv_layers=conv_layers,
            conv_bias=_bool(c, "conv_bias"),
            embed_dim=_int(c, "encoder_embed_dim"),
            ffn_dim=_int(c, "encoder_ffn_embed_dim"),
            num_layers=_int(c, "encoder_layers"),
            num_heads=_int(c, "encoder_attention_heads"),
            layer_norm_first=_bool(c, "layer_norm_first"),
            conv_pos=_int(c, "conv_pos"),
            conv_pos_groups=_int(c, "conv_pos_groups"),
            num_buckets=_int(c, "num_buckets"),
            max_distance=_int(c, "max_distance"),
            normalize=_bool(c, "normalize"),
            normalize_eps=1e-5,
            extras={k: v for k, v in cfg.items() if k not in known},
        )

    def to_original(self) -> dict[str, Any]:
        """The ``cfg`` dict of an original checkpoint (plain types only, so it loads with weights_only)."""
        if self.xvector is not None:
            raise ConfigError("the original .pt format has no speaker head; convert the backbone only")
        return {
            **_UNILM_DEFAULTS,
            **{k: v for k, v in self.extras.items() if isinstance(v, (str, int, float, bool))},
            "extractor_mode": self.extractor_mode,
            "conv_feature_layers": repr([tuple(c) for c in self.conv_layers]),
            "conv_bias": self.conv_bias,
            "encoder_embed_dim": self.embed_dim,
            "encoder_ffn_embed_dim": self.ffn_dim,
            "encoder_layers": self.num_layers,
            "encoder_attention_heads": self.num_heads,
            "layer_norm_first": self.layer_norm_first,
            "conv_pos": self.conv_pos,
            "conv_pos_groups": self.conv_pos_groups,
            "num_buckets": self.num_buckets,
            "max_distance": self.max_distance,
            "relative_position_embedding": True,
            "gru_rel_pos": True,
            "normalize": self.normalize,
        }

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> WavLMConfig:
        """Build from an HF ``config.json`` (and ``preprocessor_config.json`` for the waveform normalisation).

        Without a preprocessor file the normalisation follows the released models: on for the layer-norm
        (Large) variant, off otherwise.
        """
        if not isinstance(config, dict):
            raise ConfigError(f"config.json must be a JSON object, got {type(config).__name__}")
        if preprocessor is not None and not isinstance(preprocessor, dict):
            raise ConfigError(f"preprocessor_config.json must be a JSON object, got {type(preprocessor).__name__}")
        c = {**_HF_DEFAULTS, **config}
        norm = c["feat_extract_norm"]
        if norm not in ("group", "layer"):
            raise ConfigError(f"unsupported config: feat_extract_norm={shown(norm)}: expected 'group' or 'layer'")
        for key in ("hidden_act", "feat_extract_activation"):
            if c[key] != "gelu":
                raise ConfigError(f"unsupported config: {key}={shown(c[key])}: only 'gelu' is implemented")
        dims, kernels, strides = _ints(c, "conv_dim"), _ints(c, "conv_kernel"), _ints(c, "conv_stride")
        if not (len(dims) == len(kernels) == len(strides)):
            raise ConfigError("unsupported config: conv_dim, conv_kernel and conv_stride differ in length")
        normalize = (_bool({"do_normalize": False, **preprocessor}, "do_normalize") if preprocessor is not None
                     else norm == "layer")
        archs = c.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"unsupported config: architectures={shown(archs)}: expected a list of class names")
        xvector = None
        if any("XVector" in a for a in archs):
            tdnn = _ints(c, "tdnn_dim")
            id2label = c.get("id2label") or {}
            if not isinstance(id2label, dict):  # len() of a number was a TypeError (found by test_fuzz.py)
                raise ConfigError(f"unsupported config: id2label={shown(id2label)}: expected an object of labels")
            labels = c.get("num_labels") or len(id2label) or 2
            xvector = XVectorConfig(
                use_weighted_layer_sum=_bool(c, "use_weighted_layer_sum"),
                projector_dim=tdnn[0],
                tdnn_dim=tdnn,
                tdnn_kernel=_ints(c, "tdnn_kernel"),
                tdnn_dilation=_ints(c, "tdnn_dilation"),
                output_dim=_int(c, "xvector_output_dim"),
                num_labels=_int({"num_labels": labels}, "num_labels"),
            )
        return cls(
            extractor_mode="default" if norm == "group" else "layer_norm",
            conv_layers=tuple(zip(dims, kernels, strides, strict=True)),
            conv_bias=_bool(c, "conv_bias"),
            embed_dim=_int(c, "hidden_size"),
            ffn_dim=_int(c, "intermediate_size"),
            num_layers=_int(c, "num_hidden_layers"),
            num_heads=_int(c, "num_attention_heads"),
            layer_norm_first=_bool(c, "do_stable_layer_norm"),
            conv_pos=_int(c, "num_conv_pos_embeddings"),
            conv_pos_groups=_int(c, "num_conv_pos_embedding_groups"),
            num_buckets=_int(c, "num_buckets"),
            max_distance=_int(c, "max_bucket_distance"),
            layer_norm_eps=_positive_float(c, "layer_norm_eps"),
            normalize=normalize,
            normalize_eps=1e-7,
            xvector=xvector,
            extras={k: v for k, v in config.items() if k not in _HF_DEFAULTS},
        )

    def to_hf(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``config.json`` and ``preprocessor_config.json`` contents for an HF directory."""
        config: dict[str, Any] = {
            **{k: v for k, v in self.extras.items() if _is_json(v)},
            "model_type": "wavlm",
            "architectures": ["WavLMForXVector" if self.xvector else "WavLMModel"],
            "feat_extract_norm": "group" if self.extractor_mode == "default" else "layer",
            "feat_extract_activation": "gelu",
            "hidden_act": "gelu",
            "conv_dim": [c[0] for c in self.conv_layers],
            "conv_kernel": [c[1] for c in self.conv_layers],
            "conv_stride": [c[2] for c in self.conv_layers],
            "num_feat_extract_layers": len(self.conv_layers),
            "conv_bias": self.conv_bias,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "do_stable_layer_norm": self.layer_norm_first,
            "num_conv_pos_embeddings": self.conv_pos,
            "num_conv_pos_embedding_groups": self.conv_pos_groups,
            "num_buckets": self.num_buckets,
            "max_bucket_distance": self.max_distance,
            "layer_norm_eps": self.layer_norm_eps,
        }
        if self.xvector is not None:
            x = self.xvector
            config.update(use_weighted_layer_sum=x.use_weighted_layer_sum, tdnn_dim=list(x.tdnn_dim),
                          tdnn_kernel=list(x.tdnn_kernel), tdnn_dilation=list(x.tdnn_dilation),
                          xvector_output_dim=x.output_dim, num_labels=x.num_labels)
        preprocessor = {
            "feature_extractor_type": "Wav2Vec2FeatureExtractor",
            "feature_size": 1,
            "sampling_rate": 16000,
            "padding_value": 0.0,
            "do_normalize": self.normalize,
            "return_attention_mask": True,
        }
        return config, preprocessor

    def replace(self, **changes: Any) -> WavLMConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> WavLMConfig:
        d = Path(directory)
        if not (d / "config.json").exists():
            raise ConfigError(f"{d} has no config.json: not a Hugging Face model directory")
        pre_path = d / "preprocessor_config.json"
        preprocessor = _read_json(pre_path) if pre_path.exists() else None
        return cls.from_hf(_read_json(d / "config.json"), preprocessor)


def _read_json(path: Path) -> Any:
    """A JSON file, or :class:`ConfigError`. Besides malformed JSON and bytes that are not UTF-8, that covers
    nesting beyond the decoder's recursion limit and integers beyond Python's 4300 digits, which escaped as
    RecursionError and plain ValueError (found by tests/test_fuzz.py)."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise ConfigError(f"{path} is not valid JSON ({why}); re-download the directory") from None


# Typed reads of one config key: a value of the wrong type or out of range is a ConfigError naming the key,
# not a TypeError/ValueError/OverflowError from deep inside the model (all three were found by fuzzing).
def _int(c: dict[str, Any], key: str) -> int:
    v = c[key]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_SIZE:
        raise ConfigError(f"unsupported config: {key}={shown(v)}: expected an integer from 1 to {MAX_SIZE}")
    return v


def _ints(c: dict[str, Any], key: str) -> tuple[int, ...]:
    v = c[key]
    if not isinstance(v, (list, tuple)) or not 0 < len(v) <= MAX_CONV_LAYERS:
        raise ConfigError(f"unsupported config: {key}={shown(v)}: expected a list of 1 to {MAX_CONV_LAYERS} integers")
    return tuple(_int({key: x}, key) for x in v)


def _bool(c: dict[str, Any], key: str) -> bool:
    v = c[key]
    if v not in (True, False) or not isinstance(v, (bool, int)):  # 0 and 1 as some configs write them
        raise ConfigError(f"unsupported config: {key}={shown(v)}: expected true or false")
    return bool(v)


def _positive_float(c: dict[str, Any], key: str) -> float:
    v = c[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
        raise ConfigError(f"unsupported config: {key}={shown(v)}: expected a positive number")
    return float(v)


def _conv_triples(value: Any, spec: str) -> tuple[ConvSpec, ...]:
    """``conv_feature_layers`` as given (a list of (dim, kernel, stride)) or as evaluated from its string."""
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= MAX_CONV_LAYERS or not all(
            isinstance(x, (list, tuple)) and len(x) == 3 for x in value):
        raise ConfigError(f"unsupported config: conv_feature_layers={spec}: expected a list of 1 to "
                          f"{MAX_CONV_LAYERS} (dim, kernel, stride) triples")
    return tuple(_ints({"conv_feature_layers": x}, "conv_feature_layers") for x in value)  # type: ignore[misc]


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


_BINOPS = {ast.Add: operator.add, ast.Mult: operator.mul}


def parse_conv_layers(spec: str) -> tuple[ConvSpec, ...]:
    """Evaluate a fairseq ``conv_feature_layers`` string without ``eval``.

    Only list/tuple literals of integers combined with ``+`` and ``*`` are accepted, which covers every
    released cfg (``"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"``) and nothing executable.
    """

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            # "[(512,3,2)] * 10**10" would build a ten-billion-entry list (found by tests/test_fuzz.py)
            length = sum(len(x) if isinstance(x, (list, tuple)) else 0 for x in (left, right))
            count = max(x if isinstance(x, int) else 1 for x in (left, right))
            if length * count > 3 * MAX_CONV_LAYERS:
                raise ConfigError(f"unsupported config: conv_feature_layers={shown(spec)} is too long; at most "
                                  f"{MAX_CONV_LAYERS} layers are accepted")
            try:
                return _BINOPS[type(node.op)](left, right)
            except TypeError:  # a list plus a number, a tuple times a tuple
                raise ConfigError(f"unsupported config: conv_feature_layers={shown(spec)} mixes lists and "
                                  "numbers") from None
        raise ConfigError(f"unsupported config: conv_feature_layers={shown(spec)}: only list/tuple literals with + "
                          "and * are accepted")

    try:
        value = ev(ast.parse(spec, mode="eval"))
    except (SyntaxError, RecursionError, MemoryError) as e:  # the last two: nesting too deep for the parser
        raise ConfigError(f"unsupported config: conv_feature_layers={shown(spec)} does not parse: "
                          f"{type(e).__name__}") from None
    return _conv_triples(value, shown(spec))


# unilm WavLMConfig defaults (only the keys that shape inference)
_UNILM_DEFAULTS: dict[str, Any] = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "normalize": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": False,
    "num_buckets": 320,
    "max_distance": 1280,
    "gru_rel_pos": False,
}

# transformers WavLMConfig defaults (only the keys that shape inference)
_HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "feat_extract_norm": "group",
    "feat_extract_activation": "gelu",
    "conv_dim": (512, 512, 512, 512, 512, 512, 512),
    "conv_stride": (5, 2, 2, 2, 2, 2, 2),
    "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
    "conv_bias": False,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "num_buckets": 320,
    "max_bucket_distance": 800,
    "do_stable_layer_norm": False,
    "layer_norm_eps": 1e-5,
    "use_weighted_layer_sum": False,
    "tdnn_dim": (512, 512, 512, 512, 1500),
    "tdnn_kernel": (5, 3, 3, 1, 1),
    "tdnn_dilation": (1, 2, 3, 1, 1),
    "xvector_output_dim": 512,
}
