"""The streaming encoder against the masked offline reference, the plain offline model, and itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from streaming_reference import masked_reference

from streamwavlm.audio.queue import SampleQueue
from streamwavlm.checkpoint import load_model
from streamwavlm.streaming import NormPolicy, StreamPool, StreamSettings, stream_audio


def feed(pool: StreamPool, slot: int, queue: SampleQueue, samples) -> list:
    """Queue ``samples`` and run every whole step the queue holds."""
    queue.put(np.asarray(samples, dtype=np.float32))
    outs = []
    while len(queue) >= pool.need(slot):
        outs += pool.step({slot: queue.take(pool.need(slot))})
    return outs


def stream_all(pool: StreamPool, wav: torch.Tensor, sizes, slot: int | None = None):
    """Hand ``wav`` over in pieces of the given sizes (cycled), stepping as audio allows; then close."""
    slot = pool.open("s") if slot is None else slot
    queue = SampleQueue()
    outs, pos, i = [], 0, 0
    while pos < wav.numel():
        n = sizes[i % len(sizes)]
        outs += feed(pool, slot, queue, wav[pos:pos + n])
        pos += n
        i += 1
    return outs + pool.close(slot, queue.take(len(queue)))


def frames_of(outs, row: int = 0) -> torch.Tensor:
    first = 0
    for o in outs:
        assert o.first_frame == first, "chunks must be contiguous"
        first += o.num_frames
    return torch.cat([o.frames[row] for o in outs])


@pytest.fixture(scope="module")
def models(hf_models):
    return {k: load_model(d) for k, (_, d) in hf_models.items()}


@pytest.mark.parametrize("kind", ["base", "large"])
@pytest.mark.parametrize("chunk,left,lookahead", [(4, 8, 0), (8, 20, 3), (5, 100, 12), (16, 4, 63)])
def test_incremental_equals_masked_offline_reference(models, speech, kind, chunk, left, lookahead):
    model = models[kind]
    wav = speech[:23000]
    layers = tuple(range(model.cfg.num_layers + 1))
    s = StreamSettings(chunk=chunk, left=left, lookahead=lookahead, layers=layers, final_norm=False)
    outs = stream_all(StreamPool(model, s), wav, [1234])
    ref = masked_reference(model, wav, s)
    assert outs[-1].final
    for row, layer in enumerate(layers):
        got = frames_of(outs, row)
        assert got.shape == ref.hidden_states[layer][0].shape
        err = (got - ref.hidden_states[layer][0]).abs().max().item()
        assert err < 1e-4, f"layer {layer}: {err:.2e}"


@pytest.mark.parametrize("policy", [NormPolicy.RUNNING, NormPolicy.FROZEN])
def test_normalisation_policies_match_their_reference(models, hf_models, speech, tmp_path, policy):
    from conftest import save_hf_model

    large_norm = load_model(save_hf_model(hf_models["large"][0], tmp_path / "n", normalize=True))
    for model in (models["base"], large_norm):
        s = StreamSettings(chunk=6, left=30, lookahead=2, norm=policy, warmup=0.5, final_norm=False)
        wav = speech[:20000] + 0.01
        got = frames_of(stream_all(StreamPool(model, s), wav, [3000]))
        ref = masked_reference(model, wav, s).hidden_states[-1][0]
        assert (got - ref).abs().max() < 1e-4


@pytest.mark.parametrize("sizes", [[1], [7], [333], [16000], [5, 900, 1, 77, 4000]])
def test_cnn_frames_equal_offline_for_any_push_size(models, speech, sizes):
    model = models["large"]  # per-frame LayerNorm CNN: exact, no statistics involved
    wav = speech[:9000] if sizes == [1] else speech
    s = StreamSettings(chunk=3, left=10, layers=(0,), final_norm=False)
    got = frames_of(stream_all(StreamPool(model, s), wav, sizes))
    ref = masked_reference(model, wav, s).hidden_states[0][0]
    assert (got - ref).abs().max() < 1e-5
    with torch.no_grad():  # and the CNN itself against the offline CNN over the whole utterance
        whole = model.cnn(wav[None])[0]
    pool = StreamPool(model, s)
    slot = pool.open("s")
    cnn = []
    orig = model.frontend.forward
    model.frontend.forward = lambda w, st=None: cnn.append(orig(w, st)) or cnn[-1]
    try:
        stream_all(pool, wav, sizes, slot)
    finally:
        model.frontend.forward = orig
    assert (torch.cat(cnn, 1)[0] - whole).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["base", "large"])
def test_whole_stream_in_one_chunk_equals_offline(models, speech, kind):
    model = models[kind]
    wav = speech[: 320 * 60 + 80]
    t = model.cfg.num_frames(wav.numel())
    s = StreamSettings(chunk=t + 5, left=t + 5, lookahead=63, layers=tuple(range(model.cfg.num_layers + 1)),
                       final_norm=False)
    outs = stream_all(StreamPool(model, s), wav, [500])
    with torch.no_grad():
        ref = model(wav[None])
    for row in range(model.cfg.num_layers + 1):
        assert (frames_of(outs, row) - ref.hidden_states[row][0]).abs().max() < 1e-4


def test_batched_streams_equal_solo_streams(models, speech):
    model = models["base"]
    s = StreamSettings(chunk=4, left=12, lookahead=2)
    wavs = [speech[:15000], speech[3000:20000] * 0.5, speech[7000:30000]]
    solo = [frames_of(stream_all(StreamPool(model, s), w, [640])) for w in wavs]
    pool = StreamPool(model, s, capacity=6)
    for filler in range(6):
        pool.open(f"filler{filler}")
    for free in (0, 2, 5):  # the streams sit in scattered slots, with busy slots between them
        pool.discard(free)
    for got, ref in zip(run_joining_streams(pool, wavs), solo, strict=True):
        assert (got - ref).abs().max() < 1e-5


def run_joining_streams(pool: StreamPool, wavs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Streams that join and end at different ticks, so consecutive steps have different batch sizes."""
    slots = [pool.open(f"s{i}") for i in range(len(wavs))]
    queues = {slot: SampleQueue() for slot in slots}
    got: dict[int, list] = {slot: [] for slot in slots}
    offsets = [0] * len(wavs)
    for tick in range(60):
        for j, slot in enumerate(slots):
            if tick >= 3 * j and offsets[j] < wavs[j].numel():
                queues[slot].put(wavs[j][offsets[j]:offsets[j] + 640].cpu().numpy())
                offsets[j] += 640
        ready = {slot: q.take(pool.need(slot)) for slot, q in queues.items() if len(q) >= pool.need(slot)}
        for o in pool.step(ready):
            got[pool.slot_of(o.stream_id)].append(o)
    for slot in slots:
        got[slot] += pool.close(slot, queues[slot].take(len(queues[slot])))
    return [frames_of(got[slot]).cpu() for slot in slots]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["base", "large"])
