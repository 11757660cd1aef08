"""Tasks on plain tensors: losses/metrics by hand, config completion from model_io(),
optimizer groups and schedule, checkpoint -> load_for_serving -> same outputs, export, plots."""

from __future__ import annotations

import dataclasses
import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from streamssm.checkpoint import load_for_serving
from streamssm.errors import ConfigError, DataFormatError, ShapeError
from streamssm.commands.export import export_checkpoint
from streamssm.commands.export import main as export_main
from streamssm.models import ArchConfig, ModelConfig
from streamssm.plots import plot_training_curve, read_metrics
from streamssm.serving import ServingSpec
from streamssm.tasks import Forecaster, SequenceClassifier, TokenLM, warmup_cosine

ARCH = ArchConfig(d_model=16, n_layers=1, headdim=8, d_state=8, chunk_size=8)
TINY = dict(arch=ARCH, warmup_steps=2)


def tiny(**arch) -> dict:
    """TINY with some architecture fields changed."""
    return {**TINY, "arch": dataclasses.replace(ARCH, **arch)}


class PeriodicTokens(pl.LightningDataModule):
    """Tokens 0,1,2,3,0,1,... (vocab 5): next token is fully predictable."""

    def __init__(self, length: int = 16, batch_size: int = 4, n: int = 16) -> None:
        super().__init__()
        self.length, self.batch_size, self.n = length, batch_size, n

    def model_io(self) -> dict:
        return {"input_kind": "tokens", "vocab_size": 5, "head": "lm"}

    def serving_spec(self) -> ServingSpec:
        return ServingSpec(modality="dna", encoding="bases")

    def _loader(self, offset: int) -> DataLoader:
        seq = torch.arange(4096) % 4
        items = [{"inputs": seq[i : i + self.length], "targets": seq[i + 1 : i + self.length + 1]}
                 for i in range(offset, offset + self.n)]
        return DataLoader(items, batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1000)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    kw.setdefault("max_steps", 3)
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False,
                      default_root_dir=tmp_path, limit_val_batches=1, num_sanity_val_steps=0, **kw)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 4, 20, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 4, None, 0.1) == 1.0


def test_token_lm_metrics_by_hand():
    task = TokenLM(**TINY)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    m = task._metrics(logits, targets, mask)
    nll = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert m["loss"].item() == pytest.approx(nll[mask].mean().item(), rel=1e-5)
    assert m["bpt"].item() == pytest.approx(m["loss"].item() / math.log(2), rel=1e-6)
    assert m["acc"].item() == pytest.approx((logits.argmax(-1) == targets)[mask].float().mean().item())
    with pytest.raises(ShapeError, match="targets"):
        task._metrics(logits, targets.float(), None)


def test_forecaster_horizon_alignment():
    task = Forecaster(horizon=3, **TINY)
    series = torch.randn(2, 9, 2)  # x_0 .. x_8
    targets = series[:, 1:]  # (2, 8, 2): value after each of the 8 input steps
    b, l, k = targets.shape
    perfect = torch.zeros(b, l, 3, k)
    for j in range(3):
        perfect[:, : l - j, j] = targets[:, j:]  # prediction j at step t = x_{t+1+j}
    m = task._metrics(perfect.view(b, l, 3 * k), targets, None)
    assert m["loss"].item() == pytest.approx(0.0, abs=1e-7) and m["mae"].item() == pytest.approx(0.0, abs=1e-7)
    shifted = perfect.clone()
    shifted[:, :, 2] += 1.0  # the horizon-3 prediction is off by exactly 1 everywhere it is scored
    m = task._metrics(shifted.view(b, l, 3 * k), targets, None)
    assert m["mse_h3"].item() == pytest.approx(1.0, rel=1e-6)
    assert m["mse"].item() == pytest.approx(1.0 / 3, rel=1e-6)
    with pytest.raises(ShapeError, match="horizon 3"):
        task._metrics(perfect.view(b, l, 3 * k), targets[..., :1], None)


def test_classifier_last_valid_step_and_per_step_labels():
    task = SequenceClassifier(**TINY)
    logits = torch.zeros(2, 4, 3)
    logits[0, 1, 2] = 10.0  # row 0: last valid step is 1 -> class 2
    logits[0, 3, 0] = 10.0  # (masked out)
    logits[1, 3, 1] = 10.0  # row 1: last step 3 -> class 1
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    m = task._metrics(logits, torch.tensor([2, 1]), mask)
    assert m["acc"].item() == 1.0 and m["loss"].item() < 1e-3
    m = task._metrics(logits, torch.tensor([0, 1]), mask)
    assert m["acc"].item() == 0.5
    per_step = task._metrics(logits, torch.full((2, 4), 1), None)
    assert per_step["acc"].item() == pytest.approx(1 / 8)
    with pytest.raises(ShapeError, match="labels"):
        task._metrics(logits, torch.zeros(3, dtype=torch.long), None)


