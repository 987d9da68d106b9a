"""Both attention backends (the Triton kernel, the blocked torch path) against the naive, fully
materialised oracle that sits next to the kernel (``reference_attention``).

Without CUDA the kernel runs in Triton's interpreter. Triton fixes the mode of every ``@triton.jit``
function when it is decorated, its own standard library (``tl.max``, ``tl.sum``, ...) included, so
``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported: this module sets it at collection
(only without CUDA; nothing else on a CPU-only machine can launch a Triton kernel anyway) and restores the
previous value once its tests are done. The interpreter costs milliseconds per program iteration, so
shapes stay tiny (d=16, a few dozen keys, 16x16 tiles). With CUDA the same tests run the compiled kernel,
and the ``cuda``-only tests add realistic shapes and bf16 (the interpreter stores bf16 as raw uint16 and
its ``tl.dot`` multiplies those integers, so bf16 cannot be checked on the CPU).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from streamwavlm.kernels import KeyLayout, gated_attention, set_backend
from streamwavlm.kernels.gate import gate_from_logits
from streamwavlm.kernels.gated_attention import gated_rel_attention_torch
from torch import Tensor

# None of the imports above imports triton; the kernel module is imported by the `tga` fixture.
CUDA = torch.cuda.is_available()
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def _restore_interpret_env() -> Iterator[None]:
    """Give TRITON_INTERPRET back its previous value once this module's tests are done."""
    yield
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


@pytest.fixture(scope="module")
def tga() -> ModuleType:
    """The kernel module, in the interpreter when there is no CUDA."""
    module = importlib.import_module("streamwavlm.kernels.triton_gated_attention")
    if not CUDA:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(importlib.import_module("triton.language").max, InterpretedFunction):
            pytest.fail("triton was imported before this module set TRITON_INTERPRET=1; run with it set")
        if not module._INTERPRETED:  # imported before, in compiled mode, by another test
            module = importlib.reload(module)
    return module