def test_cuda_graph_steps_equal_eager_steps(hf_models, kind):
    model = load_model(hf_models[kind][1]).to("cuda")
    s = StreamSettings(chunk=4, left=12, lookahead=2)
    noise = torch.randn(30000, generator=torch.Generator().manual_seed(0)) * 0.1  # no sound files on GPU hosts
    wavs = [noise[:15000], noise[3000:20000] * 0.5, noise[7000:30000]]
    eager = run_joining_streams(StreamPool(model, s, capacity=4, cuda_graphs=False), wavs)
    pool = StreamPool(model, s, capacity=4)  # graphs by default on a GPU
    graphed = run_joining_streams(pool, wavs)
    assert pool._graphs is not None and pool._graphs.captured >= 3  # batch sizes 1, 2 and 3 replayed
    for a, b in zip(eager, graphed, strict=True):
        assert (a - b).abs().max() < 1e-5


def test_cuda_graphs_need_a_cuda_model(models):
    with pytest.raises(ValueError, match="CUDA device"):
        StreamPool(models["base"], StreamSettings(chunk=4, left=12), cuda_graphs=True)


def test_save_restore_equals_uninterrupted(models, speech):
    model = models["large"]
    s = StreamSettings(chunk=4, left=10, lookahead=5)
    wav = speech[:20000]
    full = frames_of(stream_all(StreamPool(model, s), wav, [1000]))
    pool = StreamPool(model, s)
    slot = pool.open("s")
    queue = SampleQueue()
    outs = feed(pool, slot, queue, wav[:9000])
    state, kept = pool.save(slot), queue.take(len(queue))
    feed(pool, slot, SampleQueue(), torch.randn(5000))  # diverge, then go back
    other = StreamPool(model, s, capacity=2)
    other.open("someone-else")
    moved = other.open("placeholder")
    other.close(moved)
    other.restore(moved, state)
    queue = SampleQueue()
    queue.put(kept)
    outs += feed(other, moved, queue, wav[9000:]) + other.close(moved, queue.take(len(queue)))
    assert (frames_of(outs) - full).abs().max() < 1e-6


