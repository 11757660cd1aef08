"""Generation from every kind of model streamssm trains, the recurrent state carried throughout.

Shape legend: l prompt / history steps, n samples (or streams), t new steps, v vocabulary,
c input channels, o outputs per step (regression: horizon x c).

- Token LMs (DNA bases, mu-law audio, any vocabulary):
  :func:`generate` (model level): the prompt is prefilled through the chunked forward once (batch 1;
  the head only at its last position), its state copied to every sample, then every new token is
  one ``step`` of the whole batch: constant cost per token, whatever the length so far.
  :func:`generate_streams` (Streamer level): the same loop through a
  :class:`~streamssm.inference.Streamer`'s batched engine (one ``feed_many`` per new token: the
  pool step, the captured CUDA step where the Streamer has one); one stream per prompt.
  Sampling: temperature / top-k / top-p (:class:`SamplingConfig`) and a seed.
- Continuous regression models (sensors, float audio): :func:`rollout` feeds the model its own
  next-step predictions (model units); :func:`forecast` wraps it in the serving spec's encoder
  and output decoder (raw units in and out).
- Mu-law audio LMs: :func:`continue_audio` (waveform -> spec encoder -> sample -> mu-law decode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from streamssm.encoding import mu_law_decode
from streamssm.errors import ConfigError, ShapeError
from streamssm.inference import Streamer
from streamssm.models import ModelConfig, SSMModel
from streamssm.serving import ServingSpec
from streamssm.state import select_streams


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (argmax); top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf") or self.top_k < 0 or not 0 < self.top_p <= 1:  # (NaN: sampling failed)
            raise ConfigError(f"need a finite temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self}")


def _nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (b, m) sorted descending -> zero outside the smallest prefix whose mass reaches top_p."""
    if top_p >= 1.0:
        return sorted_probs
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    return sorted_probs.masked_fill(drop, 0.0)


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits (b, v) -> (b, v) scaled by 1/temperature, -inf outside the top-k / top-p nucleus
    (ties at the k-th value are kept; :func:`sample_next` keeps exactly k)."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = _nucleus(sorted_logits.softmax(-1), cfg.top_p) == 0
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits (b, v) (or log-probabilities) -> token ids (b,).

    With top-k the draw is over the k best only (softmax and multinomial over (b, k), never the
    full vocabulary); top-p then trims those k."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        values, index = logits.topk(cfg.top_k, dim=-1)  # (b, k), sorted descending
        probs = _nucleus((values.float() / cfg.temperature).softmax(-1), cfg.top_p)
        return index.gather(-1, torch.multinomial(probs, 1, generator=generator))[:, 0]
    probs = filter_logits(logits, cfg).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_lm(cfg: ModelConfig) -> None:
    if cfg.input_kind != "tokens" or cfg.head != "lm":
        raise ConfigError(f"generate needs a token LM, got input_kind={cfg.input_kind!r} head={cfg.head!r}")


def _check_prompt(prompt: torch.Tensor, vocab: int) -> torch.Tensor:
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 1 or prompt.numel() == 0 or prompt.is_floating_point():
        shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ShapeError(f"prompt must be a non-empty 1-D tensor of token ids, got {shape}")
    lo, hi = int(prompt.min()), int(prompt.max())
    if lo < 0 or hi >= vocab:
        raise ShapeError(f"prompt token ids must lie in [0, {vocab}), got [{lo}, {hi}]")
    return prompt.long()


def _check_counts(length: int, samples: int) -> None:
    if length <= 0 or samples <= 0:
        raise ConfigError(f"length and samples must be positive, got {length}, {samples}")


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is not None and not 0 <= seed < 2**64:  # (torch's own error: "Overflow when unpacking long long")
        raise ConfigError(f"seed must be 0..2**64-1, got {seed}")
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _sample_loop(first: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor], length: int,
                 sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """first (n, v) logits of the first new token; ``step(tokens (n,)) -> next logits (n, v)``;
    returns (n, length) new tokens (preallocated; one step per token after the first)."""
    tokens = torch.empty(first.shape[0], length, dtype=torch.long, device=first.device)
    nxt = sample_next(first, sampling, generator)
    for t in range(length):
        tokens[:, t] = nxt
        if t + 1 < length:
            nxt = sample_next(step(nxt), sampling, generator)
    return tokens


@torch.inference_mode()
def generate(model: SSMModel, prompt: torch.Tensor, length: int, samples: int = 1,
             sampling: SamplingConfig = SamplingConfig(), seed: int | None = None) -> torch.Tensor:
    """prompt (l,) token ids -> (samples, length) new token ids (the prompt not repeated).

    ``seed`` makes the draw reproducible (a generator on the model's device)."""
    _check_lm(model.cfg)
    prompt = _check_prompt(prompt, model.cfg.vocab_size)
    _check_counts(length, samples)
    device = next(model.parameters()).device
    model = model.eval()
    # tokens are checked once here (prompt) or drawn from the vocabulary (steps): the encoder is
    # called directly, without SSMModel's per-call range check (a host sync per token)
    h, state = model.backbone(model.encoder(prompt.to(device)[None]))
    first = model.head(h[:, -1])  # (1, v): the head only where a token is drawn
    # the prompt state copied to every sample: a pool of `samples` rows that each step updates in
    # place (step_pool: no per-step copy of the state, unlike step)
    pool = select_streams(state, torch.zeros(samples, dtype=torch.long, device=device))
    rows = torch.arange(samples, device=device)

    def step(nxt: torch.Tensor) -> torch.Tensor:
        return model.head(model.backbone.step_pool(model.encoder(nxt), pool, rows))

    return _sample_loop(first.expand(samples, -1), step, length, sampling, _generator(seed, device))