def test_config_completed_from_model_io_and_conflicts_named():
    cfg = TokenLM(**TINY).model_config({"input_kind": "tokens", "vocab_size": 5})
    assert (cfg.vocab_size, cfg.head, cfg.resolved_output_dim, cfg.d_model) == (5, "lm", 5, 16)
    cfg = Forecaster(horizon=4, **TINY).model_config({"input_kind": "continuous", "input_dim": 3, "output_dim": 2})
    assert (cfg.input_dim, cfg.output_dim, cfg.head) == (3, 8, "regression")
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenLM(vocab_size=4, **TINY).model_config({"input_kind": "tokens", "vocab_size": 5})
    with pytest.raises(ConfigError, match="head"):
        Forecaster(**TINY).model_config({"input_kind": "tokens", "vocab_size": 5, "head": "lm"})
    with pytest.raises(ConfigError, match="input_kind"):
        TokenLM(**TINY).model_config(None)
    with pytest.raises(ConfigError, match="not ModelConfig fields"):
        TokenLM(**TINY).model_config({"input_kind": "tokens", "vocab_size": 5, "vocab": "ACGT"})
    with pytest.raises(ConfigError, match="lr"):
        TokenLM(lr=-1.0)
    with pytest.raises(ConfigError, match="headdim"):
        TokenLM(**tiny(headdim=7))
    with pytest.raises(ConfigError, match=r"model_io\(\) sets architecture fields \['d_model'\]"):
        TokenLM(**TINY).model_config({"input_kind": "tokens", "vocab_size": 5, "d_model": 99})
    same = TokenLM(**TINY).model_config({"input_kind": "tokens", "vocab_size": 5, "d_model": 16})
    assert same.arch == ARCH  # a datamodule repeating the architecture's own value is fine
    with pytest.raises(ConfigError, match=r"arch takes an ArchConfig \(pass cfg.arch\)"):
        TokenLM(ModelConfig.of(ARCH, vocab_size=5))
    assert TokenLM(ModelConfig.of(ARCH, vocab_size=5).arch).arch == ARCH


def test_optimizer_groups_and_warmup():
    task = TokenLM(vocab_size=5, input_kind="tokens", weight_decay=0.5, lr=1e-2, max_steps=10, **TINY)
    task.build_model()
    conf = task.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in task.model.named_parameters() if id(p) in decay}
    assert opt.param_groups[0]["weight_decay"] == 0.5 and opt.param_groups[1]["weight_decay"] == 0.0
    assert not any(n.endswith(("A_log", ".D", "dt_bias", "bias")) or "norm" in n for n in names)
    assert any(n.endswith("in_proj.weight") for n in names)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5)  # warmup step 0 of 2
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # min_lr_ratio 0.1 at max_steps


