"""``streamssm infer`` over zarr v3 arrays: equality with the offline forward, resume after a
failure or SIGKILL (byte-identical), refusal of foreign outputs, bad inputs, the rank split, and
a 2-process DDP (gloo) run identical to a 1-process run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from streamssm.checkpoint import export_safetensors
from streamssm.datamodules.zarr import InputArray, UnitChunkSampler, assign_units, make_units, resolve_layout
from streamssm.errors import ConfigError, DataFormatError, ShapeError, StateError
from streamssm.models import ModelConfig, SSMModel
from streamssm.testing import assert_close
from streamssm.zarr_infer import RESUME_DIR, ResumeRecords, run_inference

warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
REPO = Path(__file__).resolve().parents[1]


def _continuous_model(tmp_path: Path, block: str = "mamba2", seed: int = 0, channels: int = 3) -> tuple[SSMModel, Path]:
    torch.manual_seed(seed)
    cfg = ModelConfig(block=block, d_model=16, n_layers=2, input_kind="continuous", input_dim=channels,
                      head="regression", output_dim=2, headdim=8, chunk_size=16)
    model = SSMModel(cfg).eval()
    path = export_safetensors(model, tmp_path / f"{block}-{seed}.safetensors")
    return model, path


def _write(path: Path, data: np.ndarray, chunks: tuple[int, ...], **kw) -> Path:
    arr = zarr.create_array(str(path), shape=data.shape, chunks=chunks, dtype=data.dtype, **kw)
    arr[...] = data
    return path


def _offline(model: SSMModel, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        inp = torch.from_numpy(x)
        y, _ = model(inp.float() if inp.is_floating_point() else inp.long())
    return y.numpy()


def _store_bytes(root: Path) -> dict[str, bytes]:
    """Every file of an output store; resume records decoded (safetensors orders its metadata
    map arbitrarily, so their file bytes vary while tensors and metadata are equal)."""
    files = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.endswith(".partial"):
            continue
        data = p.read_bytes()
        if p.suffix == ".safetensors":
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
            meta = sorted(header.pop("__metadata__").items())
            data = json.dumps([meta, sorted(header.items())]).encode() + data[8 + int.from_bytes(data[:8], "little"):]
        files[str(p.relative_to(root))] = data
    return files


def _series(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("block", ["mamba", "mamba2"])
def test_outputs_equal_offline_forward(tmp_path, block):
    """5 series x 300 steps (partial last group and chunk): output == full forward per series."""
    model, ckpt = _continuous_model(tmp_path, block)
    x = _series(np.random.default_rng(1), (5, 300, 3))
    _write(tmp_path / "in.zarr", x, (1, 64, 3), dimension_names=("series", "time", "channel"))
    res = run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", chunk_steps=128, batch_series=2,
                        num_workers=0, accelerator="cpu")
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["in"]
    assert out.shape == (5, 300, 2) and out.chunks == (1, 64, 2)
    assert res.steps == 5 * 300 and res.chunks == 3 * 3
    assert_close("zarr infer vs offline", torch.from_numpy(_offline(model, x)), torch.from_numpy(out[:]), torch.float32)
    attrs = dict(out.attrs)
    assert attrs["streamssm_complete"] is True
    meta = attrs["streamssm"]
    assert meta["config"]["block"] == block and meta["input"]["shape"] == [5, 300, 3]
    assert meta["model_fingerprint"] and meta["chunk_steps"] == 128 and meta["batch_series"] == 2
    assert out.metadata.dimension_names == ("series", "time", "output")
    assert "zstd" in str(out.compressors).lower()


def test_group_of_arrays_with_other_axis_order_and_sensor_encoding(tmp_path):
    """A group with a (c, t) array and an (s, c, t) array; sensor normalization applied."""
    model, _ = _continuous_model(tmp_path, "mamba2", channels=2)
    mean, std = [1.0, -2.0], [2.0, 0.5]
    ckpt = export_safetensors(model, tmp_path / "sensor.safetensors",
                              spec={"modality": "sensor", "channels": ["a", "b"], "mean": mean, "std": std})
    rng = np.random.default_rng(2)
    a = _series(rng, (2, 200))  # (c, t)
    b = _series(rng, (3, 2, 200))  # (s, c, t)
    root = zarr.open_group(str(tmp_path / "in.zarr"), mode="w")
    root.create_array("a", shape=a.shape, chunks=(2, 50), dtype="float32")[...] = a
    root.create_array("b", shape=b.shape, chunks=(1, 2, 50), dtype="float32")[...] = b
    run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", time_axis=-1, channel_axis=-2,
                  chunk_steps=100, batch_series=2, num_workers=1, accelerator="cpu")
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    m, sd = np.array(mean, np.float32), np.array(std, np.float32)
    # inputs normalized as in training; forecasts (horizon 1 of channels a, b) back in the data's
    # units, as the service returns them (infer wrote normalized forecasts before)
    ref_a = _offline(model, ((a.T - m) / sd)[None])[0] * sd + m
    ref_b = _offline(model, (b.transpose(0, 2, 1) - m) / sd) * sd + m
    assert out["a"].shape == (200, 2) and out["b"].shape == (3, 200, 2)
    assert out["a"].attrs["streamssm"]["output"]["names"] == ["a@t+1", "b@t+1"]
    assert out["a"].attrs["streamssm"]["output"]["values"].startswith("forecasts in the data's units")
    assert_close("group array a", torch.from_numpy(ref_a), torch.from_numpy(out["a"][:]), torch.float32)
    assert_close("group array b", torch.from_numpy(ref_b), torch.from_numpy(out["b"][:]), torch.float32)


def test_dna_token_array(tmp_path):
    """Token ids (s, t) int8 with DNA serving metadata -> lm logits equal to the full forward."""
    torch.manual_seed(3)
    cfg = ModelConfig(block="mamba", d_model=16, n_layers=2, input_kind="tokens", vocab_size=5, head="lm")
    model = SSMModel(cfg).eval()
    ckpt = export_safetensors(model, tmp_path / "dna.safetensors", spec={"modality": "dna"})
    tok = np.random.default_rng(3).integers(0, 5, size=(3, 160)).astype(np.int8)
    _write(tmp_path / "genome.zarr", tok, (1, 32))
    run_inference(ckpt, tmp_path / "genome.zarr", tmp_path / "out.zarr", chunk_steps=64, batch_series=2,
                  num_workers=0, accelerator="cpu")
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["genome"]
    assert out.shape == (3, 160, 5)
    assert_close("dna logits", torch.from_numpy(_offline(model, tok)), torch.from_numpy(out[:]), torch.float32)


def test_mono_audio_mu_law(tmp_path):
    """A 1-D float recording (t,) into a mu-law token model; a foreign sample rate is refused."""
    from streamssm.encoding import mu_law_encode

    torch.manual_seed(4)
    cfg = ModelConfig(block="mamba2", d_model=16, n_layers=1, input_kind="tokens", vocab_size=256, head="lm",
                      headdim=8, chunk_size=16)
    model = SSMModel(cfg).eval()
    ckpt = export_safetensors(model, tmp_path / "audio.safetensors",
                              spec={"modality": "audio", "sample_rate": 8000, "encoding": "mu_law"})
    wave = (0.5 * np.sin(np.arange(192) / 5.0)).astype(np.float32)
    _write(tmp_path / "rec.zarr", wave, (64,), attributes={"sample_rate": 8000})
    run_inference(ckpt, tmp_path / "rec.zarr", tmp_path / "out.zarr", chunk_steps=64, num_workers=0,
                  accelerator="cpu")
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["rec"]
    ref = _offline(model, mu_law_encode(torch.from_numpy(wave), 256)[None].numpy())[0]
    assert out.shape == (192, 256)
    assert_close("mu-law logits", torch.from_numpy(ref), torch.from_numpy(out[:]), torch.float32)
    _write(tmp_path / "rec16k.zarr", wave, (64,), attributes={"sample_rate": 16000})
    with pytest.raises(ConfigError, match="sample_rate 16000 Hz.*8000 Hz"):
        run_inference(ckpt, tmp_path / "rec16k.zarr", tmp_path / "out16k.zarr", num_workers=0, accelerator="cpu")
    assert not (tmp_path / "out16k.zarr").exists()
    # 16-bit PCM values stored as floats: the mu-law encoding would clip every sample to +-1
    _write(tmp_path / "loud.zarr", wave * 32768, (64,), attributes={"sample_rate": 8000})
    with pytest.raises(DataFormatError, match=r"reach 1638.*1/32768"):
        run_inference(ckpt, tmp_path / "loud.zarr", tmp_path / "loud_out.zarr", chunk_steps=64, num_workers=0,
                      accelerator="cpu")


# ----------------------------------------------------------------------------- resume


def _clean_and_failing_runs(tmp_path, monkeypatch, fail_at: list[int]) -> tuple[dict, dict]:
    model, ckpt = _continuous_model(tmp_path)
    x = _series(np.random.default_rng(4), (3, 256, 3))
    _write(tmp_path / "in.zarr", x, (1, 32, 3))
    opts = dict(chunk_steps=64, batch_series=2, num_workers=0, accelerator="cpu")
    run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "clean.zarr", **opts)
    original = ResumeRecords.save
    calls = {"n": 0, "fail": None}

    def flaky_save(self, unit, next_chunk, state):
        calls["n"] += 1
        if calls["n"] == calls["fail"]:  # the chunk's data is written, its record is not
            raise RuntimeError(f"injected failure at record {calls['n']}")
        return original(self, unit, next_chunk, state)

    monkeypatch.setattr(ResumeRecords, "save", flaky_save)
    for k in fail_at:
        calls["n"], calls["fail"] = 0, k
        with pytest.raises(RuntimeError, match="injected failure"):
            run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "resumed.zarr", **opts)
    calls["fail"] = None
    run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "resumed.zarr", **opts)
    return _store_bytes(tmp_path / "clean.zarr"), _store_bytes(tmp_path / "resumed.zarr")


def test_resume_after_failures_is_byte_identical(tmp_path, monkeypatch):
    """Fail after 3 records, then 1 (first chunk of the resumed run), then finish: same bytes."""
    clean, resumed = _clean_and_failing_runs(tmp_path, monkeypatch, fail_at=[3, 1, 2])
    assert any(RESUME_DIR in k for k in clean) and any("/c/" in k for k in clean)
    assert clean.keys() == resumed.keys()
    assert [k for k in clean if clean[k] != resumed[k]] == []


def _cli(ckpt: Path, inp: Path, out: Path, chunk_steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "streamssm.cli", "infer", "--checkpoint", str(ckpt), "--input", str(inp),
            "--output", str(out), "--chunk-steps", str(chunk_steps), "--batch-series", "2", "--accelerator", "cpu",
            "--num-workers", "0", "--no-progress", *extra]


_ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def test_sigkill_resume_is_byte_identical(tmp_path):
    """SIGKILL the CLI twice at random points after it finished some chunks; rerunning the same
    job (here in-process, same arguments) gives the bytes of an uninterrupted run."""
    _, ckpt = _continuous_model(tmp_path)
    x = _series(np.random.default_rng(5), (4, 1024, 3))
    _write(tmp_path / "in.zarr", x, (1, 32, 3))
    opts = dict(chunk_steps=64, batch_series=2, num_workers=0, accelerator="cpu")
    run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "clean.zarr", **opts)
    records = tmp_path / "killed.zarr" / "in" / RESUME_DIR
    rng = np.random.default_rng(6)
    progress = []
    for _ in range(2):
        seen = _records_written(records)
        proc = subprocess.Popen(_cli(ckpt, tmp_path / "in.zarr", tmp_path / "killed.zarr", 64), env=_ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and _records_written(records) <= seen:
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0.0, 0.01)))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the job ended before it could be killed"
        progress.append(_records_written(records))
    assert 0 < progress[0] < progress[-1] < 2 * 16, progress  # killed mid-way, each run advanced
    run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "killed.zarr", **opts)
    clean, killed = _store_bytes(tmp_path / "clean.zarr"), _store_bytes(tmp_path / "killed.zarr")
    assert clean.keys() == killed.keys()
    assert [k for k in clean if clean[k] != killed[k]] == []


def _records_written(records: Path) -> int:
    """Chunks finished according to the resume records (sum of next_chunk over units)."""
    total = 0
    for p in records.glob("*.safetensors"):
        data = p.read_bytes()
        total += int(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["next_chunk"])
    return total


def test_refuses_output_of_another_model_unless_overwrite(tmp_path):
    model_a, ckpt_a = _continuous_model(tmp_path, seed=0)
    model_b, ckpt_b = _continuous_model(tmp_path, seed=1)
    x = _series(np.random.default_rng(7), (2, 64, 3))
    _write(tmp_path / "in.zarr", x, (1, 32, 3))
    opts = dict(chunk_steps=32, batch_series=2, num_workers=0, accelerator="cpu")
    run_inference(ckpt_a, tmp_path / "in.zarr", tmp_path / "out.zarr", **opts)
    before = _store_bytes(tmp_path / "out.zarr")
    again = run_inference(ckpt_a, tmp_path / "in.zarr", tmp_path / "out.zarr", **opts)  # finished: no work
    assert (again.steps, again.chunks) == (0, 0) and _store_bytes(tmp_path / "out.zarr") == before
    with pytest.raises(ConfigError, match="another model.*model_fingerprint.*--overwrite"):
        run_inference(ckpt_b, tmp_path / "in.zarr", tmp_path / "out.zarr", **opts)
    with pytest.raises(ConfigError, match="chunk_steps"):
        run_inference(ckpt_a, tmp_path / "in.zarr", tmp_path / "out.zarr", **{**opts, "chunk_steps": 64})
    run_inference(ckpt_b, tmp_path / "in.zarr", tmp_path / "out.zarr", overwrite=True, **opts)
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["in"][:]
    assert_close("overwritten by model b", torch.from_numpy(_offline(model_b, x)), torch.from_numpy(out), torch.float32)


def test_one_group_holds_one_models_outputs_and_overwrite_replaces_only_this_runs(tmp_path):
    """CLI audit: a second input run by another model into the same group was added beside the
    first model's array (a group of mixed models), and --overwrite with the second input removed
    the first input's output too."""
    model_a, ckpt_a = _continuous_model(tmp_path, seed=0)
    _, ckpt_b = _continuous_model(tmp_path, seed=1)
    x, y = (_series(np.random.default_rng(s), (2, 64, 3)) for s in (31, 32))
    _write(tmp_path / "first.zarr", x, (1, 32, 3))
    _write(tmp_path / "second.zarr", y, (1, 32, 3))
    opts = dict(chunk_steps=32, batch_series=2, num_workers=0, accelerator="cpu")
    out = tmp_path / "out.zarr"
    run_inference(ckpt_a, tmp_path / "first.zarr", out, **opts)
    before = _store_bytes(out / "first")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"holds \['first'\] made by another model.*another --output"):
            run_inference(ckpt_b, tmp_path / "second.zarr", out, overwrite=overwrite, **opts)
    assert "second" not in zarr.open_group(str(out), mode="r")
    run_inference(ckpt_a, tmp_path / "second.zarr", out, **opts)  # the same model: added beside
    run_inference(ckpt_a, tmp_path / "second.zarr", out, overwrite=True, **opts)  # replaces only "second"
    assert _store_bytes(out / "first") == before
    got = zarr.open_group(str(out), mode="r")["second"][:]
    assert_close("second", torch.from_numpy(_offline(model_a, y)), torch.from_numpy(got), torch.float32)


