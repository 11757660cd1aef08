"""``streamssm generate``: sample continuations of a prompt from a token language model.

    streamssm generate --checkpoint dna.safetensors --prompt ACGTACGT --length 200 --samples 4 --output out.fasta
    streamssm generate --checkpoint mamba.safetensors --prompt 12,845,9 --length 50 --output ids.npy

A DNA model reads the prompt as bases and writes FASTA; any other token model reads
comma-separated token ids and writes the new ids as a (samples, length) int64 .npy file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from streamssm.checkpoint import load_for_serving
from streamssm.commands.parsing import ArgumentParser
from streamssm.encoding import decode_bases, encode_bases
from streamssm.errors import ConfigError
from streamssm.generate import SamplingConfig, generate


def _prompt_ids(text: str) -> torch.Tensor:
    try:
        return torch.tensor([int(t) for t in text.split(",") if t.strip()], dtype=torch.long)
    except ValueError as exc:
        raise ConfigError(f"--prompt: a non-DNA model needs comma-separated token ids, got {text!r}") from exc


def main(argv: list[str], prog: str = "streamssm generate") -> int:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help=".safetensors or .ckpt of a token LM")
    parser.add_argument("--prompt", required=True, help="DNA bases, or comma-separated token ids")
    parser.add_argument("--length", type=int, required=True, help="new tokens per sample")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--output", required=True, help=".fasta (DNA models) or .npy (others)")
    args = parser.parse_args(argv)
    bundle = load_for_serving(args.checkpoint)
    dna = bundle.spec is not None and bundle.spec.modality == "dna"
    want = ".npy" if not dna else (".fasta", ".fa")
    if not args.output.endswith(want):
        raise ConfigError(f"--output: this model writes {want}, got {args.output!r}")
    prompt = encode_bases(args.prompt) if dna else _prompt_ids(args.prompt)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    tokens = generate(bundle.model, prompt, args.length, args.samples, sampling, args.seed).cpu()
    out = Path(args.output)
    if dna:
        out.write_text("".join(f">sample_{i}\n{decode_bases(row)}\n" for i, row in enumerate(tokens)))
    else:
        np.save(out, tokens.numpy())
    print(f"wrote {args.samples} x {args.length} tokens to {out}")
    return 0
