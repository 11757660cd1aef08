"""Labeled DNA sequences for classification (genomic-benchmark style), read with pyfaidx.

Shape legend: b batch, l longest sequence of the batch. A batch is
``{"inputs": (b, l) long tokens A,C,G,T,N -> 0..4, "mask": (b, l) bool, "targets": (b,) long}``:
sequences of unequal length are padded at the end (token N, ``mask`` False; ``pad_batch``), and
``SequenceClassifier`` reads each decision at the sequence's true last base (``pool="last"``)
or pools its valid steps (``pool="mean"``), as for sensor series.

Sequences come in one of two ways:

- **records**: ``fasta`` holds one record per sequence and ``labels`` is a CSV/Parquet table
  naming each record and its label (``name_column``, ``label_column``). Records without a row
  are not used (several tables may share one FASTA).
- **intervals**: ``bed`` rows ``chrom start end ...`` (0-based, half-open) over a reference
  ``fasta``, the label in column ``bed_label_field`` (0-based; 3 is BED's name column); a row
  with strand ``-`` (column 5) is read reverse-complemented.

Splits: ``val_path`` / ``test_path`` are tables (records) or BED files (intervals) of the same
kind, over the same FASTA file(s); otherwise a seeded random ``val_fraction`` / ``test_fraction``
of the labeled sequences is held out. Classes are the training labels (sorted); a held-out label
outside them raises. ``rc_prob`` reverse-complements training sequences at random (per epoch).

Errors (``DataFormatError``) name the file and row/line: a record or chromosome the FASTA lacks,
an empty label, an interval past the end of its chromosome, a held-out label never seen in
training, a sequence longer than ``max_length``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from streamssm.datamodules._common import (
    BaseDataModule,
    EpochKeySampler,
    check_fractions,
    check_positive,
    pad_batch,
    resolve_files,
)
from streamssm.datamodules.fasta import (
    FASTA_SUFFIXES,
    FastaReader,
    open_fasta,
    read_bed_fields,
    validate_fasta,
)
from streamssm.datamodules.sensor import TABLE_SUFFIXES, scan_table
from torch.utils.data import Dataset

from streamssm.encoding import DNA_ALPHABET, DNA_VOCAB_SIZE, N_TOKEN, reverse_complement
from streamssm.errors import ConfigError, DataFormatError
from streamssm.serving import ServingSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabeledSequence:
    """Bases ``[start, end)`` of record ``chrom`` in FASTA file ``file``, its label, and where it
    was listed (``source``: 'table.csv row 3' / 'x.bed:3') for error messages."""

    file: int
    chrom: str
    start: int
    end: int
    minus: bool
    label: str
    source: str

    @property
    def length(self) -> int:
        return self.end - self.start


class LabeledSequenceDataset(Dataset):
    """Index (or epoch key, taken modulo the size) -> ``{"inputs" (n,), "mask" (n,), "targets" ()}``.

    With ``rc_prob > 0`` (training) the strand is flipped at random, seeded by the key.
    """

    def __init__(
        self, reader: FastaReader, items: list[LabeledSequence], class_ids: dict[str, int], rc_prob: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.reader = reader
        self.items = items
        self.class_ids = class_ids
        self.rc_prob = rc_prob
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        item = self.items[int(key) % len(self.items)]
        tokens = self.reader.read(item.file, item.chrom, item.start, item.end, item.minus)
        if self.rc_prob > 0 and np.random.default_rng([self.seed, int(key)]).random() < self.rc_prob:
            tokens = reverse_complement(tokens)
        return {
            "inputs": torch.from_numpy(tokens.astype(np.int64)),
            "mask": torch.ones(tokens.size, dtype=torch.bool),
            "targets": torch.tensor(self.class_ids[item.label], dtype=torch.long),
        }


def _dna_pad(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return pad_batch(samples, pad_value=N_TOKEN)


class DnaLabelsDataModule(BaseDataModule):
    """Sequence classification over labeled DNA (records + label table, or BED intervals).

    Args:
        fasta: FASTA file(s) (a file, folder, glob or list): the records, or the reference genome.
        labels: records mode: CSV/Parquet table with ``name_column`` and ``label_column``.
        bed: intervals mode: BED file with the label in column ``bed_label_field``.
        name_column / label_column: the record-name and label columns of the tables.
        bed_label_field: 0-based column of the label in BED rows (3: the BED name column).
        val_path / test_path: held-out table(s) or BED file(s), the same kind as ``labels``/``bed``.
        val_fraction / test_fraction: otherwise, a seeded random share of the labeled sequences.
        max_length: refuse sequences longer than this (None: any length; a batch is as long as
            its longest sequence).
        rc_prob: probability of reverse-complementing a training sequence.
    """

    collate_fn = staticmethod(_dna_pad)
    input_files = {"fasta": FASTA_SUFFIXES,
                   **dict.fromkeys(("labels", "bed", "val_path", "test_path"), (*TABLE_SUFFIXES, ".bed"))}

    def __init__(
        self,
        fasta: str | list[str],
        labels: str | None = None,
        bed: str | None = None,
        name_column: str = "name",
        label_column: str = "label",
        bed_label_field: int = 3,
        val_path: str | None = None,
        test_path: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        max_length: int | None = None,
        rc_prob: float = 0.0,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        if (labels is None) == (bed is None):
            raise ConfigError("DnaLabelsDataModule: give exactly one of labels (records + table) or bed (intervals)")
        check_positive("bed_label_field", bed_label_field, minimum=3)
        if max_length is not None:
            check_positive("max_length", max_length)
        if not 0.0 <= rc_prob <= 1.0:
            raise ConfigError(f"rc_prob: expected a probability in [0, 1], got {rc_prob}")
        val_fraction = 0.0 if val_path is not None else val_fraction
        test_fraction = 0.0 if test_path is not None else test_fraction
        check_fractions(val_fraction, test_fraction)
        self.save_hyperparameters(logger=False)
        self.fasta = fasta
        self.labels = labels
        self.bed = bed
        self.name_column = name_column
        self.label_column = label_column
        self.bed_label_field = int(bed_label_field)
        self.paths = {"train": labels if labels is not None else bed, "val": val_path, "test": test_path}
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.max_length = max_length
        self.rc_prob = float(rc_prob)
        self.files: list[Path] = []
        self.classes: list[str] = []
        self.split_items: dict[str, list[LabeledSequence]] = {}

    # ------------------------------------------------------------------ metadata
    def model_io(self) -> dict[str, Any]:
        self._ensure_loaded()
        return {"input_kind": "tokens", "vocab_size": DNA_VOCAB_SIZE, "head": "classifier",
                "output_dim": len(self.classes)}

    def serving_spec(self) -> ServingSpec:
        self._ensure_loaded()
        longest = max(i.length for i in self.split_items["train"])
        return ServingSpec(modality="dna", encoding="bases", alphabet=DNA_ALPHABET, classes=tuple(self.classes),
                           window=longest, options=(("rc_prob", self.rc_prob),))

    # ------------------------------------------------------------------ loading
    def _ensure_loaded(self) -> None:
        if not self.split_items:
            self._load()

    def _lengths(self) -> dict[str, tuple[int, int]]:
        """Record name -> (file index, length), the first file holding a name winning."""
        self.files = resolve_files(self.fasta, "fasta", FASTA_SUFFIXES)
        out: dict[str, tuple[int, int]] = {}
        for i, path in enumerate(self.files):
            fa = open_fasta(path)
            try:
                for name in fa.keys():
                    out.setdefault(name, (i, len(fa.faidx.index[name])))
            finally:
                fa.close()
        return out

    def _read_table(self, path: str, lengths: dict[str, tuple[int, int]]) -> list[LabeledSequence]:
        df = scan_table(Path(path)).collect()
        for role, col in (("name_column", self.name_column), ("label_column", self.label_column)):
            if col not in df.columns:
                raise DataFormatError(f"{role} {col!r} not found in {path}; columns: {df.columns}")
        names = df[self.name_column].cast(pl.String).to_list()
        labels = df[self.label_column].cast(pl.String).to_list()
        items = []
        for row, (name, label) in enumerate(zip(names, labels, strict=True), start=1):
            where = f"{path} row {row} (file line {row + 1})"
            if name not in lengths:
                raise DataFormatError(f"{where}: record {name!r} is not in the FASTA file(s) {self._fasta_names()}")
            if label is None or not label.strip():
                raise DataFormatError(f"{where}: record {name!r} has no label")
            file, length = lengths[name]
            items.append(LabeledSequence(file, name, 0, length, False, label.strip(), where))
        return items

    def _read_bed(self, path: str, lengths: dict[str, tuple[int, int]]) -> list[LabeledSequence]:
        items = []
        for fields, lineno in read_bed_fields(path, min_fields=self.bed_label_field + 1):
            where = f"{path}:{lineno}"
            chrom, start, end = fields[0], int(fields[1]), int(fields[2])
            if chrom not in lengths:
                raise DataFormatError(f"{where}: chromosome {chrom!r} is not in the FASTA file(s) {self._fasta_names()}")
            file, length = lengths[chrom]
            if end > length:
                raise DataFormatError(f"{where}: interval {chrom}:{start}-{end} ends past the end of {chrom} "
                                      f"(length {length})")
            label = fields[self.bed_label_field].strip()
            if not label or label == ".":
                raise DataFormatError(f"{where}: no label in column {self.bed_label_field} (0-based)")
            minus = len(fields) >= 6 and fields[5].strip() == "-"
            items.append(LabeledSequence(file, chrom, start, end, minus, label, where))
        return items

    def _fasta_names(self) -> str:
        return ", ".join(str(p) for p in self.files[:3]) + (" ..." if len(self.files) > 3 else "")

    def _load(self) -> None:
        lengths = self._lengths()
        read = self._read_table if self.labels is not None else self._read_bed
        items = {split: read(p, lengths) for split, p in self.paths.items() if p is not None}
        train = items.pop("train")
        if not train:
            raise DataFormatError(f"{self.paths['train']} lists no sequence")
        order = np.random.default_rng([self.seed, 7]).permutation(len(train))
        n_test = int(round(len(train) * self.test_fraction))
        n_val = int(round(len(train) * self.val_fraction))
        held = {"test": order[:n_test], "val": order[n_test:n_test + n_val]}
        for split, idx in held.items():
            if len(idx):
                items[split] = [train[i] for i in sorted(idx)]
        split_items = {"train": [train[i] for i in sorted(order[n_test + n_val:])], **items}
        if not split_items["train"]:
            raise ConfigError(f"no training sequence is left after val_fraction/test_fraction ({len(train)} listed)")
        self.classes = sorted({i.label for i in split_items["train"]})
        for split, its in split_items.items():
            unknown = [i for i in its if i.label not in self.classes]
            if unknown:
                raise DataFormatError(f"{unknown[0].source}: label {unknown[0].label!r} does not occur in the training "
                                      f"sequences (classes {self.classes}); {len(unknown)} {split} sequence(s) have "
                                      f"unknown labels")
            too_long = [i for i in its if self.max_length is not None and i.length > self.max_length]
            if too_long:
                longest = max(too_long, key=lambda i: i.length)
                raise DataFormatError(f"{len(too_long)} {split} sequence(s) are longer than max_length="
                                      f"{self.max_length} (longest {longest.length}, {longest.source}); raise "
                                      f"max_length or shorten them")
        if len(self.classes) < 2:
            log.warning("the training sequences have a single class %s", self.classes)
        self._validate(split_items)
        self.split_items = split_items

    def _validate(self, split_items: dict[str, list[LabeledSequence]]) -> None:
        """Every base of the records in use, once (``fasta.validate_fasta``; ambiguity codes as N)."""
        used: dict[int, set[str]] = {}
        for its in split_items.values():
            for i in its:
                used.setdefault(i.file, set()).add(i.chrom)
        for file, names in used.items():
            fa = open_fasta(self.files[file], build_index=False)
            try:
                found = validate_fasta(self.files[file], fa, sorted(names))
            finally:
                fa.close()
            if found:
                log.warning("FASTA %s: %d IUPAC ambiguity code(s) read as N", self.files[file], sum(found.values()))

    def prepare_data(self) -> None:
        """Build missing ``.fai`` indexes once per node (before the ranks' ``setup``)."""
        for path in resolve_files(self.fasta, "fasta", FASTA_SUFFIXES):
            open_fasta(path).close()

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        self._ensure_loaded()
        reader = FastaReader(self.files)
        ids = {c: i for i, c in enumerate(self.classes)}
        for split, its in self.split_items.items():
            if its:
                rc = self.rc_prob if split == "train" else 0.0
                self._datasets[split] = LabeledSequenceDataset(reader, its, ids, rc, self.seed)
        log.info("labeled sequences: %s; classes %s",
                 ", ".join(f"{s} {len(v)}" for s, v in self.split_items.items()), self.classes)

    def train_dataloader(self):
        return self._loader("train", sampler=EpochKeySampler(len(self._dataset("train")), self.seed))

    def val_dataloader(self):
        """The validation sequences; an empty list (Lightning skips validation) when none is configured."""
        if self.paths["val"] is None and self.val_fraction == 0:
            return []
        return self._loader("val")

    def predict_dataloader(self):
        """The test sequences when a test split exists, else the validation sequences."""
        self._dataset("train")
        return self._loader("test" if "test" in self._datasets else "val")

