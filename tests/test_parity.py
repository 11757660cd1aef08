"""Full forward == chunked forward carrying state == token-by-token step, for every block type."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamssm.models import ModelConfig, SSMModel
from streamssm.testing import PARITY_FP32, assert_close, assert_states_close, run_in_chunks, run_step_by_step

LENGTH = 23


def tiny_model(block: str, dtype=torch.float32, **overrides) -> SSMModel:
    cfg = dict(block=block, d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=8,
               input_kind="continuous", input_dim=3, head="regression", output_dim=2)
    cfg.update(overrides)
    torch.manual_seed(1)
    return SSMModel(ModelConfig(**cfg)).to(dtype).eval()


@pytest.mark.parametrize("block", ["mamba", "mamba2", "mamba3"])
@given(cuts=st.lists(st.integers(1, LENGTH - 1), max_size=5, unique=True).map(sorted))
def test_full_equals_chunked(block, cuts):
    model = tiny_model(block)
    x = torch.randn(2, LENGTH, 3, generator=torch.Generator().manual_seed(len(cuts)))
    with torch.no_grad():
        full, full_state = model(x)
        chunked, chunked_state = run_in_chunks(model, x, cuts)
    rtol, atol = PARITY_FP32
    assert_close(f"{block} chunked output {cuts}", full, chunked, rtol=rtol, atol=atol)
    assert_states_close(f"{block} chunked", full_state, chunked_state, rtol, atol)


@pytest.mark.parametrize("block", ["mamba", "mamba2", "mamba3"])
@pytest.mark.parametrize("input_kind", ["continuous", "tokens"])
def test_full_equals_step(block, input_kind):
    overrides = {} if input_kind == "continuous" else dict(input_kind="tokens", vocab_size=5, head="lm", output_dim=0)
    model = tiny_model(block, **overrides)
    x = torch.randn(2, LENGTH, 3) if input_kind == "continuous" else torch.randint(0, 5, (2, LENGTH))
    with torch.no_grad():
        full, full_state = model(x)
        stepped, step_state = run_step_by_step(model, x)
    rtol, atol = PARITY_FP32
    assert_close(f"{block} step output", full, stepped, rtol=rtol, atol=atol)
    assert_states_close(f"{block} step", full_state, step_state, rtol, atol)


@pytest.mark.parametrize("block", ["mamba", "mamba2", "mamba3"])
def test_three_modes_agree_in_bf16(block):
    model = tiny_model(block, dtype=torch.bfloat16)
    x = torch.randn(2, LENGTH, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        full, _ = model(x)
        chunked, _ = run_in_chunks(model, x, [5, 6, 17])
        stepped, _ = run_step_by_step(model, x)
    assert_close(f"{block} bf16 chunked", full, chunked, dtype=torch.bfloat16)
    assert_close(f"{block} bf16 step", full, stepped, dtype=torch.bfloat16)


@pytest.mark.parametrize("block", ["mamba", "mamba2", "mamba3"])
def test_parity_catches_a_broken_state(block):
    """The parity check is not vacuous: dropping the SSM state between chunks breaks it."""
    model = tiny_model(block)
    x = torch.randn(1, LENGTH, 3)
    with torch.no_grad():
        full, _ = model(x)
        first, state = model(x[:, :10])
        zeroed = tuple(s._replace(ssm=torch.zeros_like(s.ssm)) for s in state)
        second, _ = model(x[:, 10:], zeroed)
    with pytest.raises(AssertionError):
        assert_close("broken", full, torch.cat([first, second], 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", ["mamba", "mamba2", "mamba3"])
def test_state_size_is_constant(block):
    model = tiny_model(block)
    with torch.no_grad():
        _, short = model(torch.randn(1, 5, 3))
        _, long = model(torch.randn(1, 50, 3))
    assert [t.shape for s in short for t in s] == [t.shape for s in long for t in s]
