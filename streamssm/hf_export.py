"""Export a streamssm model to a folder in the Hugging Face Hub layout (upload it as is).

The folder holds ``config.json``, ``model.safetensors`` and a model card ``README.md``.

* **transformers layout** (a Mamba / Mamba-2 token LM that transformers can represent): a
  ``MambaConfig`` / ``Mamba2Config`` ``config.json`` and the weights under transformers' names
  (the name and field tables of :mod:`streamssm.hf_import`, read the other way), so
  ``MambaForCausalLM.from_pretrained(folder)`` gives our logits. config.json also keeps the
  serving spec (key ``streamssm_serving``) so ``streamssm import`` gets it back.
* **streamssm layout** (everything else: sensor / classifier heads, mamba3, hybrids, a Mamba-2
  gated norm per group (``norm_groups`` > 1), an LM head with a bias): ``config.json`` with
  ``model_type: streamssm``, the reasons transformers cannot load it, and our own
  ``model.safetensors`` (weights + config + spec, :func:`~streamssm.checkpoint.export_safetensors`);
  ``streamssm import`` reads it.

The model card states only what the file records: the task and data from the serving spec and
the training checkpoint (datamodule arguments, epoch, step, the checkpoint callback's monitored
score), the license the user gave, and how to stream the model with streamssm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from streamssm.checkpoint import ServingBundle, export_safetensors, give_default_mode, load_for_serving
from streamssm.errors import ConfigError
from streamssm.hf_import import HF_FIELDS, HF_MAMBA2_FIELDS, SERVING_KEY, hf_name
from streamssm.models import ModelConfig, SSMModel

_ARCHITECTURES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}


@dataclass(frozen=True)
class HfExport:
    """What :func:`export_hf` wrote: the folder, its layout (``transformers`` | ``streamssm``)
    and why transformers cannot load it (empty for the transformers layout)."""

    folder: Path
    layout: str
    reasons: tuple[str, ...]


def transformers_blockers(model: SSMModel) -> list[str]:
    """Why transformers' MambaForCausalLM / Mamba2ForCausalLM cannot represent ``model`` (empty: it can)."""
    cfg = model.cfg
    why = []
    if cfg.block not in _ARCHITECTURES:
        why.append(f"block {cfg.block!r} has no transformers class (only mamba, mamba2)")
    if cfg.input_kind != "tokens" or cfg.head != "lm" or cfg.resolved_output_dim != cfg.vocab_size:
        why.append(f"not a token language model (input {cfg.input_kind}, head {cfg.head}, "
                   f"{cfg.resolved_output_dim} outputs for vocabulary {cfg.vocab_size})")
    if "attention" in cfg.layer_kinds:
        why.append("hybrid attention layers")
    if cfg.norm_groups != 1:
        why.append(f"Mamba-2 norm_groups={cfg.norm_groups} (transformers' Mamba2 normalizes the gate over all of "
                   "d_inner, whatever n_groups)")
    bias = getattr(model.head, "bias", None)
    if bias is not None and bool(bias.detach().abs().max() > 0):
        why.append("the LM head has a (non-zero) bias; transformers' lm_head has none")
    return why


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """transformers ``MambaConfig`` / ``Mamba2Config`` fields of a representable ModelConfig."""
    out: dict[str, Any] = {"model_type": cfg.block, "architectures": [_ARCHITECTURES[cfg.block]],
                           "vocab_size": cfg.vocab_size, "use_bias": False, "use_conv_bias": True,
                           "hidden_act": "silu", "residual_in_fp32": True, "tie_word_embeddings": False,
                           # our vocabularies have no special tokens (transformers' default id 0 is a base)
                           "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
                           "torch_dtype": "float32"}
    fields = cfg.to_dict()
    out.update({hf: fields[ours] for hf, ours in HF_FIELDS})
    out["state_size"] = cfg.resolved_d_state
    if cfg.block == "mamba":
        out.update(intermediate_size=cfg.d_inner, time_step_rank=cfg.resolved_dt_rank)
    else:
        out.update({hf: fields[ours] for hf, ours in HF_MAMBA2_FIELDS})
        out.update(num_heads=cfg.nheads, rms_norm=True, norm_before_gate=False)
    return out