# -------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_and_write_nothing(tmp_path):
    _, ckpt = _continuous_model(tmp_path)
    x = _series(np.random.default_rng(8), (2, 64, 3))
    _write(tmp_path / "in.zarr", x, (1, 32, 3))
    _write(tmp_path / "four.zarr", _series(np.random.default_rng(9), (2, 64, 4)), (1, 32, 4))
    _write(tmp_path / "text.zarr", np.array([["a"] * 64] * 2), (1, 32))
    out = tmp_path / "out.zarr"
    opts = dict(num_workers=0, accelerator="cpu")
    cases = [
        (tmp_path / "missing.zarr", {}, DataFormatError, "does not exist"),
        (tmp_path / "in.zarr" / "nope", {}, DataFormatError, "does not exist"),
        (tmp_path / "four.zarr", {}, ShapeError, "3 channel.*4"),
        (tmp_path / "text.zarr", {}, DataFormatError, "not numeric"),
        (tmp_path / "in.zarr", {"time_axis": 3}, ShapeError, "time axis 3 is out of range"),
        (tmp_path / "in.zarr", {"chunk_steps": 48}, ConfigError, "multiple of the time chunk 32"),
    ]
    for spec, kw, err, match in cases:
        with pytest.raises(err, match=match):
            run_inference(ckpt, spec, out, **opts, **kw)
        assert not out.exists(), f"{spec} {kw}: output was written"
    torch.manual_seed(0)
    tok_cfg = ModelConfig(block="mamba", d_model=16, n_layers=1, input_kind="tokens", vocab_size=5, head="lm")
    tok_ckpt = export_safetensors(SSMModel(tok_cfg), tmp_path / "tok.safetensors")
    _write(tmp_path / "floats.zarr", _series(np.random.default_rng(10), (2, 64)), (1, 32))
    with pytest.raises(DataFormatError, match="integer dtype"):
        run_inference(tok_ckpt, tmp_path / "floats.zarr", out, **opts)
    assert not out.exists()


