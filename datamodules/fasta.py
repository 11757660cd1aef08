"""DNA windows from FASTA files (pyfaidx) for next-base language modelling.

Shape legend: b batch, l window (model input length). Each sample reads ``l + 1`` bases and
returns ``{"inputs": (l,) long, "targets": (l,) long, "mask": (l,) bool}`` with tokens
A,C,G,T,N -> 0..4 (``encoding.encode_bases``; lowercase soft-masked bases are their upper-case
tokens) and ``mask`` false where the target is N (when ``mask_n``).

Windows come from one or more FASTA files, either

- random (train): a fresh seeded window every epoch, drawn from the training regions with
  probability proportional to their usable length, re-drawn (up to 10 times) while its N
  fraction exceeds ``max_n_fraction``; val/test tile their regions without overlap; or
- a BED file: each row (``chrom start end [name score strand]``, 0-based half-open) is one
  window, resized around its centre to ``l + 1`` bases and clamped to the chromosome; rows on
  the ``-`` strand are reverse-complemented. With several FASTA files, a BED chromosome name
  refers to the first file that holds it.

Whole-sequence evaluation (``whole_eval``): val/test are then each held-out region in one
sample (a whole held-out chromosome, or the held-out tail of each one), batch size 1, tokens
kept as uint8; ``TokenLM`` runs sequences longer than its ``eval_chunk`` in chunks with the
state carried over, so ``test/bpt`` is the bits per base of every held-out base in one pass.

Splits never share a base: whole chromosomes (``val_chroms``/``test_chroms``) or, per
chromosome, the last ``val_fraction + test_fraction`` of its length (train | val | test).
BED windows that straddle a split boundary are dropped. Reverse-complement augmentation
(``rc_prob``) applies to training only. Each worker process opens its own pyfaidx handles.

Files on disk: pyfaidx writes an index ``<fasta>.fai`` beside each FASTA file that lacks one
(or whose index is older than the file); it is logged once when written and reused after. The
folder must be writable, or index the file where you can (``samtools faidx``).

Validation: ``setup`` reads every record in use once, in blocks through a byte lookup table
(``validate_fasta``), so a character that is not a base fails before training starts, naming
the file, record and position. IUPAC ambiguity codes (``RYSWKMBDHV``) are read as N with a
warning giving their counts, or refused with ``iupac="error"``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pyfaidx
import torch
from torch.utils.data import Dataset

from streamssm.datamodules._common import (
    BaseDataModule,
    EpochKeySampler,
    LazyHandleMixin,
    SpanSampler,
    check_fractions,
    check_positive,
    evenly_spaced,
    resolve_files,
    span_too_short,
    split_points,
    tile_starts,
)
from streamssm.encoding import (
    BASE_LUT,
    DNA_ALPHABET,
    DNA_VOCAB_SIZE,
    IUPAC_AMBIGUOUS,
    N_TOKEN,
    base_codes,
    reverse_complement,
)
from streamssm.errors import ConfigError, DataFormatError
from streamssm.serving import ServingSpec

log = logging.getLogger(__name__)

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas", ".fa.gz", ".fasta.gz", ".fna.gz")
SPLITS = ("train", "val", "test")
VALIDATE_BLOCK = 1 << 24  # bytes read per step by validate_fasta

_AMBIGUOUS = IUPAC_AMBIGUOUS + IUPAC_AMBIGUOUS.lower()
_PLAIN = b"ACGTNacgtn\n\r"  # bytes of sequence lines that need no second look


def _invalid_table(ambiguous_as_n: bool) -> np.ndarray:
    """bool (256,): bytes not allowed inside a record's sequence lines."""
    bad = BASE_LUT == 255
    bad[list(b"\n\r")] = False
    if not ambiguous_as_n:
        bad[list(_AMBIGUOUS.encode())] = True
    return bad


