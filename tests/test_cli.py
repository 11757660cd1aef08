"""The `streamssm` entry point: help lists every command, each command's --help works (with
defaults), and every command's errors go through one path: one line, a hint, exit 2 or 1."""

from pathlib import Path

import re

import pytest

from streamssm.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_fails_with_usage(capsys):
    assert main(["frobnicate"]) != 0
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


# ------------------------------------------------------------------ one error path (issue 18)

import logging  # noqa: E402
import socket  # noqa: E402

import torch  # noqa: E402

from streamssm.checkpoint import export_safetensors  # noqa: E402
from streamssm.errors import DataFormatError  # noqa: E402
from streamssm.models import ModelConfig, SSMModel  # noqa: E402

SENSOR = {"modality": "sensor", "channels": ["a", "b"], "mean": [0.0, 1.0], "std": [1.0, 2.0],
          "task": {"name": "Forecaster", "head": "regression", "horizon": 2}}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    cfg = ModelConfig(block="mamba2", input_kind="continuous", input_dim=2, head="regression", output_dim=4,
                      d_model=16, n_layers=1, d_state=8, headdim=8, chunk_size=4)
    return export_safetensors(SSMModel(cfg), tmp_path_factory.mktemp("m") / "m.safetensors", spec=SENSOR)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith(f"streamssm {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_missing_file_is_one_line(capsys, tmp_path):
    assert main(["export", "--checkpoint", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "x.safetensors")]) == 1
    assert "nope.ckpt" in _one_error_line(capsys, "export")


def test_config_error_exits_2(capsys, model_file, tmp_path):
    assert main(["export", "--checkpoint", str(model_file), "--output", str(tmp_path / "x.bin")]) == 2
    assert "ending in .safetensors" in _one_error_line(capsys, "export")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(DataFormatError):
        main(["--debug", "export", "--checkpoint", str(tmp_path / "nope.ckpt"), "--output", str(tmp_path / "x.safetensors")])


