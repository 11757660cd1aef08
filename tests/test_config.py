"""ModelConfig validation collects every problem and names the field."""

import pytest

from streamssm.errors import ConfigError
from streamssm.models import ModelConfig


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        ModelConfig(block="lstm", d_model=0, d_conv=7, vocab_size=0)
    message = str(info.value)
    for needle in ("block must be", "d_model must be positive", "d_conv must be 2..4", "vocab_size > 0"):
        assert needle in message


def test_headdim_must_divide_inner_width():
    with pytest.raises(ConfigError, match="divisible by headdim"):
        ModelConfig(block="mamba2", d_model=20, headdim=16, vocab_size=4)


def test_round_trip_and_unknown_keys():
    cfg = ModelConfig(block="mamba", vocab_size=5)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown ModelConfig keys \\['colour'\\]"):
        ModelConfig.from_dict(cfg.to_dict() | {"colour": "red"})


def test_defaults_resolve_per_block():
    assert ModelConfig(block="mamba", vocab_size=5).resolved_d_state == 16
    assert ModelConfig(block="mamba2", vocab_size=5).resolved_d_state == 64
    assert ModelConfig(vocab_size=5).resolved_output_dim == 5