def test_more_bad_inputs_raise_before_writing(tmp_path):
    """An empty series axis (the error named the missing output before), a sample_rate attribute
    that is not a number (raw ValueError/TypeError), integer samples with no known PCM scale
    (failed mid-run after the output was made), bad --devices/--accelerator (raw Lightning
    errors) and an output inside the input: each names the problem and writes nothing."""
    _, ckpt = _continuous_model(tmp_path)
    torch.manual_seed(4)
    cfg = ModelConfig(block="mamba2", d_model=16, n_layers=1, input_kind="tokens", vocab_size=256, head="lm",
                      headdim=8, chunk_size=16)
    audio = export_safetensors(SSMModel(cfg).eval(), tmp_path / "audio.safetensors",
                               spec={"modality": "audio", "sample_rate": 8000, "encoding": "mu_law"})
    _write(tmp_path / "in.zarr", _series(np.random.default_rng(8), (2, 64, 3)), (1, 32, 3))
    _write(tmp_path / "none.zarr", np.zeros((0, 64, 3), np.float32), (1, 32, 3))
    _write(tmp_path / "rate.zarr", np.zeros(64, np.float32), (32,), attributes={"sample_rate": "16k"})
    _write(tmp_path / "rates.zarr", np.zeros(64, np.float32), (32,), attributes={"sample_rate": [8000]})
    _write(tmp_path / "i64.zarr", np.arange(64, dtype=np.int64), (32,), attributes={"sample_rate": 8000})
    out = tmp_path / "out.zarr"
    opts = dict(num_workers=0, accelerator="cpu")
    cases = [
        (ckpt, tmp_path / "none.zarr", {}, ShapeError, "series axis .* is empty"),
        (audio, tmp_path / "rate.zarr", {}, DataFormatError, "sample_rate must be a positive number.*16k"),
        (audio, tmp_path / "rates.zarr", {}, DataFormatError, "sample_rate must be a positive number"),
        (audio, tmp_path / "i64.zarr", {}, DataFormatError, "i64.zarr.*int64 samples cannot be read as PCM"),
        (ckpt, tmp_path / "in.zarr", {"devices": 0}, ConfigError, "devices: expected an integer >= 1"),
        (ckpt, tmp_path / "in.zarr", {"accelerator": "nope"}, ConfigError, "--accelerator nope"),
    ]
    for model, spec, kw, err, match in cases:
        with pytest.raises(err, match=match):
            run_inference(model, spec, out, **{**opts, **kw})
        assert not out.exists(), f"{spec} {kw}: output was written"
    with pytest.raises(ConfigError, match="inside the input"):
        run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "in.zarr" / "out", **opts)
    assert sorted(p.name for p in (tmp_path / "in.zarr").iterdir()) == ["c", "zarr.json"]


