"""A run resumed from a checkpoint saved in the middle of an epoch trains on the batches an
uninterrupted run trains on after that step (datamodules/resumable.py).

Defect: resuming a full recipe (checkpoints every N steps, mid-epoch) printed Lightning's "your
dataloader is not resumable" warning and started the epoch's order again: batches of that
epoch were trained on twice and others never. With DataLoader workers a resumed run even
replayed epoch 0's order (the iterator drew its indices before Lightning's ``set_epoch``), and
with ``max_epochs`` (the LR schedule's length from ``estimated_stepping_batches``) Lightning
never handed the saved loader state over.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import SequentialSampler

from streamssm.datamodules import FastaDataModule, SensorDataModule, synthetic
from streamssm.datamodules._common import EpochKeySampler
from streamssm.datamodules.resumable import ResumableDataLoader
from streamssm.models import ArchConfig
from streamssm.tasks import TokenLM

NOT_RESUMABLE = "ended before the epoch ended"


class RecordBatches(pl.Callback):
    """global step -> a digest of the batch trained on at that step."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen[trainer.global_step] = hashlib.sha1(batch["inputs"].numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def genome(tmp_path_factory) -> Path:
    return synthetic.write_fasta(tmp_path_factory.mktemp("dna") / "genome.fa", n_chrom=3, length=3000, seed=0)


def _fit(genome: Path, folder: Path, num_workers: int, *, max_steps: int = -1, max_epochs: int | None = None,
         ckpt_path: str | None = None, checkpoint: dict | None = None) -> tuple[dict[int, str], list[str]]:
    """Train a tiny TokenLM, checkpointing into ``folder`` (every 4 steps, or ModelCheckpoint's
    ``checkpoint`` arguments); (batches seen, warnings)."""
    pl.seed_everything(0, verbose=False)
    data = FastaDataModule(fasta=str(genome), window=32, val_chroms=["chr3"], samples_per_epoch=48, batch_size=8,
                           num_workers=num_workers, eval_windows=2)
    model = TokenLM(arch=ArchConfig(block="mamba2", d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=16))
    record = RecordBatches()
    every_4 = ModelCheckpoint(dirpath=folder, filename="{step}",
                              **(dict(every_n_train_steps=4, save_top_k=-1) if checkpoint is None else checkpoint))
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=max_epochs, limit_val_batches=0,
                         callbacks=[record, every_4], logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data, ckpt_path=ckpt_path)
    return record.seen, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("num_workers", "limits"),
    [(0, {"max_steps": 16}), (1, {"max_steps": 16}), (0, {"max_epochs": 3})],
    ids=["max_steps", "max_steps-1worker", "max_epochs"],
)
def test_a_resumed_run_trains_on_the_batches_of_an_uninterrupted_one(genome, tmp_path, num_workers, limits):
    whole, _ = _fit(genome, tmp_path / "whole", num_workers, **limits)
    assert len(set(whole.values())) == len(whole) >= 16  # no batch twice in these (about) three epochs

    def after(step: int) -> dict[int, str]:
        return {s: digest for s, digest in whole.items() if s >= step}

    # step 4: two thirds into epoch 0; the resumed run saves step 8 (a third into epoch 1), and a
    # second resume goes on from there (its place counts the batches the first resume skipped)
    first, said = _fit(genome, tmp_path / "first", num_workers, **limits, ckpt_path=str(tmp_path / "whole/step=4.ckpt"))
    assert first == after(4)
    assert not [m for m in said if NOT_RESUMABLE in m]
    second, _ = _fit(genome, tmp_path / "second", num_workers, **limits, ckpt_path=str(tmp_path / "first/step=8.ckpt"))
    assert second == after(8)

    # step 12 ends epoch 1: the resumed run starts epoch 2 at its first batch
    third, _ = _fit(genome, tmp_path / "third", num_workers, **limits, ckpt_path=str(tmp_path / "whole/step=12.ckpt"))
    assert third == after(12)


