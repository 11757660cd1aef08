"""Autoregressive sampling from a token LM (:class:`SSMModel` with an ``lm`` head).

The prompt is prefilled through the chunked forward (one call, carrying the recurrent state),
once (batch 1; its state then copied to every sample), then every new token is one ``step`` of the
whole batch of samples: the cost per token is constant, whatever the length so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamssm.errors import ConfigError, ShapeError
from streamssm.models import SSMModel
from streamssm.state import select_streams


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (argmax); top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self}")


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits (b, v) -> (b, v) scaled by 1/temperature, -inf outside the top-k / top-p nucleus."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (b, v) -> token ids (b,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: SSMModel, prompt: torch.Tensor, length: int, samples: int = 1,
             sampling: SamplingConfig = SamplingConfig(), seed: int | None = None) -> torch.Tensor:
    """prompt (l,) token ids -> (samples, length) new token ids (the prompt not repeated).

    ``seed`` makes the draw reproducible (a generator on the model's device)."""
    if model.cfg.input_kind != "tokens" or model.cfg.head != "lm":
        raise ConfigError(f"generate needs a token LM, got input_kind={model.cfg.input_kind!r} head={model.cfg.head!r}")
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise ShapeError(f"prompt must be a non-empty 1-D tensor of token ids, got shape {tuple(prompt.shape)}")
    if length <= 0 or samples <= 0:
        raise ConfigError(f"length and samples must be positive, got {length}, {samples}")
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    model = model.eval()
    logits, state = model(prompt.to(device).long()[None])
    rows = torch.zeros(samples, dtype=torch.long, device=device)
    state = select_streams(state, rows)
    tokens = torch.empty(samples, length, dtype=torch.long, device=device)
    nxt = sample_next(logits[:, -1].expand(samples, -1), sampling, generator)
    for t in range(length):
        tokens[:, t] = nxt
        if t + 1 < length:
            step_logits, state = model.step(nxt, state)
            nxt = sample_next(step_logits, sampling, generator)
    return tokens