def test_cli_reports_errors(tmp_path, capsys):
    from streamssm.cli import main

    _, ckpt = _continuous_model(tmp_path)
    code = main(["infer", "--checkpoint", str(ckpt), "--input", str(tmp_path / "x.zarr"), "--output",
                 str(tmp_path / "o.zarr")])
    err = capsys.readouterr().err  # the one error path of streamssm.cli: exit 1 (not a config error), one line
    assert code == 1 and "does not exist" in err and err.startswith("streamssm infer: error: ") and "Traceback" not in err


# ------------------------------------------------------------------------ distribution


def test_rank_split_and_sampler():
    inputs = _inputs_from_shapes([((7, 100, 2), 10), ((3, 40, 2), 10)])
    units = make_units(inputs, chunk_steps=20, batch_series=2)
    assert [(u.array, u.group, u.s0, u.s1, u.n_chunks) for u in units][:5] == [
        (0, 0, 0, 2, 5), (0, 1, 2, 4, 5), (0, 2, 4, 6, 5), (0, 3, 6, 7, 5), (1, 0, 0, 2, 2)]
    for world in (1, 2, 3, 8):
        split = assign_units(units, inputs, world)
        flat = [u for rank in split for u in rank]
        assert sorted(u.key for u in flat) == sorted(u.key for u in units)  # each unit exactly once
        assert split == assign_units(units, inputs, world)  # the same on every rank
        loads = [sum((u.s1 - u.s0) * inputs[u.array].n_steps for u in r) for r in split]
        assert max(loads) - min(loads) <= 2 * 100  # within one unit of work
    sampler = UnitChunkSampler(units[:2], start_chunk=lambda u: 3 if u.group == 0 else 0)
    assert list(sampler) == [(0, 0, 3), (0, 0, 4)] + [(0, 1, k) for k in range(5)]
    assert len(sampler) == 7
    with pytest.raises(DataFormatError, match="outside"):
        UnitChunkSampler(units[:1], start_chunk=lambda u: 9)