def hf_state_dict(model: SSMModel) -> dict[str, torch.Tensor]:
    """Our weights under transformers' names (conv (e, w) -> (e, 1, w); the zero head bias dropped)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "head.bias":
            continue
        t = t.detach().to("cpu").contiguous()
        out[hf_name(name)] = t[:, None, :].contiguous() if name.endswith("mixer.conv_weight") else t.clone()
    return out


def training_facts(checkpoint: str | Path) -> dict[str, Any]:
    """What a Lightning ``.ckpt`` records about its training (empty for other files): ``epoch``,
    ``global_step``, ``data`` (the datamodule's class and arguments) and ``scores`` (the
    checkpoint callbacks' monitored metric -> best / current value)."""
    path = Path(checkpoint)
    if path.suffix != ".ckpt":
        return {}
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    facts: dict[str, Any] = {k: ckpt[k] for k in ("epoch", "global_step") if k in ckpt}
    data = ckpt.get("datamodule_hyper_parameters")
    if isinstance(data, dict):
        facts["data"] = {k: v for k, v in data.items() if k != "_instantiator"}
    scores = {}
    for cb in (ckpt.get("callbacks") or {}).values():
        if isinstance(cb, dict) and cb.get("monitor"):
            for kind in ("best_model_score", "current_score"):
                if cb.get(kind) is not None:
                    scores[f"{cb['monitor']} ({kind.replace('_', ' ')})"] = float(cb[kind])
    if scores:
        facts["scores"] = scores
    return facts


def model_card(bundle: ServingBundle, license: str, layout: str, reasons: list[str], facts: dict[str, Any],
               name: str) -> str:
    """The Hub model card (README.md with YAML front matter) from recorded facts only."""
    cfg, spec = bundle.config, bundle.spec
    modality = spec.modality if spec else "tokens"
    library = "transformers" if layout == "transformers" else "streamssm"
    tags = ["streamssm", "state-space-model", "mamba" if cfg.block == "mamba" else cfg.block, modality]
    front = [f"license: {license}", f"library_name: {library}", "tags:", *[f"- {t}" for t in tags]]
    if layout == "transformers":
        front.append("pipeline_tag: text-generation")
    params = sum(p.numel() for p in bundle.model.parameters())
    task = (spec.task if spec and spec.task else "unknown task") + f" ({cfg.head} head)"
    lines = ["---", *front, "---", "", f"# {name}", "",
             (f"A streaming state-space model ({cfg.block}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
             f"d_state {cfg.resolved_d_state}, {params:,} parameters) exported by streamssm. "
             "Its recurrent state has a constant size, so it runs over streams of any length."), "",
             "## Task", "", f"- task: {task}; modality: {modality}", *_io_lines(cfg, spec), "",
             "## Training data", "", *_data_lines(spec, facts), "",
             "## Metrics", "", *_metric_lines(facts), "",
             "## Intended use and limits", "",
             (f"Research and engineering use on {modality} data like the training data above: scoring, "
             "streaming inference and generation with streamssm. It was not evaluated beyond the metrics "
             "listed; check it on your own data before relying on it."), "",
             "## Stream it with streamssm", "", "```bash", "pip install streamssm",
             "streamssm import . --output model.safetensors      # this folder -> a streamssm model file",
             "streamssm serve --checkpoint model.safetensors     # websocket service, many streams",
             "```", "", "```python",
             "from streamssm.hf_import import import_pretrained", "from streamssm.inference import Streamer", "",
             "imported = import_pretrained('.')", "streamer = Streamer(imported.model, capacity=8)",
             "sid = streamer.open()", "result = streamer.feed(sid, chunk)  # chunk by chunk, state carried",
             "```", ""]
    if layout == "transformers":
        cls = _ARCHITECTURES[cfg.block]
        lines += ["## Load with transformers", "", "```python", f"from transformers import {cls}",
                  f"model = {cls}.from_pretrained('.')", "```", "",
                  "The vocabulary has no special tokens (bos/eos/pad are unset).", ""]
    else:
        lines += ["## Layout", "", "This folder uses streamssm's own layout; transformers cannot load it because:",
                  *[f"- {r}" for r in reasons], ""]
    lines += ["## Provenance", "", f"- model fingerprint: {bundle.fingerprint}",
              *[f"- {k} {v}" for k, v in sorted(bundle.versions.items())], ""]
    return "\n".join(lines)


def _io_lines(cfg: ModelConfig, spec) -> list[str]:
    if spec is None:
        return [f"- input: token ids 0..{cfg.vocab_size - 1}; output: next-token logits"]
    out = [f"- encoding: {spec.encoding}"]
    if spec.sample_rate:
        out.append(f"- sample rate: {spec.sample_rate} Hz")
    if spec.channel_names:
        out.append(f"- channels: {', '.join(spec.channel_names)}")
    if spec.head == "regression":
        out.append(f"- forecasts {', '.join(spec.forecast_channels) or 'all channels'}, horizon {spec.horizon}")
    if spec.classes:
        out.append(f"- classes: {', '.join(spec.classes)}")
    return out


def _data_lines(spec, facts: dict[str, Any]) -> list[str]:
    out = []
    data = facts.get("data")
    if data:
        out.append(f"- datamodule: {data.get('_class_path', 'unknown')}")
        out += [f"  - {k}: {v}" for k, v in data.items() if k != "_class_path"]
    if spec is not None:
        if spec.window:
            out.append(f"- training window: {spec.window} steps")
        if spec.mean:
            out.append(f"- normalization (training split): mean {list(spec.mean)}, std {list(spec.std)}")
        out += [f"- {k}: {v}" for k, v in spec.options]
    return out or ["Not recorded in the exported file."]


def _metric_lines(facts: dict[str, Any]) -> list[str]:
    out = [f"- {k.replace('_', ' ')}: {facts[k]}" for k in ("epoch", "global_step") if k in facts]
    out += [f"- {k}: {v:.6g}" for k, v in facts.get("scores", {}).items()]
    return out or ["No metrics are recorded in the exported file."]


#: what an export writes into its folder
HF_FILES = ("README.md", "config.json", "model.safetensors")


def export_hf(checkpoint: str | Path, folder: str | Path, license: str, overwrite: bool = False) -> HfExport:
    """Write ``folder`` (config.json, model.safetensors, README.md) from a ``.ckpt`` / ``.safetensors``.

    ``license``: the weights' license identifier for the card (e.g. ``apache-2.0``), from the
    user. Refuses a folder holding anything but an earlier export's ``HF_FILES``, and that one
    unless ``overwrite``."""
    folder = Path(folder)
    if not license or not license.strip():
        raise ConfigError("--license: give the license of these weights for the model card (e.g. apache-2.0, mit)")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output: {str(folder)!r} exists and is not a folder")
    held = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    others = [name for name in held if name not in HF_FILES]
    if others:  # --overwrite wrote into any folder: a project's README.md, a data folder
        raise ConfigError(f"--output: {str(folder)!r} holds files an export does not write ({others[:5]}); "
                          f"--overwrite replaces only an earlier export ({', '.join(HF_FILES)}): choose another folder")
    if held and not overwrite:
        raise ConfigError(f"--output: {str(folder)!r} holds an earlier export; pass --overwrite to replace it")
    bundle = load_for_serving(checkpoint, device="cpu")
    reasons = transformers_blockers(bundle.model)
    folder.mkdir(parents=True, exist_ok=True)
    if reasons:
        layout = "streamssm"
        config = {"model_type": "streamssm", "library_name": "streamssm", "transformers_incompatible": reasons,
                  "streamssm_config": bundle.config.to_dict()}
        export_safetensors(bundle.model, folder / "model.safetensors", spec=bundle.spec, versions=bundle.versions)
    else:
        layout = "transformers"
        config = hf_config(bundle.config)
        save_file(hf_state_dict(bundle.model), str(folder / "model.safetensors"), metadata={"format": "pt"})
        give_default_mode(folder / "model.safetensors")
    if bundle.spec is not None:
        config[SERVING_KEY] = bundle.spec.to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = model_card(bundle, license.strip(), layout, reasons, training_facts(checkpoint),
                      folder.resolve().name)
    (folder / "README.md").write_text(card)
    return HfExport(folder, layout, tuple(reasons))
