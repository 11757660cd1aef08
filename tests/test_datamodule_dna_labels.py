"""DnaLabelsDataModule: labeled records (FASTA + table) and BED intervals, padding + mask,
reverse-complement augmentation, held-out files, and the errors naming file and row/line."""

from __future__ import annotations

import pytest
import torch
from test_datamodule_fasta import parse_fasta  # the plain-Python FASTA oracle

from streamssm.datamodules import synthetic
from streamssm.datamodules.dna_labels import DnaLabelsDataModule
from streamssm.encoding import encode_bases, reverse_complement
from streamssm.errors import ConfigError, DataFormatError
from streamssm.models import ArchConfig
from streamssm.tasks import SequenceClassifier


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    paths = synthetic.write_motif_sequences(tmp_path_factory.mktemp("labels"), n_train=40, n_test=20,
                                            min_length=20, max_length=60, seed=0)
    return paths, parse_fasta(paths["fasta"])


def table(path) -> dict[str, str]:
    rows = [line.strip().split(",") for line in open(path)][1:]
    return dict(rows)


def test_generated_labels_are_the_motif_presence(records):
    paths, seqs = records
    site, rc = synthetic.MOTIF, synthetic.MOTIF.translate(str.maketrans("ACGT", "TGCA"))[::-1]
    for split in ("train", "test"):
        labels = table(paths[split])
        assert {"motif", "none"} == set(labels.values())
        for name, label in labels.items():
            assert (site in seqs[name] or rc in seqs[name]) == (label == "motif"), name


def test_every_sequence_is_used_padded_and_masked_with_its_label(records):
    paths, seqs = records
    dm = DnaLabelsDataModule(str(paths["fasta"]), labels=str(paths["train"]), test_path=str(paths["test"]),
                             val_fraction=0.25, batch_size=8)
    dm.setup("fit")
    assert dm.classes == ["motif", "none"]
    assert dm.model_io() == {"input_kind": "tokens", "vocab_size": 5, "head": "classifier", "output_dim": 2}
    names = {s: [i.chrom for i in dm.split_items[s]] for s in ("train", "val", "test")}
    assert len(names["val"]) == 10 and sorted(names["train"] + names["val"]) == sorted(table(paths["train"]))
    assert sorted(names["test"]) == sorted(table(paths["test"]))
    truth = {**table(paths["train"]), **table(paths["test"])}
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        seen = 0
        for batch in loader:
            for row in range(batch["inputs"].shape[0]):
                item = dm.split_items[split][seen]
                n = int(batch["mask"][row].sum())
                assert n == len(seqs[item.chrom]) and batch["mask"][row, :n].all()
                assert torch.equal(batch["inputs"][row, :n], encode_bases(seqs[item.chrom]))
                assert (batch["inputs"][row, n:] == 4).all()  # padding is N
                assert dm.classes[int(batch["targets"][row])] == truth[item.chrom]
                seen += 1
        assert seen == len(dm.split_items[split])
    spec = dm.serving_spec()
    assert spec.classes == ("motif", "none") and spec.modality == "dna"


def test_reverse_complement_augmentation_applies_to_training_only(records):
    paths, seqs = records
    dm = DnaLabelsDataModule(str(paths["fasta"]), labels=str(paths["train"]), test_path=str(paths["test"]),
                             val_fraction=0.0, rc_prob=1.0, batch_size=4)
    dm.setup("fit")
    train, test = dm._dataset("train"), dm._dataset("test")
    item = dm.split_items["train"][0]
    assert torch.equal(train[0]["inputs"], reverse_complement(encode_bases(seqs[item.chrom])))
    assert torch.equal(test[0]["inputs"], encode_bases(seqs[dm.split_items["test"][0].chrom]))
    assert dm.val_dataloader() == []  # no validation: Lightning skips it


def test_padded_batch_decisions_equal_each_sequence_alone(records):
    """The classifier reads each padded sequence's decision at its true last base."""
    paths, _ = records
    dm = DnaLabelsDataModule(str(paths["fasta"]), labels=str(paths["train"]), val_fraction=0.0, batch_size=8)
    dm.setup("fit")
    torch.manual_seed(0)
    for pool in ("last", "mean"):
        task = SequenceClassifier(pool=pool, arch=ArchConfig(d_model=16, n_layers=1, headdim=8, d_state=8,
                                                             chunk_size=8))
        model = task.build_model(dm.model_io()).eval()
        batch = next(iter(dm.train_dataloader()))
        assert not batch["mask"].all()  # unequal lengths in the batch
        with torch.no_grad():
            pooled = task.pooled_logits(model(batch["inputs"])[0], batch["mask"])
            for row in range(batch["inputs"].shape[0]):
                n = int(batch["mask"][row].sum())
                alone = model(batch["inputs"][row : row + 1, :n])[0][0]  # (n, k)
                expected = alone[-1] if pool == "last" else alone.mean(0)
                torch.testing.assert_close(pooled[row], expected, rtol=1e-5, atol=1e-5)


