"""Our offline model against transformers' WavLMModel / WavLMForXVector with random weights."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_, save_hf_model, tiny_hf_config

from streamwavlm.checkpoint import load_model

TOL = 1e-4


def _compare(ref_states, our_states, valid=None):
    assert len(ref_states) == len(our_states)
    for i, (a, b) in enumerate(zip(ref_states, our_states, strict=True)):
        if valid is not None:
            a, b = a[valid], b[valid]
        err = (a - b).abs().max().item()
        assert err < TOL, f"hidden state {i}: max abs diff {err:.2e}"


@pytest.mark.parametrize("kind", ["base", "large"])
def test_single_utterance_matches_transformers(hf_models, speech, kind):
    ref_model, directory = hf_models[kind]
    ours = load_model(directory)
    with torch.no_grad():
        ref = ref_model(speech[None], output_hidden_states=True)
        out = ours(speech[None])
    _compare(ref.hidden_states, out.hidden_states)
    assert (ref.last_hidden_state - out.last_hidden_state).abs().max() < TOL
    if kind == "large":  # transformers 5.x: hidden_states[-1] lacks the final LN, last_hidden_state has it
        assert (out.hidden_states[-1] - out.last_hidden_state).abs().max() > 1e-2
        assert out.layers("hf4")[-1] is out.last_hidden_state


@pytest.mark.parametrize("kind", ["base", "large"])
def test_padded_batch_matches_transformers(hf_models, speech, kind):
    ref_model, directory = hf_models[kind]
    ours = load_model(directory)
    lengths = torch.tensor([32000, 20000, 9123])
    wav = torch.zeros(3, 32000)
    for i, n in enumerate(lengths):
        wav[i, :n] = speech[:n] * (1 + i)
    mask = (torch.arange(32000)[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = ref_model(wav, attention_mask=mask, output_hidden_states=True)
        out = ours(wav, lengths)
    t = out.hidden_states[0].shape[1]
    valid = torch.arange(t)[None] < out.frame_lengths[:, None]
    assert out.frame_lengths.tolist() == [ours.cfg.num_frames(int(n)) for n in lengths]
    _compare(ref.hidden_states, out.hidden_states, valid)


def test_waveform_normalisation_matches_feature_extractor(hf_models, speech, tmp_path):
    """Large-type checkpoints expect normalised audio; an HF directory asks for it with eps 1e-7."""
    from transformers import Wav2Vec2FeatureExtractor

    ref_model, _ = hf_models["large"]
    ours = load_model(save_hf_model(ref_model, tmp_path / "norm", normalize=True))
    assert ours.cfg.normalize and ours.cfg.normalize_eps == 1e-7
    wav = speech * 0.01 + 0.002  # quiet and with DC, where eps and the mean matter
    fe = Wav2Vec2FeatureExtractor(do_normalize=True, feature_size=1, sampling_rate=16000, padding_value=0.0)
    x = fe(wav.numpy(), sampling_rate=16000, return_tensors="pt").input_values
    with torch.no_grad():
        ref = ref_model(x, output_hidden_states=True)
        out = ours(wav[None])
    _compare(ref.hidden_states, out.hidden_states)


def test_full_base_size_matches_transformers(tmp_path, speech):
    """The real Base geometry (12 x 768, 12 heads, 512-channel CNN) at least once."""
    from transformers import WavLMConfig as HFConfig
    from transformers import WavLMModel

    torch.manual_seed(3)
    ref_model = perturb_(WavLMModel(HFConfig()), seed=3, scale=0.02)
    ours = load_model(save_hf_model(ref_model, tmp_path / "base"))
    # ours drops the training-only mask embedding (768) and folds the weight norm's g (128 taps) into W
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref_model.parameters()) - 896
    with torch.no_grad():
        ref = ref_model(speech[None, :24000], output_hidden_states=True)
        out = ours(speech[None, :24000])
    _compare(ref.hidden_states, out.hidden_states)


def test_long_input_front_end_in_blocks_matches(hf_models):
    """Inputs longer than one front-end block go through the CNN block by block with two-pass GroupNorm
    statistics; the result still matches transformers' single pass."""
    from streamwavlm.model import wavlm as wavlm_module

    ref_model, directory = hf_models["base"]
    ours = load_model(directory)
    wav = torch.randn(1, 16000 * 3) * 0.1
    with torch.no_grad():
        ref = ref_model(wav, output_hidden_states=True)
        whole = ours.cnn(wav, block_frames=10**6)  # one pass, GroupNorm over the tensor itself
        blocked = ours.cnn(wav, block_frames=40)
        out = ours(wav)  # blocks of FRONTEND_BLOCK_FRAMES
    assert ours.cfg.num_frames(wav.shape[1]) > wavlm_module.FRONTEND_BLOCK_FRAMES
    assert blocked.shape == whole.shape
    assert (blocked - whole).abs().max() < 1e-5
    _compare(ref.hidden_states, out.hidden_states)


@pytest.mark.parametrize("weighted", [True, False])
def test_xvector_matches_transformers(tmp_path, speech, weighted):
    from transformers import WavLMForXVector

    cfg = tiny_hf_config("base", use_weighted_layer_sum=weighted, tdnn_dim=(48, 48, 48, 48, 96),
                         xvector_output_dim=40, num_labels=7)
    torch.manual_seed(5)
    ref_model = perturb_(WavLMForXVector(cfg), seed=5, scale=0.05)
    ours = load_model(save_hf_model(ref_model, tmp_path / "sv"))
    assert ours.xvector is not None
    with torch.no_grad():
        ref = ref_model(speech[None]).embeddings
        ours_emb = ours.xvector_embedding(ours(speech[None]))
    cos = torch.nn.functional.cosine_similarity(ref, ours_emb).item()
    assert cos >= 0.9999, cos
    assert (ref - ours_emb).abs().max() < 1e-3


def test_xvector_padded_batch_equals_single(tmp_path, speech):
    """Pooling reads only frames made from valid samples (transformers lets 6 padded TDNN frames in)."""
    from transformers import WavLMForXVector

    cfg = tiny_hf_config("base", use_weighted_layer_sum=True, tdnn_dim=(48, 48, 48, 48, 96),
                         xvector_output_dim=40)
    ref_model = perturb_(WavLMForXVector(cfg), seed=6, scale=0.05)
    ours = load_model(save_hf_model(ref_model, tmp_path / "sv"))
    short = speech[:20000]
    wav = torch.zeros(2, 32000)
    wav[0] = speech
    wav[1, :20000] = short
    with torch.no_grad():
        batch = ours.xvector_embedding(ours(wav, torch.tensor([32000, 20000])))
        alone = ours.xvector_embedding(ours(short[None]))
    # GroupNorm statistics include the padding (as in the reference), so equality is approximate
    assert torch.nn.functional.cosine_similarity(batch[1:], alone).item() > 0.99
