"""ModelState helpers: size, stream selection/write-back, safetensors round trip, bad bytes."""

import pytest
import torch

from streamssm.errors import StateError
from streamssm.models import ModelConfig, SSMModel
from streamssm.state import (
    LayerState,
    select_streams,
    state_from_bytes,
    state_nbytes,
    state_to_bytes,
    write_streams,
)


def random_state(batch: int, layers: int = 2) -> tuple[LayerState, ...]:
    return tuple(LayerState(torch.randn(batch, 6, 3), torch.randn(batch, 2, 4, 5)) for _ in range(layers))


def test_nbytes_counts_every_tensor():
    state = random_state(3)
    assert state_nbytes(state) == 2 * 3 * (6 * 3 + 2 * 4 * 5) * 4


def test_select_then_write_back_touches_only_those_rows():
    pool = random_state(5)
    before = tuple(LayerState(*(t.clone() for t in layer)) for layer in pool)
    index = torch.tensor([3, 1])
    picked = select_streams(pool, index)
    assert picked[0].conv.shape[0] == 2 and torch.equal(picked[1].ssm[0], pool[1].ssm[3])
    write_streams(pool, index, tuple(LayerState(c + 1, s + 1) for c, s in picked))
    for layer, old in zip(pool, before):
        for new_t, old_t in zip(layer, old):
            assert torch.equal(new_t[index], old_t[index] + 1)
            assert torch.equal(new_t[[0, 2, 4]], old_t[[0, 2, 4]])


def test_bytes_round_trip_is_exact():
    state = random_state(2, layers=3)
    back = state_from_bytes(state_to_bytes(state, {"stream": "7"}))
    assert len(back) == 3
    for layer, other in zip(state, back):
        for a, b in zip(layer, other):
            assert torch.equal(a, b)


def test_equal_states_give_equal_bytes():
    """Snapshots and resume records can be compared and deduplicated by their bytes (safetensors
    alone writes its header maps in hash order)."""
    state = random_state(2, layers=3)
    meta = {f"key{i}": str(i) for i in range(8)}
    blobs = {state_to_bytes(state, meta) for _ in range(10)}
    blobs.add(state_to_bytes(tuple(LayerState(*(t.clone() for t in layer)) for layer in state),
                             dict(reversed(meta.items()))))
    assert len(blobs) == 1
    blob = blobs.pop()
    assert int.from_bytes(blob[:8], "little") % 8 == 0
    back = state_from_bytes(blob)
    assert all(torch.equal(a, b) for layer, other in zip(state, back) for a, b in zip(layer, other))


@pytest.mark.parametrize("blob", [b"", b"not safetensors at all", b"\x00" * 64])
def test_malformed_bytes_raise_state_error(blob):
    with pytest.raises(StateError, match="safetensors"):
        state_from_bytes(blob)


def test_model_state_size_is_independent_of_stream_length():
    model = SSMModel(ModelConfig(block="mamba2", d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=8,
                                 vocab_size=5)).eval()
    with torch.no_grad():
        _, short = model(torch.randint(0, 5, (1, 5)))
        _, long = model(torch.randint(0, 5, (1, 500)))
    assert state_nbytes(short) == state_nbytes(long) == state_nbytes(model.init_state(1))
