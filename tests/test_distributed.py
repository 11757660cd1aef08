"""Lightning DDP over 2 CPU processes (gloo): the ranks train on different windows and end with
the same weights; the checkpoint loads for serving. And the FSDP recipe's strategy wraps each
residual block.

FSDP itself is not run here: Lightning's FSDPStrategy refuses CPU accelerators ("requires a GPU
accelerator") and torch's FSDP needs an accelerator device. benchmarks/bench_multigpu.py runs
recipes/dna_fsdp.yaml on GPUs.

The DDP run is this file executed as a script in a subprocess: Lightning's launcher starts
rank 1 by running the same command line again, which a pytest process could not survive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from streamssm.checkpoint import load_for_serving

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STEPS = 3


def _worker(out: Path) -> None:
    """One DDP rank (rank 0 launches rank 1): train STEPS steps, dump this rank's view."""
    import lightning.pytorch as pl
    from safetensors.torch import save_file

    from streamssm.datamodules import FastaDataModule
    from streamssm.models import ArchConfig
    from streamssm.tasks import TokenLM

    torch.set_num_threads(1)

    class Dump(pl.Callback):
        def __init__(self) -> None:
            self.first_inputs: list[list[int]] = []

        def _save(self, trainer, pl_module, tag: str) -> None:
            state = {k: v.detach().cpu().contiguous() for k, v in pl_module.model.state_dict().items()}
            save_file(state, str(out / f"{tag}-rank{trainer.global_rank}.safetensors"))

        def on_train_start(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module, "init")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.first_inputs.append(batch["inputs"][:, :16].flatten().tolist())

        def on_train_end(self, trainer, pl_module) -> None:
            self._save(trainer, pl_module, "final")
            (out / f"batches-rank{trainer.global_rank}.json").write_text(json.dumps(self.first_inputs))

    pl.seed_everything(0, verbose=False)
    data = FastaDataModule(fasta=str(out / "genome.fa"), window=64, val_chroms=["chr3"], samples_per_epoch=64,
                           eval_windows=2, batch_size=2, num_workers=0)
    task = TokenLM(ArchConfig(block="mamba2", d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=16), lr=1e-2,
                   warmup_steps=0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[Dump()])
    trainer.fit(task, datamodule=data)
    trainer.save_checkpoint(out / "ddp.ckpt")


def test_ddp_two_cpu_processes_keep_ranks_in_sync_and_checkpoint_serves(tmp_path):
    from safetensors.torch import load_file

    from streamssm.datamodules import synthetic
    from streamssm.datamodules.fasta import open_fasta

    synthetic.write_fasta(tmp_path / "genome.fa", n_chrom=3, length=2000, seed=0)
    open_fasta(tmp_path / "genome.fa").close()  # the index exists before the ranks open it
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    init = [load_file(str(tmp_path / f"init-rank{r}.safetensors")) for r in (0, 1)]
    final = [load_file(str(tmp_path / f"final-rank{r}.safetensors")) for r in (0, 1)]
    batches = [json.loads((tmp_path / f"batches-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == STEPS
    # the distributed sampler gave the ranks different windows at every step ...
    assert all(a != b for a, b in zip(*batches)), "both ranks trained on the same windows"
    # ... so equal weights after training come from the all-reduced gradients
    assert init[0].keys() == final[0].keys() == final[1].keys()
    for name in final[0]:
        torch.testing.assert_close(init[0][name], init[1][name], rtol=0, atol=0, msg=f"initial {name}")
        torch.testing.assert_close(final[0][name], final[1][name], rtol=0, atol=0, msg=f"final {name}")
    changed = [n for n in final[0] if not torch.equal(final[0][n], init[0][n])]
    assert len(changed) == len(final[0]), f"parameters left unchanged by training: {set(final[0]) - set(changed)}"

    bundle = load_for_serving(tmp_path / "ddp.ckpt")
    served = bundle.model.state_dict()
    for name, value in final[0].items():
        torch.testing.assert_close(served[name], value, rtol=0, atol=0, msg=name)
    assert bundle.spec.modality == "dna" and bundle.spec.task == "TokenLM"
    tokens = torch.randint(0, 5, (1, 32))
    y, _ = bundle.model(tokens)
    assert y.shape == (1, 32, 5) and torch.isfinite(y).all()


def test_fsdp_recipe_wraps_every_residual_block():
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    from streamssm.models import ResidualBlock

    recipe = yaml.safe_load((RECIPES / "dna_fsdp.yaml").read_text())
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    cfg = parser.parse_object({"strategy": recipe["trainer"]["strategy"]})
    strategy = parser.instantiate(cfg).strategy
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert set(policy._module_classes) == {ResidualBlock}
    assert strategy.sharding_strategy.name == "FULL_SHARD" and strategy._state_dict_type == "full"
    # Lightning's FSDP precision plugin cannot clip gradients by norm: the recipe must not ask for it
    assert recipe["trainer"].get("gradient_clip_val") is None
    ddp = yaml.safe_load((RECIPES / "dna_ddp.yaml").read_text())
    assert ddp["model"] == recipe["model"] and ddp["data"] == recipe["data"], "the two recipes train the same thing"


def test_streamssm_fit_with_ddp_runs_to_the_end(tmp_path):
    """`streamssm fit` over 2 CPU processes: every rank reaches the end and the resolved config
    lands beside the checkpoints. Regression: the CLI's SaveConfigBesideCheckpoints read
    ``trainer.log_dir`` (a broadcast under DDP) on rank 0 only, so rank 0 waited in it while rank 1
    waited in the first gradient all-reduce: every multi-device `streamssm fit` hung at train start."""
    from streamssm.datamodules import synthetic
    from streamssm.datamodules.fasta import open_fasta

    synthetic.write_fasta(tmp_path / "genome.fa", n_chrom=3, length=2000, seed=0)
    open_fasta(tmp_path / "genome.fa").close()  # the index exists before the ranks open it
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_PORT", "LOCAL_RANK", "RANK", "WORLD_SIZE", "TRITON_INTERPRET")}
    command = [sys.executable, "-m", "streamssm", "fit", "--config", str(RECIPES / "dna_tiny.yaml"),
               "--data.init_args.fasta", "genome.fa", "--data.init_args.val_chroms", "[chr3]",
               "--data.init_args.window", "64", "--data.init_args.samples_per_epoch", "64",
               "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
               "--trainer.callbacks.dirpath", "ckpts", "--trainer.enable_progress_bar", "false"]
    # its own session: on a hang, rank 1 (started by rank 0) is killed with it
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"streamssm fit with 2 DDP processes did not finish in 240 s:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    assert (tmp_path / "ckpts" / "last.ckpt").is_file() and (tmp_path / "ckpts" / "config.yaml").is_file()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
