"""LightningModules around :class:`~streamssm.models.SSMModel`: losses, metrics, optimizer.

Shape legend: b batch, l length, c input channels, k target channels, h horizon, o outputs.

Batches are dicts (the datamodule contract)::

    inputs   (b, l) long tokens | (b, l, c) float values
    targets  (b, l) long next tokens | (b, l, k) float next values | (b,) or (b, l) long labels
    mask     optional (b, l) bool, True where a step counts

Tasks:
- :class:`TokenLM`: next-token cross-entropy; logs ``loss`` (nats/token) and ``bpt`` (bits/token).
- :class:`Forecaster`: ``targets[:, t]`` is the value after step ``t``; the head predicts the
  next ``horizon`` values at every step (o = h * k); MSE or MAE loss, logs ``mse`` and ``mae``.
- :class:`SequenceClassifier`: logits per step; a label per sequence is scored on the last
  (or mean of the) valid step(s), a label per step on every valid step; logs ``acc``.

The model is built in :meth:`SSMTask.configure_model`, once the trainer's datamodule can say
what its data looks like (``datamodule.model_io()``: input_kind, vocab_size / input_dim,
output_dim ...), so recipes never repeat vocabulary sizes or channel counts. Values given to
the task explicitly must agree with the data. The datamodule's ``serving_spec()``, completed
by the task's head (:meth:`SSMTask.complete_spec`), is saved in every checkpoint through
:func:`streamssm.checkpoint.training_record`, which is all
:func:`streamssm.checkpoint.load_for_serving` needs.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from streamssm.checkpoint import CKPT_KEY, read_training_record, training_record
from streamssm.datamodules.resumable import reopen_stopped_epoch
from streamssm.errors import ConfigError, ShapeError
from streamssm.lightning_ui import quiet_lightning, use_streamssm_callbacks
from streamssm.models import ARCH_FIELDS, ArchConfig, HeadKind, InputKind, ModelConfig, SSMModel
from streamssm.serving import ServingSpec

log = logging.getLogger(__name__)
quiet_lightning()  # every process that trains or predicts with a task (see streamssm.lightning_ui)

Batch = Mapping[str, torch.Tensor]
_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))
#: ModelConfig fields a datamodule may imply (``model_io()``) and the task may also set.
_IO_FIELDS = ("input_kind", "vocab_size", "input_dim", "output_dim")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup over ``warmup_steps``, then cosine down to ``min_lr_ratio``
    at ``total_steps`` (constant 1.0 after warmup when ``total_steps`` is None)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (b, l, ...) over the positions where ``mask`` (b, l) is True."""
    if mask is None:
        return values.mean()
    while mask.dim() < values.dim():
        mask = mask.unsqueeze(-1)
    weights = mask.expand_as(values).to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


#: wrapper prefixes that FSDP and activation checkpointing insert into parameter names
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter name with the FSDP / checkpoint wrapper prefixes removed."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def weight_decay_names(model: nn.Module) -> frozenset[str]:
    """Names of the parameters that get weight decay: matrices (>= 2-D), except ``A_log`` and
    biases (Mamba-3's ``B_bias``/``C_bias`` are 2-D).

    Decided once on the unwrapped model, because FSDP later hands out flattened 1-D shards
    whose shapes no longer tell matrices from vectors."""
    return frozenset(
        name for name, p in model.named_parameters() if p.dim() >= 2 and not name.endswith(("A_log", "bias"))
    )