def test_reset_starts_over(models, speech):
    model = models["base"]
    s = StreamSettings(chunk=4, left=10)
    pool = StreamPool(model, s)
    slot = pool.open("s")
    feed(pool, slot, SampleQueue(), speech[:5000])
    pool.reset(slot)
    first = frames_of(stream_all(pool, speech[:8000], [800], slot))
    again = frames_of(stream_all(StreamPool(model, s), speech[:8000], [800]))
    assert torch.equal(first, again)


def test_cache_rings_hold_the_last_frames_over_many_wraps(models):
    """After many wraps each layer's ring holds exactly the keys and values of the last L + C frames
    (recomputed from the masked offline reference's layer inputs), each at entry ``frame % (L + C)``."""
    model = models["large"]
    s = StreamSettings(chunk=8, left=24)
    ring = s.left + s.chunk
    pool = StreamPool(model, s)
    slot = pool.open("long")
    rings = pool._state.rings
    storage = [t.data_ptr() for t in rings.keys + rings.values]
    rng = np.random.default_rng(0)
    wav = torch.from_numpy(rng.standard_normal(16000 * 6).astype(np.float32) * 0.1)
    queue = SampleQueue()
    frames = sum(o.num_frames for o in feed(pool, slot, queue, wav))
    assert frames == 296 and frames > 7 * ring  # the ring wrapped more than 7 times
    ref = masked_reference(model, wav[:pool.cfg.receptive_field - pool.cfg.hop + frames * pool.cfg.hop], s)
    positions = rings.positions[slot]
    assert sorted(positions.tolist()) == list(range(frames - ring, frames))
    assert torch.equal(positions % ring, torch.arange(ring))
    for i, layer in enumerate(model.encoder.layers):
        x = ref.hidden_states[i][0, :frames]
        with torch.no_grad():
            _, k, v, _ = layer.attn.project(layer.attn_norm(x[None]) if layer.pre_norm else x[None])
        for cache, expected in ((rings.keys[i], k), (rings.values[i], v)):
            err = (cache[slot][:, positions % ring] - expected[0][:, positions]).abs().max()
            assert err < 1e-4, f"layer {i}: {err:.2e}"
    assert [t.data_ptr() for t in rings.keys + rings.values] == storage  # written in place, never regrown


def test_bad_steps_are_refused_and_stream_continues(models, speech):
    from streamwavlm.audio.validate import AudioError

    model = models["base"]
    s = StreamSettings(chunk=4, left=8)
    pool = StreamPool(model, s)
    slot = pool.open("s")
    need = pool.need(slot)
    with pytest.raises(ValueError, match=f"exactly {need} samples"):
        pool.step({slot: speech[:need - 1]})
    with pytest.raises(ValueError, match="1-D float32"):
        pool.step({slot: speech[:need].double()})
    with pytest.raises(ValueError, match="1-D float32"):
        pool.step({slot: torch.zeros(need, 2)})
    bad = speech[3000:4000].clone()
    bad[10] = float("nan")
    with pytest.raises(AudioError, match="NaN"):  # validated where it enters
        stream_audio(StreamPool(model, s), bad)
    got = frames_of(stream_all(pool, speech[:9000], [9000], slot))
    ref = frames_of(stream_audio(StreamPool(model, s), speech[:9000]))
    assert torch.equal(got, ref)