def test_weight_decay_groups_follow_names_through_wrappers():
    """FSDP / activation-checkpoint wrappers insert prefixes into parameter names (and FSDP
    flattens shapes): decay is decided by the unwrapped name, not by the shape."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    task = TokenLM(vocab_size=5, input_kind="tokens", weight_decay=0.5, **tiny(block="mamba3"))
    model = task.build_model()
    assert not any(n.endswith(("B_bias", "C_bias", "A_log")) for n in task._decay_names)
    model.backbone.layers[0] = checkpoint_wrapper(model.backbone.layers[0])
    opt = task.configure_optimizers()["optimizer"]
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    wrapped = dict(model.named_parameters())
    name = "backbone.layers.0._checkpoint_wrapped_module.mixer.in_proj.weight"
    assert name in wrapped and id(wrapped[name]) in decay
    assert len(decay) == len(task._decay_names)


@pytest.mark.parametrize("block", ["mamba", "mamba2"])
def test_fit_checkpoint_serving_and_export_round_trip(tmp_path, block):
    task = TokenLM(lr=3e-3, **tiny(block=block))
    trainer = _trainer(tmp_path)
    trainer.fit(task, datamodule=PeriodicTokens())
    assert task.model.cfg.vocab_size == 5  # completed from the datamodule
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)

    x = (torch.arange(23) % 4)[None]
    task.eval()
    with torch.no_grad():
        expected = task(x)
        bundle = load_for_serving(ckpt)
        torch.testing.assert_close(bundle.model(x)[0], expected, rtol=0, atol=0)
        assert bundle.spec == ServingSpec(modality="dna", encoding="bases", task="TokenLM", head="lm")
        assert bundle.config.block == block

        reloaded = TokenLM.load_from_checkpoint(ckpt, map_location="cpu").eval()
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=0)
        assert reloaded.arch == task.arch and reloaded.hparams.arch == task.arch.to_dict()
        assert reloaded.serving_spec == bundle.spec

        out, fingerprint = export_checkpoint(ckpt, tmp_path / "m.safetensors")
        exported = load_for_serving(out)
        torch.testing.assert_close(exported.model(x)[0], expected, rtol=0, atol=0)
        assert exported.fingerprint == fingerprint == bundle.fingerprint
        assert exported.spec == bundle.spec


def test_resume_rejects_a_different_architecture(tmp_path):
    task = TokenLM(**TINY)
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(task, datamodule=PeriodicTokens())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    wider = TokenLM(**tiny(d_model=24))
    with pytest.raises(ConfigError, match="d_model"):
        _trainer(tmp_path, max_steps=2).fit(wider, datamodule=PeriodicTokens(), ckpt_path=tmp_path / "a.ckpt")


def test_export_cli_errors(tmp_path, capsys):
    from streamssm.cli import main as cli_main

    args = ["export", "--checkpoint", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "x.safetensors")]
    assert cli_main(args) == 1  # the one error path of the streamssm command: one line, no traceback
    err = capsys.readouterr().err
    assert "streamssm export: error:" in err and "does not exist" in err and "Traceback" not in err
    with pytest.raises(DataFormatError, match="does not exist"):
        export_main(args[1:])
    with pytest.raises(ConfigError, match="safetensors"):
        export_checkpoint(tmp_path / "nope.ckpt", tmp_path / "x.bin")


def test_forecaster_and_classifier_fit_on_plain_loaders(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 12, 2, generator=g)
    reg = [{"inputs": x[i, :-1], "targets": x[i, 1:]} for i in range(8)]
    task = Forecaster(horizon=2, input_kind="continuous", input_dim=2, output_dim=2, **TINY)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(task, DataLoader(reg, batch_size=4), DataLoader(reg, batch_size=4))
    assert task.model.cfg.output_dim == 4
    trainer.save_checkpoint(tmp_path / "f.ckpt")
    reloaded = Forecaster.load_from_checkpoint(tmp_path / "f.ckpt", weights_only=True)  # hparams: plain data
    assert (reloaded.arch, reloaded.horizon, reloaded.model.cfg) == (ARCH, 2, task.model.cfg)
    cls = [{"inputs": x[i], "targets": torch.tensor(i % 3)} for i in range(8)]
    clf = SequenceClassifier(input_kind="continuous", input_dim=2, output_dim=3, **TINY)
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(clf, DataLoader(cls, batch_size=4), DataLoader(cls, batch_size=4))
    assert {"val/loss", "val/acc"} <= set(trainer.callback_metrics)


def test_training_curve_png(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    rows = ["epoch,step,lr,train/loss,val/loss"] + [f"0,{s},0.001,{2.0 / (s + 1)}," for s in range(10)]
    rows.append("0,9,,,0.4")
    csv_path.write_text("\n".join(rows) + "\n")
    series = read_metrics(csv_path)
    assert len(series["train/loss"]) == 10 and series["val/loss"] == [(9, 0.4)]
    png = plot_training_curve(csv_path, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.csv").write_text("epoch,step,lr\n0,1,0.1\n")
    with pytest.raises(DataFormatError, match="no loss column"):
        plot_training_curve(tmp_path / "empty.csv", tmp_path / "e.png")


# ------------------------------------------------------------------ what a training run prints

_FIT_SCRIPT = """
import logging, sys
sys.path.insert(0, sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as the CLI does
import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from streamssm.tasks import TokenLM
from streamssm.serving import ServingSpec
from test_tasks import TINY, PeriodicTokens
trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=CSVLogger(sys.argv[1]), default_root_dir=sys.argv[1],
                     limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1)