def _inputs_from_shapes(specs):
    return [InputArray(f"a{i}", f"/nonexistent/a{i}", shape, "float32", resolve_layout(shape, "x", True), tc)
            for i, (shape, tc) in enumerate(specs)]


def test_resume_record_of_other_model_is_refused(tmp_path):
    _, ckpt = _continuous_model(tmp_path)
    x = _series(np.random.default_rng(11), (2, 64, 3))
    _write(tmp_path / "in.zarr", x, (1, 32, 3))
    run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", chunk_steps=32, num_workers=0, accelerator="cpu")
    from streamssm.checkpoint import load_for_serving
    from streamssm.zarr_infer import prepare

    bundle = load_for_serving(ckpt)
    dm, module, writer = prepare(bundle, tmp_path / "in.zarr", tmp_path / "out.zarr", chunk_steps=32, num_workers=0)
    assert module.records.start_chunk(dm.units[0]) == 2  # finished: next chunk == n_chunks
    other = ResumeRecords(writer.plan, "0" * 16)
    with pytest.raises(StateError, match="belongs to model"):
        other.start_chunk(dm.units[0])


@pytest.mark.parametrize("damage", ["garbage", "next_chunk"])
def test_damaged_resume_record_is_a_state_error(tmp_path, damage):
    """A resume record of garbage bytes (MemoryError before) or naming a chunk past the end
    (the rerun said 'already complete' before) is refused, naming the record."""
    from streamssm.state import state_to_bytes

    _, ckpt = _continuous_model(tmp_path)
    _write(tmp_path / "in.zarr", _series(np.random.default_rng(11), (2, 64, 3)), (1, 32, 3))
    opts = dict(chunk_steps=32, num_workers=0, accelerator="cpu")
    run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", **opts)
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r+")["in"]
    del out.attrs["streamssm_complete"]
    record = tmp_path / "out.zarr" / "in" / RESUME_DIR / "group-000000.safetensors"
    if damage == "garbage":
        record.write_bytes(b"garbage\n")
    else:
        from streamssm.state import read_state_metadata

        meta = read_state_metadata(record)
        record.write_bytes(state_to_bytes(_state_of(record), {**meta, "next_chunk": "999"}))
    with pytest.raises(StateError, match="group-000000.safetensors.*corrupt"):
        run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", **opts)


