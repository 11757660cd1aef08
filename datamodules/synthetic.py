"""Small, realistic, learnable demo/test data written to disk; deterministic for a given seed.

- ``write_fasta``: chromosomes from an order-2 Markov background with planted motifs, copies
  of a few interspersed repeat families, soft-masked (lowercase) tandem repeats and N gaps.
- ``write_motif_sequences``: labeled DNA records of varying length for classification: the label
  says whether a fixed motif occurs (on either strand) anywhere in the sequence.
- ``write_wav_folder``: harmonic tones, chirps and amplitude-modulated tones (with a little
  noise) that a tiny model can predict sample by sample.
- ``write_sensor_table``: coupled damped oscillators driven by noise, observed through a
  random mixing matrix plus sensor noise; the oscillators' frequency switches between regimes
  that an optional label column names (so windows can be classified).
- ``make_held_out_signal``: a fresh sample from the same generators (another seed) for demos.

Nothing here downloads anything; every generator is pure numpy.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Literal

import numpy as np

from streamssm.errors import ConfigError

__all__ = [
    "dna_sequence",
    "write_fasta",
    "write_bed",
    "motif_sequences",
    "write_motif_sequences",
    "audio_signal",
    "write_wav_folder",
    "sensor_series",
    "write_sensor_table",
    "make_held_out_signal",
]

_BASES = np.frombuffer(b"ACGT", dtype=np.uint8)


def _check_int(name: str, value: int, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------
# DNA


class _GenomeModel:
    """The shared 'species' of one seed: Markov background, motifs and repeat families."""

    def __init__(self, rng: np.random.Generator) -> None:
        # order-2 Markov transitions with a strong preference (learnable, ~1.6 bits/base)
        self.trans = rng.dirichlet(np.full(4, 0.4), size=16)  # (16 contexts, 4 next)
        self.cum = np.cumsum(self.trans, axis=1)
        self.motifs = [_BASES[rng.integers(0, 4, size=int(rng.integers(8, 13)))] for _ in range(4)]
        self.repeats = [_BASES[rng.integers(0, 4, size=int(rng.integers(40, 120)))] for _ in range(3)]
        self.tandem_units = [_BASES[rng.integers(0, 4, size=int(rng.integers(2, 7)))] for _ in range(3)]

    def background(self, lengths: list[int], rng: np.random.Generator) -> list[np.ndarray]:
        """Independent Markov segments of the given lengths, simulated together (vectorized)."""
        if not lengths:
            return []
        n, width = len(lengths), max(lengths)
        out = np.empty((n, width), dtype=np.uint8)
        a = rng.integers(0, 4, size=n)
        b = rng.integers(0, 4, size=n)
        u = rng.random((n, width))
        for i in range(width):
            cum = self.cum[a * 4 + b]  # (n, 4)
            c = np.minimum((u[:, i : i + 1] > cum).sum(axis=1), 3)
            out[:, i] = c
            a, b = b, c
        return [_BASES[out[k, :m]] for k, m in enumerate(lengths)]

    def chromosome(self, length: int, rng: np.random.Generator) -> np.ndarray:
        parts: list[np.ndarray | int] = []  # ints are placeholders for background segments
        bg_lengths: list[int] = []
        total = 0
        while total < length:
            # draw the plan of the next block of segments in bulk (numpy calls are per block)
            m = max(16, (length - total) // 40)
            kinds = rng.choice(5, size=m, p=[0.45, 0.25, 0.15, 0.12, 0.03]).tolist()
            which = rng.integers(0, 3, size=m).tolist()
            sizes = rng.integers(30, 200, size=m).tolist()
            copies = rng.integers(4, 15, size=m).tolist()
            gaps = rng.integers(10, 60, size=m).tolist()
            for j, kind in enumerate(kinds):
                if total >= length:
                    break
                if kind == 0:  # background, generated below in one vectorized pass
                    parts.append(len(bg_lengths))
                    bg_lengths.append(sizes[j])
                    total += sizes[j]
                    continue
                if kind == 1:  # planted motif
                    seg = self.motifs[(which[j] + j) % len(self.motifs)]
                elif kind == 2:  # interspersed repeat copy with ~3% point mutations
                    seg = self.repeats[which[j]].copy()
                    mut = np.flatnonzero(rng.random(seg.size) < 0.03)
                    seg[mut] = _BASES[rng.integers(0, 4, size=mut.size)]
                elif kind == 3:  # soft-masked tandem repeat
                    seg = np.tile(self.tandem_units[which[j]], copies[j]) + np.uint8(32)  # lowercase
                else:  # assembly gap
                    seg = np.full(gaps[j], ord("N"), dtype=np.uint8)
                parts.append(seg)
                total += seg.size
        background = self.background(bg_lengths, rng)
        return np.concatenate([background[p] if isinstance(p, int) else p for p in parts])[:length]


def dna_sequence(length: int, seed: int = 0, genome_seed: int | None = None) -> str:
    """One synthetic chromosome as a string (upper/lower case and N), ``length`` bases.

    ``genome_seed`` picks the 'species' (motifs, repeats, Markov background); by default the
    same as ``seed``. Held-out sequences of a species use its genome_seed and another seed.
    """
    length = _check_int("length", length, 1)
    model = _GenomeModel(np.random.default_rng([int(seed if genome_seed is None else genome_seed), 0]))
    return model.chromosome(length, np.random.default_rng([int(seed), 1])).tobytes().decode("ascii")


def write_fasta(path: str | Path, n_chrom: int = 3, length: int = 20_000, seed: int = 0, line_width: int = 60) -> Path:
    """Write ``n_chrom`` chromosomes ``chr1..chrN`` of ``length`` bases each (same species).

    Lines are ``line_width`` characters; headers carry a description after the name
    (``>chr1 synthetic``), as real FASTA files do. Returns the path.
    """
    n_chrom = _check_int("n_chrom", n_chrom, 1)
    length = _check_int("length", length, 1)
    line_width = _check_int("line_width", line_width, 1)
    model = _GenomeModel(np.random.default_rng([int(seed), 0]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="ascii") as fh:
        for k in range(n_chrom):
            seq = model.chromosome(length, np.random.default_rng([int(seed), 1, k])).tobytes().decode("ascii")
            fh.write(f">chr{k + 1} synthetic chromosome {k + 1}\n")
            for i in range(0, len(seq), line_width):
                fh.write(seq[i : i + line_width] + "\n")
    return path


def write_bed(path: str | Path, intervals: list[tuple]) -> Path:
    """Write BED rows ``(chrom, start, end[, name[, score[, strand]]])`` (0-based, half-open)."""
    path = Path(path)
    with open(path, "w", encoding="ascii") as fh:
        for row in intervals:
            fh.write("\t".join(str(v) for v in row) + "\n")
    return path


MOTIF = "TATAAGC"  # the motif of ``motif_sequences`` (not its own reverse complement)
_COMPLEMENT = bytes.maketrans(b"ACGT", b"TGCA")


def _rc_text(seq: str) -> str:
    return seq.translate(_COMPLEMENT)[::-1]


def motif_sequences(
    n: int, min_length: int = 60, max_length: int = 200, seed: int = 0, motif: str = MOTIF
) -> list[tuple[str, str]]:
    """``n`` labeled sequences ``(bases, label)``: label ``motif`` when ``motif`` occurs on either
    strand (planted once at a random place and strand), ``none`` when it occurs nowhere; about
    half of each. Lengths are uniform in ``[min_length, max_length]``; the background is the
    order-2 Markov model of ``write_fasta`` (species 0), with chance occurrences removed."""
    n = _check_int("n", n, 1)
    min_length = _check_int("min_length", min_length, len(motif))
    max_length = _check_int("max_length", max_length, min_length)
    rng = np.random.default_rng([int(seed), 8])
    genome = _GenomeModel(np.random.default_rng([0, 0]))
    lengths = rng.integers(min_length, max_length + 1, size=n).tolist()
    out = []
    for length, bg in zip(lengths, genome.background(lengths, rng), strict=True):
        seq = bg.tobytes().decode("ascii")
        for site in (motif, _rc_text(motif)):  # remove chance occurrences (mutate their first base)
            while (k := seq.find(site)) >= 0:
                seq = seq[:k] + ("A" if site[0] != "A" else "C") + seq[k + 1 :]
        if rng.random() < 0.5:
            site = motif if rng.random() < 0.5 else _rc_text(motif)
            at = int(rng.integers(0, length - len(motif) + 1))
            seq = seq[:at] + site + seq[at + len(motif) :]
            out.append((seq, "motif"))
        else:
            out.append((seq, "none"))
    return out


def write_motif_sequences(
    folder: str | Path, n_train: int = 400, n_test: int = 200, min_length: int = 60, max_length: int = 200,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``sequences.fa`` (records ``train_0..``, ``test_0..``) and the label tables
    ``train_labels.csv`` / ``test_labels.csv`` (columns ``name,label``) of ``motif_sequences``
    into ``folder``; returns ``{"fasta", "train", "test"}`` paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"fasta": folder / "sequences.fa", "train": folder / "train_labels.csv", "test": folder / "test_labels.csv"}
    parts = {"train": motif_sequences(n_train, min_length, max_length, seed),
             "test": motif_sequences(n_test, min_length, max_length, seed + 1)}
    with open(paths["fasta"], "w", encoding="ascii") as fa:
        for split, items in parts.items():
            with open(paths[split], "w", encoding="ascii") as table:
                table.write("name,label\n")
                for i, (seq, label) in enumerate(items):
                    fa.write(f">{split}_{i}\n")
                    for k in range(0, len(seq), 60):
                        fa.write(seq[k : k + 60] + "\n")
                    table.write(f"{split}_{i},{label}\n")
    return paths


# ----------------------------------------------------------------------------------------------
# audio


def audio_signal(n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One mono clip of ``n`` samples, float32 in about [-0.9, 0.9]: a tone, chirp or AM tone."""
    t = np.arange(n, dtype=np.float64) / sample_rate
    kind = int(rng.integers(0, 3))
    f0 = float(rng.uniform(80.0, min(600.0, sample_rate / 16)))
    if kind == 0:  # harmonic tone with a decaying envelope that re-triggers (notes)
        period = float(rng.uniform(0.15, 0.4))
        env = np.exp(-(t % period) * rng.uniform(4.0, 10.0))
        wave = sum((0.6 / h) * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) for h in (1, 2, 3))
        wave = wave * env
    elif kind == 1:  # linear chirp up and back down
        f1 = float(rng.uniform(f0 * 1.5, min(f0 * 4.0, sample_rate / 8)))
        dur = max(t[-1], 1e-3) if n > 1 else 1.0
        tri = 1.0 - np.abs(2.0 * t / dur - 1.0)  # 0 -> 1 -> 0
        freq = f0 + (f1 - f0) * tri
        wave = 0.7 * np.sin(2 * np.pi * np.cumsum(freq) / sample_rate)
    else:  # amplitude-modulated tone
        fm = float(rng.uniform(2.0, 8.0))
        wave = 0.7 * (0.55 + 0.45 * np.sin(2 * np.pi * fm * t)) * np.sin(2 * np.pi * f0 * t)
    wave = wave + rng.normal(0.0, 0.005, size=n)
    return np.clip(wave, -0.95, 0.95).astype(np.float32)


