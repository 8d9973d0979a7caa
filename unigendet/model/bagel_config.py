"""Reading and writing the json files of a BAGEL model folder (no torch).

A BAGEL folder holds ``llm_config.json`` (Qwen2), ``vit_config.json`` (SigLIP, RAW layer count: BAGEL keeps
``num_hidden_layers + 1 + vit_select_layer`` layers, 27 -> 26), and the tokenizer files. UniGenDet folders (and
our exports) add ``bagel_config.json`` (latent/ViT grid sizes, connector activation, timestep shift, special
token ids, DIGA layer) and ``vae_config.json`` (the FLUX AE parameters). What a folder lacks comes from the
``bagel-7b-mot`` preset; special-token ids come from the tokenizer when it is there.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from unigendet.model.config import UniGenDetConfig, _merge
from unigendet.model.presets import PRESETS

_SPECIAL = {"bos": "<|im_start|>", "eos": "<|im_end|>", "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>"}
_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_ACT_BACK = {"gelu_tanh": "gelu_pytorch_tanh"}


def _read(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def tokenizer_special_ids(folder: Path) -> dict[str, int] | None:
    """Ids of the four special tokens from ``tokenizer.json`` (added tokens or the BPE vocab), if present."""
    tok = _read(folder / "tokenizer.json")
    if tok is None:
        return None
    table = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = (tok.get("model") or {}).get("vocab") or {}
    ids = {}
    for key, text in _SPECIAL.items():
        if text in table:
            ids[key] = table[text]
        elif isinstance(vocab, dict) and text in vocab:
            ids[key] = vocab[text]
    missing = set(_SPECIAL) - set(ids)
    if missing:
        raise ValueError(f"{folder / 'tokenizer.json'} lacks the special tokens "
                         f"{[_SPECIAL[k] for k in sorted(missing)]}; add them to the tokenizer first")
    return ids


def config_from_bagel_dir(folder: str | Path) -> UniGenDetConfig:
    """Read a BAGEL model folder's json files (llm_config, vit_config, optional bagel/vae configs, tokenizer)."""
    folder = Path(folder)
    llm = _read(folder / "llm_config.json")
    vit = _read(folder / "vit_config.json")
    if llm is None or vit is None:
        raise FileNotFoundError(f"{folder} is not a BAGEL model folder: llm_config.json and vit_config.json are "
                                "required")
    bagel = _read(folder / "bagel_config.json") or {}
    vae = _read(folder / "vae_config.json")
    overrides = bagel.get("llm_build_overrides", {})  # BAGEL always unties the embeddings
    vit_over = bagel.get("vit_build_overrides", {})
    select = vit_over.get("vit_select_layer", -2)
    d: dict[str, Any] = {
        "name": folder.name,
        "mot": {
            "dim": llm["hidden_size"], "n_layers": llm["num_hidden_layers"], "n_heads": llm["num_attention_heads"],
            "n_kv_heads": llm.get("num_key_value_heads", llm["num_attention_heads"]),
            "mlp_dim": llm["intermediate_size"], "vocab_size": llm["vocab_size"],
            "rope_theta": float(llm.get("rope_theta", 1e6)), "norm_eps": float(llm.get("rms_norm_eps", 1e-6)),
            "qk_norm": bool(overrides.get("qk_norm", True)),
            "act": _ACT.get(llm.get("hidden_act", "silu"), llm.get("hidden_act", "silu")),
            **({"head_dim": llm["head_dim"]} if llm.get("head_dim") else {}),
        },
        "vit": {
            "dim": vit["hidden_size"], "n_layers": vit["num_hidden_layers"] + 1 + select,
            "n_heads": vit["num_attention_heads"], "mlp_dim": vit["intermediate_size"],
            "patch_size": vit.get("patch_size", 14), "image_size": vit.get("image_size", 980),
            "max_patches_per_side": bagel.get("vit_max_num_patch_per_side",
                                              vit.get("image_size", 980) // vit.get("patch_size", 14)),
            "in_channels": vit.get("num_channels", 3), "norm_eps": float(vit.get("layer_norm_eps", 1e-6)),
            "act": _ACT.get(vit.get("hidden_act", "gelu_pytorch_tanh"), vit.get("hidden_act")),
            "connector_act": _ACT.get(bagel.get("connector_act", "gelu_pytorch_tanh"), bagel.get("connector_act")),
        },
        "flow": {
            "latent_patch_size": bagel.get("latent_patch_size", 2), "max_latent_size": bagel.get("max_latent_size", 64),
            "timestep_shift": float(bagel.get("timestep_shift", 1.0)),
        },
    }
    if vae is not None:
        keys = ("kind", "resolution", "in_channels", "downsample", "ch", "out_ch", "ch_mult", "num_res_blocks",
                "z_channels", "scale_factor", "shift_factor")
        d["vae"] = {"kind": "flux", **{k: vae[k] for k in keys if k in vae}}
    if "diga_layer" in bagel:
        d["head"] = {"diga_layer": bagel["diga_layer"]}
    tokens = tokenizer_special_ids(folder)
    if tokens is None and "special_token_ids" in bagel:
        s = bagel["special_token_ids"]
        tokens = {"bos": s["bos_token_id"], "eos": s["eos_token_id"], "vision_start": s["start_of_image"],
                  "vision_end": s["end_of_image"]}
    if tokens is not None:
        d["tokens"] = tokens
    elif d["mot"]["vocab_size"] < 151654:
        raise ValueError(f"{folder}: no tokenizer.json and no special_token_ids in bagel_config.json, and the "
                         "vocabulary is not Qwen2's: cannot tell the special-token ids")
    section = bagel.get("unigendet_config")
    if section:  # our exports: the full config; the standard files above still win for what they describe
        base = copy.deepcopy(section)
    else:
        base = copy.deepcopy(PRESETS["bagel-7b-mot"])
        base.setdefault("head", {})["diga_layer"] = min(8, d["mot"]["n_layers"])
    return UniGenDetConfig.from_dict(_merge(base, d))


def config_to_bagel_files(cfg: UniGenDetConfig) -> dict[str, dict[str, Any]]:
    """The json files of a BAGEL/UniGenDet folder describing ``cfg`` (inverse of ``config_from_bagel_dir``)."""
    m, v, f, t = cfg.mot, cfg.vit, cfg.flow, cfg.tokens
    llm = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": m.act,
        "hidden_size": m.dim, "intermediate_size": m.mlp_dim, "num_hidden_layers": m.n_layers, "head_dim": m.head_dim,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "vocab_size": m.vocab_size,
        "rope_theta": m.rope_theta, "rms_norm_eps": m.norm_eps, "tie_word_embeddings": False,
        "max_position_embeddings": 32768, "max_window_layers": m.n_layers, "use_sliding_window": False,
        "sliding_window": 131072, "attention_dropout": 0.0, "rope_scaling": None, "initializer_range": 0.02,
        "bos_token_id": t.bos, "eos_token_id": t.eos, "torch_dtype": "float32", "use_cache": True,
    }
    vit = {
        "model_type": "siglip_vision_model", "hidden_size": v.dim, "intermediate_size": v.mlp_dim,
        "num_hidden_layers": v.n_layers + 1, "num_attention_heads": v.n_heads, "patch_size": v.patch_size,
        "image_size": v.image_size, "num_channels": v.in_channels, "layer_norm_eps": v.norm_eps,
        "hidden_act": _ACT_BACK.get(v.act, v.act), "attention_dropout": 0.0,
    }
    bagel = {
        "visual_gen": True, "visual_und": True, "latent_patch_size": f.latent_patch_size,
        "max_latent_size": f.max_latent_size, "vit_max_num_patch_per_side": v.max_patches_per_side,
        "connector_act": _ACT_BACK.get(v.connector_act, v.connector_act), "interpolate_pos": False,
        "timestep_shift": f.timestep_shift,
        "special_token_ids": {"bos_token_id": t.bos, "eos_token_id": t.eos, "start_of_image": t.vision_start,
                              "end_of_image": t.vision_end},
        "diga_layer": cfg.head.diga_layer,
        "llm_build_overrides": {"layer_module": "Qwen2MoTDecoderLayer", "qk_norm": m.qk_norm,
                                "tie_word_embeddings": False, "freeze_und": False},
        "vit_build_overrides": {"vit_select_layer": -2, "rope": False},
        "unigendet_config": cfg.to_dict(),  # everything the standard files cannot say (sampler, head, demo AE)
    }
    a = cfg.vae
    vae = {"kind": a.kind, "resolution": a.resolution, "in_channels": a.in_channels, "downsample": a.downsample,
           "ch": a.ch, "out_ch": a.out_ch, "ch_mult": list(a.ch_mult), "num_res_blocks": a.num_res_blocks,
           "z_channels": a.z_channels, "scale_factor": a.scale_factor, "shift_factor": a.shift_factor}
    return {"llm_config.json": llm, "vit_config.json": vit, "bagel_config.json": bagel, "vae_config.json": vae}
