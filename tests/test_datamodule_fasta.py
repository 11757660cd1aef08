"""FastaDataModule on tiny generated genomes: windows, splits, RC, N handling, BED, errors."""

import os

import pytest
import torch

from streamssm.datamodules import FastaDataModule, synthetic
from streamssm.encoding import decode_bases, encode_bases, reverse_complement
from streamssm.errors import ConfigError, DataFormatError
from streamssm.models import ModelConfig


def parse_fasta(path) -> dict[str, str]:
    """Independent plain-Python FASTA parser (the oracle)."""
    seqs: dict[str, list[str]] = {}
    name = None
    for line in open(path):
        line = line.strip()
        if line.startswith(">"):
            name = line[1:].split()[0]
            seqs[name] = []
        elif line:
            seqs[name].append(line)
    return {k: "".join(v) for k, v in seqs.items()}


@pytest.fixture(scope="module")
def genome(tmp_path_factory):
    path = synthetic.write_fasta(tmp_path_factory.mktemp("dna") / "genome.fa", n_chrom=3, length=3000, seed=0)
    return path, parse_fasta(path)


def make(path, **kw):
    kw.setdefault("window", 64)
    kw.setdefault("batch_size", 4)
    kw.setdefault("samples_per_epoch", 16)
    dm = FastaDataModule(path if isinstance(path, list) else str(path), **kw)
    dm.setup("fit")
    return dm


