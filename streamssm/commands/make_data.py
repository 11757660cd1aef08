"""``streamssm make-data``: write the generated data the tiny recipes train on.

    streamssm make-data all                 # runs/data/genome.fa, runs/data/audio/, runs/data/sensors.csv
    streamssm make-data dna --out /tmp/d    # only the FASTA, elsewhere

Everything is synthetic and deterministic for a seed (``streamssm.datamodules.synthetic``):
a genome with planted motifs, repeats, soft-masked tandem repeats and N gaps; tone/chirp
audio clips; coupled-oscillator sensor series with labelled regimes. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from streamssm.commands.parsing import ArgumentParser
from streamssm.errors import ConfigError

KINDS = ("dna", "waveform", "sensor", "dna_labels")
DEFAULT_OUT = "runs/data"

#: what each kind writes under the output folder (the tiny recipes read these paths)
FILES = {"dna": "genome.fa", "waveform": "audio", "sensor": "sensors.csv", "dna_labels": "dna_labels"}


def make_data(kind: str, out: str | Path = DEFAULT_OUT, seed: int = 0) -> Path:
    """Write the tiny data set ``kind`` (dna | waveform | sensor | dna_labels) under ``out``; returns its path."""
    from streamssm.datamodules import synthetic

    if not 0 <= seed < 2**32:  # (numpy's "expected non-negative integer")
        raise ConfigError(f"--seed must be 0..2**32-1, got {seed}")

    target = Path(out) / FILES[kind]
    if kind == "dna":
        return synthetic.write_fasta(target, n_chrom=4, length=30_000, seed=seed)
    if kind == "waveform":
        synthetic.write_wav_folder(target, n_files=8, seconds=2.0, sample_rate=8000, seed=seed)
        return target
    if kind == "sensor":
        return synthetic.write_sensor_table(target, rows=6000, channels=4, seed=seed, label=True)
    if kind == "dna_labels":  # sequences.fa + train_labels.csv / test_labels.csv (motif present or not)
        synthetic.write_motif_sequences(target, seed=seed)
        return target
    raise ConfigError(f"kind: expected one of {KINDS} or 'all', got {kind!r}")


def main(argv: list[str], prog: str = "streamssm make-data") -> int:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=[*KINDS, "all"], help="which data set to write")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    args = parser.parse_args(argv)
    for kind in KINDS if args.kind == "all" else (args.kind,):
        print(f"{kind}: {make_data(kind, args.out, args.seed)}")
    return 0