def _state_of(path: Path):
    from streamssm.state import state_from_bytes

    return state_from_bytes(path.read_bytes(), "cpu")


@contextlib.contextmanager
def _record_fails_at(monkeypatch, n: int):
    """Inside: the ``n``-th resume record of the run fails to save (its chunk's data is written)."""
    original, calls = ResumeRecords.save, {"n": 0}

    def failing_save(self, unit, next_chunk, state):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("injected failure")
        return original(self, unit, next_chunk, state)

    with monkeypatch.context() as m:
        m.setattr(ResumeRecords, "save", failing_save)
        yield


def test_ddp_two_processes_equal_one(tmp_path, monkeypatch):
    """CPU DDP (gloo, 2 ranks launched by Lightning from the CLI) resuming a failed 1-process
    run writes the same bytes as an uninterrupted 1-process run. Units (2, 2, 1 series) go
    rank 0: {0, 2}, rank 1: {1}; the failed run finished units 0 and 1, so rank 1 has no work
    (Lightning skips its predict hooks: nothing may wait for it) and rank 0 redoes unit 2."""
    _, ckpt = _continuous_model(tmp_path)
    x = _series(np.random.default_rng(12), (5, 128, 3))
    _write(tmp_path / "in.zarr", x, (1, 32, 3))
    opts = dict(chunk_steps=64, batch_series=2, num_workers=0, accelerator="cpu")
    run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "one.zarr", **opts)
    with _record_fails_at(monkeypatch, 5), pytest.raises(RuntimeError, match="injected failure"):
        run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "two.zarr", **opts)  # unit 2, chunk 0: no record
    assert _records_written(tmp_path / "two.zarr" / "in" / RESUME_DIR) == 4
    two = subprocess.run(_cli(ckpt, tmp_path / "in.zarr", tmp_path / "two.zarr", 64, "--devices", "2"), env=_ENV,
                         capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    # one report, by rank 0, with the total of both ranks; the idle rank does not fail
    assert two.stderr.count("wrote ") == 1 and "128 series steps" in two.stderr and "on 2 devices" in two.stderr
    assert "Traceback" not in two.stderr and "zero length" not in two.stderr, two.stderr[-3000:]
    a, b = _store_bytes(tmp_path / "one.zarr"), _store_bytes(tmp_path / "two.zarr")
    assert a.keys() == b.keys() and len([k for k in a if RESUME_DIR in k]) == 3
    assert [k for k in a if a[k] != b[k]] == []
    assert zarr.open_array(str(tmp_path / "two.zarr" / "in"), mode="r").attrs["streamssm_complete"] is True
    fresh = subprocess.run(_cli(ckpt, tmp_path / "in.zarr", tmp_path / "fresh.zarr", 64, "--devices", "2"), env=_ENV,
                           capture_output=True, text=True, timeout=240)  # both ranks work: still one line
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stderr.count("wrote ") == 1 and f"{5 * 128} series steps" in fresh.stderr, fresh.stderr[-3000:]


# ------------------------------------------------------------------ hardening (issue 17 item 8)


def _sensor_ckpt(tmp_path: Path) -> tuple[SSMModel, Path, list[float], list[float]]:
    model, _ = _continuous_model(tmp_path, "mamba2", channels=2)
    mean, std = [100.0, -20.0], [10.0, 4.0]
    ckpt = export_safetensors(model, tmp_path / "sensor.safetensors",
                              spec={"modality": "sensor", "channels": ["a", "b"], "mean": mean, "std": std})
    return model, ckpt, mean, std


def test_sensor_model_refuses_integer_array_unless_told_how_to_read_it(tmp_path):
    """int16 counts into a sensor model were divided by 32768 without a word."""
    model, ckpt, mean, std = _sensor_ckpt(tmp_path)
    counts = np.random.default_rng(20).integers(60, 140, size=(2, 96, 2)).astype(np.int16)
    _write(tmp_path / "adc.zarr", counts, (1, 32, 2))
    opts = dict(chunk_steps=32, num_workers=0, accelerator="cpu")
    with pytest.raises(ConfigError, match=r"int16 samples for a sensor model.*--integer-input values.*pcm"):
        run_inference(ckpt, tmp_path / "adc.zarr", tmp_path / "out.zarr", **opts)
    assert not (tmp_path / "out.zarr").exists()
    run_inference(ckpt, tmp_path / "adc.zarr", tmp_path / "out.zarr", integer_input="values", **opts)
    out = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")["adc"]
    m, sd = np.array(mean, np.float32), np.array(std, np.float32)
    ref = _offline(model, ((counts - m) / sd).astype(np.float32)) * sd + m  # forecasts in the data's units
    assert_close("int16 read as values", torch.from_numpy(ref), torch.from_numpy(out[:]), torch.float32)
    assert dict(out.attrs)["streamssm"]["integer_input"] == "values"
    with pytest.raises(ConfigError, match="integer_input"):  # resuming with another reading is refused
        run_inference(ckpt, tmp_path / "adc.zarr", tmp_path / "out.zarr", integer_input="pcm", **opts)


def test_overwrite_never_removes_a_folder_it_did_not_write(tmp_path):
    """--overwrite wiped any directory, and the refusal told the user to pass it."""
    _, ckpt = _continuous_model(tmp_path)
    _write(tmp_path / "in.zarr", _series(np.random.default_rng(21), (2, 64, 3)), (1, 32, 3))
    opts = dict(chunk_steps=32, num_workers=0, accelerator="cpu")
    plain = tmp_path / "results"
    plain.mkdir()
    (plain / "thesis.tex").write_text("years of work")
    theirs = zarr.open_group(str(tmp_path / "theirs.zarr"), mode="w")
    theirs.create_array("raw", shape=(4,), dtype="int8")
    (tmp_path / "a_file").write_text("x")
    for target, match in ((plain, "not a zarr group"), (tmp_path / "theirs.zarr", r"not written by streamssm infer.*raw"),
                          (tmp_path / "a_file", "not a folder")):
        for overwrite in (False, True):
            with pytest.raises(DataFormatError, match=match) as exc:
                run_inference(ckpt, tmp_path / "in.zarr", target, overwrite=overwrite, **opts)
            assert "pass --overwrite" not in str(exc.value) and "left untouched" in str(exc.value)
    assert (plain / "thesis.tex").read_text() == "years of work" and sorted(p.name for p in plain.iterdir()) == ["thesis.tex"]
    assert "raw" in zarr.open_group(str(tmp_path / "theirs.zarr"), mode="r")
    empty = tmp_path / "empty"
    empty.mkdir()
    run_inference(ckpt, tmp_path / "in.zarr", empty, **opts)  # an empty folder is fine to write into
    run_inference(ckpt, tmp_path / "in.zarr", empty, overwrite=True, **opts)  # ours now: replaced
    assert dict(zarr.open_group(str(empty), mode="r")["in"].attrs)["streamssm_complete"] is True
    (empty / "notes.txt").write_text("added later")  # ours plus something else: refused, nothing removed
    with pytest.raises(DataFormatError, match=r"notes.txt"):
        run_inference(ckpt, tmp_path / "in.zarr", empty, overwrite=True, **opts)
    assert (empty / "notes.txt").exists() and (empty / "in").is_dir()


def test_deleted_input_chunk_is_an_error_not_zeros(tmp_path):
    _, ckpt = _continuous_model(tmp_path)
    _write(tmp_path / "in.zarr", _series(np.random.default_rng(22), (2, 128, 3)), (1, 32, 3))
    (tmp_path / "in.zarr" / "c" / "1" / "2" / "0").unlink()  # series 1, steps 64..95
    opts = dict(chunk_steps=64, batch_series=2, num_workers=1, accelerator="cpu")
    with pytest.raises(DataFormatError, match=r"in.zarr'.*chunk 'c/1/2/0' \(series 1..1, time steps 64..95\) is "
                                              r"missing.*fill value 0.0.*--missing-chunks fill") as exc:
        run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", **opts)
    assert "Traceback" not in str(exc.value)  # raised as it is, not wrapped by the DataLoader worker
    res = run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", missing_chunks="fill", **opts)
    assert res.status == "done"


def test_corrupt_chunk_names_array_and_chunk(tmp_path):
    _, ckpt = _continuous_model(tmp_path)
    _write(tmp_path / "in.zarr", _series(np.random.default_rng(23), (2, 128, 3)), (1, 32, 3))
    chunk = tmp_path / "in.zarr" / "c" / "0" / "3" / "0"
    chunk.write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 5)  # a zstd magic number, then junk
    with pytest.raises(DataFormatError, match=r"in.zarr'.*chunk 'c/0/3/0' \(series 0..0, time steps 96..127\) "
                                              r"cannot be decoded"):
        run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", chunk_steps=64, num_workers=0,
                      accelerator="cpu")


