"""Import pretrained Mamba / Mamba-2 language models from a local folder into :class:`SSMModel`.

Layouts read (config.json + model.safetensors or pytorch_model.bin, never the network):

* transformers ``MambaForCausalLM`` (model_type ``mamba``) and ``Mamba2ForCausalLM`` (``mamba2``);
* mamba-ssm ``MambaLMHeadModel`` (config with ``d_model``/``n_layer``/``ssm_cfg``; Mamba1 or Mamba2 mixers).

Mapping (per layer N): ``conv1d.weight`` (e, 1, w) -> ``conv_weight`` (e, w); ``conv1d.bias`` ->
``conv_bias``; every other mixer tensor keeps its name; the LM head has no bias in the source so
ours is zero; a missing ``lm_head.weight`` (tied embeddings) is the embedding. The vocabulary is
the embedding's row count (mamba-ssm pads it to ``pad_vocab_size_multiple``; the padded ids are
kept). ``residual_in_fp32``: the residual stream stays in the activation dtype here (identical in
fp32). Time-step limits and dt init values are training-only and ignored.

Mamba-2 groups (``n_groups`` > 1): B and C come per group (``ngroups``), but transformers'
Mamba2 normalizes the gated output over all of d_inner whatever ``n_groups`` (its
``MambaRMSNormGated``; only its CUDA training kernel normalizes per group, as mamba-ssm does), so
the import keeps ``norm_groups`` 1 and gives transformers' logits. mamba-ssm folders get
``norm_groups = ngroups``: their per-group norm, as trained.

Not representable (refused): biases in in_proj/out_proj (``use_bias``), a conv without bias, a
Mamba-2 ``norm_before_gate``/no-``rmsnorm`` mixer, non-RMS norms.

The name and config-field tables (:data:`TOP_LEVEL_NAMES`, :data:`MIXER_NAMES`,
:data:`HF_FIELDS`, :data:`HF_MAMBA2_FIELDS`) are the one mapping between the layouts;
:mod:`streamssm.hf_export` reads them the other way. Folders written by
``streamssm export --format hf`` also carry the serving spec (config key
:data:`SERVING_KEY`), or, for a model transformers cannot represent, are in the ``streamssm``
layout (config ``model_type: streamssm`` + our own ``model.safetensors``); both import here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamssm.checkpoint import as_spec, load_for_serving
from streamssm.encoding import DNA_VOCAB_SIZE
from streamssm.errors import ConfigError, DataFormatError, ShapeError
from streamssm.models import ModelConfig, SSMModel
from streamssm.serving import ServingSpec

#: transformers tensor name -> ours, for the tensors outside the layers (mamba-ssm: see _SSM_ALIASES)
TOP_LEVEL_NAMES = {"backbone.embeddings.weight": "encoder.weight", "lm_head.weight": "head.weight"}
#: transformers mixer tensor suffix -> ours (the other mixer and norm tensors keep their names)
MIXER_NAMES = {"mixer.conv1d.weight": "mixer.conv_weight", "mixer.conv1d.bias": "mixer.conv_bias"}
_SSM_ALIASES = {"backbone.embedding.weight": "backbone.embeddings.weight"}  # mamba-ssm -> transformers
#: (transformers config field, ModelConfig field), both Mamba and Mamba-2
HF_FIELDS = (("hidden_size", "d_model"), ("num_hidden_layers", "n_layers"), ("state_size", "d_state"),
             ("conv_kernel", "d_conv"), ("layer_norm_epsilon", "norm_eps"), ("expand", "expand"))
#: (transformers config field, ModelConfig field), Mamba-2 only
HF_MAMBA2_FIELDS = (("head_dim", "headdim"), ("n_groups", "ngroups"), ("chunk_size", "chunk_size"))
#: config.json key under which ``streamssm export --format hf`` keeps the serving spec
SERVING_KEY = "streamssm_serving"


@dataclass(frozen=True)
class ImportedModel:
    """The model, its config, where it came from (``layout``: transformers-mamba/-mamba2 or
    mamba-ssm) and its serving spec: ``dna`` when the vocabulary has our DNA size (5: A C G T N),
    else None (the model still runs on token ids through SSMModel / the Streamer)."""

    model: SSMModel
    config: ModelConfig
    layout: str
    spec: ServingSpec | None


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise DataFormatError(f"{folder}: no config.json (need config.json + model.safetensors or pytorch_model.bin)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: not JSON ({exc})") from exc


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise DataFormatError(f"{folder}: no model.safetensors or pytorch_model.bin")


def _refuse(cond: bool, what: str) -> None:
    if cond:
        raise ConfigError(f"cannot import: {what}")


def _hf_config(cfg: dict[str, Any], vocab: int) -> ModelConfig:
    """ModelConfig of a transformers Mamba / Mamba-2 config.json."""
    kind = cfg["model_type"]
    _refuse(bool(cfg.get("use_bias", False)), "use_bias=true (in_proj/out_proj biases) is not representable")
    _refuse(not cfg.get("use_conv_bias", True), "use_conv_bias=false is not representable")
    _refuse(cfg.get("hidden_act", "silu") != "silu", f"hidden_act={cfg.get('hidden_act')!r} (only silu)")
    defaults = {"layer_norm_epsilon": 1e-5, "expand": 2, "chunk_size": 256}
    common = {ours: cfg.get(hf, defaults.get(hf)) for hf, ours in HF_FIELDS if hf != "expand"}
    common["vocab_size"] = vocab
    if kind == "mamba":
        dt_rank = cfg.get("time_step_rank", "auto")
        dt_rank = math.ceil(cfg["hidden_size"] / 16) if dt_rank == "auto" else int(dt_rank)
        expand = cfg.get("intermediate_size", cfg["expand"] * cfg["hidden_size"]) / cfg["hidden_size"]
        _refuse(expand != int(expand), "intermediate_size not a multiple of hidden_size")
        return ModelConfig(block="mamba", expand=int(expand), dt_rank=dt_rank, **common)
    _refuse(not cfg.get("rms_norm", True) or cfg.get("norm_before_gate", False), "Mamba-2 norm_before_gate / no rms_norm")
    expand = cfg["expand"]
    _refuse(cfg["num_heads"] * cfg["head_dim"] != expand * cfg["hidden_size"],
            f"num_heads*head_dim={cfg['num_heads'] * cfg['head_dim']} != expand*hidden_size={expand * cfg['hidden_size']}")
    common.update({ours: cfg.get(hf, defaults.get(hf)) for hf, ours in HF_MAMBA2_FIELDS})
    return ModelConfig(block="mamba2", expand=expand, **common)


def _ssm_config(cfg: dict[str, Any], vocab: int) -> ModelConfig:
    """ModelConfig of a mamba-ssm MambaLMHeadModel config.json (Mamba1 or Mamba2 mixers, the
    defaults of mamba-ssm's modules; its Mamba2 normalizes the gate per group: norm_groups = ngroups)."""
    ssm = cfg.get("ssm_cfg") or {}
    layer = ssm.get("layer", "Mamba1")
    _refuse(layer not in ("Mamba1", "Mamba2"), f"mamba-ssm ssm_cfg.layer={layer!r} (only Mamba1, Mamba2)")
    _refuse(not cfg.get("rms_norm", True), "rms_norm=false (LayerNorm) is not representable")
    _refuse(bool(cfg.get("attn_layer_idx")), "attention layers (attn_layer_idx) are not importable")
    _refuse(bool(cfg.get("d_intermediate", 0)), "MLP layers (d_intermediate > 0) are not importable")
    _refuse(bool(ssm.get("bias", False)) or not ssm.get("conv_bias", True), "ssm_cfg bias / conv_bias not representable")
    common = {"d_model": cfg["d_model"], "n_layers": cfg["n_layer"], "d_conv": ssm.get("d_conv", 4),
              "expand": ssm.get("expand", 2), "vocab_size": vocab, "norm_eps": 1e-5}
    if layer == "Mamba2":
        _refuse(not ssm.get("rmsnorm", True) or ssm.get("norm_before_gate", False),
                "Mamba2 norm_before_gate / no rmsnorm")
        _refuse(bool(ssm.get("D_has_hdim", False)), "Mamba2 D_has_hdim (a D per channel)")
        d_ssm = ssm.get("d_ssm")
        _refuse(d_ssm is not None and d_ssm != common["expand"] * cfg["d_model"],
                f"Mamba2 d_ssm={d_ssm} (a gated MLP part)")
        ngroups = ssm.get("ngroups", 1)
        return ModelConfig(block="mamba2", d_state=ssm.get("d_state", 128), headdim=ssm.get("headdim", 64),
                           ngroups=ngroups, norm_groups=ngroups, chunk_size=ssm.get("chunk_size", 256), **common)
    dt_rank = ssm.get("dt_rank", "auto")
    return ModelConfig(block="mamba", d_state=ssm.get("d_state", 16),
                       dt_rank=math.ceil(cfg["d_model"] / 16) if dt_rank == "auto" else int(dt_rank), **common)


def _layout(cfg: dict[str, Any], folder: Path) -> str:
    if cfg.get("model_type") == "streamssm":
        return "streamssm"
    if cfg.get("model_type") in ("mamba", "mamba2"):
        return f"transformers-{cfg['model_type']}"
    if "model_type" not in cfg and "d_model" in cfg and "n_layer" in cfg:
        return "mamba-ssm"
    raise ConfigError(f"{folder}: not a Mamba / Mamba-2 language model (model_type={cfg.get('model_type')!r}, "
                      f"architectures={cfg.get('architectures')!r})")


def _rename(name: str, top: dict[str, str], mixer: dict[str, str]) -> str:
    if name in top:
        return top[name]
    for src, dst in mixer.items():
        if name.endswith(src):
            return name[: -len(src)] + dst
    return name


def our_name(name: str) -> str:
    """Our parameter name for a transformers or mamba-ssm tensor name."""
    return _rename(_SSM_ALIASES.get(name, name), TOP_LEVEL_NAMES, MIXER_NAMES)


def hf_name(name: str) -> str:
    """The transformers tensor name for one of our parameter names (inverse of :func:`our_name`)."""
    return _rename(name, {v: k for k, v in TOP_LEVEL_NAMES.items()}, {v: k for k, v in MIXER_NAMES.items()})


def convert_state_dict(weights: dict[str, torch.Tensor], model: SSMModel) -> dict[str, torch.Tensor]:
    """Source tensors -> our state dict (ShapeError listing every tensor that does not map)."""
    ours = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    problems = []
    for name, t in weights.items():
        key = our_name(name)
        if key.endswith("conv_weight") and t.dim() == 3:
            t = t[:, 0, :]
        if key not in ours:
            problems.append(f"{name}: no such parameter here (got shape {tuple(t.shape)})")
        elif ours[key].shape != t.shape:
            problems.append(f"{name}: expected shape {tuple(ours[key].shape)}, got {tuple(t.shape)}")
        else:
            out[key] = t.to(ours[key].dtype)
    out.setdefault("head.weight", out.get("encoder.weight"))  # tied embeddings
    out["head.bias"] = torch.zeros_like(ours["head.bias"])
    problems += [f"{k}: missing (expected shape {tuple(v.shape)})" for k, v in ours.items()
                 if out.get(k) is None]
    if problems:
        raise ShapeError("cannot import weights:\n  " + "\n  ".join(problems))
    return out


def import_pretrained(folder: str | Path) -> ImportedModel:
    """Load a local transformers Mamba/Mamba-2 or mamba-ssm folder into an :class:`SSMModel` (eval mode)."""
    folder = Path(folder)
    cfg = _read_config(folder)
    layout = _layout(cfg, folder)
    if layout == "streamssm":
        bundle = load_for_serving(folder / "model.safetensors")
        return ImportedModel(bundle.model, bundle.config, layout, bundle.spec)
    weights = _read_weights(folder)
    emb = weights.get("backbone.embeddings.weight", weights.get("backbone.embedding.weight"))
    if emb is None:
        raise ShapeError(f"{folder}: no embedding tensor (backbone.embeddings.weight / backbone.embedding.weight)")
    config = (_ssm_config if layout == "mamba-ssm" else _hf_config)(cfg, emb.shape[0])
    model = SSMModel(config)
    model.load_state_dict(convert_state_dict(weights, model))
    return ImportedModel(model.eval(), config, layout, _spec(cfg, config))


def _spec(cfg: dict[str, Any], config: ModelConfig) -> ServingSpec | None:
    """The serving spec a streamssm export stored in config.json, else dna for a 5-token vocabulary."""
    if cfg.get(SERVING_KEY):
        return as_spec(cfg[SERVING_KEY]).for_model(config)
    return ServingSpec(modality="dna", encoding="bases", head="lm") if config.vocab_size == DNA_VOCAB_SIZE else None
