"""ModelConfig / ArchConfig: validation collects every problem and names the field; blocks are
built from the config (old flat checkpoint configs: tests/test_checkpoint.py)."""

import dataclasses

import pytest

from streamssm.errors import ConfigError
from streamssm.layers import Mamba2Block, Mamba3Block, MambaBlock
from streamssm.models import ArchConfig, ModelConfig


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


def test_heads_must_divide_into_groups():
    """Checked by the config (once), not only when a block is built."""
    with pytest.raises(ConfigError, match="divisible by ngroups=3"):
        ArchConfig(block="mamba3", d_model=32, headdim=16, ngroups=3)


def test_architecture_is_declared_once_and_splits_off():
    arch = ArchConfig(block="mamba", d_model=24, dt_rank=3)
    cfg = ModelConfig.of(arch, vocab_size=5)
    assert cfg.arch == arch and (cfg.d_model, cfg.vocab_size, cfg.resolved_dt_rank) == (24, 5, 3)
    arch_fields = {f.name for f in dataclasses.fields(ArchConfig)}
    assert set(cfg.to_dict()) - arch_fields == {"input_kind", "vocab_size", "input_dim", "head", "output_dim"}
    assert ArchConfig.from_dict(arch.to_dict()) == arch
    assert ModelConfig.of(cfg, vocab_size=7).vocab_size == 7  # of() takes only the architecture of a ModelConfig
    with pytest.raises(ConfigError, match="invalid ArchConfig: d_model must be positive"):
        ArchConfig(d_model=-1)


def test_blocks_are_built_from_the_config():
    arch = ArchConfig(d_model=16, d_state=8, headdim=8, ngroups=2, chunk_size=8, norm_eps=1e-3)
    block = Mamba2Block(arch)
    assert (block.nheads, block.ngroups, block.d_state, block.chunk_size, block.norm.eps) == (4, 2, 8, 8, 1e-3)
    assert MambaBlock(dataclasses.replace(arch, block="mamba")).dt_rank == 1  # ceil(16 / 16)
    assert Mamba3Block(dataclasses.replace(arch, block="mamba3")).init_state(2).ssm.shape == (2, 4, 8, 8)



def test_norm_groups_is_checked_and_reaches_the_mamba2_norm():
    with pytest.raises(ConfigError, match="expand\\*d_model=32 must be divisible by norm_groups=3"):
        ArchConfig(d_model=16, headdim=8, norm_groups=3)
    with pytest.raises(ConfigError, match="norm_groups=2 applies to block='mamba2' only"):
        ArchConfig(block="mamba", d_model=16, norm_groups=2)
    with pytest.raises(ConfigError, match="norm_groups must be positive"):
        ArchConfig(norm_groups=0)
    assert Mamba2Block(ArchConfig(d_model=16, headdim=8, ngroups=2, norm_groups=2)).norm.groups == 2
    assert Mamba2Block(ArchConfig(d_model=16, headdim=8, ngroups=2)).norm.groups == 1  # today's models unchanged
    grouped = ArchConfig(d_model=16, headdim=8, ngroups=2, norm_groups=2)
    assert ArchConfig.from_dict(grouped.to_dict()) == grouped
    assert "norm_groups" not in ArchConfig().to_dict()  # saved configs (and fingerprints) of today's models stay
