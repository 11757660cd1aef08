"""SSMModel rejects bad input with errors that say what was expected and what came."""

import pytest
import torch

from streamssm.errors import ShapeError, StateError
from streamssm.models import ModelConfig, SSMModel


@pytest.fixture(scope="module")
def token_model():
    return SSMModel(ModelConfig(block="mamba2", d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=8,
                                vocab_size=5)).eval()


@pytest.fixture(scope="module")
def value_model():
    return SSMModel(ModelConfig(block="mamba", d_model=16, n_layers=1, d_state=4, input_kind="continuous",
                                input_dim=3, head="regression", output_dim=3)).eval()


def test_token_inputs(token_model):
    with pytest.raises(ShapeError, match="integer tensor"):
        token_model(torch.rand(1, 7))  # floats for a token model
    with pytest.raises(ShapeError, match=r"non-empty time axis \(batch, length, ...\), got \(7,\)"):
        token_model(torch.randint(0, 5, (7,)))  # missing batch dim
    with pytest.raises(ShapeError, match=r"token ids must lie in \[0, 5\)"):
        token_model(torch.tensor([[0, 1, 9]]))


def test_value_inputs(value_model):
    with pytest.raises(ShapeError, match="3 channels"):
        value_model(torch.rand(1, 7, 4))
    with pytest.raises(ShapeError, match="float tensor"):
        value_model(torch.ones(1, 7, 3, dtype=torch.long))


def test_empty_sequence(token_model):
    with pytest.raises(ShapeError, match=r"non-empty time axis .* got \(1, 0\)"):
        token_model(torch.zeros(1, 0, dtype=torch.long))


def test_state_of_another_batch_or_model(token_model, value_model):
    with pytest.raises(StateError, match="for batch 2"):
        token_model(torch.randint(0, 5, (2, 7)), token_model.init_state(3))
    with pytest.raises(StateError, match="layers"):
        token_model(torch.randint(0, 5, (1, 7)), value_model.init_state(1))
    with pytest.raises(StateError):
        token_model.step(torch.randint(0, 5, (2,)), token_model.init_state(1))