def write_wav_folder(
    path: str | Path,
    n_files: int = 4,
    seconds: float = 1.0,
    sample_rate: int = 8000,
    seed: int = 0,
    channels: int = 1,
    subtype: str = "PCM_16",
) -> list[Path]:
    """Write ``n_files`` WAV files ``clip_000.wav``... into folder ``path``; returns their paths.

    With ``channels > 1`` the extra channels are delayed, attenuated copies of the first.
    """
    import soundfile as sf

    n_files = _check_int("n_files", n_files, 1)
    sample_rate = _check_int("sample_rate", sample_rate, 1)
    channels = _check_int("channels", channels, 1)
    n = int(round(seconds * sample_rate))
    if n < 1:
        raise ConfigError(f"seconds: expected a duration of at least one sample, got {seconds}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n_files):
        rng = np.random.default_rng([int(seed), 2, k])
        mono = audio_signal(n, sample_rate, rng)
        data = np.stack([np.roll(mono, 7 * c) * (1.0 - 0.2 * c) for c in range(channels)], axis=1)
        p = folder / f"clip_{k:03d}.wav"
        sf.write(p, data, sample_rate, subtype=subtype)
        out.append(p)
    return out


# ----------------------------------------------------------------------------------------------
# sensors


def sensor_series(
    rows: int, channels: int, seed: int = 0, n_regimes: int = 3, system_seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Coupled noisy oscillators observed by ``channels`` sensors.

    Returns ``(values (rows, channels) float32, regime (rows,) int64)``. The hidden state is
    ``ceil(channels/2)`` damped 2-D rotations, weakly coupled, driven by noise; the regime
    (segments of 100-400 rows) scales all frequencies, so it is identifiable from a window.
    ``system_seed`` fixes the physical system (frequencies, coupling, mixing; default ``seed``).
    """
    rows = _check_int("rows", rows, 1)
    channels = _check_int("channels", channels, 1)
    n_regimes = _check_int("n_regimes", n_regimes, 1)
    sys_rng = np.random.default_rng([int(seed if system_seed is None else system_seed), 3])
    rng = np.random.default_rng([int(seed), 4])
    k = (channels + 1) // 2
    base_w = sys_rng.uniform(0.04, 0.25, size=k)  # radians per step
    coupling = sys_rng.normal(0.0, 0.02, size=(2 * k, 2 * k))
    mixing = np.eye(2 * k)[:, :channels] + sys_rng.normal(0.0, 0.3, size=(2 * k, channels))
    scales = np.linspace(1.0, 2.5, n_regimes)

    def transition(regime: int) -> np.ndarray:
        a = np.zeros((2 * k, 2 * k))
        for i, w in enumerate(base_w * scales[regime]):
            c, s = np.cos(w), np.sin(w)
            a[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = 0.985 * np.array([[c, -s], [s, c]])
        return a + coupling

    mats = [transition(r) for r in range(n_regimes)]
    regime = np.empty(rows, dtype=np.int64)
    pos = 0
    while pos < rows:
        seg = int(rng.integers(100, 401))
        regime[pos : pos + seg] = int(rng.integers(0, n_regimes))
        pos += seg
    h = rng.normal(0.0, 1.0, size=2 * k)
    drive = rng.normal(0.0, 0.15, size=(rows, 2 * k))
    states = np.empty((rows, 2 * k))
    for t in range(rows):
        h = mats[regime[t]] @ h + drive[t]
        states[t] = h
    values = states @ mixing + rng.normal(0.0, 0.05, size=(rows, channels))
    offsets = sys_rng.uniform(-5.0, 5.0, size=channels)
    gains = sys_rng.uniform(0.5, 3.0, size=channels)
    return (values * gains + offsets).astype(np.float32), regime


def write_sensor_table(
    path: str | Path,
    rows: int = 2000,
    channels: int = 3,
    seed: int = 0,
    format: Literal["csv", "parquet"] = "csv",
    label: bool = False,
    n_series: int = 1,
    shuffle_rows: bool = False,
    missing_fraction: float = 0.0,
) -> Path:
    """Write a sensor table with columns ``timestamp, [series_id,] ch0..ch{c-1} [, label]``.

    ``rows`` per series; ``n_series > 1`` writes long format (a ``series_id`` column, one system,
    different noise). ``label`` adds the regime name (``"regime_0"``...) per row.
    ``shuffle_rows`` permutes rows (so a reader must sort by timestamp);
    ``missing_fraction`` blanks that share of feature cells (null in Parquet, empty in CSV).
    """
    import polars as pl

    n_series = _check_int("n_series", n_series, 1)
    if format not in ("csv", "parquet"):
        raise ConfigError(f"format: expected 'csv' or 'parquet', got {format!r}")
    if not 0.0 <= missing_fraction < 1.0:
        raise ConfigError(f"missing_fraction: expected a fraction in [0, 1), got {missing_fraction}")
    start = _dt.datetime(2026, 1, 1)
    frames = []
    for s in range(n_series):
        values, regime = sensor_series(rows, channels, seed=int(seed) * 1000 + s, system_seed=int(seed))
        cols: dict[str, object] = {
            "timestamp": pl.datetime_range(
                start, start + _dt.timedelta(milliseconds=10 * (rows - 1)), interval="10ms", eager=True
            )
        }
        if n_series > 1:
            cols["series_id"] = [f"dev{s}"] * rows
        for c in range(channels):
            cols[f"ch{c}"] = values[:, c]
        if label:
            cols["label"] = [f"regime_{r}" for r in regime]
        frames.append(pl.DataFrame(cols))
    df = pl.concat(frames)
    rng = np.random.default_rng([int(seed), 5])
    if missing_fraction > 0:
        for c in range(channels):
            hole = rng.random(df.height) < missing_fraction
            df = df.with_columns(pl.when(pl.Series(hole)).then(None).otherwise(pl.col(f"ch{c}")).alias(f"ch{c}"))
    if shuffle_rows:
        df = df[rng.permutation(df.height)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "csv":
        df.write_csv(path)
    else:
        df.write_parquet(path)
    return path


# ----------------------------------------------------------------------------------------------
# demo


def make_held_out_signal(
    modality: Literal["dna", "audio", "sensor"],
    length: int,
    seed: int = 0,
    *,
    data_seed: int = 0,
    sample_rate: int = 8000,
    channels: int = 3,
) -> str | np.ndarray:
    """A fresh signal from the same generator as the training data of ``data_seed``.

    dna -> str of ``length`` bases (same motifs/repeats as ``write_fasta(seed=data_seed)``);
    audio -> float32 (length,) clip; sensor -> float32 (length, channels) raw values from the
    same physical system as ``write_sensor_table(seed=data_seed)``. ``seed`` must differ from
    the training seeds to be held out.
    """
    length = _check_int("length", length, 1)
    if modality == "dna":
        return dna_sequence(length, seed=10_000 + int(seed), genome_seed=data_seed)
    if modality == "audio":
        return audio_signal(length, sample_rate, np.random.default_rng([int(seed), 6]))
    if modality == "sensor":
        return sensor_series(length, channels, seed=10_000 + int(seed), system_seed=data_seed)[0]
    raise ConfigError(f"modality: expected 'dna', 'audio' or 'sensor', got {modality!r}")