def test_nan_error_says_series_time_and_channel(tmp_path):
    _, ckpt = _continuous_model(tmp_path)
    x = _series(np.random.default_rng(24), (3, 128, 3))
    x[2, 77, 1] = np.nan
    _write(tmp_path / "in.zarr", x, (1, 32, 3))
    with pytest.raises(DataFormatError, match=r"nan at series 2, time index 77, channel 1"):
        run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", chunk_steps=64, batch_series=2,
                      num_workers=0, accelerator="cpu")


def test_relative_and_absolute_input_paths_resume_the_same_job(tmp_path, monkeypatch):
    _, ckpt = _continuous_model(tmp_path)
    x = _series(np.random.default_rng(25), (2, 128, 3))
    _write(tmp_path / "in.zarr", x, (1, 32, 3))
    opts = dict(chunk_steps=32, batch_series=1, num_workers=0, accelerator="cpu")
    run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "clean.zarr", **opts)
    monkeypatch.chdir(tmp_path)
    with _record_fails_at(monkeypatch, 3), pytest.raises(RuntimeError, match="injected failure"):
        run_inference(ckpt, "in.zarr", "out.zarr", **opts)  # relative
    done = _records_written(tmp_path / "out.zarr" / "in" / RESUME_DIR)
    assert 0 < done < 8
    res = run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", **opts)  # absolute: resumes
    assert res.status == "done" and res.steps == 2 * 128 - 32 * done
    clean, out = _store_bytes(tmp_path / "clean.zarr"), _store_bytes(tmp_path / "out.zarr")
    assert clean.keys() == out.keys() and [k for k in clean if clean[k] != out[k]] == []


