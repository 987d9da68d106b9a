"""Older CPUs' code paths, run here through oneDNN's ISA cap: what is native, what runs, and that it is right.

``ONEDNN_MAX_CPU_ISA=AVX2`` makes oneDNN (and ``ATEN_CPU_CAPABILITY=avx2`` torch's own kernels) behave as on a
Zen 2/3 or Haswell-class server, ``AVX512_CORE`` as on Skylake-SP (AVX-512 without VNNI or BF16). The cap is
read when oneDNN starts, so each case runs in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from streamwavlm.cpu import CAP_ALLOWS, bf16_runs, capped, hardware_flags, int8_saturates, isa_cap

SAPPHIRE = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
                      "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "fma"})


def test_a_cap_hides_the_features_above_it():
    assert capped(SAPPHIRE, None) == SAPPHIRE
    assert capped(SAPPHIRE, "AVX2") == {"avx2", "fma"}
    assert capped(SAPPHIRE, "AVX2_VNNI") == {"avx2", "fma", "avx_vnni"}
    assert capped(SAPPHIRE, "AVX512_CORE") == {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}
    assert capped(SAPPHIRE, "AVX512_CORE_VNNI") == capped(SAPPHIRE, "AVX512_CORE") | {"avx512_vnni"}
    assert capped(SAPPHIRE, "AVX512_CORE_BF16") == capped(SAPPHIRE, "AVX512_CORE_VNNI") | {"avx512_bf16"}
    assert capped(SAPPHIRE, "AVX512_CORE_AMX") == SAPPHIRE - {"avx_vnni"}
    assert capped(frozenset({"avx2"}), "AVX512_CORE_AMX") == {"avx2"}  # a cap adds nothing


@pytest.mark.parametrize(("env", "value", "cap"), [
    ("ONEDNN_MAX_CPU_ISA", "avx2", "AVX2"), ("DNNL_MAX_CPU_ISA", "AVX512_CORE_VNNI", "AVX512_CORE_VNNI"),
    ("ONEDNN_MAX_CPU_ISA", "ALL", None), ("ONEDNN_MAX_CPU_ISA", "DEFAULT", None), ("ONEDNN_MAX_CPU_ISA", "", None)])
def test_the_cap_is_read_from_either_name(monkeypatch, env, value, cap):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv(env, value)
    assert isa_cap() == cap


def test_what_each_cap_level_can_run():
    assert [int8_saturates(capped(SAPPHIRE, c)) for c in ("AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")] \
        == [True, False, True, False]
    newer = SAPPHIRE | {"avx_ne_convert"}
    assert [bf16_runs(capped(newer, c)) for c in ("AVX2", "AVX2_VNNI_2", "AVX512_CORE")] == [False, True, True]


# What a capped process reports: its native paths, auto's choice, int8 on a row of equal inputs (every 16-bit pair
# sum at its largest: saturated with 8-bit weights), bf16's fate, and the per-layer agreement of the paths that run.
_PROBE = """
import json, warnings
import torch
from streamwavlm import precision
from streamwavlm.audio.files import load_audio
from streamwavlm.commands.common import bundled_sample
from streamwavlm.config import WavLMConfig
from streamwavlm.cpu import int8_saturates
from streamwavlm.model.linear import pack, packing
from streamwavlm.model.wavlm import WavLM
from streamwavlm.precision_fidelity import measure_precision
from streamwavlm.streaming import StreamSettings

warnings.simplefilter("ignore")
torch.manual_seed(0)
torch.set_grad_enabled(False)
out = {"onednn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(), "native": precision.native_precisions(),
       "auto": precision.choose_auto(use_cache=False).precision, "saturates": int8_saturates()}
w, x = torch.ones(8, 768), torch.ones(2, 768)
x[1] = torch.randn(768)
with packing("int8"):
    product = pack(w, None)
ref = x @ w.T
out["equal_rows_error"] = ((product(x) - ref).abs().amax(1) / ref.abs().amax(1)).tolist()
model = WavLM(WavLMConfig())
wav = torch.from_numpy(load_audio(bundled_sample())[16000:48000].copy())
for p in ("bfloat16", "int8"):
    try:
        precision.resolve(p)
    except precision.PrecisionError as e:
        out[p] = str(e)
        continue
    rows = measure_precision(model, wav, p, [StreamSettings(chunk=16, left=50)])
    out[p] = min(r.worst_cosine for r in rows)
print(json.dumps(out))
"""


def _capped_env(cap: str, tmp_path) -> dict[str, str]:
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=cap, STREAMWAVLM_CACHE=str(tmp_path), OMP_NUM_THREADS="2")
    if cap == "AVX2":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    return env


def _probe(cap: str, tmp_path) -> dict:
    if not torch.backends.mkldnn.is_available() or "avx2" not in hardware_flags():
        pytest.skip("needs an x86-64 CPU with AVX2 and a torch build with oneDNN")
    if not set(CAP_ALLOWS[cap]) <= hardware_flags():
        pytest.skip(f"this CPU lacks features the {cap} cap leaves on, so it cannot stand in for that CPU")
    done = subprocess.run([sys.executable, "-c", _PROBE], env=_capped_env(cap, tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if cap == "AVX2" and out["onednn_bf16"]:
        pytest.skip("this torch's oneDNN ignores ONEDNN_MAX_CPU_ISA (built without ONEDNN_ENABLE_MAX_CPU_ISA)")
    return out


def test_an_avx2_only_cpu(tmp_path):
    """auto is fp32 (no benchmark: nothing else is native); forced int8 is right despite the saturating kernel
    (7-bit weights) and close to fp32; bf16 is refused with a reason instead of failing inside oneDNN."""
    out = _probe("AVX2", tmp_path)
    assert out["native"] == ["float32"] and out["auto"] == "float32" and out["saturates"]
    equal, noise = out["equal_rows_error"]  # 8-bit weights gave 0.99 and 12.9 (saturated pair sums)
    assert equal < 1e-3 and noise < 0.02, out
    assert "bfloat16 cannot run on this CPU" in out["bfloat16"]
    assert out["int8"] >= 0.99


@pytest.mark.parametrize(("cap", "native"), [("AVX512_CORE", ["float32"]),  # Skylake-SP
                                             ("AVX512_CORE_VNNI", ["float32", "int8"])])  # Cascade Lake, Ice Lake
def test_a_cpu_with_avx512_but_without_bf16(tmp_path, cap, native):
    """bf16 runs emulated (by conversion) and agrees with fp32; int8 agrees with fp32 with 8-bit weights where
    there is VNNI and 7-bit ones where there is not; auto chooses among the native paths only."""
    out = _probe(cap, tmp_path)
    assert out["native"] == native and out["auto"] in native and out["saturates"] == ("int8" not in native)
    equal, noise = out["equal_rows_error"]
    assert equal < 1e-3 and noise < 0.02, out
    assert out["bfloat16"] >= 0.999 and out["int8"] >= 0.99


def test_the_command_line_on_an_avx2_only_cpu(tmp_path):
    """Forcing bf16 there is one line on stderr and exit 2, not oneDNN's RuntimeError."""
    if "avx2" not in hardware_flags() or not torch.backends.mkldnn.is_available():
        pytest.skip("needs an x86-64 CPU with AVX2 and a torch build with oneDNN")
    done = subprocess.run([sys.executable, "-c", "from streamwavlm.cli import main; raise SystemExit(main("
                           "['run', '--dtype', 'bfloat16']))"],
                          env=_capped_env("AVX2", tmp_path), capture_output=True, text=True, timeout=120)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert "bfloat16 cannot run on this CPU" in err[0] and "Traceback" not in done.stderr
