"""Encodings shared by training and serving, and the synthetic data generators."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from streamssm.datamodules import synthetic
from streamssm.encoding import (
    DNA_ALPHABET,
    Normalizer,
    decode_bases,
    encode_bases,
    mu_law_decode,
    mu_law_encode,
    pcm_to_float,
    reverse_complement,
)
from streamssm.errors import ConfigError, DataFormatError, ShapeError


def test_encode_bases_maps_case_and_ambiguity():
    tok = encode_bases("ACGTNacgtnRYkmBDHVswn")
    assert tok.dtype == torch.long
    assert tok.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4] + [4] * 11
    assert torch.equal(encode_bases(b"GATTACA"), encode_bases("gattaca"))
    assert encode_bases("").shape == (0,)


@pytest.mark.parametrize("text,char,pos", [("ACGU", "U", 3), ("AC GT", " ", 2), ("ACG-T", "-", 3), ("ACµ", "µ", 2)])
def test_encode_bases_rejects_invalid_with_position(text, char, pos):
    with pytest.raises(DataFormatError) as exc:
        encode_bases(text)
    msg = str(exc.value)
    assert repr(char) in msg and f"position {pos}" in msg


def test_decode_roundtrip_and_range_check():
    assert decode_bases(encode_bases("ACGTNacgtR")) == "ACGTNACGTN"
    assert DNA_ALPHABET == "ACGTN"
    with pytest.raises(DataFormatError, match="0..4"):
        decode_bases(torch.tensor([0, 5]))
    with pytest.raises(ShapeError):
        decode_bases(torch.zeros(2, 2, dtype=torch.long))


def test_reverse_complement_matches_string_definition():
    seq = "AACGTNGGCAT"
    comp = {"A": "T", "C": "G", "G": "C", "T": "A", "N": "N"}
    expected = "".join(comp[b] for b in reversed(seq))
    assert decode_bases(reverse_complement(encode_bases(seq))) == expected
    batch = torch.stack([encode_bases("ACGTT"), encode_bases("NNACG")])  # (2, 5)
    rc = reverse_complement(batch)
    assert rc.shape == (2, 5)
    assert decode_bases(rc[1]) == "CGTNN"
    assert torch.equal(reverse_complement(rc), batch)  # involution
    as_numpy = reverse_complement(batch.numpy().astype("uint8"))  # the loaders' numpy path
    assert as_numpy.dtype == "uint8" and (as_numpy == rc.numpy()).all()


def test_mu_law_roundtrip_error_is_small_and_monotone():
    x = torch.linspace(-1, 1, 1001)
    tok = mu_law_encode(x)
    assert tok.dtype == torch.long and int(tok.min()) == 0 and int(tok.max()) == 255
    assert bool((tok[1:] >= tok[:-1]).all())
    y = mu_law_decode(tok)
    # mu-law step is finest near zero: |error| <= half a step, about 0.03 at full scale
    assert float((y - x).abs().max()) < 0.035
    assert float((y - x)[x.abs() < 0.01].abs().max()) < 5e-4  # vs 4e-3 for linear 8-bit
    assert torch.equal(mu_law_encode(torch.tensor([1.7, -3.0])), torch.tensor([255, 0]))
    with pytest.raises(DataFormatError, match="NaN"):
        mu_law_encode(torch.tensor([0.0, float("nan")]))
    with pytest.raises(DataFormatError, match="float"):
        mu_law_encode(torch.tensor([1, 2]))
    with pytest.raises(ConfigError):
        mu_law_encode(x, channels=1)


def test_pcm_to_float_scales_integer_formats():
    assert torch.allclose(pcm_to_float(np.array([-32768, 0, 16384], dtype=np.int16)), torch.tensor([-1.0, 0.0, 0.5]))
    assert torch.allclose(pcm_to_float(np.array([0, 128, 192], dtype=np.uint8)), torch.tensor([-1.0, 0.0, 0.5]))
    with pytest.raises(DataFormatError):
        pcm_to_float(np.array([1], dtype=np.uint16))


def test_normalizer_fit_apply_invert_and_serialise():
    rng = np.random.default_rng(0)
    x = rng.normal([3.0, -2.0, 7.0], [2.0, 0.5, 1.0], size=(4000, 3))
    x[:, 2] = 7.0  # a constant channel gets std 1 instead of a division by zero
    norm = Normalizer.fit(x)
    z = norm.apply(torch.tensor(x, dtype=torch.float32))
    assert z.dtype == torch.float32
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(z[:, :2].std(0), torch.ones(2), atol=1e-3)
    assert torch.allclose(z[:, 2], torch.zeros(4000))
    back = norm.invert(z)
    assert torch.allclose(back, torch.tensor(x, dtype=torch.float32), atol=1e-4)
    again = Normalizer.from_dict(norm.to_dict())
    assert torch.equal(again.apply(torch.tensor(x)), norm.apply(torch.tensor(x)))
    with pytest.raises(ShapeError, match="3"):
        norm.apply(torch.zeros(5, 2))
    with pytest.raises(ConfigError, match="positive"):
        Normalizer([0.0], [0.0])
    with pytest.raises(ConfigError, match="std"):
        Normalizer.from_dict({"mean": [0.0]})


def test_encoding_module_does_not_import_lightning():
    code = (
        "import sys, streamssm.encoding as e; "
        "assert 'lightning' not in sys.modules and 'lightning.pytorch' not in sys.modules, 'lightning imported'; "
        "assert e.encode_bases('A').tolist() == [0]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_synthetic_generators_are_deterministic(tmp_path):
    a = synthetic.write_fasta(tmp_path / "a.fa", n_chrom=2, length=500, seed=3)
    b = synthetic.write_fasta(tmp_path / "b.fa", n_chrom=2, length=500, seed=3)
    c = synthetic.write_fasta(tmp_path / "c.fa", n_chrom=2, length=500, seed=4)
    assert a.read_text() == b.read_text() != c.read_text()
    text = a.read_text()
    seq = "".join(line for line in text.splitlines() if not line.startswith(">"))
    assert len(seq) == 1000 and text.count(">") == 2
    assert all(len(line) <= 60 for line in text.splitlines())
    encode_bases(seq)  # only valid characters
    s1 = synthetic.sensor_series(300, 3, seed=1)[0]
    assert np.array_equal(s1, synthetic.sensor_series(300, 3, seed=1)[0])
    w = synthetic.make_held_out_signal("audio", 400, seed=2)
    assert w.shape == (400,) and w.dtype == np.float32 and np.abs(w).max() <= 0.95


def test_synthetic_fasta_has_soft_mask_gaps_and_repeats(tmp_path):
    seq = synthetic.dna_sequence(20_000, seed=0)
    assert any(ch.islower() for ch in seq) and "N" * 10 in seq
    # planted structure makes k-mers far more repetitive than uniform random sequence
    upper = seq.upper()
    kmers = {upper[i : i + 12] for i in range(0, len(upper) - 12)}
    assert len(kmers) < 0.8 * (len(upper) - 12)
    held = synthetic.make_held_out_signal("dna", 2000, seed=5)
    assert isinstance(held, str) and len(held) == 2000 and held != seq[:2000]


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_synthetic_data_is_learnable():
    # DNA: the next base given the two before carries well under the 2 bits of random sequence
    seq = encode_bases(synthetic.dna_sequence(50_000, seed=0)).numpy()
    ctx = seq[:-2] * 5 + seq[1:-1]
    h_cond = _entropy_bits(np.bincount(ctx * 5 + seq[2:]).astype(float)) - _entropy_bits(np.bincount(ctx).astype(float))
    assert h_cond < 1.8
    # audio and sensors: a linear order-2 predictor explains most of the next step
    for kind, series in (
        ("audio", synthetic.audio_signal(4000, 8000, np.random.default_rng(1))[:, None]),
        ("sensor", synthetic.sensor_series(3000, 3, seed=0)[0]),
    ):
        x = np.concatenate([series[1:-1], series[:-2], np.ones((len(series) - 2, 1))], axis=1)
        y = series[2:]
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        r2 = 1 - (y - x @ coef).var(0) / y.var(0)
        assert (r2 > 0.9).all(), (kind, r2)
    # sensor regimes differ in their dynamics (what window classification learns)
    values, regime = synthetic.sensor_series(3000, 2, seed=0)
    crossings = [
        np.mean(np.diff(np.sign(values[regime == r, 0] - values[regime == r, 0].mean())) != 0) for r in range(3)
    ]
    assert crossings[0] < crossings[2]


def test_strict_bases_refuse_ambiguity_codes_but_keep_n():
    assert encode_bases("ACGTN", ambiguous_as_n=False).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataFormatError, match=r"'r' at position 2.*ambiguity codes are refused"):
        encode_bases("ACrT", ambiguous_as_n=False)
    assert encode_bases("ACrT").tolist() == [0, 1, 4, 3]