class SSMTask(pl.LightningModule):
    """Shared parts of the streamssm tasks: model building, AdamW + warmup/cosine, checkpoints.

    Args:
        arch: the architecture (:class:`~streamssm.models.ArchConfig`, which documents each
            field); recipes nest it as ``model.init_args.arch: {block: mamba2, d_model: 128, ...}``.
        input_kind: ``tokens`` or ``continuous``; None takes it from the datamodule.
        vocab_size: token vocabulary; None takes it from the datamodule.
        input_dim: input channels of continuous data; None takes it from the datamodule.
        output_dim: head size per step (vocab for LM, target channels for forecasting,
            classes for classification); None takes it from the datamodule.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only (not to biases, norms,
            ``A_log``, ``D``, ``dt_bias``).
        betas: AdamW betas.
        warmup_steps: linear warmup steps.
        max_steps: end of the cosine decay; None uses the trainer's estimated number of steps.
        min_lr_ratio: learning rate at the end of the cosine decay, as a fraction of ``lr``.
    """

    head_kind: ClassVar[HeadKind]

    def __init__(
        self,
        arch: ArchConfig = ArchConfig(),
        input_kind: InputKind | None = None,
        vocab_size: int | None = None,
        input_dim: int | None = None,
        output_dim: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(arch, Mapping):  # load_from_checkpoint passes the saved hparams' dict back
            arch = ArchConfig.from_dict(arch)
        if isinstance(arch, ModelConfig):
            raise ConfigError(f"{type(self).__name__}: arch takes an ArchConfig (pass cfg.arch); the input/output "
                              "fields of a ModelConfig come from the datamodule or the task's own arguments")
        # hparams hold the architecture as a plain dict: checkpoints stay loadable with weights_only
        self.save_hyperparameters(ignore=["arch"])
        self.save_hyperparameters({"arch": arch.to_dict()})
        problems = []
        if lr <= 0:
            problems.append(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {weight_decay}")
        if warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {warmup_steps}")
        if max_steps is not None and max_steps <= 0:
            problems.append(f"max_steps must be > 0 or None, got {max_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if problems:
            raise ConfigError(f"{type(self).__name__}: " + "; ".join(problems))
        #: the architecture of the model this task builds
        self.arch = arch
        self._explicit_io = {
            k: v for k, v in zip(_IO_FIELDS, (input_kind, vocab_size, input_dim, output_dim)) if v is not None
        }
        self.model: SSMModel | None = None
        #: the serving contract saved with the model (taken from the datamodule, completed by
        #: :meth:`complete_spec`); None without a datamodule that has ``serving_spec()``.
        self.serving_spec: ServingSpec | None = None

    # ---------------------------------------------------------------- model building
    def _head_io(self, io: dict[str, Any]) -> dict[str, Any]:
        """Turn the data's per-step output size into the head size (Forecaster: * horizon)."""
        return io

    def complete_spec(self, spec: ServingSpec) -> ServingSpec:
        """The datamodule's spec completed by what this task trains (name, head; subclasses add
        their output semantics)."""
        return spec.with_task(task=type(self).__name__, head=self.head_kind)

    def _take_spec(self) -> None:
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "serving_spec"):
            self.serving_spec = self.complete_spec(dm.serving_spec())

    def model_config(self, data_io: Mapping[str, Any] | None = None) -> ModelConfig:
        """The ModelConfig from this task's arguments completed by ``data_io``
        (a datamodule's ``model_io()``). Raises ConfigError naming any disagreeing field."""
        data_io = dict(data_io or {})
        unknown = sorted(set(data_io) - _CONFIG_FIELDS)
        if unknown:
            raise ConfigError(f"model_io() returned keys that are not ModelConfig fields: {unknown}")
        data_head = data_io.pop("head", self.head_kind)
        if data_head != self.head_kind:
            raise ConfigError(
                f"head: the datamodule's data is for head {data_head!r}, but {type(self).__name__} "
                f"trains head {self.head_kind!r}; pick the matching task or datamodule options"
            )
        io = {**data_io}
        for key, value in self._explicit_io.items():
            if key in data_io and data_io[key] != value:
                raise ConfigError(
                    f"{key}: the task was given {value!r} but the datamodule's data needs {data_io[key]!r}; "
                    f"drop {key} from the model arguments"
                )
            io[key] = value
        arch = self.arch.to_dict()
        arch_conflicts = sorted(k for k in io if k in arch and io[k] != arch[k])
        if arch_conflicts:
            raise ConfigError(f"model_io() sets architecture fields {arch_conflicts}; datamodules may only set {_IO_FIELDS}")
        io = self._head_io({k: v for k, v in io.items() if k not in arch})
        if "input_kind" not in io:
            raise ConfigError(
                f"{type(self).__name__}: input_kind is unknown: pass input_kind (and vocab_size or input_dim, "
                f"output_dim) to the task, or train with a datamodule that has model_io()"
            )
        return ModelConfig.of(self.arch, **io, head=self.head_kind)

    def build_model(self, data_io: Mapping[str, Any] | None = None) -> SSMModel:
        """Create ``self.model`` (no-op when it exists and agrees with ``data_io``)."""
        cfg = self.model_config(data_io)
        if self.model is not None:
            if self.model.cfg != cfg:
                raise ConfigError(f"the existing model's config {self.model.cfg} differs from {cfg}")
            return self.model
        self.model = SSMModel(cfg)
        self._decay_names = weight_decay_names(self.model)
        return self.model

    def _datamodule(self) -> pl.LightningDataModule | None:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def configure_model(self) -> None:
        """Build the model from the task arguments and the trainer's datamodule (once).

        Without a trainer (``load_from_checkpoint`` calls this hook first) and without
        explicit sizes, building waits for :meth:`on_load_checkpoint`, which has the config.
        """
        if self.model is not None:
            return
        if self._trainer is None and "input_kind" not in self._explicit_io:
            return
        dm = self._datamodule()
        data_io = dm.model_io() if dm is not None and hasattr(dm, "model_io") else None
        self._take_spec()
        self.build_model(data_io)

    def _require_model(self) -> SSMModel:
        if self.model is None:
            raise ConfigError(
                f"{type(self).__name__}: the model is not built yet; it is built by the Trainer "
                f"(configure_model) or by calling build_model(data_io)"
            )
        return self.model

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path | IO[bytes], *args: Any, **kwargs: Any) -> SSMTask:
        """Lightning's loader, also for checkpoints written before the architecture was nested:
        their flat hyperparameters (``d_model=...``) are moved under ``arch`` first."""
        if not isinstance(checkpoint_path, (str, Path)):
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        # memory-mapped: only the hparams are looked at here; Lightning reads the file itself after
        ckpt = torch.load(str(checkpoint_path), map_location="cpu", mmap=True,
                          weights_only=kwargs.get("weights_only") is not False)
        hparams = ckpt.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {}
        flat = {k: hparams[k] for k in ARCH_FIELDS if k in hparams}
        if not flat:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        ckpt[cls.CHECKPOINT_HYPER_PARAMS_KEY] = {
            **{k: v for k, v in hparams.items() if k not in flat}, "arch": {**dict(hparams.get("arch") or {}), **flat},
        }
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        buffer.seek(0)
        return super().load_from_checkpoint(buffer, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        model = self._require_model()
        self._take_spec()
        checkpoint[CKPT_KEY] = training_record(model.cfg, self.serving_spec)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        reopen_stopped_epoch(checkpoint)
        record = read_training_record(checkpoint)
        cfg = ModelConfig.from_dict(record.config)
        if self.model is None:
            self.model = SSMModel(cfg)
        elif self.model.cfg != cfg:
            diff = {k: (v, getattr(self.model.cfg, k)) for k, v in cfg.to_dict().items() if getattr(self.model.cfg, k) != v}
            raise ConfigError(f"checkpoint config differs from the model built for this run (checkpoint, run): {diff}")
        self.serving_spec = record.spec

    # ---------------------------------------------------------------- trainer output
    def configure_callbacks(self) -> list[pl.Callback]:
        """Swap Lightning's default progress bar and model summary for streamssm's in place
        (step-counting bar, one-line summary; ``streamssm.lightning_ui``); adds nothing, so
        Lightning has no callbacks to report as overridden."""
        if self._trainer is not None:
            use_streamssm_callbacks(self.trainer)
        return []

    # ---------------------------------------------------------------- optimization
    def configure_optimizers(self) -> dict[str, Any]:
        model = self._require_model()
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (decay if unwrapped_name(name) in self._decay_names else no_decay).append(p)
        hp = self.hparams
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # not fused: Lightning's gradient clipping under AMP refuses fused optimizers
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = hp.max_steps
        if total is None and self._trainer is not None:
            est = self.trainer.estimated_stepping_batches
            total = int(est) if math.isfinite(est) else None
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """Hand a resumed run's training-loader state (its place in the epoch) to the loader.

        Lightning 2.6 does this when it builds the training loader, unless
        ``estimated_stepping_batches`` (``configure_optimizers`` without ``max_steps``) built it
        before the checkpoint was read; then the state was never handed over and the resumed
        epoch started again from its first batch (Lightning issue #20550). Calling it again is a
        no-op; ``ResumableDataLoader`` fixes its place at its first batch, after this hook.
        """
        self.trainer.fit_loop._load_combined_loader_states()

    # ---------------------------------------------------------------- steps
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs (b, l) tokens or (b, l, c) values -> outputs (b, l, o)."""
        y, _ = self._require_model()(inputs)
        return y

    def _unpack(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if not isinstance(batch, Mapping) or "inputs" not in batch or "targets" not in batch:
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ShapeError(f"{type(self).__name__}: a batch must be a dict with 'inputs' and 'targets', got {got}")
        inputs, targets, mask = batch["inputs"], batch["targets"], batch.get("mask")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(inputs.shape[:2])):
            raise ShapeError(
                f"mask must be a bool tensor of shape {tuple(inputs.shape[:2])} (batch, length), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        return inputs, targets, mask

    def _metrics(self, outputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Return at least ``loss``; every entry is logged as ``<stage>/<name>``."""
        raise NotImplementedError

    def _log_metrics(self, metrics: dict[str, torch.Tensor], stage: str, weight: int) -> None:
        """Log every metric as ``<stage>/<name>``; epoch values are means weighted by ``weight``."""
        on_step = stage == "train"
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value.detach(), prog_bar=name == "loss", on_step=on_step,
                     on_epoch=not on_step, batch_size=weight)

    def _shared_step(self, batch: Batch, stage: str) -> torch.Tensor:
        inputs, targets, mask = self._unpack(batch)
        outputs = self(inputs)
        metrics = self._metrics(outputs, targets, mask)
        self._log_metrics(metrics, stage, inputs.shape[0])
        return metrics["loss"]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        if self._trainer is not None and self.trainer.optimizers:
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: Batch | torch.Tensor, batch_idx: int) -> torch.Tensor:
        inputs = batch["inputs"] if isinstance(batch, Mapping) else batch
        return self(inputs)