def generate_streams(streamer: Streamer, prompts: Sequence[torch.Tensor], length: int,
                     sampling: SamplingConfig = SamplingConfig(), seed: int | None = None) -> torch.Tensor:
    """n prompts (l_i,) token ids -> (n, length) new tokens, one stream of ``streamer`` per prompt.

    Repeat a prompt for several samples of it. Streams are opened here and closed on return
    (StateError when the streamer lacks n free rows). The prompts are fed as one batched chunk
    (outputs only at their last token), then every new token is one ``feed_many`` of all n
    streams; sampling runs on the CPU (where the Streamer returns its log-probabilities), so the
    seed draws the same tokens as :func:`generate` on a CPU model."""
    _check_lm(streamer.cfg)
    if not prompts:
        raise ConfigError("generate_streams needs at least one prompt")
    prompts = [_check_prompt(p, streamer.cfg.vocab_size) for p in prompts]
    _check_counts(length, len(prompts))
    ids: list[int] = []
    try:
        for _ in prompts:
            ids.append(streamer.open())
        heads = {sid: p[:-1] for sid, p in zip(ids, prompts) if p.numel() > 1}
        streamer.feed_many(heads, outputs=False)
        res = streamer.feed_many({sid: p[-1:] for sid, p in zip(ids, prompts)})
        first = torch.stack([res[sid].outputs[-1] for sid in ids])  # (n, v) log-probs

        def step(nxt: torch.Tensor) -> torch.Tensor:
            out = streamer.feed_many({sid: nxt[i:i + 1] for i, sid in enumerate(ids)})
            return torch.stack([out[sid].outputs[0] for sid in ids])

        return _sample_loop(first, step, length, sampling, _generator(seed, torch.device("cpu")))
    finally:
        for sid in ids:
            streamer.close(sid)


def _rollout_channels(cfg: ModelConfig) -> int:
    """c: the input channels, which the first c outputs forecast (ConfigError when they cannot)."""
    if cfg.input_kind != "continuous" or cfg.head != "regression":
        raise ConfigError(f"a rollout needs a continuous regression model, got input_kind={cfg.input_kind!r} "
                          f"head={cfg.head!r}")
    if cfg.resolved_output_dim % cfg.input_dim:
        raise ConfigError(f"a rollout feeds the next-step forecast back as input: {cfg.resolved_output_dim} outputs "
                          f"are not horizon x {cfg.input_dim} input channels")
    return cfg.input_dim


@torch.inference_mode()
def rollout(model: SSMModel, history: torch.Tensor, steps: int) -> torch.Tensor:
    """history (l, c) or (b, l, c) in model units -> (b, steps, o) forecasts in model units.

    Row j is the model's output after it has read the history and its own next-step predictions
    ``out[:, :j, :c]``: the first c outputs (the t+1 forecast) are fed back as the next input."""
    c = _rollout_channels(model.cfg)
    if history.dim() == 2:
        history = history[None]
    if history.dim() != 3 or history.shape[1] == 0 or history.shape[2] != c or not history.is_floating_point():
        raise ShapeError(f"history must be float (l, {c}) or (b, l, {c}) with l > 0, got {tuple(history.shape)}")
    if steps <= 0:
        raise ConfigError(f"steps must be positive, got {steps}")
    param = next(model.parameters())
    y, state = model.eval()(history.to(param.device, param.dtype))
    y_t = y[:, -1]
    out = torch.empty(history.shape[0], steps, y.shape[-1], dtype=y.dtype, device=y.device)
    for t in range(steps):
        out[:, t] = y_t
        if t + 1 < steps:
            y_t, state = model.step(y_t[:, :c], state)
    return out


def forecast(model: SSMModel, spec: ServingSpec, history: torch.Tensor, steps: int) -> torch.Tensor:
    """Raw history rows (l, c) in the spec's channels and units -> (steps, c) raw-unit forecasts.

    The history goes through ``spec.encoder()`` (normalization), the rollout runs in model units,
    its outputs are de-normalized by ``spec.output_decoder()``; row j forecasts step l + j."""
    spec = spec.for_model(model.cfg)
    c = _rollout_channels(model.cfg)
    if spec.modality == "sensor" and tuple(spec.forecast_channels) != tuple(spec.channel_names):
        raise ConfigError(f"a rollout needs forecasts of every input channel; this model forecasts "
                          f"{list(spec.forecast_channels)} of {list(spec.channel_names)}")
    out = rollout(model, spec.encoder()(history), steps)[0]  # (steps, o)
    return spec.output_decoder()(out.float().cpu())[:, :c]


def continue_audio(model: SSMModel, spec: ServingSpec, wave: torch.Tensor, sample_rate: int, length: int,
                   samples: int = 1, sampling: SamplingConfig = SamplingConfig(),
                   seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A mu-law audio LM continues a waveform.

    wave (l,) or (l, channels) float in [-1, 1] (or int PCM) at ``sample_rate`` Hz -> (prompt (l',),
    continuations (samples, length)) float32 in [-1, 1] at ``spec.sample_rate``: the prompt as
    the model heard it (resampled, mixed to mono, mu-law encoded and decoded) and the new samples."""
    if spec.modality != "audio" or spec.encoding != "mu_law":
        raise ConfigError(f"continue_audio needs a mu-law audio LM, got a {spec.modality} model "
                          f"with {spec.encoding} encoding")
    spec = spec.for_model(model.cfg)
    tokens = spec.encoder()(wave, sample_rate=sample_rate)  # (l',) in 0..q-1
    new = generate(model, tokens, length, samples, sampling, seed).cpu()
    q = spec.quantization_channels
    return mu_law_decode(tokens, q), mu_law_decode(new, q)
