"""``streamssm generate``: continue a prompt with a trained model, whatever its modality.

    streamssm generate --checkpoint dna.safetensors --prompt ACGTACGT --length 200 --samples 4 --output out.fasta
    streamssm generate --checkpoint mamba.safetensors --prompt 12,845,9 --length 50 --output ids.npy
    streamssm generate --checkpoint audio.safetensors --prompt voice.wav --length 16000 --samples 2 --output cont.wav
    streamssm generate --checkpoint sensor.safetensors --prompt history.csv --length 96 --output forecast.parquet

What the prompt and the output are comes from the model's serving spec:
- DNA LM: bases -> FASTA, one record per sample;
- mu-law audio LM: a WAV/FLAC file (resampled to the model rate, mixed to mono, mu-law encoded)
  -> one WAV per sample at the model rate (the prompt as the model heard it, then the new
  samples; ``out.wav``, or ``out_0.wav``, ``out_1.wav``, ... for several) + ``out.png``;
- sensor / float-audio regression model: a CSV/Parquet history (sensor: the training columns;
  float audio: a WAV) -> a multi-step rollout feeding the model its own predictions,
  de-normalized to raw units -> CSV/Parquet (sensor) or WAV (audio) + a PNG beside it;
- any other token LM: comma-separated token ids -> the new ids as a (samples, length) int64 .npy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from streamssm.audio_io import read_audio
from streamssm.checkpoint import ServingBundle, load_for_serving
from streamssm.commands.parsing import ArgumentParser
from streamssm.encoding import decode_bases, encode_bases
from streamssm.errors import ConfigError
from streamssm.generate import SamplingConfig, continue_audio, forecast, generate
from streamssm.generate_io import (
    TABLE_SUFFIXES,
    audio_figure,
    read_history,
    rollout_figure,
    save_figure,
    write_forecast,
    write_wav,
)

AUDIO_SUFFIXES = (".wav", ".flac")


def _prompt_ids(text: str) -> torch.Tensor:
    try:
        return torch.tensor([int(t) for t in text.split(",") if t.strip()], dtype=torch.long)
    except ValueError as exc:
        raise ConfigError(f"--prompt: a non-DNA model needs comma-separated token ids, got {text!r}") from exc


def _check_output(output: str, suffixes: tuple[str, ...], what: str) -> Path:
    if not output.endswith(suffixes):
        raise ConfigError(f"--output: this {what} model writes {' or '.join(suffixes)}, got {output!r}")
    return Path(output)


def _check_free(paths: list[Path], args: argparse.Namespace) -> None:
    """Refuse to write over the prompt file, and over any existing file without ``--overwrite``
    (CLI audit: a training clip or FASTA given as --output was replaced silently)."""
    prompt = Path(args.prompt)
    for path in paths:
        if path.exists() and prompt.is_file() and path.resolve() == prompt.resolve():
            raise ConfigError(f"--output: {path} is the prompt; write the continuation to another file")
        if path.exists() and not args.overwrite:
            raise ConfigError(f"--output: {path} exists; pass --overwrite to replace it")


def _audio(bundle: ServingBundle, args: argparse.Namespace, sampling: SamplingConfig) -> str:
    out = _check_output(args.output, AUDIO_SUFFIXES, "audio")
    paths = [out] if args.samples == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(args.samples)]
    _check_free([*paths, out.with_suffix(".png")], args)
    spec = bundle.spec
    wave, rate = read_audio(args.prompt)
    prompt, new = continue_audio(bundle.model, spec, torch.from_numpy(wave), rate, args.length, args.samples,
                                 sampling, args.seed)
    prompt, new = prompt.numpy(), new.numpy()
    for path, row in zip(paths, new):
        write_wav(path, np.concatenate([prompt, row]), spec.sample_rate)
    png = save_figure(audio_figure(prompt, new, spec.sample_rate, f"{Path(args.prompt).name} continued"),
                      out.with_suffix(".png"))
    return f"wrote {len(paths)} WAV file(s) of {len(prompt)} prompt + {args.length} new samples at " \
           f"{spec.sample_rate} Hz ({', '.join(map(str, paths))}) and {png}"


def _rollout(bundle: ServingBundle, args: argparse.Namespace) -> str:
    spec = bundle.spec
    if spec.modality == "audio":  # float audio: WAV in, WAV out
        out = _check_output(args.output, AUDIO_SUFFIXES, "float audio")
        wave, rate = read_audio(args.prompt)
        if rate != spec.sample_rate:
            raise ConfigError(f"--prompt: {args.prompt} is at {rate} Hz; this float audio model reads {spec.sample_rate} Hz")
        history = wave.mean(1, keepdims=True) if spec.mono else wave
        names = tuple(f"channel {i}" for i in range(history.shape[1]))
    else:
        out = _check_output(args.output, TABLE_SUFFIXES, "sensor")
        names = spec.channel_names
        history = read_history(args.prompt, names)
    _check_free([out, out.with_suffix(".png")], args)
    pred = forecast(bundle.model, spec, torch.from_numpy(history), args.length).double().numpy()
    if spec.modality == "audio":
        write_wav(out, np.concatenate([history, pred]), spec.sample_rate)
    else:
        write_forecast(out, pred, names)
    png = save_figure(rollout_figure(history, pred, names, f"{Path(args.prompt).name}: {args.length}-step rollout",
                                     spec.sample_rate), out.with_suffix(".png"))
    return f"wrote a {args.length}-step rollout of {len(names)} channel(s) to {out} and {png}"


def _tokens(bundle: ServingBundle, args: argparse.Namespace, sampling: SamplingConfig) -> str:
    dna = bundle.spec is not None and bundle.spec.modality == "dna"
    out = _check_output(args.output, (".fasta", ".fa") if dna else (".npy",), "DNA" if dna else "token")
    _check_free([out], args)
    prompt = encode_bases(args.prompt) if dna else _prompt_ids(args.prompt)
    tokens = generate(bundle.model, prompt, args.length, args.samples, sampling, args.seed).cpu()
    if dna:
        out.write_text("".join(f">sample_{i}\n{decode_bases(row)}\n" for i, row in enumerate(tokens)))
    else:
        np.save(out, tokens.numpy())
    return f"wrote {args.samples} x {args.length} tokens to {out}"


def main(argv: list[str], prog: str = "streamssm generate") -> int:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help=".safetensors or .ckpt of a trained or imported model")
    parser.add_argument("--prompt", required=True,
                        help="DNA bases, comma-separated token ids, a WAV file (audio) or a CSV/Parquet history (sensor)")
    parser.add_argument("--length", type=int, required=True, help="new tokens / samples / forecast steps")
    parser.add_argument("--samples", type=int, default=1, help="samples drawn (token LMs) (default: 1)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature, 0 = greedy (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens, 0 = off (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample within this probability mass (nucleus), 1.0 = off (default: 1.0)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed: the same seed draws the same samples (default: none, a new draw each run)")
    parser.add_argument("--output", required=True, help=".fasta (DNA), .npy (token ids), .wav (audio), "
                                                          ".csv/.parquet (sensor); plots go beside it as .png")
    parser.add_argument("--overwrite", action="store_true", help="replace output files that exist (never the prompt)")
    args = parser.parse_args(argv)
    bundle = load_for_serving(args.checkpoint)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    spec = bundle.spec
    if bundle.config.head == "regression" and spec is not None:
        if args.samples != 1:
            raise ConfigError("--samples: a regression model's rollout is deterministic; use --samples 1")
        message = _rollout(bundle, args)
    elif spec is not None and spec.modality == "audio" and spec.encoding == "mu_law":
        message = _audio(bundle, args, sampling)
    elif bundle.config.head == "lm" and (spec is None or spec.modality == "dna"):
        message = _tokens(bundle, args, sampling)
    else:
        raise ConfigError(f"generate: a {bundle.config.head} model ({spec.modality if spec else 'no serving spec'}) "
                          "does not generate; token LMs sample, regression models roll out")
    print(message)
    return 0
