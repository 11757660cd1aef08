"""Token log-probabilities in C (kernels/scores_cpu.py), the CPU Streamer's scores of calls without
full outputs, against log_softmax + gather; the Streamer's dispatch to it."""

import pytest
import torch
import torch.nn.functional as F

import streamssm.kernels.scores_cpu as scores_cpu
from streamssm.inference import Streamer
from streamssm.models import ModelConfig, SSMModel
from streamssm.testing import assert_close

needs_compiler = pytest.mark.skipif(scores_cpu.library() is None, reason="no C++ compiler builds the CPU scores here")


@needs_compiler
@pytest.mark.parametrize("b, t, o, scale", [(2, 9, 256, 3.0), (1, 1, 5, 1.0), (3, 4, 37, 40.0), (2, 0, 16, 1.0)])
def test_token_log_probs_match_log_softmax(b, t, o, scale):
    """Logits read through a (b, t) slice of a longer tensor (the Streamer's y[:, :-1]); classes
    fewer than a vector, not a multiple of one; large logits (the max shift); no steps."""
    g = torch.Generator().manual_seed(b * t * o)
    logits = (torch.randn(b, t + 1, o, generator=g) * scale)[:, :-1]
    tokens = torch.randint(0, o, (b, t + 1), generator=g)[:, 1:]
    got = scores_cpu.token_log_probs_cpu(logits, tokens)
    want = F.log_softmax(logits.double(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    assert got.shape == (b, t) and got.dtype == torch.float32
    assert_close("scores", want.float(), got, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_streamer_scores_only_calls_use_it_with_the_same_scores(monkeypatch):
    """A scores-only Streamer call takes the C scores; they equal those of a call with outputs."""
    calls, fn = [], scores_cpu.token_log_probs_cpu
    monkeypatch.setattr(scores_cpu, "token_log_probs_cpu", lambda a, k: calls.append(tuple(a.shape)) or fn(a, k))
    torch.manual_seed(0)
    model = SSMModel(ModelConfig(input_kind="tokens", vocab_size=40, head="lm", block="mamba2", d_model=16,
                                 n_layers=1, d_state=8, headdim=8, chunk_size=8))
    x = torch.randint(0, 40, (3, 11))
    results = []
    for outputs in (False, True):
        streamer = Streamer(model, capacity=3)
        ids = [streamer.open() for _ in range(3)]
        results.append(streamer.launch_stacked(ids, x, outputs=outputs).result())
    assert calls == [(3, 10, 40)]
    assert_close("scores", torch.as_tensor(results[1].scores), torch.as_tensor(results[0].scores), rtol=1e-5, atol=1e-5)