def test_serve_port_in_use(capsys, model_file):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--checkpoint", str(model_file), "--port", str(port), "--device", "cpu"]) == 2
    assert _one_error_line(capsys, "serve").endswith(f"port {port} is in use; pick another with --port "
                                                     "(--debug shows the traceback)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_serve_cuda_without_a_gpu(capsys, model_file):
    assert main(["serve", "--checkpoint", str(model_file), "--device", "cuda"]) == 2
    assert "no CUDA device is available" in _one_error_line(capsys, "serve")


def test_stream_without_a_server(capsys, tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n1,2\n3,4\n")
    url = f"ws://127.0.0.1:{_free_port()}/"
    assert main(["stream", str(csv), "--url", url, "--wait", "0.3"]) == 1
    line = _one_error_line(capsys, "stream")
    assert f"no server at {url} (connection refused for 0.3 s)" in line and "streamssm serve" in line


@pytest.mark.parametrize("options,named", [
    (["--chunk", "-5"], "--chunk must be >= 1 samples, got -5"),  # streamed nothing, rc 0
    (["--chunk", "0"], "--chunk must be >= 1 samples, got 0"),  # silently the default
    (["--chunk-ms", "0"], "--chunk-ms must be a positive number of milliseconds, got 0.0"),
    (["--chunk-ms", "nan"], "--chunk-ms must be a positive number of milliseconds, got nan"),
    (["--out", "saved"], "--out names the .npz file to save, got 'saved'"),  # numpy wrote saved.npz
    (["--wait", "nan"], "wait must be >= 0 seconds, got nan"),  # retried forever
])
def test_stream_options_out_of_range_are_refused_before_streaming(options, named, capsys, tmp_path):
    """CLI audit: each of these streamed something else than asked, or nothing, without a word."""
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n1,2\n3,4\n")
    assert main(["stream", str(csv), "--url", f"ws://127.0.0.1:{_free_port()}/", *options]) == 2
    assert named in _one_error_line(capsys, "stream")


@pytest.mark.parametrize("argv,named", [
    (["make-data", "dna", "--seed", "-5"], r"--seed must be 0..2\*\*32-1, got -5"),
    (["serve", "--checkpoint", "MODEL", "--threads", "-3"], "--threads must be >= 1"),
    (["generate", "--checkpoint", "MODEL", "--prompt", "1,2", "--length", "3", "--output", "OUT.npy",
      "--temperature", "nan"], "need a finite temperature >= 0"),
    (["generate", "--checkpoint", "LM", "--prompt", "1,2", "--length", "3", "--output", "OUT.npy",
      "--seed", "99999999999999999999999"], "seed must be 0..2\\*\\*64-1"),
])
def test_numbers_out_of_range_are_one_error_line(argv, named, capsys, model_file, tmp_path, monkeypatch):
    """CLI audit: each raised a numpy / torch traceback (NaN temperature: in the sampling)."""
    monkeypatch.chdir(tmp_path)
    lm = export_safetensors(SSMModel(ModelConfig(block="mamba", d_model=8, n_layers=1, vocab_size=5)),
                            tmp_path / "lm.safetensors")
    names = {"MODEL": str(model_file), "LM": str(lm), "OUT.npy": str(tmp_path / "out.npy")}
    argv = [names.get(a, a) for a in argv]
    assert main(argv) == 2
    assert re.search(named, _one_error_line(capsys, argv[0]))


def test_serve_refuses_a_port_outside_the_range(capsys, model_file):
    """CLI audit: --port 99999 listened on 99999 mod 65536."""
    assert main(["serve", "--checkpoint", str(model_file), "--port", "99999"]) == 2
    assert "port must be 0..65535 (0: any free port), got 99999" in _one_error_line(capsys, "serve")


def test_stream_http_url_hints_ws(capsys, tmp_path):
    assert main(["stream", str(tmp_path / "x.csv"), "--url", "http://127.0.0.1:8765/"]) == 2
    assert "use ws://" in _one_error_line(capsys, "stream")


def _logs_to_this_stderr(monkeypatch) -> None:
    """Console log handlers (Lightning's; the one cli.main installs) keep the sys.stderr of the
    moment they were made, an earlier test's closed capture: point them at this test's."""
    import sys

    import lightning  # noqa: F401 - installs its handler

    for name in ("", "lightning"):
        for handler in logging.getLogger(name).handlers:
            if type(handler) is logging.StreamHandler:
                monkeypatch.setattr(handler, "stream", sys.stderr)


def test_fit_missing_fasta_is_one_line(capsys, tmp_path, monkeypatch):
    _logs_to_this_stderr(monkeypatch)
    monkeypatch.chdir(tmp_path)
    recipe = str(ROOT / "recipes" / "dna_tiny.yaml")
    assert main(["fit", "--config", recipe, "--data.init_args.fasta", "nope.fa", "--trainer.logger", "false"]) == 1
    assert "nope.fa" in _one_error_line(capsys, "fit")


def test_fit_instantiation_error_is_unwrapped(capsys, tmp_path, monkeypatch):
    _logs_to_this_stderr(monkeypatch)
    monkeypatch.chdir(tmp_path)
    recipe = str(ROOT / "recipes" / "dna_tiny.yaml")
    assert main(["fit", "--config", recipe, "--model.init_args.warmup_steps", "-3"]) == 2
    assert _one_error_line(capsys, "fit").startswith("streamssm fit: error: TokenLM: warmup_steps must be >= 0")


@pytest.mark.parametrize("flag", [["--trainer.max_steps", "-5"], ["--trainer.devices", "0"]])
def test_a_trainer_setting_lightning_refuses_is_one_line(flag, capsys, tmp_path, monkeypatch):
    """CLI audit: Lightning's MisconfigurationException came out as a traceback."""
    from streamssm.commands.make_data import make_data

    _logs_to_this_stderr(monkeypatch)
    monkeypatch.chdir(tmp_path)
    make_data("dna")
    assert main(["fit", "--config", str(ROOT / "recipes" / "dna_tiny.yaml"), *flag, "--trainer.logger", "false"]) == 2
    assert "streamssm fit: error: Lightning: `" in _one_error_line(capsys, "fit")


@pytest.mark.parametrize("flags, code, says", [
    (["--data.init_args.fasta", "nope.fa"], 1, "fasta: file 'nope.fa' does not exist"),
    (["--model.init_args.arch.d_model", "-4"], 2, "d_model must be positive, got -4"),
    (["--model.init_args.arch.layer_pattern", "mx"], 2, "layer_pattern"),
    (["--data.init_args.window", "0"], 2, "window: expected an integer >= 1, got 0"),
])
def test_fit_config_error_comes_before_any_lightning_output(flags, code, says, capsys, tmp_path, monkeypatch):
    """A bad model, data or file fails with the one error line before LightningCLI seeds
    ("Seed set to 0") and before the Trainer reports its devices ("GPU available: ...")."""
    _logs_to_this_stderr(monkeypatch)
    monkeypatch.chdir(tmp_path)
    recipe = str(ROOT / "recipes" / "dna_tiny.yaml")
    assert main(["fit", "--config", recipe, *flags, "--trainer.logger", "false"]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("streamssm fit: error: ")]
    assert len(lines) == 1 and says in lines[0], err
    assert "Seed set" not in err and "GPU available" not in err, err


def test_fit_still_seeds_before_the_trainer(tmp_path, monkeypatch):
    """The seed moved from right after parsing to just before the Trainer: it is still set
    (and recorded in the config that is saved) before anything trains."""
    import torch

    from streamssm.commands.fit import StreamSSMCLI, build_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.fa").write_text(">chr1\nACGT\n")
    monkeypatch.setattr(StreamSSMCLI, "_run_subcommand", lambda self, subcommand: None)
    torch.manual_seed(7)
    cli = build_cli("fit", ["--config", str(ROOT / "recipes" / "dna_tiny.yaml"), "--data.init_args.fasta", "g.fa",
                            "--seed_everything", "1234", "--trainer.logger", "false"])
    assert torch.initial_seed() == 1234 and cli.config["fit"]["seed_everything"] == 1234
    assert cli.trainer is not None and cli.model.model is None  # weights come later, in configure_model


@pytest.mark.parametrize("cls, args, missing", [
    ("FastaDataModule", {"fasta": "g.fa", "bed": "nope.bed"}, "bed: file 'nope.bed'"),
    ("SensorDataModule", {"path": "t.csv", "val_path": ["t.csv", "nope.csv"]}, "val_path: file 'nope.csv'"),
    ("WaveformDataModule", {"files": "nope/*.wav"}, "files: pattern 'nope/*.wav' matches no files"),
    ("DnaLabelsDataModule", {"fasta": "g.fa", "labels": "nope.csv"}, "labels: file 'nope.csv'"),
])
def test_datamodules_check_their_input_files_without_reading_them(cls, args, missing, tmp_path, monkeypatch):
    """check_inputs (what fit runs before the Trainer) names the missing path of every file
    argument, and passes once it exists (the files stay empty: nothing is read)."""
    import streamssm.datamodules as dms
    from streamssm.datamodules.dna_labels import DnaLabelsDataModule
    from streamssm.errors import DataFormatError

    monkeypatch.chdir(tmp_path)
    for name in ("g.fa", "t.csv"):
        (tmp_path / name).touch()
    dm = (DnaLabelsDataModule if cls == "DnaLabelsDataModule" else getattr(dms, cls))(**args)
    with pytest.raises(DataFormatError, match=missing.replace("*", r"\*")):
        dm.check_inputs()
    (tmp_path / "nope").mkdir()
    for name in ("nope.bed", "nope.csv", "nope/a.wav"):
        (tmp_path / name).touch()
    dm.check_inputs()


@pytest.mark.parametrize("command, shown", [
    ("serve", ["default: 8765)", "default: auto)", "default: 127.0.0.1)", "default: 64)", "default: 640)"]),
    ("infer", ["default: 8)", "default: auto)", "default: error)"]),
    ("stream", ["(default: ws://127.0.0.1:8765/)", "(default: 20.0)"]),
    ("generate", ["(token LMs) (default: 1)", "greedy (default: 1.0)", "off (default: 0)", "random seed"]),
])
def test_help_shows_defaults(command, shown, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in shown:
        assert text in out


# ------------------------------------------------- commands together, config files (issue 20)

import dataclasses  # noqa: E402

import yaml  # noqa: E402

from streamssm.commands.infer import InferConfig  # noqa: E402
from streamssm.commands.infer import build_parser as infer_parser  # noqa: E402
from streamssm.commands.parsing import build, option_name, parse  # noqa: E402
from streamssm.commands.serve import build_parser as serve_parser  # noqa: E402
from streamssm.errors import ConfigError  # noqa: E402
from streamssm.service.config import ServeConfig  # noqa: E402


def _print_config(capsys, argv: list[str]) -> dict:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_serve_print_config_round_trips_through_config(capsys, tmp_path, model_file):
    flags = ["--checkpoint", str(model_file), "--max-streams", "7", "--write-ahead-interval", "2.5",
             "--nan-policy", "zero", "--token", "s3cret", "--slice-samples", "64"]
    printed = _print_config(capsys, ["serve", *flags, "--print_config"])
    assert printed["max_streams"] == 7 and printed["write_ahead_interval"] == 2.5 and printed["checkpoint"] == str(model_file)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(printed))
    from_flags = build(ServeConfig, parse(serve_parser("streamssm serve"), flags))
    from_file = build(ServeConfig, parse(serve_parser("streamssm serve"), ["--config", str(path)]))
    assert from_file == from_flags
    assert _print_config(capsys, ["serve", "--config", str(path), "--print_config"]) == printed
    later = parse(serve_parser("streamssm serve"), ["--config", str(path), "--max-streams", "9"])
    assert later.max_streams == 9 and later.nan_policy == "zero"  # options after --config override it


def test_every_serve_setting_is_an_option_with_todays_name(capsys):
    """One declaration (ServeConfig): each field is a dashed option, e.g. --max-streams."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(ServeConfig):
        assert option_name(f.name) in out
    for flag in ("--checkpoint", "--threads", "--config", "--print_config"):
        assert flag in out


def test_infer_print_config_round_trips_through_config(capsys, tmp_path):
    flags = ["--checkpoint", "m.safetensors", "--input", "in.zarr", "--output", "out.zarr", "--time-axis", "1",
             "--overwrite", "--missing-chunks", "fill"]
    printed = _print_config(capsys, ["infer", *flags, "--print_config"])
    assert printed["overwrite"] is True and printed["time_axis"] == 1 and printed["no_progress"] is False
    path = tmp_path / "infer.yaml"
    path.write_text(yaml.safe_dump(printed))
    got = build(InferConfig, parse(infer_parser("streamssm infer"), ["--config", str(path)]))
    assert got == build(InferConfig, parse(infer_parser("streamssm infer"), flags))
    assert got.missing_chunks == "fill" and got.overwrite is True


def test_serve_settings_are_checked_once_whether_from_flags_or_file(capsys, model_file, tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(f"checkpoint: {model_file}\nmax_streams: 0\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "max_streams must be >= 1, got 0" in _one_error_line(capsys, "serve")


@pytest.mark.parametrize("argv", [
    ["serve", "--checkpoint", "m.safetensors", "--max-streams", "many"],
    ["serve", "--checkpoint", "m.safetensors", "--no-such-option", "1"],
    ["serve", "--checkpoint", "m.safetensors", "--nan-policy", "ignore"],
    ["infer", "--checkpoint", "m", "--input", "i", "--output", "o", "--integer-input", "maybe"],
    ["infer", "--checkpoint", "m"],
    ["export", "--checkpoint", "m", "--output", "o.safetensors", "--frobnicate"],
    ["stream", "x.csv", "--chunk", "big"],
    ["make-data", "everything"],
    ["info", "--jsn"],
    ["demo", "--task", "chess"],
])
def test_a_bad_option_is_one_error_line(argv, capsys):
    assert main(argv) == 2
    line = _one_error_line(capsys, argv[0])
    assert line.endswith(f"see streamssm {argv[0]} --help (--debug shows the traceback)")
    assert "usage:" not in capsys.readouterr().err


def test_fit_bad_option_is_one_error_line(capsys):
    assert main(["fit", "--config", str(ROOT / "recipes" / "dna_tiny.yaml"), "--trainer.max_steps", "x"]) == 2
    assert "trainer.max_steps" in _one_error_line(capsys, "fit")


@pytest.mark.parametrize("text, says", [("max_streams: [1, 2\n", "Problems parsing config"),
                                         ("checkpoint: m\nmax_stream: 3\n", "'max_stream' is not accepted")])
def test_bad_config_file_is_one_error_line(text, says, capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["serve", "--config", str(path)]) == 2
    assert says in _one_error_line(capsys, "serve")


def test_infer_errors_go_through_the_one_error_path(capsys, tmp_path):
    """infer used to catch StreamSSMError itself (its own line, no --debug hint, exit 2 for any error)."""
    assert main(["infer", "--checkpoint", str(tmp_path / "nope.safetensors"), "--input", str(tmp_path / "in.zarr"),
                 "--output", str(tmp_path / "out.zarr"), "--no-progress"]) == 1
    assert "nope.safetensors" in _one_error_line(capsys, "infer")


def test_parse_turns_argument_errors_into_config_errors():
    with pytest.raises(ConfigError, match="--port|port"):
        parse(serve_parser("streamssm serve"), ["--checkpoint", "m", "--port", "eighty"])


def test_event_loop_choice(monkeypatch):
    import asyncio
    import sys

    from streamssm.commands.serve import event_loop_factory

    assert event_loop_factory("asyncio") is asyncio.new_event_loop
    with pytest.raises(ConfigError, match="--event-loop must be one of"):
        event_loop_factory("trio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: import fails
    assert event_loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        event_loop_factory("uvloop")
