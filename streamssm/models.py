"""Backbone (a stack of residual SSM blocks) and the full model with its input and output heads.

Shape legend: b batch, l length, d d_model, c input channels, o output size.

    tokens (b, l) long  --Embedding-->  (b, l, d)
    values (b, l, c)    --Linear----->  (b, l, d)
    Backbone: x = x + block(RMSNorm(x)) for each layer, then a final RMSNorm
              (block: the SSM block, or sliding-window attention on the layers picked by
              ``attention_every`` / ``layer_pattern``: a hybrid, its state still bounded)
    head: Linear (b, l, d) -> (b, l, o)   logits (lm / classifier) or values (regression)

Every module offers ``forward(x, state=None) -> (y, state)``, ``step(x_t, state) -> (y_t,
state)`` and ``init_state(batch, device, dtype)``; the three modes agree (tests/test_parity.py).

Configuration: :class:`ArchConfig` declares the architecture once and validates it (the blocks
and the attention layer are built from it and trust its shapes); :class:`ModelConfig` adds the
input and output and is what checkpoints store, as one flat dict.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Self

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from streamssm.errors import ConfigError, ShapeError, StateError
from streamssm.kernels import add_rms_norm
from streamssm.layers import Mamba2Block, Mamba3Block, MambaBlock, RMSNorm
from streamssm.layers.attention import SlidingWindowAttention
from streamssm.state import LayerState, ModelState, select_streams, write_streams

BlockType = Literal["mamba", "mamba2", "mamba3"]
InputKind = Literal["tokens", "continuous"]
HeadKind = Literal["lm", "regression", "classifier"]


#: fields added after models were saved -> the default that keeps those models unchanged
#: (``to_dict`` leaves them out at it; ``from_dict`` fills it in)
_LATER_FIELDS: dict[str, Any] = {"norm_groups": 1}
#: every block type's default d_state (ArchConfig.d_state None)
_DEFAULT_D_STATE: dict[str, int] = {"mamba": 16, "mamba2": 64, "mamba3": 32}


@dataclass(frozen=True)
class ArchConfig:
    """The architecture of the backbone, declared once: recipes nest it as
    ``model.init_args.arch``, the blocks are built from it, :class:`ModelConfig` extends it with
    the input and output fields. Invalid values raise one ConfigError listing every problem.

    Args:
        block: mixer type: ``mamba`` (selective scan), ``mamba2`` (SSD) or ``mamba3``.
        d_model: width of the residual stream.
        n_layers: number of residual blocks.
        d_state: SSM state size per channel (mamba) or head; None picks 16 (mamba), 64 (mamba2)
            or 32 (mamba3, must be even).
        d_conv: causal conv width, 2..4 (mamba, mamba2).
        expand: inner width d_inner = expand * d_model.
        headdim: head size of mamba2/mamba3; d_inner must be divisible by it.
        ngroups: B/C groups of mamba2/mamba3; the heads (d_inner / headdim) must be divisible by it.
        norm_groups: groups of the mamba2 gated output norm, each d_inner / norm_groups channels
            normalized by its own RMS: 1 (all of d_inner, as transformers' Mamba2), or ngroups
            for mamba-ssm's Mamba2 (which normalizes per B/C group).
        chunk_size: chunk length of the mamba2/mamba3 chunked scan.
        dt_rank: rank of the Mamba-1 dt projection; None = ceil(d_model / 16).
        norm_eps: epsilon of the RMS norms.
        checkpoint_layers: recompute each layer in backward (gradient checkpointing) to save
            activation memory on very long sequences.
        attention_every: make layers k, 2k, ... (1-based) sliding-window attention (a hybrid);
            0 = pure SSM.
        layer_pattern: or one letter per layer, ``m`` SSM block / ``a`` attention (e.g. ``mmma``).
        attention_heads: heads of the attention layers (d_model / attention_heads must be even).
        attention_window: keys each attention query sees, itself included (the ring-buffer size).
    """

    block: BlockType = "mamba2"
    d_model: int = 128
    n_layers: int = 4
    d_state: int | None = None
    d_conv: int = 4
    expand: int = 2
    headdim: int = 32
    ngroups: int = 1
    norm_groups: int = 1
    chunk_size: int = 64
    dt_rank: int | None = None
    norm_eps: float = 1e-5
    checkpoint_layers: bool = False
    attention_every: int = 0
    layer_pattern: str = ""
    attention_heads: int = 4
    attention_window: int = 1024

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        """Every invalid field, described (subclasses add theirs)."""
        problems = self._size_problems()
        if self.block not in _DEFAULT_D_STATE:
            problems.insert(0, f"block must be 'mamba', 'mamba2' or 'mamba3', got {self.block!r}")
        elif not problems:  # the shapes derived from valid sizes
            problems = self._block_problems()
        return problems + self._hybrid_problems()

    def _size_problems(self) -> list[str]:
        problems = [f"{name} must be positive, got {getattr(self, name)}"
                    for name in ("d_model", "n_layers", "expand", "headdim", "ngroups", "norm_groups", "chunk_size",
                                 "norm_eps")
                    if getattr(self, name) <= 0]
        problems += [f"{name} must be positive or None, got {getattr(self, name)}"
                     for name in ("d_state", "dt_rank") if getattr(self, name) is not None and getattr(self, name) <= 0]
        if not 2 <= self.d_conv <= 4:
            problems.append(f"d_conv must be 2..4, got {self.d_conv}")
        return problems

    def _block_problems(self) -> list[str]:
        """The shapes the mamba2/mamba3 heads need (the blocks rely on them)."""
        problems = []
        if self.block == "mamba3" and self.resolved_d_state % 2:
            problems.append(f"block='mamba3' needs an even d_state (complex pairs), got {self.resolved_d_state}")
        if self.block in ("mamba2", "mamba3"):
            if self.d_inner % self.headdim:
                problems.append(f"expand*d_model={self.d_inner} must be divisible by headdim={self.headdim}")
            elif self.nheads % self.ngroups:
                problems.append(f"heads=expand*d_model/headdim={self.nheads} must be divisible by "
                                f"ngroups={self.ngroups}")
        if self.norm_groups != 1:
            if self.block != "mamba2":
                problems.append(f"norm_groups={self.norm_groups} applies to block='mamba2' only")
            elif self.d_inner % self.norm_groups:
                problems.append(f"expand*d_model={self.d_inner} must be divisible by norm_groups={self.norm_groups}")
        return problems

    def _hybrid_problems(self) -> list[str]:
        problems = []
        if self.attention_every < 0:
            problems.append(f"attention_every must be >= 0, got {self.attention_every}")
        if self.layer_pattern:
            if self.attention_every:
                problems.append("set either attention_every or layer_pattern, not both")
            if len(self.layer_pattern) != self.n_layers or set(self.layer_pattern) - {"m", "a"}:
                problems.append(f"layer_pattern must be {self.n_layers} letters of 'm' (SSM) / 'a' (attention), "
                                f"got {self.layer_pattern!r}")
        if self.attention_every or "a" in self.layer_pattern:
            if self.attention_heads <= 0 or self.d_model % self.attention_heads:
                problems.append(f"d_model={self.d_model} must be divisible by attention_heads={self.attention_heads}")
            elif (self.d_model // self.attention_heads) % 2:
                problems.append(f"attention head size d_model/attention_heads={self.d_model // self.attention_heads} "
                                "must be even (rotary positions)")
            if self.attention_window <= 0:
                problems.append(f"attention_window must be positive, got {self.attention_window}")
        return problems

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """'ssm' or 'attention' for each layer."""
        if self.layer_pattern:
            return tuple("attention" if c == "a" else "ssm" for c in self.layer_pattern)
        k = self.attention_every
        return tuple("attention" if k and (i + 1) % k == 0 else "ssm" for i in range(self.n_layers))

    @property
    def resolved_d_state(self) -> int:
        return self.d_state if self.d_state is not None else _DEFAULT_D_STATE[self.block]

    @property
    def d_inner(self) -> int:
        """Inner width of the SSM blocks: expand * d_model."""
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        """Heads of the mamba2/mamba3 blocks: d_inner / headdim."""
        return self.d_inner // self.headdim

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able dict of every field (what checkpoints and exports store), less the
        fields of :data:`_LATER_FIELDS` at their defaults: a model that does not use them keeps
        the config, and so the fingerprint, it had before they existed."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Read :meth:`to_dict` output; unknown keys raise ConfigError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class ModelConfig(ArchConfig):
    """Everything needed to rebuild a model (saved, flat, in every checkpoint and export): the
    architecture (:class:`ArchConfig`) and the input and output.

    Args:
        input_kind: ``tokens`` (ids, embedded) or ``continuous`` (values, linearly projected).
        vocab_size: token vocabulary (tokens in).
        input_dim: channels in (continuous).
        head: ``lm`` (next-token logits), ``regression`` (values) or ``classifier`` (logits).
        output_dim: head size per step: vocab (lm), channels (regression), classes
            (classifier); 0 = vocab_size for lm.
    """

    input_kind: InputKind = "tokens"
    vocab_size: int = 0
    input_dim: int = 0
    head: HeadKind = "lm"
    output_dim: int = 0

    @classmethod
    def of(cls, arch: ArchConfig, **io: Any) -> ModelConfig:
        """The ModelConfig of the architecture of ``arch`` with the input/output fields ``io``."""
        return cls(**_arch_fields(arch), **io)

    @property
    def arch(self) -> ArchConfig:
        """The architecture part."""
        return ArchConfig(**_arch_fields(self))

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.input_kind not in ("tokens", "continuous"):
            problems.append(f"input_kind must be 'tokens' or 'continuous', got {self.input_kind!r}")
        if self.head not in ("lm", "regression", "classifier"):
            problems.append(f"head must be 'lm', 'regression' or 'classifier', got {self.head!r}")
        if self.input_kind == "tokens" and self.vocab_size <= 0:
            problems.append("input_kind='tokens' needs vocab_size > 0")
        if self.input_kind == "continuous" and self.input_dim <= 0:
            problems.append("input_kind='continuous' needs input_dim > 0")
        if self.head != "lm" and self.output_dim <= 0:
            problems.append(f"head={self.head!r} needs output_dim > 0")
        if self.head == "lm" and self.output_dim <= 0 and self.vocab_size <= 0:
            problems.append("head='lm' needs output_dim or vocab_size > 0")
        return problems

    @property
    def resolved_output_dim(self) -> int:
        return self.output_dim if self.output_dim > 0 else self.vocab_size


#: names of the architecture fields (what recipes nest under ``arch``)
ARCH_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ArchConfig))


def _arch_fields(cfg: ArchConfig) -> dict[str, Any]:
    """The ArchConfig fields of ``cfg`` (also of a ModelConfig) by name."""
    return {name: getattr(cfg, name) for name in ARCH_FIELDS}


#: the mixer of each layer kind / block type; each takes the config
_MIXERS: dict[str, type[nn.Module]] = {
    "attention": SlidingWindowAttention, "mamba": MambaBlock, "mamba2": Mamba2Block, "mamba3": Mamba3Block,
}


def make_block(cfg: ArchConfig, kind: str = "ssm") -> nn.Module:
    """The mixer of one layer: ``kind`` 'attention' or 'ssm' (the config's block type)."""
    return _MIXERS[cfg.block if kind == "ssm" else kind](cfg)


class ResidualBlock(nn.Module):
    """x -> x + mixer(RMSNorm(x))."""

    def __init__(self, cfg: ModelConfig, kind: str = "ssm"):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = make_block(cfg, kind)

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> LayerState:
        return self.mixer.init_state(batch, device, dtype)

    def forward(self, x: torch.Tensor, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState]:
        y, state = self.mixer(self.norm(x), state)
        return x + y, state

    def step(self, x_t: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        y, state = self.mixer.step(self.norm(x_t), state)
        return x_t + y, state

    def step_pool(self, x_t: torch.Tensor, pool: LayerState, state_indices: torch.Tensor) -> torch.Tensor:
        """x_t (b, d) -> (b, d); updates ``pool`` rows ``state_indices`` (b,) in place."""
        return x_t + self.mixer.step_pool(self.norm(x_t), pool, state_indices)


def _mix_pool(mixer: nn.Module, u: torch.Tensor, pool: LayerState, rows: torch.Tensor) -> torch.Tensor:
    """One mixer over pool rows ``rows`` (b,): its own ``forward_pool`` where it has one, else
    the rows gathered, ``forward`` and the new states written back. u (b, l, d) -> (b, l, d)."""
    own = getattr(mixer, "forward_pool", None)
    if own is not None:
        return own(u, pool, rows)
    y, new_state = mixer(u, select_streams((pool,), rows)[0])
    write_streams((pool,), rows, (new_state,))
    return y


class Backbone(nn.Module):
    """N residual blocks and a final norm over (b, l, d) features."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(ResidualBlock(cfg, kind) for kind in cfg.layer_kinds)
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> ModelState:
        return tuple(layer.init_state(batch, device, dtype) for layer in self.layers)

    def _check_state(self, state: ModelState, batch: int) -> None:
        if len(state) != len(self.layers):
            raise StateError(f"state has {len(state)} layers, the model has {len(self.layers)}")
        for i, (layer_state, ref) in enumerate(zip(state, self._state_shapes())):
            for field, t, r in zip(LayerState._fields, layer_state, ref):
                if t.shape[0] != batch or t.shape[1:] != r:
                    raise StateError(
                        f"layer {i} {field} state has shape {tuple(t.shape)}, expected "
                        f"({batch}, {', '.join(map(str, r))}) for batch {batch}"
                    )

    def _state_shapes(self) -> tuple[tuple[torch.Size, ...], ...]:
        """Per layer, the state tensors' shapes after the batch dim (computed once: the blocks'
        sizes are fixed at construction)."""
        shapes = self.__dict__.get("_state_shapes_cache")
        if shapes is None:
            shapes = tuple(tuple(t.shape[1:] for t in ls) for ls in self.init_state(1, "meta"))
            self.__dict__["_state_shapes_cache"] = shapes
        return shapes

    def forward(self, x: torch.Tensor, state: ModelState | None = None) -> tuple[torch.Tensor, ModelState]:
        """x (b, l, d) -> (features (b, l, d), new state)."""
        if x.dim() != 3 or x.shape[1] == 0:
            raise ShapeError(f"Backbone.forward: x must be (batch, length>0, d_model), got {tuple(x.shape)}")
        if state is None:  # each block starts from zeros itself (Mamba-2: no zero tensors at all)
            state = (None,) * len(self.layers)
        else:
            self._check_state(state, x.shape[0])
        new_state = []
        if self.cfg.checkpoint_layers and self.training and torch.is_grad_enabled():
            for layer, layer_state in zip(self.layers, state):
                x, s = checkpoint(layer, x, layer_state, use_reentrant=False)
                new_state.append(s)
            return self.norm_f(x), tuple(new_state)

        def mix(i: int, normed: torch.Tensor) -> torch.Tensor:
            y, s = self.layers[i].mixer(normed, state[i])
            new_state.append(s)
            return y

        return self._fused_residuals(x, mix), tuple(new_state)

    def _fused_residuals(self, x: torch.Tensor, mix: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """x (..., d) through every block, ``mix(i, normed)`` being block i's mixer output; each
        residual add and the next norm (or the final one) in one add_rms_norm launch (the kernel
        without gradients). Returns the final normed features (..., d)."""
        d = x.shape[-1]
        normed = self.layers[0].norm(x)
        next_norms = [layer.norm for layer in self.layers[1:]] + [self.norm_f]
        for i, norm in enumerate(next_norms):
            y = mix(i, normed)
            h, normed = add_rms_norm(x.reshape(-1, d), y.reshape(-1, d), norm.weight, norm.eps)
            x, normed = h.view(x.shape), normed.view(x.shape)
        return normed

    def step(self, x_t: torch.Tensor, state: ModelState) -> tuple[torch.Tensor, ModelState]:
        """x_t (b, d) -> (features (b, d), new state)."""
        if x_t.dim() != 2:
            raise ShapeError(f"Backbone.step: x_t must be (batch, d_model), got {tuple(x_t.shape)}")
        self._check_state(state, x_t.shape[0])
        new_state = []
        for layer, layer_state in zip(self.layers, state):
            x_t, s = layer.step(x_t, layer_state)
            new_state.append(s)
        return self.norm_f(x_t), tuple(new_state)

    def forward_pool(self, x: torch.Tensor, pool: ModelState, state_indices: torch.Tensor) -> torch.Tensor:
        """x (b, l, d) -> features (b, l, d); **updates the state pool** in place at rows
        ``state_indices`` (b,) int64 (distinct, but for a scratch row nobody reads), leaving the
        other rows untouched: :meth:`forward` from and back into the pool. Mixers with a
        ``forward_pool`` of their own (Mamba-2) read and write the rows in their kernels; the
        others' rows are gathered, run through ``forward`` and written back."""
        if x.dim() != 3 or x.shape[1] == 0:
            raise ShapeError(f"Backbone.forward_pool: x must be (batch, length>0, d_model), got {tuple(x.shape)}")
        if len(pool) != len(self.layers):
            raise StateError(f"state pool has {len(pool)} layers, the model has {len(self.layers)}")
        return self._fused_residuals(x, lambda i, normed: _mix_pool(self.layers[i].mixer, normed, pool[i],
                                                                    state_indices))

    def step_pool(self, x_t: torch.Tensor, pool: ModelState, state_indices: torch.Tensor) -> torch.Tensor:
        """x_t (b, d) -> features (b, d); **updates the state pool** (capacity rows) in place at
        rows ``state_indices`` (b,) int64, leaving the other rows untouched."""
        if x_t.dim() != 2:
            raise ShapeError(f"Backbone.step_pool: x_t must be (batch, d_model), got {tuple(x_t.shape)}")
        if len(pool) != len(self.layers):
            raise StateError(f"state pool has {len(pool)} layers, the model has {len(self.layers)}")
        return self._fused_residuals(x_t, lambda i, normed: self.layers[i].mixer.step_pool(normed, pool[i],
                                                                                        state_indices))


class SSMModel(nn.Module):
    """Input encoder -> Backbone -> head. Inputs: tokens (b, l) long or values (b, l, c)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.input_kind == "tokens":
            self.encoder: nn.Module = nn.Embedding(cfg.vocab_size, cfg.d_model)
        else:
            self.encoder = nn.Linear(cfg.input_dim, cfg.d_model)
        self.backbone = Backbone(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.resolved_output_dim)

    def init_state(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> ModelState:
        return self.backbone.init_state(batch, device, dtype)

    def _encode(self, x: torch.Tensor, time_dims: int) -> torch.Tensor:
        """Validate and embed inputs with ``time_dims`` leading (batch[, time]) dims."""
        cfg = self.cfg
        if cfg.input_kind == "tokens":
            if x.dim() != time_dims or x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                want = "(batch, length)" if time_dims == 2 else "(batch,)"
                raise ShapeError(f"token inputs must be an integer tensor {want}, got {x.dtype} {tuple(x.shape)}")
            # a data-dependent check (a host sync): skipped while torch.compile / export traces
            # (the embedding lookup still rejects out-of-range ids)
            if not torch.compiler.is_compiling() and x.numel() and (int(x.min()) < 0 or int(x.max()) >= cfg.vocab_size):
                raise ShapeError(f"token ids must lie in [0, {cfg.vocab_size}), got [{int(x.min())}, {int(x.max())}]")
            return self.encoder(x.long())
        if x.dim() != time_dims + 1 or x.shape[-1] != cfg.input_dim or not x.is_floating_point():
            want = "(batch, length, channels)" if time_dims == 2 else "(batch, channels)"
            raise ShapeError(
                f"continuous inputs must be a float tensor {want} with {cfg.input_dim} channels, "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        return self.encoder(x.to(self.encoder.weight.dtype))

    def forward(self, x: torch.Tensor, state: ModelState | None = None) -> tuple[torch.Tensor, ModelState]:
        """x (b, l) tokens or (b, l, c) values -> (outputs (b, l, o), new state)."""
        if x.dim() < 2 or x.shape[1] == 0:
            raise ShapeError(f"inputs need a non-empty time axis (batch, length, ...), got {tuple(x.shape)}")
        h, state = self.backbone(self._encode(x, 2), state)
        return self.head(h), state

    def step(self, x_t: torch.Tensor, state: ModelState) -> tuple[torch.Tensor, ModelState]:
        """x_t (b,) tokens or (b, c) values -> (outputs (b, o), new state)."""
        h, state = self.backbone.step(self._encode(x_t, 1), state)
        return self.head(h), state

    def step_pool(self, x_t: torch.Tensor, pool: ModelState, state_indices: torch.Tensor) -> torch.Tensor:
        """x_t (b,) tokens or (b, c) values -> outputs (b, o); **updates the state pool in place**
        at rows ``state_indices`` (b,) int64 (see :meth:`Backbone.step_pool`)."""
        return self.head(self.backbone.step_pool(self._encode(x_t, 1), pool, state_indices))
