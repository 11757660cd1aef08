"""``streamssm import``: a local pretrained Mamba / Mamba-2 folder -> one streamssm ``.safetensors``.

    streamssm import path/to/mamba-130m --output mamba.safetensors

Reads transformers ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` folders and mamba-ssm
``MambaLMHeadModel`` folders (config.json + model.safetensors or pytorch_model.bin); never the
network. The file serves, streams and generates like an exported checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from streamssm.checkpoint import export_safetensors, model_fingerprint
from streamssm.commands.parsing import ArgumentParser
from streamssm.errors import ConfigError
from streamssm.hf_import import import_pretrained


def main(argv: list[str], prog: str = "streamssm import") -> int:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="local folder with config.json and the weights")
    parser.add_argument("--output", required=True, help="destination .safetensors file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.suffix != ".safetensors":
        raise ConfigError(f"--output: expected a path ending in .safetensors, got {args.output!r}")
    if output.exists() and not args.overwrite:
        raise ConfigError(f"--output: {args.output!r} exists; pass --overwrite to replace it")
    imported = import_pretrained(args.folder)
    export_safetensors(imported.model, output, spec=imported.spec)
    spec = imported.spec.modality if imported.spec else "none (token ids)"
    print(f"wrote {output} from {imported.layout} ({imported.config.block}, {imported.config.n_layers} layers, "
          f"vocab {imported.config.vocab_size}, serving spec {spec}; fingerprint {model_fingerprint(imported.model)})")
    return 0