@pytest.fixture
def no_forced_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A clean dispatcher: no env override, and whatever a test forces is undone."""
    monkeypatch.delenv("STREAMWAVLM_ATTENTION", raising=False)
    yield
    set_backend(None)


def assert_close(out: Tensor, ref: Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    tol = TOL[out.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def run(fn, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, table: Tensor, q_pos: Tensor, k_pos: Tensor,
        **layout) -> Tensor:
    """Call a backend with the key layout given as keywords (k_len, chunk, left, rows)."""
    return fn(q, k, v, gate, table, KeyLayout(q_pos, k_pos, **layout))


def make_inputs(gen: torch.Generator, batch: int, heads: int, tq: int, tk: int, dim: int = 16,
                max_dist: int = 8, dtype: torch.dtype = torch.float32, base: int = 0, gap: int = 1,
                shuffle: bool = False) -> tuple[Tensor, ...]:
    """Random q, k, v, gate, table and positions; keys every ``gap`` frames from ``base``, optionally in a
    shuffled (ring-buffer) order, queries at the last ``tq`` key frames."""
    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)

    q, k, v = randn(batch, heads, tq, dim), randn(batch, heads, tk, dim), randn(batch, heads, tk, dim)
    gate = (2 * torch.rand(batch, heads, tq, generator=gen)).to(DEVICE)
    table = torch.randn(heads, 2 * max_dist + 1, generator=gen).to(DEVICE)
    offsets = base + gap * torch.arange(tk).repeat(batch, 1) + torch.randint(0, 50, (batch, 1), generator=gen)
    q_pos = offsets[:, tk - tq :].clone() if tq <= tk else offsets[:, -1:] + torch.arange(1, tq + 1)
    if shuffle:
        offsets = offsets[:, torch.randperm(tk, generator=gen)]
    return q, k, v, gate, table, q_pos.to(DEVICE), offsets.to(DEVICE)


@pytest.mark.parametrize("seed", range(16))
def test_random_shapes_masks_and_positions(tga: ModuleType, seed: int) -> None:
    """Random small shapes with ragged k_len, block masks, shuffled caches, negative or > 2**32 positions."""
    gen = torch.Generator().manual_seed(seed)

    def pick(n: int) -> int:
        return int(torch.randint(n, (), generator=gen))

    batch, heads, tq, tk = 1 + pick(3), 1 + pick(2), 1 + pick(20), 1 + pick(40)
    base = (0, -517, 2**33 + 5)[seed % 3]
    inputs = make_inputs(gen, batch, heads, tq, tk, base=base, gap=1 + 3 * (seed % 2), shuffle=seed % 4 == 3)
    kw: dict = {}
    if seed % 2:
        kw["k_len"] = torch.randint(0, tk + 1, (batch,), generator=gen).to(DEVICE)
    if seed % 4 >= 2:
        kw["chunk"], kw["left"] = 1 + pick(8), (None, pick(12))[seed % 2]
    out = run(tga.gated_rel_attention_triton, *inputs, **kw)
    assert_close(out, run(tga.reference_attention, *inputs, **kw))


@pytest.mark.parametrize("seed", range(8))
def test_torch_backend_equals_the_oracle(tga: ModuleType, seed: int) -> None:
    """The blocked CPU path (small query blocks, the offline diagonal fast path, masks) against the oracle."""
    gen = torch.Generator().manual_seed(100 + seed)
    tq = (40, 13, 7, 40)[seed % 4]
    tk = 40 if tq == 40 else 35
    q, k, v, gate, table, q_pos, k_pos = make_inputs(gen, 2, 3, tq, tk, max_dist=6, shuffle=seed == 2)
    if tq == tk:
        k_pos = q_pos  # offline: queries and keys at the same consecutive frames
    kw = [{}, {"chunk": 4, "left": 6}, {"k_len": torch.tensor([tk, tk // 2], device=DEVICE)}, {"chunk": 8}][seed // 2]
    layout = KeyLayout(q_pos, k_pos, **kw)
    expected = tga.reference_attention(q, k, v, gate, table, layout)
    assert_close(gated_rel_attention_torch(q, k, v, gate, table, layout, block_q=8), expected)


@pytest.mark.parametrize("rows", [[3, 1], [1, 2], [0, 2, 4]])
def test_rows_read_kv_in_place(tga: ModuleType, rows: list[int]) -> None:
    """A batch whose K/V live in other rows of a larger tensor (a pool's rings): both backends read them in
    place, scattered or adjacent, and equal attending over the gathered rows."""
    gen = torch.Generator().manual_seed(13)
    q, _, _, gate, table, q_pos, k_pos = make_inputs(gen, len(rows), 2, 6, 20, shuffle=True)
    k_all = torch.randn(5, 2, 20, 16, generator=gen).to(DEVICE)
    v_all = torch.randn(5, 2, 20, 16, generator=gen).to(DEVICE)
    idx = torch.tensor(rows, device=DEVICE)
    kw = {"chunk": 4, "left": 8}
    gathered = run(tga.reference_attention, q, k_all[idx], v_all[idx], gate, table, q_pos, k_pos, **kw)
    for fn in (tga.gated_rel_attention_triton, gated_rel_attention_torch):
        assert_close(run(fn, q, k_all, v_all, gate, table, q_pos, k_pos, rows=idx, **kw), gathered)


def test_distances_beyond_the_table_clamp(tga: ModuleType) -> None:
    """Keys hundreds of frames away read the table's end entries, in both directions."""
    gen = torch.Generator().manual_seed(1)
    q, k, v, gate, table, _, k_pos = make_inputs(gen, 2, 2, 5, 24, gap=100)
    q_pos = k_pos[:, 10:15] + 7  # keys from -1007 to +1307 frames away, with M = 8
    assert_close(run(tga.gated_rel_attention_triton, q, k, v, gate, table, q_pos, k_pos),
                 run(tga.reference_attention, q, k, v, gate, table, q_pos, k_pos))


@pytest.mark.parametrize(("chunk", "left"), [(None, None), (4, None), (4, 6)])
def test_sentinel_positions_of_empty_cache_slots(tga: ModuleType, chunk: int | None,
                                                 left: int | None) -> None:
    """Ring-buffer slots marked with far-away positions (the streaming pool uses -(1 << 40)) are exact:
    masked by the left rule, and otherwise read the table's end entries, whatever their int32 residue."""
    gen = torch.Generator().manual_seed(12)
    q, k, v, gate, table, q_pos, k_pos = make_inputs(gen, 2, 2, 6, 24, base=1000, shuffle=True)
    k_pos[0, ::3] = -(1 << 40)
    k_pos[1, 1::4] = q_pos[1, 0] + 1 + (1 << 33)  # distances that look small modulo 2**32
    k_pos[1, 2::5] = q_pos[1, 0] - 2 - (1 << 32)
    kw = {"chunk": chunk, "left": left}
    assert_close(run(tga.gated_rel_attention_triton, q, k, v, gate, table, q_pos, k_pos, **kw),
                 run(tga.reference_attention, q, k, v, gate, table, q_pos, k_pos, **kw))


@pytest.mark.parametrize("gate_value", [0.0, 2.0, 60.0])
def test_extreme_gates(tga: ModuleType, gate_value: float) -> None:
    """Gate 0 removes the bias (plain softmax attention); a large gate makes the bias dominate."""
    gen = torch.Generator().manual_seed(2)
    q, k, v, gate, table, q_pos, k_pos = make_inputs(gen, 2, 2, 12, 30, max_dist=8)
    gate = torch.full_like(gate, gate_value)
    k_len = torch.tensor([30, 17], device=DEVICE)
    out = run(tga.gated_rel_attention_triton, q, k, v, gate, table, q_pos, k_pos, k_len=k_len)
    assert_close(out, run(tga.reference_attention, q, k, v, gate, table, q_pos, k_pos, k_len=k_len))
    if gate_value == 0.0:  # batch row 0 sees all its keys: plain softmax attention
        plain = torch.softmax(q[:1] @ k[:1].transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v[:1]
        assert_close(out[:1], plain)


def test_fp16_inputs(tga: ModuleType) -> None:
    gen = torch.Generator().manual_seed(3)
    inputs = make_inputs(gen, 3, 2, 17, 37, dtype=torch.float16, base=2**33)
    kw = {"k_len": torch.tensor([37, 20, 9], device=DEVICE), "chunk": 5, "left": 9}
    assert_close(run(tga.gated_rel_attention_triton, *inputs, **kw), run(tga.reference_attention, *inputs, **kw))


@pytest.mark.parametrize(("chunk", "left"), [(None, None), (8, None), (8, 16), (5, 0)])
def test_offline_whole_utterance(tga: ModuleType, chunk: int | None, left: int | None) -> None:
    """Tq = Tk at the same consecutive positions (the torch side takes its diagonal fast path)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v, gate, table, _, pos = make_inputs(gen, 1, 2, 40, 40, max_dist=12)
    assert_close(run(tga.gated_rel_attention_triton, q, k, v, gate, table, pos, pos, chunk=chunk, left=left),
                 run(tga.reference_attention, q, k, v, gate, table, pos, pos, chunk=chunk, left=left))


def test_rows_without_keys_are_zero(tga: ModuleType) -> None:
    """An empty stream slot (k_len 0) and queries whose allowed keys are absent give 0, never NaN, on both
    backends."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, gate, table, q_pos, k_pos = make_inputs(gen, 2, 2, 6, 20)
    q_pos[1] = k_pos[1, 0] - 10 + torch.arange(6, device=DEVICE)  # row 1: every key is in a later chunk
    k_len = torch.tensor([0, 20], device=DEVICE)
    out = run(tga.gated_rel_attention_triton, q, k, v, gate, table, q_pos, k_pos, k_len=k_len, chunk=4)
    assert (out == 0).all()
    assert (run(tga.reference_attention, q, k, v, gate, table, q_pos, k_pos, k_len=k_len, chunk=4) == 0).all()
    out = run(tga.gated_rel_attention_triton, q, k, v, gate, table, q_pos, k_pos, chunk=4)
    assert (out[1] == 0).all() and (out[0] != 0).any()
    assert_close(out, run(tga.reference_attention, q, k, v, gate, table, q_pos, k_pos, chunk=4))


def test_strided_views_of_a_fused_projection(tga: ModuleType) -> None:
    """q/k/v/gate sliced out of one (B, T, H, 3d+1) buffer and every other position, without copies."""
    gen = torch.Generator().manual_seed(6)
    batch, heads, t, dim = 2, 2, 18, 16
    fused = torch.randn(batch, t, heads, 3 * dim + 1, generator=gen).to(DEVICE)
    q, k, v = (fused[..., i * dim : (i + 1) * dim].transpose(1, 2) for i in range(3))
    gate = fused[..., -1].transpose(1, 2).sigmoid() * 2
    pos = (torch.arange(2 * t).repeat(batch, 1) * 3).to(DEVICE)[:, ::2]
    table = torch.randn(heads, 17, generator=gen).to(DEVICE)
    assert not q.is_contiguous() and not pos.is_contiguous()
    assert_close(run(tga.gated_rel_attention_triton, q, k, v, gate, table, pos, pos, chunk=4, left=5),
                 run(tga.reference_attention, q, k, v, gate, table, pos, pos, chunk=4, left=5))


def test_gate_from_logits_matches_wavlm() -> None:
    """gate_from_logits on the two summed groups of grep_linear reproduces the gate of wavlm.md §9.3."""
    gen = torch.Generator().manual_seed(8)
    batch, t, heads, head_dim = 2, 5, 3, 8
    x = torch.randn(batch, t, heads * head_dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(8, head_dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(8, generator=gen, dtype=torch.float64)
    const = torch.rand(heads, generator=gen, dtype=torch.float64)
    # Reference (unilm fast path / HF): grep_linear on each head's raw slice, 8 -> (2, 4) summed, sigmoid.
    xh = x.view(batch, t, heads, head_dim).permute(0, 2, 1, 3)
    logits = (xh @ weight.T + bias).view(batch, heads, t, 2, 4).sum(-1)
    gate_a, gate_b = torch.sigmoid(logits).chunk(2, dim=-1)
    expected = (gate_a * (gate_b * const.view(1, heads, 1, 1) - 1.0) + 2.0).squeeze(-1)
    torch.testing.assert_close(gate_from_logits(logits, const), expected.float())


def test_dispatcher_routes_to_triton_when_forced(
    tga: ModuleType, no_forced_backend: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    kernel = tga.gated_rel_attention_triton

    def spy(*args, **kwargs) -> Tensor:
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(tga, "gated_rel_attention_triton", spy)
    inputs = make_inputs(torch.Generator().manual_seed(9), 1, 2, 4, 10)
    expected = run(tga.reference_attention, *inputs)
    set_backend("triton")
    assert gated_attention.attention_backend(DEVICE) == "triton"
    assert_close(run(gated_attention.gated_rel_attention, *inputs), expected)
    assert calls == [1]
    set_backend("torch")
    assert_close(run(gated_attention.gated_rel_attention, *inputs), expected)
    set_backend(None)
    run(gated_attention.gated_rel_attention, *inputs)
    assert calls == ([1, 1] if CUDA else [1])  # auto: Triton on CUDA, torch on the CPU
    monkeypatch.setenv("STREAMWAVLM_ATTENTION", "triton")
    run(gated_attention.gated_rel_attention, *inputs)
    assert len(calls) == (3 if CUDA else 2)


def test_rejects_what_it_cannot_compute(tga: ModuleType) -> None:
    q, k, v, gate, table, q_pos, k_pos = make_inputs(torch.Generator().manual_seed(10), 1, 2, 4, 10)
    with pytest.raises(ValueError, match="head dim"):
        run(tga.gated_rel_attention_triton, q[..., :8], k[..., :8], v[..., :8], gate, table, q_pos, k_pos)
    with pytest.raises(ValueError, match="table"):
        run(tga.gated_rel_attention_triton, q, k, v, gate, table[:, :-1], q_pos, k_pos)
    with pytest.raises(ValueError, match="chunk"):
        run(tga.gated_rel_attention_triton, q, k, v, gate, table, q_pos, k_pos, chunk=0)
    with pytest.raises(ValueError, match="gate"):
        run(tga.gated_rel_attention_triton, q, k, v, gate[:, :1], table, q_pos, k_pos)
    with pytest.raises(TypeError):
        run(tga.gated_rel_attention_triton, q, k.half(), v, gate, table, q_pos, k_pos)
    with pytest.raises(TypeError, match="int32 or int64"):
        run(tga.gated_rel_attention_triton, q, k, v, gate, table, q_pos.float(), k_pos)


def test_gpu_autotune_space_is_pruned_to_the_problem(tga: ModuleType) -> None:
    """The H100 configs kept per problem (pure Python: checked here although the GPU path never runs)."""
    configs = tga._gpu_configs()

    def kept(tq: int, tk: int, precision: str = "tf32") -> set[tuple[int, int]]:
        named = {"tq_bucket": tq, "tk_bucket": tk}
        pruned = tga._prune_configs(configs, named, DOT_PRECISION=precision)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in pruned}

    assert {m for m, _ in kept(8, 1024)} == {16}  # a streaming chunk of 8 queries
    assert {m for m, _ in kept(32, 512)} == {16, 32}
    assert {m for m, _ in kept(4096, 4096)} == {64, 128}  # offline T = 3000
    assert all(n <= 32 for _, n in kept(16, 16))
    assert all(m * n <= 1024 for m, n in kept(4096, 4096, "ieee"))  # fp32 spills on larger tiles
    distinct = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}
    assert len(distinct) == len(configs)


_CROSS_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from streamwavlm.kernels import triton_gated_attention as m

dtype = sys.argv[1]
block_mask, has_rows, block_m, block_n, warps, stages = (int(a) for a in sys.argv[2:])
fn = m._gated_rel_attn_fwd
ptrs = dict(q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, out_ptr=dtype, gate_ptr="fp32", table_ptr="fp32",
            qpos_ptr="i64", kpos_ptr="i64", klen_ptr="i64", rows_ptr="i64")
consts = dict(HEAD_DIM=64, HAS_ROWS=bool(has_rows), HAS_KLEN=True, BLOCK_MASK=bool(block_mask),
              HAS_LEFT=bool(block_mask), DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
              BLOCK_M=block_m, BLOCK_N=block_n)
if not has_rows:
    consts["rows_ptr"] = None
signature = {a: "constexpr" if a in consts else "*" + ptrs[a] if a in ptrs else "fp32" if a == "sm_scale"
             else "i32" for a in fn.arg_names}
source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
options = dict(num_warps=warps, num_stages=stages)
print("wgmma" in triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"])
"""


@pytest.mark.heavy
@pytest.mark.parametrize(
    ("dtype", "block_mask", "has_rows", "block_m", "block_n", "warps", "stages", "wgmma"),
    [
        ("fp16", 0, 0, 128, 64, 8, 3, True),
        ("bf16", 1, 1, 64, 64, 4, 3, True),
        ("fp16", 1, 0, 16, 64, 4, 2, False),
        ("fp32", 1, 1, 16, 64, 4, 2, False),
    ],
)
def test_cross_compiles_for_h100(dtype: str, block_mask: int, has_rows: int, block_m: int, block_n: int,
                                 warps: int, stages: int, wgmma: bool) -> None:
    """The kernel lowers to sm_90 code with Triton's bundled ptxas, no GPU needed (catches what the
    interpreter cannot: types, layouts, shared memory); large query tiles use Hopper's wgmma."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = map(str, (dtype, block_mask, has_rows, block_m, block_n, warps, stages))
    command = [sys.executable, "-c", _CROSS_COMPILE, *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(wgmma)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("batch", "heads", "tq", "tk", "chunk", "left"),
    [(16, 12, 25, 512, None, None), (64, 16, 8, 1024, 25, 500), (1, 12, 1500, 1500, None, None),
     (1, 16, 3000, 3000, 25, 750)],
)
def test_gpu_realistic_shapes(tga: ModuleType, dtype: torch.dtype, batch: int, heads: int, tq: int, tk: int,
                              chunk: int | None, left: int | None) -> None:
    """WavLM shapes (d=64, 1601-entry table) on the GPU, ragged caches, against the reference in fp32."""
    gen = torch.Generator().manual_seed(11)
    q, k, v, gate, table, q_pos, k_pos = make_inputs(gen, batch, heads, tq, tk, dim=64, max_dist=800,
                                                     dtype=dtype, base=10_000)
    k_len = torch.randint(tk // 2, tk + 1, (batch,), generator=gen).to(DEVICE)
    kw = {"k_len": k_len, "chunk": chunk, "left": left}
    out = run(tga.gated_rel_attention_triton, q, k, v, gate, table, q_pos, k_pos, **kw)
    ref = run(tga.reference_attention, q.float(), k.float(), v.float(), gate, table, q_pos, k_pos, **kw)
    assert_close(out, ref.to(dtype))


@needs_cuda
def test_gpu_auto_backend_is_triton(no_forced_backend: None) -> None:
    assert gated_attention.attention_backend(torch.device("cuda")) == "triton"


def test_model_streaming_step_through_triton_equals_torch(tga: ModuleType, no_forced_backend: None,
                                                          tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny model streamed with the Triton path (interpreted on the CPU) equals the torch path."""
    from conftest import perturb_, save_hf_model, tiny_hf_config
    from transformers import WavLMModel

    from streamwavlm.checkpoint import load_model
    from streamwavlm.streaming import StreamPool, StreamSettings

    cfg = tiny_hf_config("large", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, conv_dim=(16,) * 7)
    model = load_model(save_hf_model(perturb_(WavLMModel(cfg)), tmp_path / "tiny")).to(DEVICE)
    wav = torch.randn(9000, generator=torch.Generator().manual_seed(1)) * 0.1
    calls: list[int] = []
    kernel = tga.gated_rel_attention_triton
    monkeypatch.setattr(tga, "gated_rel_attention_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))

    def stream(backend: str) -> Tensor:
        set_backend(backend)
        settings = StreamSettings(chunk=4, left=8, lookahead=2, layers=(1, 2))
        pool = StreamPool(model, settings, capacity=3, cuda_graphs=False)  # every step calls the kernel
        a, gap, b = pool.open("a"), pool.open("gap"), pool.open("b")
        pool.discard(gap)  # a and b sit in scattered slots: the kernel reads their rings through `rows`
        audio = {a: wav, b: wav[1000:6000]}  # b at another position in the same batches
        outs = []
        while any(len(x) >= pool.need(slot) for slot, x in audio.items() if slot in pool.streams.values()):
            ready = {slot: x[:pool.need(slot)] for slot, x in audio.items() if len(x) >= pool.need(slot)}
            audio |= {slot: audio[slot][len(x):] for slot, x in ready.items()}
            outs += pool.step(ready)
        outs += pool.close(a, audio[a]) + pool.close(b, audio[b])
        return torch.cat([o.frames for o in outs if o.stream_id == "a"], 1)

    with torch.no_grad():
        assert_close(stream("triton"), stream("torch"))
    assert len(calls) > 10  # every layer of every step went through the kernel
