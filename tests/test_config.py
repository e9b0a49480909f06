"""Layered config: defaults < method preset < JSON file < --set overrides; bad fields are named."""

from __future__ import annotations

import json

import pytest

from sa2crq.config import TokenizerConfig, load_tokenizer_config


def test_presets_differ_where_the_methods_do():
    assert TokenizerConfig.for_method("sa2crq").quantizer == "acrq"
    assert TokenizerConfig.for_method("sa2crq-no-sarq").sid.adaptive_length is False
    assert TokenizerConfig.for_method("sa2crq-no-acrq").quantizer == "rqvae"
    tiger = TokenizerConfig.for_method("tiger")
    assert (tiger.rqvae.levels, tiger.rqvae.codebook_size, tiger.sid.always_digit) == (3, 256, True)
    assert TokenizerConfig.for_method("rqkmeans").quantizer == "rqkmeans"


def test_file_then_assignments_take_precedence(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rqvae": {"epochs": 7, "codebook_size": 64}, "sid": {"max_bucket": 8}}))
    config = load_tokenizer_config("tiger", path, ["rqvae.epochs=3", "sid.tau=9.5"])
    assert config.rqvae.epochs == 3  # command line beats file
    assert config.rqvae.codebook_size == 64  # file beats preset default
    assert config.rqvae.levels == 3  # preset kept where nothing overrides it
    assert config.sid.max_bucket == 8 and config.sid.tau == 9.5


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="rqvae.epoch"):
        TokenizerConfig().with_overrides({"rqvae.epoch": 3})
    with pytest.raises(ValueError, match="unknown config field"):
        TokenizerConfig().with_overrides({"nonsense": 1})


@pytest.mark.parametrize(
    "override, message",
    [
        ({"rqvae.levels": 0}, "rqvae.levels"),
        ({"sid.min_length": 9}, "sid.min_length"),
        ({"segments.head_fraction": 0.9, "segments.torso_fraction": 0.3}, "at most 1"),
        ({"acrq.gate_quantile": 1.5}, "acrq.gate_quantile"),
        ({"rqvae.nested_weights": [1.0, 2.0]}, "nested_weights"),
        ({"sid.epsilon": 0.5}, "sid.epsilon"),
    ],
)
def test_bad_values_fail_where_given(override, message):
    with pytest.raises(ValueError, match=message):
        TokenizerConfig().with_overrides(override)


def test_round_trips_through_a_dict():
    config = TokenizerConfig.for_method("tiger").with_overrides({"rqvae.hidden_dims": [64, 32]})
    assert TokenizerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