@pytest.mark.parametrize("checkpoint", [dict(), dict(save_last=True, every_n_train_steps=4)], ids=["epoch-end", "last"])
def test_a_run_stopped_by_max_steps_mid_epoch_resumes_that_epoch(genome, tmp_path, checkpoint):
    """Defect: ``max_steps`` stopped a run 3 batches into a 6-batch epoch; the checkpoint its
    epoch-end hooks saved (``step=3.ckpt``, or ``last.ckpt``) counted the epoch as done, and the
    run resumed with a larger ``max_steps`` started epoch 1: epoch 0's last 3 batches were never
    trained on and every later step saw another batch than an uninterrupted run."""
    whole, _ = _fit(genome, tmp_path / "whole", 0, max_steps=16)
    _fit(genome, tmp_path / "stopped", 0, max_steps=3, checkpoint=checkpoint)
    saved = tmp_path / "stopped" / ("last.ckpt" if checkpoint else "step=3.ckpt")
    state = torch.load(saved, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (state["epoch"], state["batches"], state["num_batches"]) == (0, 3, 6)
    resumed, _ = _fit(genome, tmp_path / "resumed", 0, max_steps=16, ckpt_path=str(saved), checkpoint=checkpoint)
    assert resumed == {s: digest for s, digest in whole.items() if s >= 3}


def _digests(batches) -> list[list[int]]:
    return [b.tolist() for b in batches]


@pytest.mark.parametrize("rank", [0, 1])
def test_under_ddp_each_rank_continues_its_own_shard(rank):
    """Lightning re-creates the loader with a DistributedSamplerWrapper (DDP); a rank's loader
    resumed from rank 0's state continues this rank's shard of the epoch."""

    def loader() -> ResumableDataLoader:
        plain = ResumableDataLoader(torch.arange(1000), batch_size=3, sampler=EpochKeySampler(40, seed=5))
        shard = DistributedSamplerWrapper(plain.sampler, num_replicas=2, rank=rank, shuffle=False)
        resharded = _update_dataloader(plain, shard)
        assert isinstance(resharded, ResumableDataLoader) and resharded.sampler is shard
        return resharded

    whole = loader()
    whole.sampler.set_epoch(2)
    expected = _digests(whole)  # 7 batches: 20 keys of epoch 2 (keys 80..119) for this rank

    interrupted = loader()
    interrupted.sampler.set_epoch(2)
    batches = iter(interrupted)
    before = [next(batches) for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 3, "batch_size": 3, "num_batches": 7}

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning: after iter(), before the first batch
    assert _digests(before) + _digests(resumed) == expected
    assert all(80 <= k < 120 for b in expected for k in b)


def test_a_state_it_cannot_place_restarts_the_epoch_and_says_so(caplog):
    sampler = EpochKeySampler(12, seed=0)
    loader = ResumableDataLoader(torch.arange(100), batch_size=4, sampler=sampler)
    loader.load_state_dict({"epoch": 0, "batches": 2, "batch_size": 2, "num_batches": 6})
    assert "had 6 batches of 2 per epoch (this run: 3 of 4); the resumed epoch starts again" in caplog.text
    assert _digests(loader) == [b.tolist() for b in torch.tensor(list(sampler)).split(4)]

    # Lightning's overfit_batches swaps in a SequentialSampler: no epoch, the same order each time
    in_order = ResumableDataLoader(torch.arange(100), batch_size=4, sampler=SequentialSampler(range(12)))
    in_order.load_state_dict({"epoch": 0, "batches": 2, "batch_size": 4, "num_batches": 3})
    assert "(SequentialSampler) has no epoch" in caplog.text
    assert _digests(in_order) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_sensor_windows_are_shuffled_per_epoch_by_seed(tmp_path):
    """The sensor datamodule shuffles with an epoch-keyed sampler (a torch RandomSampler's order
    depends on how many epochs this process has drawn, which a resumed run cannot repeat)."""
    path = synthetic.write_sensor_table(tmp_path / "s.csv", rows=300, channels=2, seed=0)

    def order(epoch: int) -> list[float]:
        dm = SensorDataModule(str(path), window=16, stride=8, batch_size=4, val_fraction=0.2)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader, ResumableDataLoader)
        loader.sampler.set_epoch(epoch)
        return [row for b in loader for row in b["inputs"][:, 0, 0].tolist()]

    assert order(1) == order(1) and order(1) != order(0) and sorted(order(1)) == sorted(order(0))


def test_fit_ckpt_path_last_of_a_full_recipe_resumes_its_epoch_quietly(tmp_path, monkeypatch):
    """``streamssm fit --config recipes/sensor.yaml --ckpt_path last`` (the recipe's DataLoader
    workers included), shrunk to seconds and checkpointing every 2 steps: the run stopped after
    step 3 left its last checkpoint at step 2, early in epoch 0."""
    from streamssm.commands.fit import build_cli
    from streamssm.commands.make_data import make_data

    monkeypatch.chdir(tmp_path)
    make_data("sensor")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "sensor.yaml"
    argv = ["--config", str(recipe), "--data.init_args.path", "runs/data/sensors.csv", "--data.init_args.window", "64",
            "--data.init_args.stride", "64", "--data.init_args.batch_size", "2", "--trainer.precision", "32-true",
            "--model.init_args.arch.d_model", "16", "--model.init_args.arch.n_layers", "1",
            "--model.init_args.arch.d_state", "8", "--model.init_args.arch.headdim", "8",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.limit_val_batches", "0", "--trainer.callbacks.every_n_train_steps", "2",
            "--trainer.callbacks.monitor", "null", "--trainer.callbacks.save_top_k", "1"]
    first = build_cli("fit", [*argv, "--trainer.max_steps", "3"])
    assert first.datamodule.num_workers > 0

    def loader_state() -> dict[str, int]:
        last = torch.load("runs/sensor/checkpoints/last.ckpt", weights_only=False)
        [state] = last["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        return state

    state = loader_state()
    assert state["epoch"] == 0 and state["batches"] == 2 < state["num_batches"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = build_cli("fit", [*argv, "--trainer.max_steps", "5", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 5
    assert not [w for w in caught if NOT_RESUMABLE in str(w.message)]
    assert loader_state()["epoch"] == 0 and loader_state()["batches"] == 4  # went on from batch 2
