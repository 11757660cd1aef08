"""hf_import: transformers Mamba / Mamba-2 and mamba-ssm folders -> SSMModel with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from streamssm.errors import ConfigError, DataFormatError, ShapeError
from streamssm.hf_import import import_pretrained
from streamssm.inference import Streamer

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 37, 21


def _hf_model(kind: str):
    """kind: mamba, mamba2, or mamba2-groups (n_groups=2)."""
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2, "state_size": 8, "expand": 2}
    if kind == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**common))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            **common, num_heads=4, head_dim=8, n_groups=2 if kind == "mamba2-groups" else 1, chunk_size=8))
    with torch.no_grad():  # non-trivial norms and D so a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(params=["mamba", "mamba2", "mamba2-groups"])
def saved(request, tmp_path):
    hf = _hf_model(request.param)
    hf.save_pretrained(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    return tmp_path, tokens, ref


@torch.no_grad()
def _assert_modes_match(model, tokens: torch.Tensor, ref: torch.Tensor) -> None:
    """Full forward, 8-token chunks carrying the state, and one step at a time all give ``ref``."""
    full, _ = model(tokens)
    assert (full - ref).abs().max() <= 1e-4
    state, parts = None, []
    for chunk in tokens.split(8, dim=1):
        out, state = model(chunk, state)
        parts.append(out)
    assert (torch.cat(parts, 1) - ref).abs().max() <= 1e-4
    state, steps = model.init_state(2), []
    for t in range(LENGTH):
        out, state = model.step(tokens[:, t], state)
        steps.append(out)
    assert (torch.stack(steps, 1) - ref).abs().max() <= 1e-4


def test_full_chunked_and_step_match_transformers(saved):
    folder, tokens, ref = saved
    imported = import_pretrained(folder)
    groups = json.loads((folder / "config.json").read_text()).get("n_groups", 1)
    # B/C per group; the gated norm over all of d_inner, as transformers' Mamba2 computes it
    assert (imported.config.ngroups, imported.config.norm_groups) == (groups, 1)
    _assert_modes_match(imported.model, tokens, ref)


@torch.no_grad()
def test_imported_model_streams_like_offline(saved):
    folder, tokens, ref = saved
    streamer = Streamer(import_pretrained(folder).model, capacity=2)
    sid = streamer.open()
    outs = [streamer.feed(sid, chunk).outputs for chunk in tokens[0].split(5)]
    assert (torch.cat(outs) - ref[0].log_softmax(-1)).abs().max() <= 1e-4


@torch.no_grad()
def test_mamba_ssm_layout_with_padded_vocab(tmp_path):
    hf = _hf_model("mamba")
    weights = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    weights.pop("lm_head.weight", None)  # tie_embeddings
    torch.save(weights, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 16, "n_layer": 2, "vocab_size": 33, "pad_vocab_size_multiple": 37, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "tie_embeddings": True,
        "ssm_cfg": {"d_state": 8, "d_conv": 4, "expand": 2}}))
    imported = import_pretrained(tmp_path)
    tokens = torch.randint(0, 33, (1, LENGTH))
    assert imported.layout == "mamba-ssm" and imported.config.vocab_size == VOCAB and imported.spec is None
    assert (imported.model(tokens)[0] - hf(tokens).logits).abs().max() <= 1e-4


def test_foreign_architecture_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="model_type='gpt2'.*GPT2LMHeadModel"):
        import_pretrained(tmp_path)


def test_missing_files_refused(tmp_path):
    with pytest.raises(DataFormatError, match="no config.json"):
        import_pretrained(tmp_path)
    _hf_model("mamba").config.to_json_file(tmp_path / "config.json")
    with pytest.raises(DataFormatError, match="no model.safetensors or pytorch_model.bin"):
        import_pretrained(tmp_path)


def test_shape_mismatch_names_the_tensor(tmp_path):
    hf = _hf_model("mamba")
    weights = dict(hf.state_dict())
    weights["backbone.layers.1.mixer.x_proj.weight"] = torch.zeros(3, 32)
    torch.save(weights, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ShapeError, match=r"layers\.1\.mixer\.x_proj\.weight: expected shape \(17, 32\), got \(3, 32\)"):
        import_pretrained(tmp_path)


def _group_norm_forward(norm, groups: int):
    """mamba-ssm's gated RMSNorm (norm_before_gate=False, group_size = d / groups) in place of
    transformers' one over all channels: RMS of y * silu(z) over each group, then the weight."""
    def forward(hidden_states, gate=None):
        x = hidden_states.float() * torch.nn.functional.silu(gate.float())
        x = x.unflatten(-1, (groups, -1))
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).flatten(-2)
        return norm.weight * x.to(hidden_states.dtype)
    return forward


