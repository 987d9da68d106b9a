"""Configs from both formats describe the same model; bad configs name the key."""

from __future__ import annotations

import pytest

from streamwavlm.config import ConfigError, WavLMConfig, parse_conv_layers


def test_conv_layer_string_of_released_models():
    layers = parse_conv_layers("[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2")
    cfg = WavLMConfig(conv_layers=layers)
    assert cfg.hop == 320 and cfg.receptive_field == 400
    assert [cfg.num_frames(n) for n in (399, 400, 16000, 16080)] == [0, 1, 49, 50]


@pytest.mark.parametrize("spec", ["__import__('os').system('true')", "[(512,10,5)] - [1]", "[(1,2)]", "(("])
def test_conv_layer_string_is_never_executed(spec):
    with pytest.raises(ConfigError, match="conv_feature_layers"):
        parse_conv_layers(spec)


def test_original_and_hf_configs_agree():
    large = {"extractor_mode": "layer_norm", "layer_norm_first": True, "encoder_layers": 24,
             "encoder_embed_dim": 1024, "encoder_ffn_embed_dim": 4096, "encoder_attention_heads": 16,
             "relative_position_embedding": True, "gru_rel_pos": True, "max_distance": 800, "normalize": True}
    a = WavLMConfig.from_original(large)
    hf, pre = a.to_hf()
    b = WavLMConfig.from_hf(hf, pre)
    assert a == b.replace(normalize_eps=1e-5)
    assert WavLMConfig.from_original(a.to_original()) == a


def test_unilm_defaults_are_not_wavlm():
    with pytest.raises(ConfigError, match="relative_position_embedding"):
        WavLMConfig.from_original({})


@pytest.mark.parametrize("bad, key", [
    ({"feat_extract_norm": "batch"}, "feat_extract_norm"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"hidden_size": 100, "num_attention_heads": 12}, "encoder_attention_heads"),
    ({"conv_dim": [512], "conv_kernel": [10, 3], "conv_stride": [5]}, "differ in length"),
])
def test_hf_config_errors_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=key):
        WavLMConfig.from_hf(bad)