def test_closing_with_queued_steps_equals_stepping_then_flushing(models, speech):
    """close() with several whole steps still pending runs them as ordinary steps (docs/streaming.md rule 6)."""
    model = models["base"]
    s = StreamSettings(chunk=4, left=8, lookahead=3)
    wav = speech[:20000]
    stepped = frames_of(stream_all(StreamPool(model, s), wav, [500]))
    pool = StreamPool(model, s)
    slot = pool.open("late")
    need = pool.need(slot)
    outs = pool.step({slot: wav[:need]}) + pool.close(slot, wav[need:])  # one step, then everything at once
    assert torch.equal(frames_of(outs), stepped)


def test_settings_are_validated(models):
    with pytest.raises(ValueError, match="lookahead"):
        StreamPool(models["base"], StreamSettings(lookahead=64))
    with pytest.raises(ValueError, match="speaker head"):
        from streamwavlm.streaming import XVectorSettings

        StreamPool(models["base"], StreamSettings(xvector=XVectorSettings()))
    assert StreamSettings(chunk=16, lookahead=0).latency_ms(models["base"].cfg) == 16 * 20 + 25


@pytest.mark.parametrize("window,hop", [(20, 10), (30, 7)])
def test_streaming_xvectors_equal_pooling_the_reference(tmp_path, speech, window, hop):
    """Each x-vector equals the head applied to the masked-offline hidden states over the same window."""
    from conftest import perturb_, save_hf_model, tiny_hf_config
    from transformers import WavLMForXVector

    from streamwavlm.streaming import XVectorSettings

    cfg = tiny_hf_config("base", use_weighted_layer_sum=True, tdnn_dim=(24, 24, 24, 24, 48),
                         xvector_output_dim=16)
    model = load_model(save_hf_model(perturb_(WavLMForXVector(cfg), seed=9), tmp_path / "sv"))
    s = StreamSettings(chunk=6, left=24, lookahead=4, xvector=XVectorSettings(window=window, hop=hop))
    wav = speech[:26000]
    outs = stream_all(StreamPool(model, s), wav, [2000])
    got = [xv for o in outs for xv in o.xvectors]
    ref = masked_reference(model, wav, s)
    head = model.xvector
    with torch.no_grad():
        tdnn = head.tdnn_frames(head.frame_input(ref.hidden_states))[0]  # TDNN frame j ends at frame j+14
    lag = model.cfg.xvector.receptive_field - 1
    n = tdnn.shape[0]
    ends = [*range(hop, n + 1, hop)]
    if ends[-1] != n:
        ends.append(n)
    assert [e for e, _ in got] == [e + lag for e in ends]
    for (_, emb), e in zip(got, ends, strict=True):
        with torch.no_grad():
            expected = head.pool(tdnn[max(0, e - window):e][None])[0]
        assert torch.nn.functional.cosine_similarity(emb, expected, dim=0) > 0.9999
        assert (emb - expected).abs().max() < 1e-4


@pytest.mark.heavy
def test_an_hour_of_audio_keeps_a_flat_footprint(models):
    """One hour through a tiny model: resident memory after the first minutes stays flat to the end."""
    from pathlib import Path

    def rss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    model = models["base"]
    pool = StreamPool(model, StreamSettings(chunk=50, left=250, lookahead=8))
    slot = pool.open("hour")
    queue = SampleQueue()
    rng = np.random.default_rng(0)
    block = rng.standard_normal(16000 * 10).astype(np.float32) * 0.1
    frames, marks = 0, []
    for minute in range(60):
        for _ in range(6):
            frames += sum(o.num_frames for o in feed(pool, slot, queue, block))
        if minute in (5, 59):
            marks.append(rss_mb())
    assert frames >= 3600 * 50 - 100
    assert marks[1] - marks[0] < 20, marks


def test_a_graph_replay_is_checked_against_its_eager_step():
    from streamwavlm.streaming.graphs import _mismatch

    eager = [torch.randn(2, 4, 8), torch.randn(2, 4, 8)]
    assert _mismatch([t.clone() for t in eager], eager) is None
    assert _mismatch([eager[0].half(), eager[1].half()], eager) is None  # rounding of a half replay
    off = [eager[0].clone(), eager[1].clone()]
    off[1][1, 2, 3] += 0.1
    assert "hidden state 1" in (_mismatch(off, eager) or "")