class TokenLM(SSMTask):
    """Next-token language model over tokens (DNA bases, mu-law audio).

    ``targets`` (b, l) long hold the next token of every position. Loss: cross-entropy in
    nats/token; ``bpt`` = loss / ln 2 (bits per token); ``acc`` = top-1 accuracy. Validation
    and test values are means over every counted token (batches weighted by their counted
    tokens), so a whole held-out sequence (``FastaDataModule(whole_eval=True)``) gives its
    bits per base.

    Args:
        eval_chunk: validation/test sequences longer than this many tokens run chunk by chunk
            with the recurrent state carried over (:meth:`chunked_scores`): the same scores as
            one pass, in bounded memory.
        arch, **kwargs: architecture and optimizer arguments of :class:`SSMTask`.
    """

    head_kind: ClassVar[HeadKind] = "lm"

    def __init__(self, arch: ArchConfig = ArchConfig(), eval_chunk: int = 65536, **kwargs: Any) -> None:
        if eval_chunk < 1:
            raise ConfigError(f"eval_chunk must be >= 1, got {eval_chunk}")
        super().__init__(arch, **kwargs)
        self.eval_chunk = int(eval_chunk)

    def chunked_scores(
        self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(nll sum in nats, correct top-1 count, counted tokens) over (b, l) sequences, run in
        chunks of ``eval_chunk`` steps with the state carried from chunk to chunk."""
        model = self._require_model()
        state, nll, hits, count = None, inputs.new_zeros((), dtype=torch.float64), 0, 0
        for s in range(0, inputs.shape[1], self.eval_chunk):
            e = min(s + self.eval_chunk, inputs.shape[1])
            logits, state = model(inputs[:, s:e], state)  # (b, e - s, v)
            y = targets[:, s:e].long()
            m = torch.ones_like(y, dtype=torch.bool) if mask is None else mask[:, s:e]
            step_nll = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (b, e - s)
            nll = nll + step_nll[m].double().sum()
            hits += int((logits.argmax(-1) == y)[m].sum())
            count += int(m.sum())
        return nll, torch.tensor(hits, device=inputs.device), count

    def _eval_step(self, batch: Batch, stage: str) -> torch.Tensor:
        inputs, targets, mask = self._unpack(batch)
        if inputs.shape[1] <= self.eval_chunk:
            metrics = self._metrics(self(inputs), targets, mask)
            count = int(mask.sum()) if mask is not None else targets.numel()
        else:
            nll, hits, count = self.chunked_scores(inputs, targets, mask)
            loss = (nll / max(count, 1)).float()
            metrics = {"loss": loss, "bpt": loss / math.log(2.0), "acc": hits.float() / max(count, 1)}
        self._log_metrics(metrics, stage, max(count, 1))
        return metrics["loss"]

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def _metrics(self, outputs, targets, mask):
        if targets.shape != outputs.shape[:2] or targets.is_floating_point():
            raise ShapeError(
                f"TokenLM: targets must be integer next tokens of shape {tuple(outputs.shape[:2])}, "
                f"got {targets.dtype} {tuple(targets.shape)}"
            )
        logits = outputs.float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets.long(), reduction="none")  # (b, l)
        loss = _masked_mean(nll, mask)
        acc = _masked_mean((logits.argmax(-1) == targets).float(), mask)
        return {"loss": loss, "bpt": loss / math.log(2.0), "acc": acc}


class Forecaster(SSMTask):
    """Multivariate forecaster: at every step, predicts the next ``horizon`` values.

    ``targets`` (b, l, k) float with ``targets[:, t]`` the value right after step ``t``; the
    head has ``horizon * k`` outputs, viewed as (b, l, h, k), and prediction ``j`` at step ``t``
    is compared with ``targets[:, t + j]`` where that exists.

    Args:
        horizon: how many future steps each position predicts.
        loss: ``mse`` or ``mae`` (both are logged either way).
        **kwargs: architecture and optimizer arguments of :class:`SSMTask`.
    """

    head_kind: ClassVar[HeadKind] = "regression"

    def __init__(self, horizon: int = 1, loss: Literal["mse", "mae"] = "mse", **kwargs: Any) -> None:
        if horizon < 1:
            raise ConfigError(f"horizon must be >= 1, got {horizon}")
        if loss not in ("mse", "mae"):
            raise ConfigError(f"loss must be 'mse' or 'mae', got {loss!r}")
        super().__init__(**kwargs)
        self.horizon = int(horizon)
        self.loss_kind = loss

    def _head_io(self, io):
        if "output_dim" in io:
            io = {**io, "output_dim": io["output_dim"] * self.horizon}
        return io

    def complete_spec(self, spec: ServingSpec) -> ServingSpec:
        return spec.with_task(task=type(self).__name__, head=self.head_kind, horizon=self.horizon)

    def _metrics(self, outputs, targets, mask):
        b, l, o = outputs.shape
        if not targets.is_floating_point() or targets.dim() != 3 or targets.shape[:2] != (b, l) \
                or targets.shape[2] * self.horizon != o:
            raise ShapeError(
                f"Forecaster: targets must be float (batch, length, channels) = ({b}, {l}, {o // self.horizon}) "
                f"for horizon {self.horizon}, got {targets.dtype} {tuple(targets.shape)}"
            )
        pred = outputs.float().view(b, l, self.horizon, -1)  # (b, l, h, k)
        targets = targets.float()
        sq, ab = [], []
        for j in range(min(self.horizon, l)):
            err = pred[:, : l - j, j] - targets[:, j:]  # (b, l-j, k)
            m = mask[:, j:] if mask is not None else None
            sq.append(_masked_mean(err.square(), m))
            ab.append(_masked_mean(err.abs(), m))
        mse, mae = torch.stack(sq).mean(), torch.stack(ab).mean()
        out = {"loss": mse if self.loss_kind == "mse" else mae, "mse": mse, "mae": mae}
        if self.horizon > 1 and len(sq) == self.horizon:
            out[f"mse_h{self.horizon}"] = sq[-1]
        return out


class SequenceClassifier(SSMTask):
    """Classifies sequences (label per window) or steps (label per step) from per-step logits.

    ``targets`` (b,) long: one label per sequence, scored on the logits of the last valid step
    (``pool="last"``, what a stream sees as its running answer) or their mean over valid steps
    (``pool="mean"``). ``targets`` (b, l) long: one label per step, scored at every valid step.
    Series shorter than the window arrive padded at the end with ``mask`` False there
    (``SensorDataModule``), so "last" is each series' true last step.

    Args:
        pool: ``last`` or ``mean`` (sequence labels only).
        **kwargs: architecture and optimizer arguments of :class:`SSMTask`.
    """

    head_kind: ClassVar[HeadKind] = "classifier"

    def __init__(self, pool: Literal["last", "mean"] = "last", **kwargs: Any) -> None:
        if pool not in ("last", "mean"):
            raise ConfigError(f"pool must be 'last' or 'mean', got {pool!r}")
        super().__init__(**kwargs)
        self.pool = pool

    def complete_spec(self, spec: ServingSpec) -> ServingSpec:
        return spec.with_task(task=type(self).__name__, head=self.head_kind, pool=self.pool)

    def pooled_logits(self, outputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """outputs (b, l, o) -> (b, o) by the configured pooling over valid steps."""
        b, l, _ = outputs.shape
        if mask is None:
            mask = torch.ones(b, l, dtype=torch.bool, device=outputs.device)
        if self.pool == "mean":
            w = mask.unsqueeze(-1).to(outputs.dtype)
            return (outputs * w).sum(1) / w.sum(1).clamp_min(1.0)
        positions = torch.arange(l, device=outputs.device).expand(b, l)
        last = torch.where(mask, positions, -1).amax(1).clamp_min(0)  # (b,) last valid step
        return outputs[torch.arange(b, device=outputs.device), last]

    def _metrics(self, outputs, targets, mask):
        b, l, _ = outputs.shape
        if targets.is_floating_point() or targets.shape not in ((b,), (b, l)):
            raise ShapeError(
                f"SequenceClassifier: targets must be integer labels of shape ({b},) or ({b}, {l}), "
                f"got {targets.dtype} {tuple(targets.shape)}"
            )
        logits = outputs.float()
        if targets.dim() == 1:
            pooled = self.pooled_logits(logits, mask)
            loss = F.cross_entropy(pooled, targets.long())
            acc = (pooled.argmax(-1) == targets).float().mean()
        else:
            loss = _masked_mean(F.cross_entropy(logits.transpose(1, 2), targets.long(), reduction="none"), mask)
            acc = _masked_mean((logits.argmax(-1) == targets).float(), mask)
        return {"loss": loss, "acc": acc}


__all__ = ["Forecaster", "SSMTask", "SequenceClassifier", "TokenLM", "warmup_cosine"]