def test_batches_are_next_token_pairs_of_real_windows(genome):
    path, seqs = genome
    dm = make(path, rc_prob=0.0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (4, 64) and batch["inputs"].dtype == torch.long
    assert batch["targets"].shape == (4, 64) and batch["mask"].dtype == torch.bool
    assert torch.equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert int(batch["inputs"].max()) <= 4
    ds = dm._dataset("train")
    keys = list(dm.train_dataloader().sampler)[:4]
    for row, key in enumerate(keys):
        win, _ = ds.draw(key)
        expected = encode_bases(seqs[win.chrom][win.start : win.end])
        assert torch.equal(batch["inputs"][row], expected[:-1])
        assert torch.equal(batch["targets"][row], expected[1:])
    assert dm.model_io() == {"input_kind": "tokens", "vocab_size": 5, "head": "lm", "output_dim": 5}
    ModelConfig(**dm.model_io())  # the contract: model_io gives valid ModelConfig fields
    assert dm.serving_spec().alphabet == "ACGTN"


def test_random_windows_are_seeded_and_change_per_epoch(genome):
    path, _ = genome
    a, b = make(path, seed=1), make(path, seed=1)
    la, lb = a.train_dataloader(), b.train_dataloader()
    first = next(iter(la))["inputs"]
    assert torch.equal(first, next(iter(lb))["inputs"])
    la.sampler.set_epoch(1)
    assert not torch.equal(first, next(iter(la))["inputs"])
    other = make(path, seed=2)
    assert not torch.equal(first, next(iter(other.train_dataloader()))["inputs"])


def test_fraction_split_does_not_leak(genome):
    path, _ = genome
    dm = make(path, val_fraction=0.2, test_fraction=0.1, eval_windows=None)
    # per chromosome of 3000: train [0, 2100), val [2100, 2700), test [2700, 3000)
    for r in dm.split_regions["train"]:
        assert (r.start, r.end) == (0, 2100)
    ds = dm._dataset("train")
    for key in range(200):
        win, _ = ds.draw(key)
        assert 0 <= win.start and win.end <= 2100 and win.end - win.start == 65
    for split, lo, hi in (("val", 2100, 2700), ("test", 2700, 3000)):
        wins = dm._dataset(split).windows
        assert wins and all(lo <= w.start and w.end <= hi for w in wins)
        assert len(wins) == 3 * ((hi - lo) // 65)
    assert len(dm.val_dataloader().dataset) == len(dm._dataset("val"))


def test_chromosome_split_and_unknown_chromosome(genome):
    path, _ = genome
    dm = make(path, val_chroms=["chr2"], test_chroms=["chr3"])
    assert {r.chrom for r in dm.split_regions["train"]} == {"chr1"}
    assert {w.chrom for w in dm._dataset("val").windows} == {"chr2"}
    assert {w.chrom for w in dm._dataset("test").windows} == {"chr3"}
    assert all(dm._dataset("train").draw(k)[0].chrom == "chr1" for k in range(50))
    with pytest.raises(ConfigError, match="chrX"):
        make(path, val_chroms=["chrX"])
    with pytest.raises(ConfigError, match="overlap"):
        make(path, val_chroms=["chr2"], test_chroms=["chr2"])


def test_reverse_complement_augmentation(genome):
    path, seqs = genome
    dm = make(path, rc_prob=1.0)
    ds = dm._dataset("train")
    for key in range(5):
        win, _ = ds.draw(key)
        assert win.minus
        fwd = encode_bases(seqs[win.chrom][win.start : win.end])
        sample = ds[key]
        assert torch.equal(sample["inputs"], reverse_complement(fwd)[:-1])
    # evaluation windows are never flipped
    val = dm._dataset("val")
    w = val.windows[0]
    assert torch.equal(val[0]["inputs"], encode_bases(seqs[w.chrom][w.start : w.end])[:-1])
    half = make(path, rc_prob=0.5)
    flips = [half._dataset("train").draw(k)[0].minus for k in range(200)]
    assert 60 < sum(flips) < 140


def test_n_targets_masked_and_n_rich_windows_redrawn(tmp_path):
    path = tmp_path / "gappy.fa"
    # chr1: 200 ACGT, 600 N, 200 ACGT (soft-masked half)
    path.write_text(">chr1\n" + "ACGT" * 50 + "N" * 600 + "acgt" * 25 + "ACGT" * 25 + "\n")
    dm = make(path, window=32, val_fraction=0.0, max_n_fraction=0.0, samples_per_epoch=64)
    ds = dm._dataset("train")
    for key in range(64):
        s = ds[key]
        assert int((s["inputs"] == 4).sum()) == 0
    keep = make(path, window=32, val_fraction=0.0, max_n_fraction=1.0, mask_n=True, rc_prob=0.0)
    seen_n = False
    for key in range(64):
        s = keep._dataset("train")[key]
        assert torch.equal(s["mask"], s["targets"] != 4)
        seen_n |= bool((~s["mask"]).any())
    assert seen_n
    nomask = make(path, window=32, val_fraction=0.0, max_n_fraction=1.0, mask_n=False)
    assert bool(nomask._dataset("train")[0]["mask"].all())


def test_bed_windows_centre_strand_and_split(genome, tmp_path):
    path, seqs = genome
    bed = synthetic.write_bed(
        tmp_path / "w.bed",
        [
            ("chr1", 100, 200, "a", 0, "+"),
            ("chr2", 500, 520, "b", 0, "-"),
            ("chr1", 2380, 2420),  # straddles the train/val boundary at 2400: dropped
            ("chr1", 2600, 2610),  # inside val
            ("chr3", 0, 10),  # clamped at the chromosome start
        ],
    )
    dm = make(path, bed=str(bed), val_fraction=0.2, rc_prob=0.0)
    train = dm._dataset("train").windows
    assert [(w.chrom, w.start, w.end, w.minus) for w in train] == [
        ("chr1", 150 - 32, 150 + 33, False),
        ("chr2", 510 - 32, 510 + 33, True),
        ("chr3", 0, 65, False),
    ]
    assert [(w.chrom, w.start) for w in dm._dataset("val").windows] == [("chr1", 2605 - 32)]
    minus = dm._dataset("train")[1]
    assert decode_bases(minus["inputs"]) == decode_bases(reverse_complement(encode_bases(seqs["chr2"][478:543])))[:-1]
    bad = synthetic.write_bed(tmp_path / "bad.bed", [("chrZ", 0, 10)])
    with pytest.raises(DataFormatError, match="chrZ"):
        make(path, bed=str(bad))
    junk = tmp_path / "junk.bed"
    junk.write_text("chr1\tten\t20\n")
    with pytest.raises(DataFormatError, match="junk.bed:1"):
        make(path, bed=str(junk))


def test_missing_index_is_built(genome, tmp_path):
    src, _ = genome
    path = tmp_path / "copy.fa"
    path.write_text(src.read_text())
    assert not os.path.exists(str(path) + ".fai")
    dm = make(path)
    assert os.path.exists(str(path) + ".fai")
    assert next(iter(dm.train_dataloader()))["inputs"].shape == (4, 64)


def test_prepare_data_builds_the_index_before_setup(genome, tmp_path):
    src, _ = genome
    path = tmp_path / "fresh.fa"
    path.write_text(src.read_text())
    dm = FastaDataModule(str(path), window=64)
    dm.prepare_data()  # what Lightning runs once per node, before any rank's setup
    assert os.path.getsize(str(path) + ".fai") > 0


@pytest.mark.parametrize(
    "content,match",
    [
        (b"hello world\nthis is not fasta\n", "malformed"),
        (b">c1\nACGT\nACGTAC\nAC\n", "malformed"),
        (bytes(range(256)) * 8, "not a text FASTA"),
        (b">c1\nACGT\n>c1\nACGT\n", "Duplicate"),
        (b"\x1f\x8b\x08\x00gzipped", "gzip"),
        (b">c1\nACGT\n\n\n>c2\nACGT\n", "blank lines"),  # pyfaidx raised a RuntimeError
    ],
    ids=["text", "ragged", "binary", "duplicate", "gzip", "blank-lines"],
)
def test_bad_files_raise_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.fa"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=match) as exc:
        make(path)
    assert "bad.fa" in str(exc.value)


def test_missing_file_and_invalid_base(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        make(tmp_path / "nope.fa")
    path = tmp_path / "rna.fa"
    path.write_text(">r1\n" + "ACGU" * 40 + "\n")
    with pytest.raises(DataFormatError, match=r"rna\.fa.*r1.*'U'"):  # at setup, before any window
        make(path, window=16, val_fraction=0.0)
    path.write_text(">r1\n" + "ACGT" * 40 + "\n")
    with pytest.raises(ConfigError, match="window"):
        make(path, window=500, val_fraction=0.0)


def test_two_workers_give_the_same_batches(genome):
    path, _ = genome
    serial = make(path, num_workers=0, samples_per_epoch=12)
    parallel = make(path, num_workers=2, samples_per_epoch=12)
    a = [b["inputs"] for b in serial.train_dataloader()]
    b = [b["inputs"] for b in parallel.train_dataloader()]
    assert len(a) == len(b) == 3
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_lightning_trainer_reseeds_each_epoch_and_checkpoints_metadata(genome, tmp_path):
    import lightning.pytorch as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, batch["inputs"].clone()))
            return (self.w * batch["inputs"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    path, _ = genome
    dm = FastaDataModule(str(path), window=32, samples_per_epoch=8, batch_size=4)
    probe = Probe()
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(probe, datamodule=dm)
    first = torch.cat([x for e, x in probe.seen if e == 0])
    second = torch.cat([x for e, x in probe.seen if e == 1])
    assert first.shape == second.shape == (8, 32)
    assert not torch.equal(first, second)  # Lightning's set_epoch reached the sampler
    trainer.save_checkpoint(tmp_path / "probe.ckpt")
    ckpt = torch.load(tmp_path / "probe.ckpt", weights_only=False)
    assert not ckpt.get("FastaDataModule")  # the serving spec is stored once, by the task (streamssm.checkpoint)


def test_several_fasta_files_and_chromosome_subset(tmp_path):
    a = synthetic.write_fasta(tmp_path / "g" / "a.fa", n_chrom=2, length=800, seed=1)
    b = synthetic.write_fasta(tmp_path / "g" / "b.fasta", n_chrom=1, length=800, seed=2)
    seqs = [parse_fasta(a), parse_fasta(b)]
    dm = make(tmp_path / "g", window=32, val_fraction=0.25, rc_prob=0.0)  # a folder of FASTA files
    assert [p.name for p in dm.files] == ["a.fa", "b.fasta"]
    ds = dm._dataset("train")
    drawn = set()
    for key in range(100):
        win, _ = ds.draw(key)
        drawn.add((win.file, win.chrom))
        expected = encode_bases(seqs[win.file][win.chrom][win.start : win.end])
        assert torch.equal(ds[key]["inputs"], expected[:-1])
    assert drawn == {(0, "chr1"), (0, "chr2"), (1, "chr1")}  # same name in two files stays apart
    only = make([str(a), str(b)], window=32, chroms=["chr2"], val_fraction=0.25)
    assert {(r.file, r.chrom) for r in only.split_regions["train"]} == {(0, "chr2")}


def _write_lines(path, records: dict[str, str], width: int = 60) -> None:
    with open(path, "w") as fh:
        for name, seq in records.items():
            fh.write(f">{name} description\n")
            fh.writelines(seq[i : i + width] + "\n" for i in range(0, len(seq), width))


@pytest.mark.parametrize("block", [1 << 24, 7], ids=["one-block", "7-byte-blocks"])
def test_invalid_base_found_at_setup_with_record_and_position(tmp_path, monkeypatch, block):
    """A bad character was found only when a window holding it was sampled (hours into a run)."""
    import streamssm.datamodules.fasta as fasta_mod

    monkeypatch.setattr(fasta_mod, "VALIDATE_BLOCK", block)
    seq = "ACGT" * 500
    bad = seq[:1234] + "." + seq[1235:]
    _write_lines(tmp_path / "g.fa", {"chr1": seq, "chr2": bad})
    with pytest.raises(DataFormatError, match=r"g\.fa.*record 'chr2'.*'\.' \(not a base\) at position 1234 "
                                              r"\(0-based; line 21 of the record\)"):
        FastaDataModule(str(tmp_path / "g.fa"), window=16).setup("fit")
    dm = FastaDataModule(str(tmp_path / "g.fa"), window=16, chroms=["chr1"])  # records not in use are not read
    dm.setup("fit")
    assert dm.chrom_lengths == [(0, "chr1", 2000)]


def test_iupac_codes_warn_with_counts_or_are_refused(tmp_path, caplog):
    seq = "ACGT" * 100
    _write_lines(tmp_path / "g.fa", {"c1": seq[:50] + "Rry" + seq[53:], "c2": seq[:300] + "k" + seq[301:]})
    with caplog.at_level("WARNING", logger="streamssm.datamodules.fasta"):
        dm = FastaDataModule(str(tmp_path / "g.fa"), window=16)
        dm.setup("fit")
    warned = [r.getMessage() for r in caplog.records if "ambiguity" in r.getMessage()]
    assert len(warned) == 1 and "4 IUPAC ambiguity code(s) read as N (K: 1, R: 2, Y: 1)" in warned[0]
    with pytest.raises(DataFormatError, match=r"record 'c1'.*'R' \(an IUPAC ambiguity code.*position 50"):
        FastaDataModule(str(tmp_path / "g.fa"), window=16, iupac="error").setup("fit")
    _write_lines(tmp_path / "clean.fa", {"c1": seq})
    caplog.clear()
    with caplog.at_level("WARNING", logger="streamssm.datamodules.fasta"):
        FastaDataModule(str(tmp_path / "clean.fa"), window=16, iupac="error").setup("fit")
    assert not caplog.records


@pytest.mark.parametrize("changed", [
    {"c1": "ACGT" * 25, "c2": "ACGT" * 50},  # c1 shorter: c2 moved
    {"c1": "ACGT" * 60, "c2": "ACGT" * 50},  # c1 longer
    {"c1": "ACGT" * 50, "c2": "ACGT" * 50, "c3": "ACGT" * 50},  # a record appended
    {"x1": "ACGT" * 50, "c2": "ACGT" * 50},  # a record renamed
], ids=["shorter", "longer", "appended", "renamed"])
def test_stale_index_newer_than_the_fasta_is_refused(tmp_path, changed):
    """pyfaidx rebuilds an index older than the FASTA only: a FASTA replaced by one with an
    older time (cp -p, tar x) kept an index that read other bases, or not all, silently."""
    path = tmp_path / "g.fa"
    _write_lines(path, {"c1": "ACGT" * 50, "c2": "ACGT" * 50})
    FastaDataModule(str(path), window=16).setup("fit")  # writes g.fa.fai
    fai_time = os.stat(str(path) + ".fai").st_mtime
    _write_lines(path, changed)
    os.utime(path, (fai_time - 100, fai_time - 100))
    with pytest.raises(DataFormatError, match=r"g\.fa.*index .*g\.fa\.fai.*stale.*delete"):
        FastaDataModule(str(path), window=16).setup("fit")
    os.remove(str(path) + ".fai")
    FastaDataModule(str(path), window=16).setup("fit")  # rebuilt: fine


def test_fai_index_written_beside_the_fasta_is_logged_once(genome, tmp_path, caplog):
    src, _ = genome
    path = tmp_path / "mine.fa"
    path.write_text(src.read_text())
    with caplog.at_level("INFO", logger="streamssm.datamodules.fasta"):
        dm = FastaDataModule(str(path), window=64)
        dm.prepare_data()
        dm.setup("fit")
        FastaDataModule(str(path), window=64).setup("fit")
    wrote = [r.getMessage() for r in caplog.records if "FASTA index" in r.getMessage()]
    assert wrote == [f"wrote the FASTA index {path}.fai beside {path} (pyfaidx; reused while the FASTA is unchanged)"]


def test_validation_split_too_short_for_the_window_names_the_cause(tmp_path):
    _write_lines(tmp_path / "g.fa", {"c1": "ACGT" * 250})  # 1000 bases: val tail of 100
    dm = FastaDataModule(str(tmp_path / "g.fa"), window=200, val_fraction=0.1)
    dm.setup("fit")
    with pytest.raises(ConfigError, match=r"validation span of 100 bases is shorter than the 201 bases one window "
                                          r"needs; lower window or raise val_fraction \(now 0.1\)"):
        dm.val_dataloader()


def test_whole_eval_bits_per_base_of_a_held_out_chromosome_in_one_pass(genome):
    """streamssm test with whole_eval: one sample per held-out chromosome, run in chunks with the
    state carried; test/bpt equals the windowed scores with carried state summed by hand, and the
    full forward over the whole (short) chromosome."""
    import math

    import lightning.pytorch as pl
    import torch.nn.functional as F

    from streamssm.models import ArchConfig
    from streamssm.tasks import TokenLM

    path, seqs = genome
    dm = make(path, val_chroms=["chr2"], test_chroms=["chr3"], whole_eval=True, batch_size=4)
    batches = list(dm.test_dataloader())
    tokens = encode_bases(seqs["chr3"])
    assert len(batches) == 1 and torch.equal(batches[0]["inputs"][0].long(), tokens[:-1])
    torch.manual_seed(0)
    chunk = 700  # does not divide the 2999 scored bases
    task = TokenLM(arch=ArchConfig(d_model=16, n_layers=2, headdim=8, d_state=8, chunk_size=16), eval_chunk=chunk)
    model = task.build_model(dm.model_io()).eval()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False)
    bpt = trainer.test(task, datamodule=dm, verbose=False)[0]["test/bpt"]

    x, y = tokens[:-1][None], tokens[1:]
    counted = y != 4  # N targets are masked (mask_n)
    state, nll = None, 0.0
    with torch.no_grad():
        for s in range(0, x.shape[1], chunk):
            logits, state = model(x[:, s : s + chunk], state)
            step = F.cross_entropy(logits[0], y[s : s + chunk], reduction="none")
            nll += float(step[counted[s : s + chunk]].sum())
        full = F.cross_entropy(model(x)[0][0], y, reduction="none")[counted].sum().item()
    n = int(counted.sum())
    assert bpt == pytest.approx(nll / n / math.log(2), rel=1e-5)
    assert bpt == pytest.approx(full / n / math.log(2), rel=1e-4)
    assert dm.test_dataloader().batch_size == 1 and len(list(dm.val_dataloader())) == 1