def test_bed_intervals_with_labels_and_strand(tmp_path):
    fasta = synthetic.write_fasta(tmp_path / "ref.fa", n_chrom=2, length=400, seed=1)
    ref = parse_fasta(fasta)
    bed = synthetic.write_bed(tmp_path / "train.bed", [
        ("chr1", 10, 60, "enhancer", 0, "+"), ("chr1", 100, 180, "other", 0, "-"), ("chr2", 0, 33, "enhancer"),
        ("chr2", 300, 400, "other", 0, "+"),
    ])
    test_bed = synthetic.write_bed(tmp_path / "test.bed", [("chr2", 50, 90, "other")])
    dm = DnaLabelsDataModule(str(fasta), bed=str(bed), test_path=str(test_bed), val_fraction=0.0, batch_size=4)
    dm.setup("fit")
    assert dm.classes == ["enhancer", "other"]
    ds = dm._dataset("train")
    by_start = {(i.chrom, i.start): k for k, i in enumerate(dm.split_items["train"])}
    minus = ds[by_start[("chr1", 100)]]["inputs"]
    assert torch.equal(minus, reverse_complement(encode_bases(ref["chr1"][100:180])))
    assert torch.equal(ds[by_start[("chr2", 0)]]["inputs"], encode_bases(ref["chr2"][:33]))
    assert dm._dataset("test")[0]["inputs"].shape == (40,)
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (4, 100) and sorted(batch["mask"].sum(1).tolist()) == [33, 50, 80, 100]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([("chr1", 10, 401, "a")], r"bad.bed:1: interval chr1:10-401 ends past the end of chr1 \(length 400\)"),
        ([("chr1", 0, 10, "a"), ("chrX", 0, 10, "a")], r"bad.bed:2: chromosome 'chrX' is not in the FASTA"),
        ([("chr1", 0, 10, ".")], r"bad.bed:1: no label in column 3"),
        ([("chr1", 0, 10)], r"bad.bed:1: expected at least 4 columns"),
    ],
)
def test_bed_errors_name_the_line(tmp_path, rows, match):
    fasta = synthetic.write_fasta(tmp_path / "ref.fa", n_chrom=1, length=400, seed=1)
    bed = synthetic.write_bed(tmp_path / "bad.bed", rows)
    with pytest.raises(DataFormatError, match=match):
        DnaLabelsDataModule(str(fasta), bed=str(bed), val_fraction=0.0).setup("fit")


def test_table_errors_name_the_row(records, tmp_path):
    paths, _ = records
    fasta = str(paths["fasta"])
    (tmp_path / "missing.csv").write_text("name,label\ntrain_0,motif\nnot_a_record,none\n")
    with pytest.raises(DataFormatError, match=r"missing.csv row 2 \(file line 3\): record 'not_a_record' is not"):
        DnaLabelsDataModule(fasta, labels=str(tmp_path / "missing.csv"), val_fraction=0.0).setup("fit")
    (tmp_path / "empty.csv").write_text("name,label\ntrain_0,motif\ntrain_1,\n")
    with pytest.raises(DataFormatError, match=r"empty.csv row 2 .*'train_1' has no label"):
        DnaLabelsDataModule(fasta, labels=str(tmp_path / "empty.csv"), val_fraction=0.0).setup("fit")
    (tmp_path / "unknown.csv").write_text("name,label\ntest_0,motif\ntest_1,enhancer\n")
    with pytest.raises(DataFormatError, match=r"unknown.csv row 2 .*label 'enhancer' does not occur in the training"):
        DnaLabelsDataModule(fasta, labels=str(paths["train"]), test_path=str(tmp_path / "unknown.csv"),
                            val_fraction=0.0).setup("fit")
    with pytest.raises(DataFormatError, match=r"label_column 'class' not found"):
        DnaLabelsDataModule(fasta, labels=str(paths["train"]), label_column="class").setup("fit")
    with pytest.raises(DataFormatError, match=r"train sequence\(s\) are longer than max_length=30"):
        DnaLabelsDataModule(fasta, labels=str(paths["train"]), val_fraction=0.0, max_length=30).setup("fit")
    with pytest.raises(ConfigError, match="exactly one of labels"):
        DnaLabelsDataModule(fasta)
