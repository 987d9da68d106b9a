"""``streamwavlm embed FILE|DIR... --out PATH``: offline, batched embeddings of many files, saved with an index.

Outputs (``--out``):

* ``PATH.safetensors`` or ``PATH.npz``: one file; input ``i`` has the tensors ``hidden_states.<i>`` (layers,
  frames, dim) and ``xvector.<i>``; the index (JSON: source, frames, layers, frame rate per input) is the
  safetensors metadata ``index``, or the npz array ``index``.
* any other PATH: a directory with one file per input, named after its path under the directory given (or
  its file name): ``<name>.npy`` (hidden states) and ``<name>.xvector.npy``, or ``<name>.safetensors``
  (``--format``), and ``index.json`` listing them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from ..audio.files import audio_files
from ..audio.validate import SAMPLE_RATE, AudioError
from ..checkpoint import model_from_setting
from ..embedding import Embedding, check_request, embed_items, file_item, resolve_device
from ..permissions import as_umask_allows
from ..progress import Bar
from .common import _int_list, add_checkpoint_option, add_device_option, add_dtype_option, cpu_dtype

SINGLE_FILE = (".safetensors", ".npz")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="offline embeddings of audio files (batched), saved as .npy/.safetensors",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="FILE|DIR", help="audio files, or directories searched recursively "
                   "(any format, rate and channel count libsndfile reads)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="a directory (one file per input), or one .safetensors / .npz file with an index")
    add_checkpoint_option(p)
    add_device_option(p)
    p.add_argument("--layers", type=_int_list, default=(), metavar="I,J,...",
                   help="hidden-state indices to save, 0..L (default: the last layer)")
    p.add_argument("--xvector", action="store_true", help="also save the 512-d speaker embedding of each file "
                   "(needs a speaker-head checkpoint, e.g. wavlm-base-plus-sv)")
    add_dtype_option(p, default="float32", help="CPU compute precision: float32 (default; exact), bfloat16, int8 or "
                     "auto (docs/precision.md)")
    p.add_argument("--out-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the saved arrays (default: %(default)s)")
    p.add_argument("--format", choices=("npy", "safetensors"), default="npy",
                   help="per-file format when --out is a directory (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="files per forward (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    files = audio_files(args.inputs)
    if not files:
        raise AudioError(f"no audio files in {' '.join(args.inputs)}")
    names = [name for _, name in files]
    repeated = sorted(str(n) for n, count in Counter(names).items() if count > 1)
    if repeated and Path(args.out).suffix not in SINGLE_FILE:
        raise ValueError(f"several inputs would be saved as {repeated[0]}: give their directories instead, "
                         "or --out FILE.safetensors")
    model, description = model_from_setting(args.checkpoint, dtype=cpu_dtype(args))
    model = model.to(device)
    check_request(model, args.layers, args.xvector, args.batch_size)
    print(f"model: {description}", file=sys.stderr)
    items = [file_item(path, model.cfg.receptive_field) for path, _ in files]
    seconds = sum(item.length for item in items) / SAMPLE_RATE
    with Bar(f"embedding {len(items)} file(s)", round(seconds, 1), unit="s of audio") as bar:
        results = embed_items(model, items, layers=args.layers, xvector=args.xvector, batch_size=args.batch_size,
                              on_batch=lambda n: bar.advance(n / SAMPLE_RATE))
    out = save(results, names, Path(args.out), args.format, np.dtype(args.out_dtype))
    print(out)
    return 0


def _entry(e: Embedding) -> dict[str, object]:
    return {"source": e.source, "frames": e.frames, "dim": int(e.hidden_states.shape[-1]), "layers": list(e.layers),
            "frame_rate": e.frame_rate, "xvector": e.xvector is not None}


def _arrays(e: Embedding, dtype: np.dtype) -> dict[str, np.ndarray]:
    arrays = {"hidden_states": e.hidden_states.numpy().astype(dtype)}
    if e.xvector is not None:
        arrays["xvector"] = e.xvector.numpy().astype(dtype)
    return arrays


def save(results: list[Embedding], names: list[Path], out: Path, fmt: str, dtype: np.dtype) -> Path:
    """Write ``results`` as described in the module docstring; returns what was written (the file or the
    directory's ``index.json``)."""
    from safetensors.numpy import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix in SINGLE_FILE:
        tensors = {f"{key}.{i}": a for i, e in enumerate(results) for key, a in _arrays(e, dtype).items()}
        index = json.dumps([_entry(e) for e in results])
        if out.suffix == ".safetensors":
            save_file(tensors, str(out), metadata={"index": index})
            as_umask_allows(out)
        else:
            np.savez(out, index=np.array(index), **tensors)
        return out
    entries = []
    for e, name in zip(results, names, strict=True):
        base = out / name.with_suffix("")
        base.parent.mkdir(parents=True, exist_ok=True)
        arrays = _arrays(e, dtype)
        if fmt == "safetensors":
            written = [base.with_name(base.name + ".safetensors")]
            save_file(arrays, str(written[0]), metadata={"index": json.dumps(_entry(e))})
            as_umask_allows(written[0])
        else:
            written = [base.with_name(f"{base.name}{'' if key == 'hidden_states' else '.' + key}.npy")
                       for key in arrays]
            for path, array in zip(written, arrays.values(), strict=True):
                np.save(path, array)
        entries.append({**_entry(e), "files": [str(p.relative_to(out)) for p in written]})
    index_path = out / "index.json"
    index_path.write_text(json.dumps(entries, indent=1) + "\n")
    return index_path