# ------------------------------------------------------------------ the CLI (issue 18)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_stops_cleanly_and_the_rerun_resumes_then_says_complete(tmp_path, sig):
    """`streamssm infer` ignored SIGTERM (Lightning's handler only sets a flag); a rerun of a
    finished job printed `wrote ... 0 series steps`. Ctrl-C (CLI audit) exited 1 with Lightning's
    line only: now 130 and the same resume hint."""
    _, ckpt = _continuous_model(tmp_path)
    x = _series(np.random.default_rng(26), (2, 4096, 3))
    _write(tmp_path / "in.zarr", x, (1, 32, 3))
    opts = dict(chunk_steps=32, batch_series=2, num_workers=0, accelerator="cpu")
    run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "clean.zarr", **opts)
    records = tmp_path / "out.zarr" / "in" / RESUME_DIR
    # (SIGINT with a loader worker: multiprocessing's resource-sharer thread prints a traceback at exit)
    workers = "1" if sig == signal.SIGTERM else "0"
    cmd = _cli(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", 32, "--num-workers", workers)
    proc = subprocess.Popen(cmd, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and _records_written(records) < 2:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"stopped by {sig.name}" in err and "rerun the same command to resume" in err and "Traceback" not in err
    done = _records_written(records)
    assert 2 <= done < 128  # stopped early, finished chunks kept
    assert not zarr.open_array(str(tmp_path / "out.zarr" / "in"), mode="r").attrs.get("streamssm_complete")
    res = run_inference(ckpt, tmp_path / "in.zarr", tmp_path / "out.zarr", **opts)
    assert res.status == "done" and res.steps == 2 * 4096 - 2 * 32 * done
    clean, out = _store_bytes(tmp_path / "clean.zarr"), _store_bytes(tmp_path / "out.zarr")
    assert clean.keys() == out.keys() and [k for k in clean if clean[k] != out[k]] == []
    again = subprocess.run(cmd, env=_ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is already complete: nothing to do" in again.stderr and "wrote" not in again.stderr


def test_writes_queued_behind_a_failed_write_do_not_run():
    """A later chunk's record was saved after an earlier chunk's write had failed (so a rerun
    skipped past it; flaky 'DID NOT RAISE' in test_resume_after_failures_is_byte_identical)."""
    import threading

    from streamssm.zarr_infer import _BackgroundIO

    gate, ran = threading.Event(), []

    def failing() -> None:
        gate.wait(10)
        raise OSError("disk full")

    io = _BackgroundIO(depth=2)
    io.submit(failing)
    io.submit(ran.append, "chunk 2 record")  # queued behind the failing write
    gate.set()
    with pytest.raises(OSError, match="disk full"):
        io.close()
    assert ran == []