def validate_fasta(
    path: str | Path, fasta: pyfaidx.Fasta, names: Sequence[str], ambiguous_as_n: bool = True
) -> Counter[str]:
    """Check every base of records ``names`` once; return the IUPAC ambiguity-code counts.

    Streams each record's bytes (located by the ``.fai`` index) in blocks of
    ``VALIDATE_BLOCK``; ``bytes.translate`` drops the plain bases and newlines of a block in one
    C pass, and only what remains (ambiguity codes, invalid bytes: usually nothing) is looked at.
    Raises ``DataFormatError`` naming the file, record, 0-based position and line of the first
    character that is not a base (nor an allowed ambiguity code), or saying that the ``.fai``
    index does not fit the file (``_check_index_entry``).
    """
    bad_table = _invalid_table(ambiguous_as_n)
    found: Counter[str] = Counter()
    index = fasta.faidx.index
    with open(path, "rb") as fh:
        if index:
            name, rec = max(index.items(), key=lambda kv: int(kv[1].offset))
            _check_index_entry(fh, path, name, int(rec.offset), _record_bytes(rec), last=True)
        for name in names:
            rec = index[name]
            lenc, lenb = int(rec.lenc), int(rec.lenb)
            total = _record_bytes(rec)
            _check_index_entry(fh, path, name, int(rec.offset), total)
            fh.seek(rec.offset)
            done = 0
            while done < total:
                block = fh.read(min(VALIDATE_BLOCK, total - done))
                if not block:
                    raise DataFormatError(f"FASTA file {str(path)!r}: record {name!r} ends early; delete the stale "
                                          f"{path}.fai to rebuild it")
                rest = block.translate(None, _PLAIN)
                if rest:
                    if bad_table[np.frombuffer(rest, dtype=np.uint8)].any():
                        i = done + int(np.flatnonzero(bad_table[np.frombuffer(block, dtype=np.uint8)])[0])
                        _raise_invalid(path, name, chr(block[i - done]), (i // lenb) * lenc + i % lenb,
                                       i // lenb + 1, ambiguous_as_n)
                    seen = np.bincount(np.frombuffer(rest, dtype=np.uint8), minlength=256)
                    for b in np.flatnonzero(seen):
                        found[chr(b).upper()] += int(seen[b])
                done += len(block)
    return found


def _record_bytes(rec: Any) -> int:
    """Bytes of a ``.fai`` entry's sequence lines (line breaks inside the record included)."""
    lenc, lenb = int(rec.lenc), int(rec.lenb)
    return (rec.rlen // lenc) * lenb + rec.rlen % lenc if lenc else 0


def _check_index_entry(fh: BinaryIO, path: str | Path, name: str, offset: int, total: int, last: bool = False) -> None:
    """Raise ``DataFormatError`` unless the ``.fai`` entry of record ``name`` fits the file: its
    sequence starts right after a ``>name`` header line and its ``total`` bytes are followed by a
    line break then the next header or the end of the file. pyfaidx rebuilds an index older than
    the FASTA only; a file replaced by one with an older time (``cp -p``, ``tar x``, ``rsync -t``)
    kept an index that read other bases, or fewer, without a word. ``last``: the entry that
    comes last in the file, after which only the end of the file may follow (not a record the
    index does not know)."""
    stale = (
        f"FASTA file {str(path)!r}: record {name!r} is not where the index {path}.fai says (the index is "
        f"stale: the FASTA changed after it was written); delete {path}.fai to rebuild it"
    )
    lo = max(0, offset - 1024)
    fh.seek(lo)
    before = fh.read(offset - lo)
    if not before.endswith(b"\n"):
        raise DataFormatError(stale)
    cut = before.rfind(b"\n", 0, len(before) - 1)
    if cut >= 0 or lo == 0:  # the whole header line is in view (a longer one's name is not checked)
        header = before[cut + 1 :].decode("utf-8", "replace")
        if not header.startswith(">") or header[1:].split()[:1] != [name]:
            raise DataFormatError(stale)
    fh.seek(offset + total)
    after = fh.read(256).lstrip(b"\r\n\t ")
    if after and (last or not after.startswith((b">", b";"))):  # after the last entry: the end of the file
        raise DataFormatError(stale)


def _raise_invalid(path: str | Path, name: str, char: str, pos: int, line: int, ambiguous_as_n: bool) -> None:
    what = "an IUPAC ambiguity code (iupac='error')" if char in _AMBIGUOUS else "not a base"
    raise DataFormatError(
        f"FASTA file {str(path)!r}: record {name!r}: invalid character {char!r} ({what}) at position {pos} "
        f"(0-based; line {line} of the record); expected ACGTN (any case)"
        f"{' or an IUPAC ambiguity code' if ambiguous_as_n else ''}"
    )


@dataclass(frozen=True)
class Region:
    """Half-open span ``[start, end)`` of chromosome ``chrom`` in FASTA file number ``file``."""

    file: int
    chrom: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Window:
    """One fixed window (``end - start == l + 1`` bases); ``minus`` reads the reverse strand."""

    file: int
    chrom: str
    start: int
    end: int
    minus: bool = False


def open_fasta(path: str | Path, build_index: bool = True) -> pyfaidx.Fasta:
    """Open a FASTA file with pyfaidx (building ``path.fai`` if missing or stale; logged).

    Raises ``DataFormatError`` naming the file for a missing file, non-FASTA or binary content,
    inconsistent line lengths, duplicate names, or an index that cannot be written.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"FASTA file {str(path)!r} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head[:2] == b"\x1f\x8b":
        raise DataFormatError(f"FASTA file {str(path)!r} is gzip-compressed; decompress it (gzip -d) and retry")
    if b"\x00" in head:
        raise DataFormatError(f"FASTA file {str(path)!r} is not a text FASTA file (binary content)")
    fai = Path(f"{path}.fai")
    before = fai.stat().st_mtime_ns if fai.exists() else None
    try:
        fasta = pyfaidx.Fasta(
            str(path),
            as_raw=True,
            sequence_always_upper=False,
            strict_bounds=True,
            rebuild=build_index,
            build_index=build_index,
        )
    except UnicodeDecodeError:
        raise DataFormatError(
            f"FASTA file {str(path)!r} is not a text FASTA file (binary content; compressed files must be "
            f"decompressed first)"
        ) from None
    except pyfaidx.FastaIndexingError as exc:
        raise DataFormatError(f"FASTA file {str(path)!r} is malformed: {exc}") from None
    except pyfaidx.IndexNotFoundError as exc:
        raise DataFormatError(f"FASTA index of {str(path)!r} is missing: {exc}") from None
    except PermissionError as exc:
        raise DataFormatError(
            f"cannot build the index {str(path)}.fai ({exc}); make the folder writable or run "
            f"`samtools faidx {path}` where you can"
        ) from None
    except ValueError as exc:  # duplicate record names and similar content problems
        raise DataFormatError(f"FASTA file {str(path)!r} cannot be indexed: {exc}") from None
    except RuntimeError as exc:  # pyfaidx's "Unhandled exception during fasta indexing": blank lines
        raise DataFormatError(
            f"FASTA file {str(path)!r} cannot be indexed (pyfaidx: {str(exc).split('Please report')[0]}); "
            f"blank lines inside or after a record are the usual cause: remove them"
        ) from None
    if fai.exists() and fai.stat().st_mtime_ns != before:
        log.info("wrote the FASTA index %s beside %s (pyfaidx; reused while the FASTA is unchanged)", fai, path)
    return fasta


class FastaReader(LazyHandleMixin):
    """Reads base spans from several FASTA files through per-process pyfaidx handles."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [str(p) for p in paths]

    def _open_handle(self) -> list[pyfaidx.Fasta]:
        return [open_fasta(p, build_index=False) for p in self.paths]

    def read(self, file: int, chrom: str, start: int, end: int, minus: bool = False) -> np.ndarray:
        """Tokens (end - start,) uint8 of ``[start, end)``; reverse complement when ``minus``."""
        try:
            text = self.handle()[file][chrom][start:end]
        except pyfaidx.FetchError as exc:
            raise DataFormatError(f"{self.paths[file]}: cannot read {chrom}:{start}-{end}: {exc}") from None
        try:
            tokens = base_codes(text)
        except DataFormatError as exc:
            raise DataFormatError(f"{self.paths[file]}: {chrom}:{start}-{end}: {exc}") from None
        if tokens.size != end - start:
            raise DataFormatError(
                f"{self.paths[file]}: {chrom}:{start}-{end} returned {tokens.size} bases; "
                f"the .fai index may be stale (delete it to rebuild)"
            )
        return reverse_complement(tokens) if minus else tokens


def lm_sample(tokens: np.ndarray, mask_n: bool) -> dict[str, torch.Tensor]:
    """(l+1,) uint8 tokens -> next-token sample ``{"inputs", "targets", "mask"}`` of length l.

    Built with numpy (several times faster than small torch CPU ops for 1M-base windows).
    """
    long = tokens.astype(np.int64)
    mask = tokens[1:] != N_TOKEN if mask_n else np.ones(tokens.size - 1, dtype=bool)
    return {
        "inputs": torch.from_numpy(long[:-1]),
        "targets": torch.from_numpy(long[1:]),
        "mask": torch.from_numpy(mask),
    }


class RandomWindowDataset(Dataset):
    """Key -> a random window of ``window + 1`` bases from ``regions`` (see ``EpochKeySampler``)."""

    def __init__(
        self,
        reader: FastaReader,
        regions: list[Region],
        window: int,
        num_samples: int,
        seed: int,
        rc_prob: float,
        max_n_fraction: float,
        mask_n: bool,
        max_tries: int = 10,
    ) -> None:
        self.reader = reader
        self.regions = regions
        try:
            self.spans = SpanSampler([r.length for r in regions], window + 1)
        except ConfigError:
            longest = max((r.length for r in regions), default=0)
            raise ConfigError(
                f"window={window}: every training region is shorter than window + 1 bases "
                f"(longest {longest}); use a smaller window"
            ) from None
        self.window = window
        self.num_samples = num_samples
        self.seed = seed
        self.rc_prob = rc_prob
        self.max_n_fraction = max_n_fraction
        self.mask_n = mask_n
        self.max_tries = max_tries

    def __len__(self) -> int:
        return self.num_samples

    def draw(self, key: int) -> tuple[Window, np.ndarray]:
        """The window for ``key`` and its tokens (forward strand), re-drawn while too N-rich."""
        rng = np.random.default_rng([self.seed, int(key)])
        for _ in range(self.max_tries):
            i, offset = self.spans.draw(rng)
            r = self.regions[i]
            start = r.start + offset
            tokens = self.reader.read(r.file, r.chrom, start, start + self.window + 1)
            if np.count_nonzero(tokens == N_TOKEN) <= self.max_n_fraction * tokens.size:
                break
        minus = bool(rng.random() < self.rc_prob)
        return Window(r.file, r.chrom, start, start + self.window + 1, minus), tokens

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        win, tokens = self.draw(key)
        return lm_sample(reverse_complement(tokens) if win.minus else tokens, self.mask_n)


class RegionDataset(Dataset):
    """Index -> one whole region as a next-token sample: ``inputs``/``targets`` (n - 1,) uint8
    (both views of one read), ``mask`` (n - 1,) bool."""

    def __init__(self, reader: FastaReader, regions: list[Region], mask_n: bool) -> None:
        self.reader = reader
        self.regions = regions
        self.mask_n = mask_n

    def __len__(self) -> int:
        return len(self.regions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        r = self.regions[int(index)]
        tokens = torch.from_numpy(self.reader.read(r.file, r.chrom, r.start, r.end))  # (n,) uint8
        mask = tokens[1:] != N_TOKEN if self.mask_n else torch.ones(r.length - 1, dtype=torch.bool)
        return {"inputs": tokens[:-1], "targets": tokens[1:], "mask": mask}


class FixedWindowDataset(Dataset):
    """Index (or epoch key, taken modulo the size) -> one of a fixed list of windows.

    With ``rc_prob > 0`` (training on BED windows) the strand is flipped at random per key.
    """

    def __init__(
        self, reader: FastaReader, windows: list[Window], mask_n: bool, rc_prob: float = 0.0, seed: int = 0
    ) -> None:
        self.reader = reader
        self.windows = windows
        self.mask_n = mask_n
        self.rc_prob = rc_prob
        self.seed = seed

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, key: int) -> dict[str, torch.Tensor]:
        win = self.windows[int(key) % len(self.windows)]
        minus = win.minus
        if self.rc_prob > 0 and np.random.default_rng([self.seed, int(key)]).random() < self.rc_prob:
            minus = not minus
        tokens = self.reader.read(win.file, win.chrom, win.start, win.end, minus)
        return lm_sample(tokens, self.mask_n)


def read_bed_fields(path: str | Path, min_fields: int = 3) -> list[tuple[list[str], int]]:
    """``(fields, line_number)`` of every interval line of a BED file (tab- or space-separated;
    blank, ``#``, ``track`` and ``browser`` lines skipped), checking ``0 <= start < end`` and at
    least ``min_fields`` columns. Raises ``DataFormatError`` naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"BED file {str(path)!r} does not exist")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip() or line.startswith(("#", "track", "browser")):
                continue
            fields = line.rstrip("\n").split("\t") if "\t" in line else line.split()
            if len(fields) < min_fields:
                raise DataFormatError(
                    f"{path}:{lineno}: expected at least {min_fields} columns (chrom start end ...), "
                    f"got {line.strip()!r}"
                )
            try:
                start, end = int(fields[1]), int(fields[2])
            except ValueError:
                raise DataFormatError(
                    f"{path}:{lineno}: start/end must be integers, got {fields[1]!r}, {fields[2]!r}"
                ) from None
            if start < 0 or end <= start:
                raise DataFormatError(f"{path}:{lineno}: expected 0 <= start < end, got {start}, {end}")
            rows.append((fields, lineno))
    if not rows:
        raise DataFormatError(f"BED file {str(path)!r} holds no intervals")
    return rows


def read_bed(path: str | Path) -> list[tuple[str, int, int, bool, int]]:
    """Rows ``(chrom, start, end, minus_strand, line_number)`` of a BED file (0-based, half-open)."""
    return [
        (f[0], int(f[1]), int(f[2]), len(f) >= 6 and f[5].strip() == "-", lineno)
        for f, lineno in read_bed_fields(path)
    ]


class FastaDataModule(BaseDataModule):
    """Next-base LM windows (vocab 5: A,C,G,T,N) over FASTA files.

    Args:
        fasta: a FASTA file, folder, glob or list of them (plain text; ``.fai`` built if missing).
        window: model input length l (each sample reads l + 1 bases).
        bed: optional BED file of windows (replaces random windows; see module docstring).
        chroms: use only these chromosomes (default: all).
        val_chroms / test_chroms: hold out whole chromosomes (then fractions are ignored).
        val_fraction / test_fraction: otherwise hold out the tail of every chromosome.
        samples_per_epoch: random training windows per epoch.
        eval_windows: at most this many val/test windows (evenly spread; None = all).
        whole_eval: val/test score each held-out region whole, in one pass (batch size 1;
            see the module docstring) instead of windows; ``eval_windows`` then does not apply.
        rc_prob: probability of reverse-complementing a training window.
        max_n_fraction: re-draw random training windows with more N than this.
        mask_n: mask targets that are N out of the loss.
        iupac: "as_n" reads the ambiguity codes RYSWKMBDHV as N (a warning gives their counts);
            "error" refuses them (setup names the first one).
    """

    input_files = {"fasta": FASTA_SUFFIXES, "bed": (".bed",)}

    def __init__(
        self,
        fasta: str | list[str],
        window: int = 1024,
        bed: str | None = None,
        chroms: list[str] | None = None,
        val_chroms: list[str] | None = None,
        test_chroms: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.0,
        samples_per_epoch: int = 1024,
        eval_windows: int | None = 64,
        whole_eval: bool = False,
        rc_prob: float = 0.5,
        max_n_fraction: float = 0.5,
        mask_n: bool = True,
        iupac: Literal["as_n", "error"] = "as_n",
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        check_positive("window", window)
        check_positive("samples_per_epoch", samples_per_epoch)
        if eval_windows is not None:
            check_positive("eval_windows", eval_windows)
        if not val_chroms and not test_chroms:
            check_fractions(val_fraction, test_fraction)
        if iupac not in ("as_n", "error"):
            raise ConfigError(f"iupac: expected 'as_n' or 'error', got {iupac!r}")
        for name, p in (("rc_prob", rc_prob), ("max_n_fraction", max_n_fraction)):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name}: expected a probability in [0, 1], got {p}")
        self.save_hyperparameters(logger=False)
        self.fasta = fasta
        self.window = int(window)
        self.bed = bed
        self.chroms = list(chroms) if chroms else None
        self.val_chroms = list(val_chroms or [])
        self.test_chroms = list(test_chroms or [])
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.samples_per_epoch = int(samples_per_epoch)
        self.eval_windows = eval_windows
        self.whole_eval = bool(whole_eval)
        self.rc_prob = float(rc_prob)
        self.max_n_fraction = float(max_n_fraction)
        self.mask_n = bool(mask_n)
        self.iupac = iupac
        self.files: list[Path] = []
        self.chrom_lengths: list[tuple[int, str, int]] = []  # (file, chrom, length)
        self.split_regions: dict[str, list[Region]] = {}

    # ------------------------------------------------------------------ metadata
    def model_io(self) -> dict[str, Any]:
        return {"input_kind": "tokens", "vocab_size": DNA_VOCAB_SIZE, "head": "lm", "output_dim": DNA_VOCAB_SIZE}

    def serving_spec(self) -> ServingSpec:
        return ServingSpec(modality="dna", encoding="bases", alphabet=DNA_ALPHABET, window=self.window,
                           ambiguous_as_n=self.iupac == "as_n", options=(("mask_n", self.mask_n),))

    # ------------------------------------------------------------------ setup
    def _index(self) -> None:
        self.files = resolve_files(self.fasta, "fasta", FASTA_SUFFIXES)
        lengths = []
        for i, path in enumerate(self.files):
            fa = open_fasta(path)
            try:
                lengths.extend((i, name, len(fa.faidx.index[name])) for name in fa.keys())
            finally:
                fa.close()
        names = {c for _, c, _ in lengths}
        wanted = {"chroms": self.chroms or [], "val_chroms": self.val_chroms, "test_chroms": self.test_chroms}
        for arg, chroms in wanted.items():
            unknown = [c for c in chroms if c not in names]
            if unknown:
                shown = sorted(names)[:20]
                raise ConfigError(f"{arg}: chromosome(s) {unknown} not found in the FASTA files; available: {shown}")
        both = set(self.val_chroms) & set(self.test_chroms)
        if both:
            raise ConfigError(f"val_chroms and test_chroms share {sorted(both)}: splits must not overlap")
        if self.chroms:
            keep = set(self.chroms) | set(self.val_chroms) | set(self.test_chroms)
            lengths = [t for t in lengths if t[1] in keep]
        self.chrom_lengths = lengths
        self._validate()

    def _validate(self) -> None:
        """Every base of the records in use, once, before any window is drawn (see module doc)."""
        for i, path in enumerate(self.files):
            names = [c for f, c, _ in self.chrom_lengths if f == i]
            fa = open_fasta(path, build_index=False)
            try:
                found = validate_fasta(path, fa, names, ambiguous_as_n=self.iupac == "as_n")
            finally:
                fa.close()
            if found:
                log.warning("FASTA %s: %d IUPAC ambiguity code(s) read as N (%s); set iupac='error' to refuse them",
                            path, sum(found.values()), ", ".join(f"{k}: {v}" for k, v in sorted(found.items())))

    def _split(self) -> dict[str, list[Region]]:
        out: dict[str, list[Region]] = {s: [] for s in SPLITS}
        by_chrom = bool(self.val_chroms or self.test_chroms)
        for file, chrom, length in self.chrom_lengths:
            if by_chrom:
                split = "val" if chrom in self.val_chroms else "test" if chrom in self.test_chroms else "train"
                out[split].append(Region(file, chrom, 0, length))
                continue
            a, b = split_points(length, self.val_fraction, self.test_fraction)
            for split, lo, hi in (("train", 0, a), ("val", a, b), ("test", b, length)):
                if hi > lo:
                    out[split].append(Region(file, chrom, lo, hi))
        return out

    def _bed_windows(self, regions: dict[str, list[Region]]) -> dict[str, list[Window]]:
        need = self.window + 1
        first_file: dict[str, tuple[int, int]] = {}
        for file, chrom, length in self.chrom_lengths:
            first_file.setdefault(chrom, (file, length))
        out: dict[str, list[Window]] = {s: [] for s in SPLITS}
        dropped = 0
        for chrom, start, end, minus, lineno in read_bed(self.bed):  # type: ignore[arg-type]
            if chrom not in first_file:
                raise DataFormatError(f"{self.bed}:{lineno}: chromosome {chrom!r} is not in the FASTA files")
            file, length = first_file[chrom]
            if end > length:
                raise DataFormatError(f"{self.bed}:{lineno}: end {end} is past the end of {chrom} (length {length})")
            if length < need:
                dropped += 1
                continue
            s = min(max((start + end) // 2 - need // 2, 0), length - need)
            home = [
                split
                for split in SPLITS
                for r in regions[split]
                if r.file == file and r.chrom == chrom and r.start <= s and s + need <= r.end
            ]
            if not home:
                dropped += 1
                continue
            out[home[0]].append(Window(file, chrom, s, s + need, minus))
        if dropped:
            log.info(
                "BED %s: %d window(s) dropped (straddle a split boundary or chromosome too short)", self.bed, dropped
            )
        return out

    def prepare_data(self) -> None:
        """Build missing ``.fai`` indexes once (Lightning runs this on one process per node
        before ``setup``, so DDP ranks never race to write the same index)."""
        for path in resolve_files(self.fasta, "fasta", FASTA_SUFFIXES):
            open_fasta(path).close()

    def setup(self, stage: str | None = None) -> None:
        if self._datasets:
            return
        self._index()
        self.split_regions = self._split()
        reader = FastaReader(self.files)
        need = self.window + 1
        if self.bed is not None:
            windows = self._bed_windows(self.split_regions)
            if not windows["train"]:
                raise ConfigError(f"bed={self.bed!r}: no BED window falls inside the training split")
            self._datasets["train"] = FixedWindowDataset(reader, windows["train"], self.mask_n, self.rc_prob, self.seed)
        else:
            windows = {
                split: [
                    Window(r.file, r.chrom, s, s + need)
                    for r in self.split_regions[split]
                    for s in tile_starts(r.start, r.end, need, need)
                ]
                for split in ("val", "test")
            }
            self._datasets["train"] = RandomWindowDataset(
                reader,
                self.split_regions["train"],
                self.window,
                self.samples_per_epoch,
                self.seed,
                self.rc_prob,
                self.max_n_fraction,
                self.mask_n,
            )
        for split in ("val", "test"):
            regions = [r for r in self.split_regions[split] if r.length >= 2]
            if self.whole_eval and regions:
                self._datasets[split] = RegionDataset(reader, regions, self.mask_n)
                continue
            chosen = evenly_spaced(windows[split], self.eval_windows)
            if chosen:
                self._datasets[split] = FixedWindowDataset(reader, chosen, self.mask_n)
            elif self.split_regions[split]:
                longest = max(r.length for r in self.split_regions[split])
                fraction = self.val_fraction if split == "val" else self.test_fraction
                self._split_unusable(split, span_too_short(split, longest, need, "bases", "window", fraction))

    def train_dataloader(self):  # noqa: ANN201 - DataLoader
        ds = self._dataset("train")
        n = self.samples_per_epoch if isinstance(ds, RandomWindowDataset) else len(ds)
        return self._loader("train", sampler=EpochKeySampler(n, self.seed))

    def _loader(self, split: str, sampler=None, batch_size: int | None = None):  # noqa: ANN001, ANN202
        """Whole regions (``whole_eval``) go one per batch: their lengths differ."""
        whole = isinstance(self._dataset(split), RegionDataset)
        return super()._loader(split, sampler, batch_size=1 if whole else batch_size)

    def predict_dataloader(self):  # noqa: ANN201 - DataLoader
        """The test windows when a test split exists, else the validation windows."""
        self._dataset("train")  # runs setup if needed
        return self._loader("test" if "test" in self._datasets else "val")