trainer.fit(TokenLM(**TINY), datamodule=PeriodicTokens(n=8, batch_size=4))  # 2 batches/epoch: 3 epochs
"""


def test_fit_output_is_quiet_and_counts_steps(tmp_path):
    """A default Trainer (rich bar, model summary, checkpointing, CSV logger) bounded by max_steps,
    in a fresh process with every warning shown: no tips, FLOPs 0, v_num, deprecation or
    `Epoch 2/-2`; the bar counts the 5 steps across 3 epochs; the summary is one line."""
    import os
    import re
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "default", "COLUMNS": "120"}
    done = subprocess.run([sys.executable, "-c", _FIT_SCRIPT, str(tmp_path), os.path.dirname(__file__)],
                          capture_output=True, text=True, env=env, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for noise in ("Tip:", "FLOPs", "v_num", "deprecated", "LeafSpec", "Warning"):
        assert noise not in out, f"{noise!r} in the output of a fit:\n{out}"
    assert not re.search(r"Epoch \d+/-\d", out), out
    assert re.search(r"Epoch 2 · step\s.*\b5/5\b", out), out
    assert re.search(r"model: [\d.]+ ?\w* parameters \([\d.]+ ?\w* trainable", out), out


def test_only_lightnings_default_bar_and_summary_are_replaced(tmp_path):
    from lightning.pytorch.callbacks import (
        ModelSummary,
        ProgressBar,
        RichModelSummary,
        TQDMProgressBar,
    )

    from streamssm.lightning_ui import (
        ParameterSummary,
        StepProgressBar,
        use_streamssm_callbacks,
    )

    default = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    use_streamssm_callbacks(default)
    assert isinstance(default.progress_bar_callback, StepProgressBar)
    assert [type(c) for c in default.callbacks if isinstance(c, ModelSummary)] == [ParameterSummary]
    chosen = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path,
                        callbacks=[TQDMProgressBar(), RichModelSummary(max_depth=2)])
    use_streamssm_callbacks(chosen)
    assert [type(c) for c in chosen.callbacks if isinstance(c, (ProgressBar, ModelSummary))] \
        == [TQDMProgressBar, RichModelSummary]


def _metrics_dir(tmp_path, header: str, rows: list[str], task: str | None):
    log_dir = tmp_path / "runs" / "sensor_tiny" / "version_3"
    log_dir.mkdir(parents=True)
    (log_dir / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
    if task:
        (log_dir / "config.yaml").write_text(f"model:\n  class_path: streamssm.tasks.{task}\n  init_args: {{}}\n")
    return log_dir / "metrics.csv"


def test_training_curve_title_names_run_and_task_and_axes_state_units(tmp_path):
    from streamssm.plots import training_curve_figure

    lm = _metrics_dir(tmp_path / "lm", "epoch,step,lr,train/loss,train/bpt,val/loss,val/bpt",
                      [f"0,{s},0.001,{math.log(2) * 2},2.0,," for s in range(5)] + ["0,4,,,,0.693,1.0"], "TokenLM")
    fig = training_curve_figure(lm)
    loss_ax, lr_ax = fig.axes
    assert loss_ax.get_title() == "sensor_tiny · TokenLM (version_3)"  # not "version_3"
    assert loss_ax.get_ylabel() == "cross-entropy (bits per token)"
    assert sorted(line.get_label() for line in loss_ax.get_lines()) == ["train/bpt", "val/bpt"]
    assert lr_ax.get_ylabel() == "learning rate" and lr_ax.get_xlabel() == "optimizer step"

    clf = _metrics_dir(tmp_path / "clf", "epoch,step,train/loss,train/acc", ["0,1,1.3862944,0.5"], None)
    fig = training_curve_figure(clf)
    assert fig.axes[0].get_title() == "sensor_tiny (version_3)"
    assert fig.axes[0].get_ylabel() == "cross-entropy (bits)"
    assert fig.axes[0].get_lines()[0].get_ydata()[0] == pytest.approx(2.0)  # nats -> bits

    fc = _metrics_dir(tmp_path / "fc", "epoch,step,train/loss,train/mse,train/mae", ["0,1,0.5,0.5,0.6"], "Forecaster")
    assert training_curve_figure(fc).axes[0].get_ylabel() == "MSE (training targets)"
    assert training_curve_figure(fc, title="mine").axes[0].get_title() == "mine"


def test_the_empty_validation_list_is_not_warned_about_but_other_empty_loaders_are():
    """With val_fraction 0 a datamodule returns [] (no validation): Lightning's zero-length note
    on it says nothing; a zero-length DataLoader still gets it (that may be a mistake)."""
    import warnings

    from lightning.pytorch.strategies import SingleDeviceStrategy
    from lightning.pytorch.utilities.data import has_len_all_ranks
    from torch.utils.data import DataLoader

    from streamssm.lightning_ui import quiet_lightning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        strategy = SingleDeviceStrategy(device="cpu")
        has_len_all_ranks([], strategy)
        has_len_all_ranks(DataLoader([]), strategy)
    assert [str(w.message).split(" across")[0] for w in caught] == ["Total length of `DataLoader`"]
