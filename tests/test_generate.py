"""generate: seeded reproducibility, top-k/top-p filtering, greedy == argmax rollout."""

from __future__ import annotations

import pytest
import torch

from streamssm.errors import ConfigError, ShapeError
from streamssm.generate import SamplingConfig, filter_logits, generate, sample_next
from streamssm.models import ModelConfig, SSMModel


@pytest.fixture(scope="module")
def model() -> SSMModel:
    torch.manual_seed(0)
    return SSMModel(ModelConfig(block="mamba", d_model=16, n_layers=2, vocab_size=11)).eval()


PROMPT = torch.tensor([1, 4, 2, 7, 3])


def test_seeded_generation_is_reproducible(model):
    cfg = SamplingConfig(temperature=1.0, top_k=5)
    a = generate(model, PROMPT, 12, samples=4, sampling=cfg, seed=3)
    b = generate(model, PROMPT, 12, samples=4, sampling=cfg, seed=3)
    c = generate(model, PROMPT, 12, samples=4, sampling=cfg, seed=4)
    assert a.shape == (4, 12) and torch.equal(a, b) and not torch.equal(a, c)


@torch.no_grad()
def test_greedy_equals_argmax_rollout_through_full_forward(model):
    out = generate(model, PROMPT, 10, samples=2, sampling=SamplingConfig(temperature=0))
    seq = PROMPT.clone()
    for _ in range(10):
        seq = torch.cat([seq, model(seq[None])[0][0, -1].argmax()[None]])
    assert torch.equal(out[0], seq[len(PROMPT):]) and torch.equal(out[1], out[0])


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(filter_logits(logits, SamplingConfig(top_k=2))).tolist() == [[True, True, False, False, False]]
    # 0.4 + 0.3 = 0.7 < 0.8: the nucleus needs the third token too
    assert torch.isfinite(filter_logits(logits, SamplingConfig(top_p=0.8))).tolist() == [[True, True, True, False, False]]
    draws = sample_next(logits.expand(20000, -1), SamplingConfig(top_k=2), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[2:].sum() == 0 and abs(freq[0] - 4 / 7) < 0.02  # renormalized over the top 2


def test_bad_arguments_refused(model):
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ShapeError, match="1-D"):
        generate(model, PROMPT[None], 3)
    regression = SSMModel(ModelConfig(block="mamba", d_model=16, n_layers=1, input_kind="continuous", input_dim=2,
                                      head="regression", output_dim=2))
    with pytest.raises(ConfigError, match="token LM"):
        generate(regression, PROMPT, 3)