@torch.no_grad()
def test_mamba_ssm_mamba2_layout_normalizes_per_group(tmp_path, monkeypatch):
    """A mamba-ssm Mamba2 folder with ngroups=2 imports with its per-group gated norm
    (norm_groups=2): the logits of the same network with mamba-ssm's norm, in every mode."""
    hf = _hf_model("mamba2-groups")
    weights = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    torch.save(weights, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 16, "n_layer": 2, "vocab_size": VOCAB, "d_intermediate": 0, "rms_norm": True,
        "tie_embeddings": False,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8}}))
    tokens = torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    whole_norm = hf(tokens).logits
    for layer in hf.backbone.layers:
        monkeypatch.setattr(layer.mixer.norm, "forward", _group_norm_forward(layer.mixer.norm, 2))
    ref = hf(tokens).logits
    assert (ref - whole_norm).abs().max() > 1e-2  # the two norms differ on this model
    imported = import_pretrained(tmp_path)
    assert imported.layout == "mamba-ssm" and (imported.config.ngroups, imported.config.norm_groups) == (2, 2)
    _assert_modes_match(imported.model, tokens, ref)
    streamer = Streamer(imported.model, capacity=2)  # the service's pool step (in-place CPU steps)
    sid = streamer.open()
    outs = [streamer.feed(sid, chunk).outputs for chunk in tokens[1].split(5)]
    assert (torch.cat(outs) - ref[1].log_softmax(-1)).abs().max() <= 1e-4


def test_mamba_ssm_mamba2_refusals(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": 16, "n_layer": 2, "vocab_size": VOCAB, "ssm_cfg": {"layer": "Mamba2", "norm_before_gate": True}}))
    torch.save({"backbone.embedding.weight": torch.zeros(VOCAB, 16)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="norm_before_gate"):
        import_pretrained(tmp_path)


def test_dna_vocabulary_gets_a_dna_spec(tmp_path):
    transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=5, hidden_size=16, num_hidden_layers=1, state_size=8)).save_pretrained(tmp_path)
    spec = import_pretrained(tmp_path).spec
    assert spec is not None and spec.modality == "dna" and spec.alphabet == "ACGTN"


def test_cli_import_then_generate(saved, tmp_path, capsys):
    import numpy as np

    from streamssm.cli import main

    folder, tokens, ref = saved
    model_file = tmp_path / "m.safetensors"
    assert main(["import", str(folder), "--output", str(model_file)]) == 0
    ids = tmp_path / "ids.npy"
    prompt = ",".join(str(t) for t in tokens[0, :5].tolist())
    assert main(["generate", "--checkpoint", str(model_file), "--prompt", prompt, "--length", "3",
                 "--temperature", "0", "--samples", "2", "--output", str(ids)]) == 0
    out = np.load(ids)
    assert out.shape == (2, 3) and out[0, 0] == ref[0, 4].argmax().item()


def test_cli_generate_dna_writes_fasta(tmp_path):
    from streamssm.cli import main

    transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=5, hidden_size=16, num_hidden_layers=1, state_size=8)).save_pretrained(tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--output", str(tmp_path / "d.safetensors")]) == 0
    fasta = tmp_path / "g.fasta"
    assert main(["generate", "--checkpoint", str(tmp_path / "d.safetensors"), "--prompt", "ACGT", "--length", "7",
                 "--samples", "2", "--seed", "1", "--top-k", "3", "--output", str(fasta)]) == 0
    lines = fasta.read_text().splitlines()
    assert lines[0] == ">sample_0" and lines[2] == ">sample_1" and len(lines[1]) == 7 and set(lines[1]) <= set("ACGTN")
